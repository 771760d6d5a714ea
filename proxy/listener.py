"""The client listener: a SO_REUSEPORT socket (workers and a restarting instance share the port) that
closes without resetting the connections already queued on it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("shardgate")

BACKLOG = 2048


def reuseport_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR and SO_REUSEPORT: other processes of the same user bind the
    same port and the kernel spreads new connections among them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """An asyncio server over a reuseport socket. Closing a listening socket resets the connections in its
    accept queue (the kernel does not move them to the other sockets of the port), so `close` keeps a
    duplicate of the socket, stops the server, accepts what is queued and hands it to the protocol, and only
    then closes: a rolling restart loses no connection the kernel gave to the old instance."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        self.server: asyncio.base_events.Server | None = None
        self._spare: socket.socket | None = None  # same listening socket, kept open through close()
        self._adopting: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        sock = reuseport_socket(host, port)
        self._spare = sock.dup()
        self._spare.setblocking(False)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.factory, sock=sock, backlog=BACKLOG)

    def close(self) -> int:
        """Stop listening; returns how many queued connections were taken over on the way."""
        if self.server is not None:
            self.server.close()
            self.server = None
        spare, self._spare = self._spare, None
        if spare is None:
            return 0
        taken = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, _ = spare.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("event=listener_drain_error error=%r", str(exc))
                    break
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                task = loop.create_task(self._adopt(conn))
                self._adopting.add(task)
                task.add_done_callback(self._adopting.discard)
                taken += 1
        finally:
            spare.close()  # the socket leaves the port's group here: nothing more is queued on it
        return taken

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()
