"""Notification hubs: LISTEN/NOTIFY in the pooled modes, one listening server connection per (database, user)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from proxy.errors import ProxyError
from proxy.pool import Pool
from proxy.protocol import codec, sqlstate
from proxy.protocol.sqltext import quote_ident
from proxy.server import ServerConnection, ServerOwner
from proxy.session_state import ServerState

log = logging.getLogger("shardgate.notify")

APPLICATION_NAME = "shardgate-listen"  # how the hub's server connection shows in pg_stat_activity
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 5.0
_NOTIFICATION, _ERROR = b"A"[0], b"E"[0]


class Listener(Protocol):
    """A client registered on channels: told its notifications (one or several whole NotificationResponse
    messages), as the server sent them."""

    def notify(self, message: bytes) -> None: ...


class NotifyHub:
    """The clients listening to one database as one user, by channel, and the one server connection to its
    primary that LISTENs on the union of their channels (outside the pool: it never takes a client's server).

    A channel is on the server while a client listens to it or has reserved it (a LISTEN inside a
    transaction, registered at its commit); the last one gone, the hub UNLISTENs it, and with no channel left
    closes its connection. A lost connection is opened again, to the primary of that moment (after a
    failover: the promoted server), and LISTENs again; what was notified meanwhile is lost."""

    def __init__(self, name: str, primary_pool: Callable[[], Pool]) -> None:
        self.name = name  # user@database
        # the primary's pool (address and credentials), asked at each connect; ProxyError: no primary now
        self.primary_pool = primary_pool
        self.listeners: dict[str, set[Listener]] = {}
        self.reserved: dict[str, int] = {}
        self.server: ServerConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.on_server: set[str] = set()  # LISTENed, or a LISTEN on its way
        self.listening: set[str] = set()  # LISTEN answered: notifications for them arrive
        self.sent: deque[tuple[str, tuple[str, ...]]] = deque()  # commands awaiting their ReadyForQuery
        self.waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = []
        self.failed: str | None = None  # the error of the command in flight
        self.last_error = ""
        self.buffer = bytearray()  # a message cut across reads
        self.delivered = 0
        self.reconnects = 0
        self.closed = False
        self._backoff_s = RECONNECT_FIRST_S

    # ------------------------------------------------------------ what clients ask

    def reserve(self, channel: str) -> None:
        """A client's LISTEN that takes hold later (at its transaction's commit): the hub listens already, so
        that nothing notified after that commit is missed."""
        self.reserved[channel] = self.reserved.get(channel, 0) + 1
        if channel not in self.on_server:
            self._sync()

    def release(self, channel: str) -> None:
        left = self.reserved.get(channel, 0) - 1
        if left > 0:
            self.reserved[channel] = left
            return
        self.reserved.pop(channel, None)
        if channel not in self.listeners:
            self._sync()

    def add(self, listener: Listener, channel: str) -> None:
        self.listeners.setdefault(channel, set()).add(listener)
        if channel not in self.on_server:
            self._sync()

    def remove(self, listener: Listener, channel: str) -> None:
        found = self.listeners.get(channel)
        if found is None:
            return
        found.discard(listener)
        if not found:
            del self.listeners[channel]
            if channel not in self.reserved:
                self._sync()

    def is_listening(self, channels: frozenset[str]) -> bool:
        return channels <= self.listening

    async def ready(self, channels: frozenset[str], timeout_s: float) -> None:
        """Wait until the server has answered a LISTEN for each of `channels` (the caller reserved them).
        Raises ProxyError when the hub cannot connect or its LISTEN failed."""
        if channels <= self.listening:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (channels, waiter)
        self.waiters.append(entry)
        self._sync()
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise ProxyError(sqlstate.CONNECTION_FAILURE,
                             f"LISTEN: the notification connection of {self.name} is not up within {timeout_s:g} s"
                             + (f": {self.last_error}" if self.last_error else "")) from None
        finally:
            if entry in self.waiters:
                self.waiters.remove(entry)

    # ------------------------------------------------------------ the server's channels

    def _wanted(self) -> set[str]:
        return self.listeners.keys() | self.reserved.keys()

    def _sync(self) -> None:
        """Bring the server's channels to what the clients want: LISTEN the new ones, UNLISTEN the ones nobody
        wants, connect when there is something to listen to, close when there is nothing."""
        if self.closed:
            return
        wanted = self._wanted()
        server = self.server
        if server is None:
            if wanted and self.connecting is None:
                self.connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        if not wanted:
            log.info("event=listen_connection_closed hub=%s reason=no_channels", self.name)
            self._drop_server()
            server.close()
            return
        new = tuple(sorted(wanted - self.on_server))
        gone = tuple(sorted(self.on_server - wanted))
        if new:
            self._send(server, "LISTEN", new)
        if gone:
            self._send(server, "UNLISTEN", gone)

    def _send(self, server: ServerConnection, command: str, channels: tuple[str, ...]) -> None:
        if command == "LISTEN":
            self.on_server.update(channels)
        else:
            self.on_server.difference_update(channels)
            self.listening.difference_update(channels)
        self.sent.append((command, channels))
        server.outstanding += 1
        server.send(codec.query(";".join(f"{command} {quote_ident(channel)}" for channel in channels)))

    async def _connect(self) -> None:
        try:
            while not self.closed and self._wanted():
                try:
                    pool = self.primary_pool()
                    server = ServerConnection(self, pool.address, pool.user, pool.password, pool.database, pool.tls)
                    await server.connect({"application_name": APPLICATION_NAME, "client_encoding": "UTF8"},
                                         pool.settings.connect_timeout_ms / 1000)
                except ProxyError as exc:
                    self.last_error = exc.message
                    log.warning("event=listen_connect_failed hub=%s sqlstate=%s error=%r retry_s=%s", self.name,
                                exc.sqlstate, exc.message, self._backoff_s)
                    self._fail_waiters(self._wanted(), f"LISTEN: cannot open the notification connection of "
                                       f"{self.name}: {exc.message}")
                    await asyncio.sleep(self._backoff_s)
                    self._backoff_s = min(self._backoff_s * 2, RECONNECT_MAX_S)
                    continue
                self._backoff_s = RECONNECT_FIRST_S
                self.last_error = ""
                server.state = "active"
                server.sink = self
                server.out = self
                self.server = server
                log.info("event=listen_connected hub=%s server=%s:%s server_pid=%s channels=%d", self.name,
                         pool.address[0], pool.address[1], server.process_id, len(self._wanted()))
                self.connecting = None
                self._sync()
                return
        except asyncio.CancelledError:
            pass
        finally:
            if self.connecting is asyncio.current_task():
                self.connecting = None

    def _drop_server(self) -> None:
        self.server = None
        self.on_server.clear()
        self.listening.clear()
        self.sent.clear()
        self.buffer.clear()
        self.failed = None

    def _fail_waiters(self, channels: set[str], message: str) -> None:
        for wanted, waiter in list(self.waiters):
            if wanted & channels and not waiter.done():
                waiter.set_exception(ProxyError(sqlstate.CONNECTION_FAILURE, message))

    def close(self) -> None:
        """Shutdown: the connection closes, no reconnect."""
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        server = self.server
        self._drop_server()
        if server is not None:
            server.close()

    # ------------------------------------------------------------ the server's messages (its sink and writer)

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        """Whatever the server sent, cut into messages: notifications go to their channel's listeners."""
        buffer = self.buffer
        if buffer:
            buffer += data
            chunk: bytes | bytearray | memoryview = buffer
        else:
            chunk = data
        size = len(chunk)
        pos = 0
        # a burst of notifications arrives in few reads: each listener gets its share of a read in one write
        batch: dict[Listener, list[bytes]] = {}
        while size - pos >= 5:
            type_code, length = codec.unpack_header(chunk, pos)
            end = pos + 1 + length
            if end > size:
                break
            if type_code == _NOTIFICATION:
                self._collect(bytes(chunk[pos:end]), batch)
            elif type_code == _ERROR:
                self.failed = codec.parse_error_fields(bytes(chunk[pos + 5 : end])).get("M", "error")
            pos = end
        if chunk is buffer:
            del buffer[:pos]
        elif pos < size:
            buffer += chunk[pos:]
        for listener, messages in batch.items():
            listener.notify(messages[0] if len(messages) == 1 else b"".join(messages))

    def _collect(self, message: bytes, batch: dict[Listener, list[bytes]]) -> None:
        # NotificationResponse: type, length, the notifying backend's pid, channel, payload
        channel = message[9 : message.index(b"\x00", 9)].decode("utf-8", "replace")
        listeners = self.listeners.get(channel)
        if not listeners:
            return  # a channel nobody listens to any more (its UNLISTEN is on its way)
        for listener in listeners:
            found = batch.get(listener)
            if found is None:
                batch[listener] = [message]
            else:
                found.append(message)
        self.delivered += len(listeners)

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        if server is not self.server or not self.sent:
            return
        command, channels = self.sent.popleft()
        failed, self.failed = self.failed, None
        if command != "LISTEN":
            return
        if failed is not None:
            log.warning("event=listen_failed hub=%s channels=%d error=%r", self.name, len(channels), failed)
            self.on_server.difference_update(channels)
            self._fail_waiters(set(channels), f"LISTEN failed on the notification connection: {failed}")
            return
        self.listening.update(c for c in channels if c in self.on_server)
        for wanted, waiter in list(self.waiters):
            if wanted <= self.listening and not waiter.done():
                waiter.set_result(None)

    def on_server_lost(self, server: ServerConnection) -> None:
        if server is not self.server:
            return
        self._drop_server()
        if self.closed or not self._wanted():
            return
        self.reconnects += 1
        log.warning("event=listen_connection_lost hub=%s channels=%d", self.name, len(self._wanted()))
        self._sync()

    def pause_reading(self) -> None:
        """The server connection's buffer toward PostgreSQL is full: nothing to slow down here."""

    def resume_reading(self) -> None:
        pass

    # what a ServerConnection asks of its pool: the hub's connection is nobody else's

    def checkin(self, server: ServerConnection, *, reset: bool = False) -> None:
        server.close()

    def park(self, server: ServerConnection, owner: ServerOwner) -> bool:
        return False

    def unpark(self, server: ServerConnection) -> bool:
        return False

    async def restore(self, server: ServerConnection, wanted: ServerState, then: str = "") -> None:
        return None

    # ------------------------------------------------------------ views

    def stats(self) -> dict[str, int]:
        clients: set[int] = set()
        for listeners in self.listeners.values():
            clients.update(id(listener) for listener in listeners)
        return {"clients": len(clients), "channels": len(self.listeners), "delivered": self.delivered,
                "connected": int(self.server is not None), "reconnects": self.reconnects}


class NotifyHubs:
    """Every hub of the runtime, by user and database."""

    def __init__(self) -> None:
        self.hubs: dict[str, NotifyHub] = {}

    def hub_for(self, user: str, database: str, primary_pool: Callable[[], Pool]) -> NotifyHub:
        name = f"{user}@{database}"
        hub = self.hubs.get(name)
        if hub is None:
            hub = self.hubs[name] = NotifyHub(name, primary_pool)
        return hub

    def close(self) -> None:
        for hub in self.hubs.values():
            hub.close()

    def listening_clients(self) -> int:
        clients: set[int] = set()
        for hub in self.hubs.values():
            for listeners in hub.listeners.values():
                clients.update(id(listener) for listener in listeners)
        return len(clients)
