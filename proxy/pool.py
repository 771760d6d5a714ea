"""Server connections for one (server, user): idle, active and waiting; the only place that moves them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.errors import PoolError, ProxyError, ServerError
from proxy.protocol import sqlstate
from proxy.server import ServerConnection

log = logging.getLogger("shardgate.pool")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    size: int
    min_size: int
    checkout_timeout_ms: int
    idle_timeout_s: float
    server_lifetime_s: float
    healthcheck_idle_ms: int
    connect_timeout_ms: int
    reset_query: str


class Pool:
    """One server address, one backend user. Servers are `idle` (deque), `active` (set) or being created."""

    def __init__(self, name: str, address: tuple[str, int], database: str, user: str, password: str,
                 settings: PoolSettings) -> None:
        self.name = name
        self.address = address
        self.database = database
        self.user = user
        self.password = password
        self.settings = settings
        self.idle: deque[ServerConnection] = deque()
        self.active: set[ServerConnection] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future[ServerConnection | None]] = deque()
        self.base_params: dict[str, str] = {}
        self.closed = False
        self.checkouts = 0
        self.wait_time_total_s = 0.0
        self.servers_created = 0
        self.servers_failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # ------------------------------------------------------------ checkout

    def try_checkout(self) -> ServerConnection | None:
        """An idle, recently used server without waiting, or None (the caller then awaits `checkout`)."""
        idle = self.idle
        if not idle or self.waiters:
            return None
        server = idle.pop()
        if server.broken or (time.monotonic() - server.last_used) * 1000 > self.settings.healthcheck_idle_ms:
            idle.append(server)
            return None
        server.state = "active"
        self.active.add(server)
        self.checkouts += 1
        return server

    async def checkout(self) -> ServerConnection:
        started = time.monotonic()
        timeout_ms = self.settings.checkout_timeout_ms
        deadline = started + timeout_ms / 1000 if timeout_ms > 0 else float("inf")
        while True:
            if self.closed:
                raise PoolError(sqlstate.CANNOT_CONNECT_NOW, f"pool {self.name} is shutting down")
            server = await self._take_idle()
            if server is None and self.total < self.settings.size:
                server = await self._create()
            if server is not None:
                self.active.add(server)
                server.state = "active"
                self.checkouts += 1
                self.wait_time_total_s += time.monotonic() - started
                return server
            remaining: float | None = deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._timeout_error()
            if remaining == float("inf"):
                remaining = None
            waiter: asyncio.Future[ServerConnection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                handed = await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise self._timeout_error()
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if handed is not None:
                if handed.broken:
                    continue
                self.checkouts += 1
                self.wait_time_total_s += time.monotonic() - started
                return handed

    def _timeout_error(self) -> PoolError:
        return PoolError(sqlstate.TOO_MANY_CONNECTIONS,
                         f"no server connection available in pool {self.name} within "
                         f"{self.settings.checkout_timeout_ms} ms (pool size {self.settings.size})",
                         fatal=False)

    async def _take_idle(self) -> ServerConnection | None:
        while self.idle:
            server = self.idle.pop()
            if server.broken:
                continue
            if (time.monotonic() - server.last_used) * 1000 > self.settings.healthcheck_idle_ms:
                server.state = "testing"
                self.connecting += 1
                try:
                    failed = await server.execute_internal(";", self.settings.connect_timeout_ms / 1000)
                except (TimeoutError, ProxyError):
                    failed = b"timeout"
                finally:
                    self.connecting -= 1
                if failed is not None or server.broken or server.txn_status != b"I":
                    log.info("event=server_healthcheck_failed pool=%s", self.name)
                    server.close()
                    continue
            return server
        return None

    async def _create(self) -> ServerConnection:
        self.connecting += 1
        server = ServerConnection(self, self.address, self.user, self.password, self.database)
        try:
            await server.connect({}, self.settings.connect_timeout_ms / 1000)
        except ServerError:
            self.servers_failed += 1
            raise
        finally:
            self.connecting -= 1
        self.servers_created += 1
        if not self.base_params:
            self.base_params = dict(server.params)
        server.last_used = time.monotonic()
        return server

    # ------------------------------------------------------------ checkin

    def checkin(self, server: ServerConnection, *, reset: bool = False) -> None:
        """A client is done with `server`: clean it if needed and hand it to a waiter or the idle list."""
        self.active.discard(server)
        server.client = None
        now = time.monotonic()
        if server.broken or self.closed or not server.idle_clean or self._expired(server, now):
            server.close()
            self._wake_one(None)
            return
        if reset or server.txn_status != b"I":
            sql = self.settings.reset_query if reset else "ROLLBACK"
            if server.txn_status != b"I" and reset:
                sql = "ROLLBACK; " + sql
            if sql:
                self._spawn(self._clean(server, sql, reset))
                return
        server.last_used = now
        if self.waiters:
            self._release(server)
        else:
            server.state = "idle"
            self.idle.append(server)

    async def _clean(self, server: ServerConnection, sql: str, reset: bool) -> None:
        server.state = "testing"
        self.active.add(server)
        try:
            failed = await server.execute_internal(sql, self.settings.connect_timeout_ms / 1000)
        except (TimeoutError, ProxyError):
            failed = b"timeout"
        self.active.discard(server)
        if failed is not None or server.txn_status != b"I":
            server.close()
            self._wake_one(None)
            return
        if reset:
            server.reset_tracking()
        self._release(server)

    def _release(self, server: ServerConnection) -> None:
        server.last_used = time.monotonic()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                server.state = "active"
                self.active.add(server)
                waiter.set_result(server)
                return
        server.state = "idle"
        self.idle.append(server)

    def _wake_one(self, value: ServerConnection | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(value)
                return

    def _expired(self, server: ServerConnection, now: float) -> bool:
        return 0 < self.settings.server_lifetime_s < now - server.created_at

    def on_server_lost(self, server: ServerConnection) -> None:
        was_known = server in self.active
        self.active.discard(server)
        try:
            self.idle.remove(server)
            was_known = True
        except ValueError:
            pass
        if was_known:
            self._wake_one(None)

    # ------------------------------------------------------------ maintenance (janitor)

    def maintain(self) -> None:
        """Close idle servers past their idle timeout or lifetime; open servers up to the minimum."""
        now = time.monotonic()
        keep: deque[ServerConnection] = deque()
        surplus = len(self.idle) + len(self.active) - self.settings.min_size
        for server in self.idle:
            expired = self._expired(server, now)
            idle_too_long = 0 < self.settings.idle_timeout_s < now - server.last_used
            if server.broken or ((expired or idle_too_long) and surplus > 0):
                server.close()
                surplus -= 1
            else:
                keep.append(server)
        self.idle = keep
        missing = self.settings.min_size - self.total
        for _ in range(max(0, missing)):
            self._spawn(self._add_idle())

    async def _add_idle(self) -> None:
        try:
            server = await self._create()
        except ProxyError as exc:
            log.warning("event=server_connect_failed pool=%s sqlstate=%s error=%r", self.name, exc.sqlstate, exc.message)
            return
        self._release(server)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self.closed = True
        for server in list(self.idle) + list(self.active):
            server.close()
        self.idle.clear()
        self._wake_one(None)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stats(self) -> dict[str, float]:
        return {
            "idle": len(self.idle),
            "active": len(self.active),
            "connecting": self.connecting,
            "waiting": len(self.waiters),
            "checkouts": self.checkouts,
            "servers_created": self.servers_created,
            "servers_failed": self.servers_failed,
            "wait_time_total_s": self.wait_time_total_s,
        }
