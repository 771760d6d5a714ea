"""Server connections for one (server, user): idle, active and waiting; the only place that moves them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from auth.scram import ScramKeys
from proxy.errors import PoolError, ProxyError, ServerError
from proxy.metrics import Traffic
from proxy.protocol import codec, sqlstate
from proxy.server import ServerConnection, ServerOwner
from proxy.session_state import Effect, ServerState, server_state_after, sync_sql
from proxy.tls import TlsContexts

log = logging.getLogger("shardgate.pool")

PARK_LIMIT_S = 1.0
_monotonic = time.monotonic


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
    connects_in_flight: int = 0  # at most this many server logins at once (0 = no limit)
    send_buffer_bytes: int = 0  # each server socket's send buffer (client_to_server_buffer_bytes); 0 = kernel's


class Pool:
    """One server address, one backend user. Servers are `idle` (deque), `active` (set) or being created.

    A server whose client finished a transaction while nobody waited stays linked to that client,
    `parked` (a subset of `active`): the client's next transaction reuses it with no check-out. Parked
    servers count as idle: a checkout that finds no idle server and no room for a new one takes a parked
    one from its client, and the janitor returns any parked for longer than PARK_LIMIT_S to the idle list.
    """

    def __init__(self, name: str, address: tuple[str, int], database: str, user: str, password: str | ScramKeys,
                 settings: PoolSettings, tls: TlsContexts | None = None, traffic: Traffic | None = None) -> None:
        self.name = name
        self.traffic = traffic if traffic is not None else Traffic()  # the runtime's, shared by its pools
        self.tls = tls  # read at each server connect: a reload's new certificates go to new servers
        self.address = address
        self.database = database
        self.user = user
        self.password = password
        self.settings = settings
        self.idle: deque[ServerConnection] = deque()
        self.active: set[ServerConnection] = set()
        # parked server -> its client; insertion-ordered, so the longest parked is taken first
        self.parked: dict[ServerConnection, ServerOwner] = {}
        self.connecting = 0
        self.waiters: deque[asyncio.Future[ServerConnection | None]] = deque()
        self.base_params: dict[str, str] = {}
        self.closed = False
        self.checkouts = 0
        self.wait_time_total_s = 0.0
        self.servers_created = 0
        self.servers_failed = 0
        self.untested_reuse_s = settings.healthcheck_idle_ms / 1000
        # set by a reload that dropped this pool's server: its servers close once idle; None while in the
        # config, else why new checkouts are refused ("" when its holders may still check out: it moved)
        self.retired: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.paused = False  # admin PAUSE: no checkout, no parking until resume
        self._resumed: asyncio.Event | None = None
        self.logins_in_flight = 0  # server logins under way (max_server_connects_in_flight bounds them)
        self.logins_peak = 0
        self._login_turns: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> int:
        """Servers lent to a client for a transaction (parked ones are not)."""
        return len(self.active) - len(self.parked)

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # ------------------------------------------------------------ checkout

    def try_checkout(self) -> ServerConnection | None:
        """An idle, recently used server without waiting (or, in a full pool, a parked one), or None (the
        caller then awaits `checkout`)."""
        if self.waiters or self.paused:
            return None
        idle = self.idle
        if idle:
            server = idle.pop()
            if server.broken or self._due_for_test(server, time.monotonic()):
                idle.append(server)
                return None
            server.state = "active"
            self.active.add(server)
        elif self.parked and self.total >= self.settings.size:
            server = self._take_parked()
            now = time.monotonic()
            if not server.idle_clean or self._expired(server, now) or self._due_for_test(server, now):
                self.checkin(server)  # closed, or to the idle list where `checkout` tests it
                return None
        else:
            return None
        self.checkouts += 1
        return server

    async def checkout(self) -> ServerConnection:
        started = time.monotonic()
        timeout_ms = self.settings.checkout_timeout_ms
        deadline = started + timeout_ms / 1000 if timeout_ms > 0 else float("inf")
        while True:
            if self.closed:
                raise PoolError(sqlstate.CANNOT_CONNECT_NOW, f"pool {self.name} is shutting down")
            if self.retired:
                raise PoolError(sqlstate.INVALID_CATALOG_NAME, self.retired, fatal=False)
            if self.paused:  # the wait for RESUME does not count against checkout_timeout_ms
                await self._wait_resumed()
                deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms > 0 else float("inf")
                continue
            # idle first, then a new server while the pool has room, then one parked with another client
            server = await self._take_idle(False)
            if server is None and self.total < self.settings.size:
                server = await self._create()
            if server is None:
                server = await self._take_idle(True)
            if server is not None:
                self.active.add(server)
                server.state = "active"
                self.checkouts += 1
                waited_s = time.monotonic() - started
                self.wait_time_total_s += waited_s
                self.traffic.checkout_wait.observe(waited_s)
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
                waited_s = time.monotonic() - started
                self.wait_time_total_s += waited_s
                self.traffic.checkout_wait.observe(waited_s)
                return handed

    def _timeout_error(self) -> PoolError:
        return PoolError(sqlstate.TOO_MANY_CONNECTIONS,
                         f"no server connection available in pool {self.name} within "
                         f"{self.settings.checkout_timeout_ms} ms (pool size {self.settings.size})",
                         fatal=False)

    async def _take_idle(self, or_parked: bool) -> ServerConnection | None:
        while self.idle or (or_parked and self.parked):
            if self.idle:
                server = self.idle.pop()
            else:
                server = self._take_parked()
                self.active.discard(server)  # the caller adds it back
            if server.broken or not server.idle_clean or self._expired(server, time.monotonic()):
                server.close()
                continue
            if self._due_for_test(server, time.monotonic()):
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
        server = ServerConnection(self, self.address, self.user, self.password, self.database, self.tls,
                                  self.settings.send_buffer_bytes)
        try:
            await self._login_turn()
            try:
                await server.connect({}, self.settings.connect_timeout_ms / 1000)
            finally:
                self._login_done()
        except ServerError:
            self.servers_failed += 1
            raise
        finally:
            self.connecting -= 1
        self.servers_created += 1
        if self.settings.server_lifetime_s > 0:
            server.retire_at = server.created_at + self.settings.server_lifetime_s
        if self.retired is not None:
            server.retire_at = 0.0  # lent to a client that still holds this pool, then closed
        if not self.base_params:
            self.base_params = dict(server.params)
        server.last_used = time.monotonic()
        return server

    async def _login_turn(self) -> None:
        """Wait while max_server_connects_in_flight logins are under way (a reconnect storm opens servers a
        few at a time instead of all at once); the wait counts as connecting, so the pool does not overfill."""
        limit = self.settings.connects_in_flight
        if limit > 0 and self.logins_in_flight >= limit:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._login_turns.append(turn)
            try:
                await turn  # handed the slot of a finished login (see _login_done)
            except BaseException:
                if not turn.cancelled() and turn.done():
                    self._login_done()  # given the slot, but gone: pass it on
                elif turn in self._login_turns:
                    self._login_turns.remove(turn)
                raise
        else:
            self.logins_in_flight += 1
        self.logins_peak = max(self.logins_peak, self.logins_in_flight)

    def _login_done(self) -> None:
        while self._login_turns:
            turn = self._login_turns.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot goes to the next waiter: logins_in_flight stays
                return
        self.logins_in_flight -= 1

    # ------------------------------------------------------------ parking

    def park(self, server: ServerConnection, owner: ServerOwner) -> bool:
        """The linked client finished a transaction (its server is idle): True when the server may stay
        with it, False when the client must check it in (somebody waits, or the pool is closing). A
        parked server relays nothing: like an idle one, it has no sink until unparked."""
        if self.waiters or self.closed or self.paused:
            return False
        server.last_used = _monotonic()
        self.parked[server] = owner
        server.sink = None
        return True

    def unpark(self, server: ServerConnection) -> bool:
        """The parked server's client starts a transaction: True when it may use the server as it is;
        False when the server is due for a health check or past its lifetime (it is checked in instead)."""
        server.sink = self.parked.pop(server)
        now = _monotonic()
        # _due_for_test and _expired, inlined: this runs once per transaction
        if now - server.last_used > self.untested_reuse_s or now > server.retire_at:
            self.checkin(server)  # closed if too old; else tested on its way out of the idle list
            return False
        self.checkouts += 1
        return True

    def _take_parked(self) -> ServerConnection:
        """Take the longest-parked server from its client (it stays active, for the caller)."""
        server = next(iter(self.parked))
        self._unlink_parked(server)
        return server

    def _unlink_parked(self, server: ServerConnection) -> None:
        self.parked.pop(server).on_server_taken(server)

    def release_parked(self, older_than_s: float) -> None:
        """Janitor: servers parked for longer than `older_than_s` go back to the idle list."""
        cutoff = time.monotonic() - older_than_s
        for server in [s for s in self.parked if s.last_used < cutoff]:
            self._unlink_parked(server)
            self.checkin(server)

    # ------------------------------------------------------------ server session state (only here)

    async def restore(self, server: ServerConnection, wanted: ServerState, then: str = "") -> None:
        """Make `server`'s session state `wanted` (plus `then`, a held-back BEGIN) in one round trip whose
        answers nobody sees. Raises ServerLostError if the server dies meanwhile, ProxyError (fatal) if
        the state cannot be set on it (it is then unusable)."""
        current = server.session_state
        if current == wanted and not then:
            server.session_state = wanted  # the same object: compared by identity next time
            return
        sql = ";".join(part for part in (sync_sql(wanted, current), then) if part)
        failed = await server.execute_internal(sql, None)
        if failed is not None:
            fields = codec.parse_error_fields(failed[5:])
            server.broken = True
            raise ProxyError(fields.get("C", sqlstate.INTERNAL_ERROR),
                             fields.get("M", "could not restore session state"), fatal=True)
        server.session_state = wanted
        server.relayed = False

    @staticmethod
    def adopt(server: ServerConnection, wanted: ServerState) -> None:
        """`server` already has a state equal to `wanted`: keep `wanted` itself, so the next comparison is
        by identity."""
        server.session_state = wanted

    @staticmethod
    def settle(server: ServerConnection, effects: list[Effect]) -> None:
        """A transaction that changed session state committed on `server`: record what it has now."""
        server.session_state = server_state_after(server.session_state, effects)

    @staticmethod
    def mark_prepared(server: ServerConnection, global_name: str) -> None:
        """A Parse of `global_name` is on its way to `server`: later Binds need not prepare it again (an
        error in its batch takes it back, see ServerConnection._batch_failed)."""
        server.prepared.add(global_name)
        server.stale.discard(global_name)

    @staticmethod
    def mark_deallocated(server: ServerConnection) -> None:
        """A DEALLOCATE ALL or DISCARD ALL is on its way to `server` (it takes effect at once, whatever
        becomes of its transaction): what the server had is prepared afresh at its next use, a Close first
        in case the statement failed and left them there."""
        server.stale |= server.prepared
        server.prepared.clear()

    @staticmethod
    def take_failed_parses(server: ServerConnection) -> list[str]:
        """The global names of the client's Parses that failed on `server` since the last call."""
        failed, server.failed_parses = server.failed_parses, []
        return failed

    # ------------------------------------------------------------ checkin

    def checkin(self, server: ServerConnection, *, reset: bool = False) -> None:
        """A client is done with `server`: clean it if needed and hand it to a waiter or the idle list."""
        self.active.discard(server)
        if self.parked:
            self.parked.pop(server, None)
        server.sink = server.out = None
        server.failed_parses.clear()
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
        if failed is not None or server.txn_status != b"I" or self._expired(server, time.monotonic()):
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

    def _due_for_test(self, server: ServerConnection, now: float) -> bool:
        """Idle for longer than healthcheck_idle_ms: tested before it is lent."""
        return now - server.last_used > self.untested_reuse_s

    def _expired(self, server: ServerConnection, now: float) -> bool:
        return now > server.retire_at

    def on_server_lost(self, server: ServerConnection) -> None:
        was_known = server in self.active
        self.active.discard(server)
        if server in self.parked:
            self._unlink_parked(server)
        try:
            self.idle.remove(server)
            was_known = True
        except ValueError:
            pass
        if was_known:
            self._wake_one(None)

    # ------------------------------------------------------------ admin console: pause, reconnect

    def pause(self) -> None:
        """New transactions wait: no checkout and no parking until `resume`; running transactions go on.
        Servers parked with clients go back to the idle list, so their clients' next transaction asks for
        one; clients already waiting for a server now wait for the resume instead (never failed by it)."""
        if self.paused:
            return
        self.paused = True
        self._resumed = asyncio.Event()
        for server in list(self.parked):
            self._unlink_parked(server)
            self.checkin(server)
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_result(None)

    def resume(self) -> None:
        self.paused = False
        event, self._resumed = self._resumed, None
        if event is not None:
            event.set()

    async def _wait_resumed(self) -> None:
        event = self._resumed
        if event is not None:
            await event.wait()

    def reconnect(self) -> None:
        """Every server is closed once idle (the idle ones at once), so that new ones are opened."""
        idle, self.idle = self.idle, deque()
        for server in idle:
            server.close()
        for server in self.active:  # lent or parked: closed at its next checkin or unpark
            server.retire_at = 0.0
        if idle:
            self._wake_one(None)

    # ------------------------------------------------------------ maintenance (janitor)

    def maintain(self) -> None:
        """Close idle servers past their idle timeout or lifetime; open servers up to the minimum."""
        self.release_parked(PARK_LIMIT_S)
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

    # ------------------------------------------------------------ reload

    def reconfigure(self, settings: PoolSettings, user: str, password: str | ScramKeys) -> None:
        """A reload: new settings for new checkouts. A smaller pool closes its surplus idle servers now and
        its surplus busy ones when they come back; a bigger one lets its waiters open servers. A new
        backend role closes every server once idle (they are logged in as the old one); a new password
        only applies to new logins."""
        old, self.settings = self.settings, settings
        self.untested_reuse_s = settings.healthcheck_idle_ms / 1000
        self.password = password
        if user != self.user:
            self.user = user
            self.base_params = {}
            self.drain()
        surplus = self.total - settings.size
        while surplus > 0 and self.parked:
            server = self._take_parked()
            self.active.discard(server)
            server.close()
            surplus -= 1
        while surplus > 0 and self.idle:
            self.idle.popleft().close()  # the least recently used first
            surplus -= 1
        for server in self.active:
            if surplus <= 0:
                break
            if server.retire_at > 0.0:
                server.retire_at = 0.0  # closed at checkin (see `_expired`)
                surplus -= 1
        for _ in range(min(max(settings.size - old.size, 0), len(self.waiters))):
            self._wake_one(None)  # the waiter loops and opens a server in the new room

    def drain(self) -> None:
        """Close every server once idle: idle and parked ones now, busy ones when their transaction ends."""
        for server in list(self.parked):
            self._unlink_parked(server)
            self.active.discard(server)
            server.close()
        for server in self.idle:
            server.close()
        self.idle.clear()
        for server in self.active:
            server.retire_at = 0.0

    def retire(self, refusal: str = "") -> None:
        """The config no longer has this pool's server: drain it. With `refusal`, later checkouts fail with
        it (the database is gone); without, a client that still holds this pool may check out (it moves to
        the new pool at its next transaction), each server closed when given back."""
        self.retired = refusal
        self.drain()
        if refusal:
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self.closed = True
        for server in list(self.parked):
            self._unlink_parked(server)
        for server in list(self.idle) + list(self.active):
            server.close()
        self.idle.clear()
        self._wake_one(None)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stats(self) -> dict[str, float]:
        return {
            "idle": len(self.idle) + len(self.parked),
            "active": self.busy,
            "connecting": self.connecting,
            "waiting": len(self.waiters),
            "checkouts": self.checkouts,
            "servers_created": self.servers_created,
            "servers_failed": self.servers_failed,
            "wait_time_total_s": self.wait_time_total_s,
        }
