"""Cluster: the servers of one database shard, their roles, health, bans and replica lag; picks a server per route."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from config.model import WILDCARD_DATABASE, Config, DatabaseConfig, GeneralConfig
from proxy.errors import ProxyError
from proxy.protocol import sqlstate
from proxy.server import ServerConnection, ServerPool
from proxy.tls import TlsContexts

log = logging.getLogger("shardgate.cluster")

PRIMARY = "primary"
REPLICA = "replica"
UNKNOWN = "unknown"

# One round trip tells role, WAL position and time lag. CASE keeps pg_current_wal_insert_lsn() (an error in
# recovery) off replicas; the time lag is 0 when everything received is replayed, so an idle primary
# does not make its replicas look late.
PROBE_SQL = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, "
    "CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000 END"
)
MONITOR_APPLICATION_NAME = "shardgate-monitor"
# A lost monitor connection, or a write refused for want of a primary, triggers an early probe, but never
# more often than this.
MIN_PROBE_GAP_S = 0.2
# While no primary is reachable the servers are probed at least this often, so that writes resume soon after
# the primary comes back (a restart) or a replica is promoted.
NO_PRIMARY_PROBE_INTERVAL_S = 1.0
# While writes wait for a primary (primary_wait_timeout_ms) the servers are probed this often, so a promoted
# replica or a restarted primary takes the waiting writes within a fraction of a second.
WAITING_PROBE_INTERVAL_S = 0.25
# Refusals a write may wait out: no primary reachable, a primary that cannot be reached or does not take
# logins yet (restarting: 57P03), or split brain (it ends when one of the two is demoted or fenced).
WAITABLE_SQLSTATES = frozenset({sqlstate.CONNECTION_FAILURE, sqlstate.CANNOT_CONNECT_NOW,
                                sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH})


def parse_lsn(text: str) -> int:
    """A pg_lsn in its text form 'X/Y' (two hex halves) as a byte position."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one successful probe of one server saw."""

    in_recovery: bool
    lsn: int | None       # primary: current WAL position; replica: last replayed position
    lag_ms: float         # replica replay delay in time (0 when nothing received is waiting)


class ClusterServer:
    """One configured server of a (database name, shard): its current role, health, ban and lag."""

    def __init__(self, config: DatabaseConfig, now: Callable[[], float]) -> None:
        self.config = config
        self.address: tuple[str, int] = (config.host, config.port)
        self.configured_role = config.role
        self.role = UNKNOWN if config.role == "auto" else config.role
        self.banned_until = 0.0
        self.ban_reason = ""
        self.lag_ms = 0.0
        self.lag_bytes = 0
        self.lsn: int | None = None
        self.healthy = True  # until a probe says otherwise: with probing off, every server serves
        self.last_error = ""
        self.probes_failed = 0
        self.monitor: ServerConnection | None = None
        self._caught_up_at = 0.0
        self._now = now

    @property
    def name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    @property
    def caught_up_at(self) -> float:
        """Monotonic time of the last probe showing every write the primary had was replayed here."""
        return self._now() if self.role == PRIMARY else self._caught_up_at

    @caught_up_at.setter
    def caught_up_at(self, value: float) -> None:
        self._caught_up_at = value

    def banned(self, now: float) -> bool:
        return now < self.banned_until

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.banned_until

    def __repr__(self) -> str:
        return f"ClusterServer({self.name}, role={self.role}, healthy={self.healthy})"


class _MonitorLink:
    """Stands in for a pool under a monitor connection: a lost connection asks for an early probe."""

    def __init__(self, cluster: Cluster, server: ClusterServer) -> None:
        self.cluster = cluster
        self.server = server

    def on_server_lost(self, connection: ServerConnection) -> None:
        if self.server.monitor is connection:
            self.server.monitor = None
            self.cluster.wake.set()


class Cluster:
    """Servers of one logical database and one shard: roles, health, bans, lag; picks a server per route."""

    def __init__(self, name: str, shard: int, servers: Sequence[DatabaseConfig], general: GeneralConfig,
                 credentials: tuple[str, str] | None, now: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.shard = shard
        self.general = general
        self.credentials = credentials
        self.tls: TlsContexts | None = None  # the runtime's, for monitor connections
        self.servers: list[ClusterServer] = [ClusterServer(config, now) for config in servers]
        self.probes = 0
        self.bans = 0  # bans started (a ban extended is not a new one)
        self.wake = asyncio.Event()
        self._now = now
        self._next = 0  # round-robin position, also the tie breaker of least_connections
        self._random = random.Random()
        self._split_brain = False
        self._no_primary = False
        self._probe_lock = asyncio.Lock()
        # writes waiting for a primary: (when each started waiting, its future), woken by the first probe
        # round that started after it and found a primary (see wait_for_primary)
        self._primary_waiters: list[tuple[float, asyncio.Future[None]]] = []
        self.primary_waits = 0  # writes that waited, for the metrics
        self.primary_wait_timeouts = 0
        self.removed = False  # a reload dropped this database shard: no server, and errors say why

    # ------------------------------------------------------------ picking a server

    def primary(self) -> ClusterServer:
        """The one reachable primary; ProxyError 08006 when there is none or more than one. A refusal asks
        the probe loop for an early probe, so a primary that is back is seen before the next interval."""
        try:
            return self._the_primary()
        except ProxyError:
            self.wake.set()
            raise

    def _the_primary(self) -> ClusterServer:
        claimants = [server for server in self.servers if server.role == PRIMARY and server.healthy]
        if len(claimants) > 1:
            if not self._split_brain:
                self._split_brain = True
                log.error("event=split_brain database=%s shard=%d servers=%s", self.name, self.shard,
                          ",".join(server.name for server in claimants))
            raise ProxyError(sqlstate.CONNECTION_FAILURE,
                             f"split brain: {len(claimants)} servers of database {self.name} claim to be "
                             "primary; writes are stopped")
        if self._split_brain:
            self._split_brain = False
            log.warning("event=split_brain_resolved database=%s shard=%d", self.name, self.shard)
        if claimants and claimants[0].available(self._now()):
            if self._no_primary:
                self._no_primary = False
                log.info("event=primary_reachable database=%s shard=%d server=%s", self.name, self.shard,
                         claimants[0].name)
            return claimants[0]
        if self.removed:
            raise ProxyError(sqlstate.INVALID_CATALOG_NAME,
                             f'database "{self.name}" shard {self.shard} was removed from the configuration')
        if not self._no_primary:
            self._no_primary = True
            log.warning("event=no_primary database=%s shard=%d", self.name, self.shard)
        raise ProxyError(sqlstate.CONNECTION_FAILURE,
                         f"no primary is reachable for database {self.name} shard {self.shard}")

    def waits_for_primary(self) -> bool:
        """A write refused for want of a primary may wait for one: primary_wait_timeout_ms is set and the
        probes run (they are what sees a primary come back)."""
        return (self.general.primary_wait_timeout_ms > 0 and self.general.healthcheck_interval_ms > 0
                and self.credentials is not None and not self.removed)

    async def wait_for_primary(self, deadline: float, failed: ProxyError) -> ClusterServer:
        """Wait until a probe round that started after this call finds one reachable primary, and return it.
        `failed` is why the write could not go to a primary now; at `deadline` (monotonic) its error is
        raised again, saying which database has no primary and for how long the write waited. No polling:
        the probe loop resolves the waiters (and probes every WAITING_PROBE_INTERVAL_S while they wait)."""
        loop = asyncio.get_running_loop()
        self.primary_waits += 1
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or self.removed:
                break
            waiter = (self._now(), loop.create_future())
            self._primary_waiters.append(waiter)
            self.wake.set()
            try:
                await asyncio.wait_for(waiter[1], remaining_s)
            except TimeoutError:
                break
            finally:
                if waiter in self._primary_waiters:
                    self._primary_waiters.remove(waiter)
            try:
                return self._the_primary()
            except ProxyError as exc:
                failed = exc  # a reload or another round changed it meanwhile: wait on
        self.primary_wait_timeouts += 1
        try:
            self._the_primary()  # 3D000 once removed; the probes' view of the primary when they have one
        except ProxyError as exc:
            if exc.sqlstate != sqlstate.CONNECTION_FAILURE:
                raise
            failed = exc
        message = failed.message
        if f"database {self.name}" not in message:  # a connect error names only the server
            message = f"no primary is reachable for database {self.name} shard {self.shard}: {message}"
        log.warning("event=primary_wait_timeout database=%s shard=%d primary_wait_timeout_ms=%d", self.name,
                    self.shard, self.general.primary_wait_timeout_ms)
        raise ProxyError(sqlstate.CONNECTION_FAILURE, f"{message} (waited primary_wait_timeout_ms = "
                         f"{self.general.primary_wait_timeout_ms} ms)")

    @property
    def primary_waiting(self) -> int:
        """Statements and logins waiting for a primary now."""
        return len(self._primary_waiters)

    def _wake_primary_waiters(self, started: float) -> None:
        """A probe round that started at `started` found a primary: wake the writes that began waiting
        before it started (a round already under way when a connect failed may not have seen the failure)."""
        still: list[tuple[float, asyncio.Future[None]]] = []
        for since, future in self._primary_waiters:
            if since <= started:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((since, future))
        self._primary_waiters = still

    def pick_read(self, *, sticky: ClusterServer | None = None, min_caught_up_at: float | None = None,
                  active_connections: Callable[[ClusterServer], int] = lambda s: 0) -> ClusterServer:
        """A server for a read: an eligible replica (or the primary, per read_write_split), else the primary."""
        # one pass over the servers (this runs for every routed read): eligible replicas, and the primary
        # when it is the only healthy claimant and not banned
        now = self._now()
        general = self.general
        max_lag_ms = general.max_replica_lag_ms
        max_lag_bytes = general.max_replica_lag_bytes
        candidates: list[ClusterServer] = []
        primary: ClusterServer | None = None
        claimants = 0
        for server in self.servers:
            role = server.role
            if role == REPLICA:
                if (server.healthy and now >= server.banned_until
                        and not (max_lag_ms > 0 and server.lag_ms > max_lag_ms)
                        and not (max_lag_bytes > 0 and server.lag_bytes > max_lag_bytes)
                        and (min_caught_up_at is None or server.caught_up_at >= min_caught_up_at)):
                    candidates.append(server)
            elif role == PRIMARY and server.healthy:
                claimants += 1
                primary = server
        if (general.read_write_split == "include_primary" and claimants == 1 and primary is not None
                and now >= primary.banned_until):
            candidates.append(primary)
        if not candidates:
            try:
                return self.primary()
            except ProxyError as exc:
                if not self.replicas():
                    raise
                raise ProxyError(sqlstate.CONNECTION_FAILURE,
                                 f"no server can serve reads for database {self.name} shard {self.shard}: "
                                 f"no replica is available and in sync, and {exc.message}")
        if sticky is not None and sticky in candidates:
            return sticky
        if len(candidates) == 1:
            return candidates[0]
        strategy = self.general.load_balancing
        if strategy == "random":
            return self._random.choice(candidates)
        start = self._next % len(candidates)
        self._next += 1
        if strategy == "least_connections":
            return min(candidates[start:] + candidates[:start], key=active_connections)
        return candidates[start]

    def _primary_or_none(self) -> ClusterServer | None:
        """The primary when exactly one healthy server claims it and it is not banned (as pick_read sees it)."""
        claimants = [server for server in self.servers if server.role == PRIMARY and server.healthy]
        if len(claimants) == 1 and claimants[0].available(self._now()):
            return claimants[0]
        return None

    def replicas(self) -> list[ClusterServer]:
        return [server for server in self.servers if server.role == REPLICA]

    def server_at(self, address: tuple[str, int]) -> ClusterServer | None:
        for server in self.servers:
            if server.address == address:
                return server
        return None

    # ------------------------------------------------------------ bans

    def ban(self, server: ClusterServer, reason: str) -> None:
        """No routes to `server` for ban_timeout_s from now; logged when the ban starts, not when extended.
        Only replicas are banned: a primary (or a server whose role no probe has told yet) is the only place
        writes can go, and it must take them again as soon as it answers."""
        if server.role != REPLICA:
            return
        now = self._now()
        already = server.banned(now)
        server.banned_until = max(server.banned_until, now + self.general.ban_timeout_s)
        if not already:
            self.bans += 1
            server.ban_reason = reason
            log.warning("event=server_banned database=%s shard=%d server=%s role=%s ban_timeout_s=%s reason=%r",
                        self.name, self.shard, server.name, server.role, self.general.ban_timeout_s, reason)

    def ban_until_unbanned(self, server: ClusterServer) -> None:
        """Admin BAN of a replica: no routes to it until `unban` (probes do not lift it)."""
        server.banned_until = float("inf")
        server.ban_reason = "banned from the admin console"
        log.warning("event=server_banned database=%s shard=%d server=%s role=%s reason=admin", self.name,
                    self.shard, server.name, server.role)

    def unban(self, server: ClusterServer) -> None:
        """Admin UNBAN: the server takes routes again (if healthy); a new failed probe bans it as usual."""
        if server.banned_until:
            log.info("event=server_unbanned database=%s shard=%d server=%s reason=admin", self.name,
                     self.shard, server.name)
        server.banned_until = 0.0
        server.ban_reason = ""

    # ------------------------------------------------------------ health checks

    async def probe_once(self) -> None:
        """Probe every server at once; update roles, health, bans and lag from what they answer."""
        if self.credentials is None or not self.servers:
            return
        async with self._probe_lock:
            started = self._now()
            servers = list(self.servers)  # a reload may change the list while the probes run
            results = await asyncio.gather(*(self._probe(server) for server in servers))
            self.probes += 1
            self._apply(started, results, servers)

    def _apply(self, started: float, results: Sequence[ProbeResult | str],
               servers: Sequence[ClusterServer] | None = None) -> None:
        """Apply one probe round's results to `servers` (by default the cluster's, in order)."""
        if servers is None:
            servers = self.servers
        now = self._now()
        primary_lsns: list[int] = []
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, str):
                server.probes_failed += 1
                server.last_error = result
                if server.healthy:
                    log.warning("event=server_unhealthy database=%s shard=%d server=%s error=%r",
                                self.name, self.shard, server.name, result)
                server.healthy = False
                self.ban(server, f"health check failed: {result}")
                continue
            if not server.healthy:
                log.info("event=server_healthy database=%s shard=%d server=%s", self.name, self.shard,
                         server.name)
            server.healthy = True
            server.last_error = ""
            role = REPLICA if result.in_recovery else PRIMARY
            if role != server.role:
                log.log(logging.INFO if server.role == UNKNOWN else logging.WARNING,
                        "event=server_role_changed database=%s shard=%d server=%s old=%s new=%s configured=%s",
                        self.name, self.shard, server.name, server.role, role, server.configured_role)
                server.role = role
            server.lsn = result.lsn
            if role == PRIMARY:
                server.lag_ms = 0.0
                server.lag_bytes = 0
                if result.lsn is not None:
                    primary_lsns.append(result.lsn)
            else:
                server.lag_ms = result.lag_ms
            if server.banned_until and (role == PRIMARY or not server.banned(now)):
                server.banned_until = 0.0
                log.info("event=server_unbanned database=%s shard=%d server=%s", self.name, self.shard,
                         server.name)
        if primary_lsns:
            # With two primaries (split brain) the further one is the conservative reference.
            primary_lsn = max(primary_lsns)
            for server, result in zip(servers, results, strict=True):
                if isinstance(result, str) or server.role != REPLICA or result.lsn is None:
                    continue
                server.lag_bytes = max(0, primary_lsn - result.lsn)
                if result.lsn >= primary_lsn:
                    server.caught_up_at = started
        # Log split brain / no primary when it starts, even with no write traffic to notice it.
        try:
            self._the_primary()
        except ProxyError:
            return
        if self._primary_waiters:
            self._wake_primary_waiters(started)

    async def _probe(self, server: ClusterServer) -> ProbeResult | str:
        """One server's probe; the error text when it failed (the connection is then dropped)."""
        assert self.credentials is not None
        timeout_s = max(self.general.server_connect_timeout_ms, 1) / 1000
        deadline = time.monotonic() + timeout_s
        connection = server.monitor
        try:
            if connection is None or connection.broken:
                self._drop_monitor(server)
                user, password = self.credentials
                # a monitor connection is never lent: of its "pool" only on_server_lost is ever called
                link = cast(ServerPool, _MonitorLink(self, server))
                connection = ServerConnection(link, server.address, user, password, server.config.server_database,
                                              self.tls)
                try:
                    await connection.connect({"application_name": MONITOR_APPLICATION_NAME}, timeout_s)
                except BaseException:
                    connection.close()
                    raise
                # Linked only once logged in: a failed login must not wake the loop for another probe.
                server.monitor = connection
            remaining_s = max(deadline - time.monotonic(), 0.001)
            rows = await connection.fetch_rows(PROBE_SQL, remaining_s)
            return _parse_probe(rows)
        except TimeoutError:
            self._drop_monitor(server)
            return f"no answer within {timeout_s * 1000:.0f} ms"
        except ProxyError as exc:
            self._drop_monitor(server)
            return f"{exc.sqlstate} {exc.message}"
        except (OSError, ValueError, IndexError) as exc:
            self._drop_monitor(server)
            return f"{type(exc).__name__}: {exc}"
        except BaseException:
            self._drop_monitor(server)
            raise

    def _drop_monitor(self, server: ClusterServer) -> None:
        connection, server.monitor = server.monitor, None
        if connection is not None:
            connection.close()

    async def run(self) -> None:
        """Probe every healthcheck_interval_ms until cancelled (never when the interval is 0)."""
        interval_s = self.general.healthcheck_interval_ms / 1000
        if interval_s <= 0 or self.credentials is None:
            return
        try:
            while True:
                started = time.monotonic()
                self.wake.clear()
                try:
                    await self.probe_once()
                except Exception:
                    log.exception("event=probe_failed database=%s shard=%d", self.name, self.shard)
                elapsed_s = time.monotonic() - started
                wait_s = min(interval_s, NO_PRIMARY_PROBE_INTERVAL_S) if self._no_primary else interval_s
                if self._primary_waiters:
                    wait_s = min(wait_s, WAITING_PROBE_INTERVAL_S)
                try:
                    await asyncio.wait_for(self.wake.wait(), max(wait_s - elapsed_s, 0))
                except TimeoutError:
                    continue
                # Woken by a lost monitor connection: probe soon, but not in a tight loop.
                await asyncio.sleep(max(MIN_PROBE_GAP_S - (time.monotonic() - started), 0))
        finally:
            self.close()

    def close(self) -> None:
        for server in self.servers:
            self._drop_monitor(server)

    # ------------------------------------------------------------ reload

    def update(self, servers: Sequence[DatabaseConfig], general: GeneralConfig,
               credentials: tuple[str, str] | None) -> list[ClusterServer]:
        """A reload: the new server list, in config order. A server still at the same address and database
        keeps its probed role, health, ban and lag; a new one starts unknown. Returns the servers dropped
        (their monitor connections are closed)."""
        kept = {(server.address, server.config.server_database): server for server in self.servers}
        fresh: list[ClusterServer] = []
        for config in servers:
            server = kept.pop(((config.host, config.port), config.server_database), None)
            if server is None:
                server = ClusterServer(config, self._now)
            elif config != server.config:
                server.config = config
                if config.role != server.configured_role:
                    server.configured_role = config.role
                    if config.role != "auto":
                        server.role = config.role
            fresh.append(server)
        self.servers = fresh
        self.general = general
        if credentials != self.credentials:
            self.credentials = credentials
            for server in fresh:
                self._drop_monitor(server)  # logged in with the old credentials
        dropped = list(kept.values())
        for server in dropped:
            self._drop_monitor(server)
        self.wake.set()  # probe the new servers soon
        return dropped

    def remove(self) -> None:
        """A reload dropped this database shard: no server is picked any more, and errors say why."""
        self.removed = True
        self.close()
        self.servers = []
        for _, future in self._primary_waiters:  # they get the 3D000 that says why
            if not future.done():
                future.set_result(None)

    # ------------------------------------------------------------ reporting

    def stats(self) -> list[dict[str, object]]:
        now = self._now()
        return [
            {
                "database": self.name,
                "shard": self.shard,
                "host": server.address[0],
                "port": server.address[1],
                "role": server.role,
                "configured_role": server.configured_role,
                "healthy": server.healthy,
                "banned": server.banned(now),
                "lag_ms": server.lag_ms,
                "lag_bytes": server.lag_bytes,
            }
            for server in self.servers
        ]


def _parse_probe(rows: list[list[str | None]]) -> ProbeResult:
    in_recovery_text, lsn_text, lag_text = rows[0][:3]
    if in_recovery_text not in ("t", "f"):
        raise ValueError(f"unexpected pg_is_in_recovery() value {in_recovery_text!r}")
    in_recovery = in_recovery_text == "t"
    lsn = parse_lsn(lsn_text) if lsn_text else None
    # NULL lag: no transaction replayed since the replica started; the byte lag still applies.
    lag_ms = max(float(lag_text), 0.0) if lag_text and in_recovery else 0.0
    return ProbeResult(in_recovery, lsn, lag_ms)


def build_clusters(config: Config) -> dict[tuple[str, int], Cluster]:
    """One cluster per (database name, shard), servers in config order; the first user's backend
    credentials log in the monitor."""
    grouped: dict[tuple[str, int], list[DatabaseConfig]] = {}
    for database in config.databases:
        if database.name != WILDCARD_DATABASE:  # its clusters are made per database name (proxy/autodb.py)
            grouped.setdefault((database.name, database.shard), []).append(database)
    credentials: tuple[str, str] | None = None
    if config.users:
        first = config.users[0]
        credentials = (first.backend_user, first.backend_password)
    return {
        key: Cluster(key[0], key[1], servers, config.general, credentials)
        for key, servers in grouped.items()
    }
