"""The client listener: a SO_REUSEPORT socket (workers and a restarting instance share the port) that
closes without resetting the connections already queued on it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("shardgate")

BACKLOG = 2048


def reuseport_sockets(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets with SO_REUSEADDR and SO_REUSEPORT, one per address `host` resolves to (as
    asyncio's create_server binds them): other processes of the same user bind the same port and the kernel
    spreads new connections among them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((info[0], info[4][:2]) for info in infos))
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """An asyncio server over a reuseport socket. Closing a listening socket resets the connections in its
    accept queue (the kernel does not move them to the other sockets of the port), so `close` keeps a
    duplicate of the socket, stops the server, accepts what is queued and hands it to the protocol, and only
    then closes: a rolling restart loses no connection the kernel gave to the old instance."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        self.servers: list[asyncio.base_events.Server] = []
        self._spares: list[socket.socket] = []  # the same listening sockets, kept open through close()
        self._adopting: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for sock in reuseport_sockets(host, port):
            spare = sock.dup()
            spare.setblocking(False)
            self._spares.append(spare)
            self.servers.append(await loop.create_server(self.factory, sock=sock, backlog=BACKLOG))

    def close(self) -> int:
        """Stop listening; returns how many queued connections were taken over on the way."""
        for server in self.servers:
            server.close()
        self.servers = []
        spares, self._spares = self._spares, []
        return sum(self._take_queued(spare) for spare in spares)

    def _take_queued(self, spare: socket.socket) -> int:
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
