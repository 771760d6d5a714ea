"""What every session shares: config, clusters and pools, cancel keys, caches; passed to each session."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from auth.scram import ScramKeys
from config.model import WILDCARD_DATABASE, Config, DatabaseConfig, UserConfig
from proxy.auth_query import AuthQuery
from proxy.authenticator import Authenticator
from proxy.autodb import AutoDatabases
from proxy.cluster import Cluster, build_clusters
from proxy.errors import ProxyError
from proxy.limits import Limits
from proxy.metrics import Traffic
from proxy.notify import NotifyHubs
from proxy.pool import Pool, PoolSettings
from proxy.protocol import codec, sqlstate
from proxy.server import ServerConnection
from proxy.session_state import EffectScanner
from proxy.shardmap import build_shard_router
from proxy.tls import TlsContexts
from proxy.twophase.coordinator import TwoPhase
from routing.router import Router
from routing.sharding import ShardRouter

log = logging.getLogger("shardgate")

JANITOR_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the admin views (proxy/views.py) show of one client, read when a view is asked for."""

    client_id: int
    user: str
    database: str
    state: str  # login | active | waiting (for a server) | console
    addr: str
    port: int
    local_addr: str
    local_port: int
    connect_time: float  # wall clock, seconds
    application_name: str
    pool_mode: str
    pool: Pool | None  # the pool of its home server (its last one between transactions)
    server: ServerConnection | None  # the home server linked or parked with it
    prepared_statements: int


class Session(Protocol):
    """What the runtime needs of a connected client (the session module is not imported here)."""

    client_id: int

    def info(self) -> SessionInfo: ...

    def cancel_running(self) -> None: ...

    def fatal(self, code: str, text: str) -> None: ...

    def busy(self) -> bool: ...

    def reconfigure(self) -> None: ...

    def activity(self) -> tuple[str, int, str]: ...

    def timed_out(self, kind: str, limit: str) -> None: ...


class Runtime:
    """Everything the sessions share: config, pools, cancel keys, caches."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[tuple[str, str, int, str, str], Pool] = {}
        self.clients: set[Session] = set()
        self.cancel_keys: dict[tuple[int, int], Session] = {}
        self.effects = EffectScanner()
        self.login_params: dict[Any, bytes] = {}  # (pool, startup settings) -> ParameterStatus messages
        self.shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.tls = TlsContexts(config.tls)  # raises TlsSetupError (a ValueError) for a file it cannot use
        self.clusters = build_clusters(config)
        for cluster in self.clusters.values():
            cluster.tls = self.tls
        self.router = Router(config.general.volatile_functions if hasattr(config.general, "volatile_functions") else ())
        self.auth = Authenticator(config)
        self.auth_query = AuthQuery(config)  # users the config does not list (general.auth_user)
        self.autodb = AutoDatabases(config, self.clusters, self.pools, self.tls)  # the wildcard's databases
        self.traffic = Traffic()  # statements, durations, bytes, errors by SQLSTATE class (proxy/metrics.py)
        self.limits = Limits(config)  # auth cool-offs, accept pace, client counts, timeouts (proxy/limits.py)
        self.collations: dict[str, str] = {}  # database -> its collation as the merger compares text
        self.shard_routers: dict[str, ShardRouter | None] = {}
        self.twophase = TwoPhase(self)
        self.notify = NotifyHubs()  # LISTEN/NOTIFY in the pooled modes: a listening server per (database, user)
        # admin console: client ids, paused databases, and what App lends it (reload, graceful stop)
        self.client_ids = itertools.count(1)
        self.paused_databases: set[str] = set()
        self.paused_all = False
        self.reload_config: Callable[[], str | None] | None = None  # None on success, else the problems
        self.request_shutdown: Callable[[], None] | None = None
        self._probe_tasks: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self._probing = False

    # ------------------------------------------------------------ clusters and pools

    def cluster_for(self, database: str, shard: int = 0) -> Cluster | None:
        return self.clusters.get((database, shard))

    def open_cluster(self, database: str) -> Cluster | None:
        """A login's database: its configured shard 0, else the wildcard's cluster for it (made now)."""
        return self.clusters.get((database, 0)) or self.autodb.cluster_for(database)

    def auth_query_pool(self, database: str) -> Pool:
        """auth_user's pool on the server auth_query runs on: general.auth_dbname's, else the database the
        client asks for (ProxyError 3D000 when there is no such database)."""
        general = self.config.general
        name = general.auth_dbname or database
        cluster = self.open_cluster(name)
        auth_user = self.config.user(general.auth_user)
        if cluster is None or auth_user is None:
            raise ProxyError(sqlstate.INVALID_CATALOG_NAME, f'database "{name}" does not exist', fatal=True)
        try:
            target = cluster.primary()
        except ProxyError:
            target = cluster.pick_read()  # the roles are the same on a replica
        return self.pool_for_server(auth_user, target.config)

    def use_server_secret(self, user_name: str, secret: str | ScramKeys) -> None:
        """A user of auth_query logged in: its SCRAM keys (or md5 hash) log its servers in from now on (a
        changed password gives new ones, which the pools it already has take too)."""
        if self.auth.passthrough.get(user_name) == secret or self.config.user(user_name) is not None:
            return
        self.auth.passthrough[user_name] = secret
        for key, pool in self.pools.items():
            if key[4] == user_name:
                pool.password = secret

    def shards_of(self, database: str) -> list[Cluster]:
        """The clusters of every shard of a logical database, by shard number (the config checks they
        are numbered from 0 without gaps)."""
        found = sorted((shard, cluster) for (name, shard), cluster in self.clusters.items() if name == database)
        return [cluster for _, cluster in found]

    def shard_router(self, database: str) -> ShardRouter | None:
        """The sharding-key router of a database with sharded tables (one per database, shared by its
        sessions: its cache is by statement text), None for a database without."""
        if database in self.shard_routers:
            return self.shard_routers[database]
        router = build_shard_router(self.config, database, len(self.shards_of(database)))
        self.shard_routers[database] = router
        return router

    def splits_reads(self, cluster: Cluster) -> bool:
        """Routing runs only where there is a choice: several servers, or roles found at run time."""
        return len(cluster.servers) > 1 or any(s.config.role == "auto" for s in cluster.servers)

    def pool_for_server(self, user: UserConfig, server: DatabaseConfig) -> Pool:
        key = (server.name, server.host, server.port, server.server_database, user.name)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(
                f"{user.name}@{server.name}/{server.host}:{server.port}",
                (server.host, server.port),
                server.server_database,
                user.backend_user,
                self.auth.backend_secret(user),
                self.pool_settings(user),
                tls=self.tls,
                traffic=self.traffic,
            )
            self.pools[key] = pool
            if self.is_paused(server.name):
                pool.pause()
        return pool

    def pool_settings(self, user: UserConfig) -> PoolSettings:
        general = self.config.general
        size = user.pool_size or general.default_pool_size
        return PoolSettings(
            size=size,
            min_size=min(size, user.min_pool_size if user.min_pool_size is not None else general.min_pool_size),
            checkout_timeout_ms=general.checkout_timeout_ms,
            idle_timeout_s=general.idle_timeout_s,
            server_lifetime_s=general.server_lifetime_s,
            healthcheck_idle_ms=general.healthcheck_idle_ms,
            connect_timeout_ms=general.server_connect_timeout_ms,
            reset_query=general.server_reset_query,
            connects_in_flight=general.max_server_connects_in_flight,
            send_buffer_bytes=general.client_to_server_buffer_bytes,
        )

    def create_min_pools(self) -> None:
        """Pools with a minimum size are created at start so their servers are opened by the janitor."""
        general = self.config.general
        for user in self.config.users:
            minimum = user.min_pool_size if user.min_pool_size is not None else general.min_pool_size
            if minimum <= 0:
                continue
            for server in self.config.databases:
                if server.name != WILDCARD_DATABASE:
                    self.pool_for_server(user, server)

    # ------------------------------------------------------------ pause (admin console)

    def pools_of(self, database: str | None) -> list[Pool]:
        """The pools of a logical database, or every pool for None."""
        return [pool for key, pool in self.pools.items() if database is None or key[0] == database]

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    def pause(self, database: str | None) -> None:
        """New transactions on `database` (every database for None) wait until `resume`."""
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        for pool in self.pools_of(database):
            pool.pause()

    def resume(self, database: str | None) -> None:
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        for key, pool in self.pools.items():
            if not self.is_paused(key[0]):
                pool.resume()

    # ------------------------------------------------------------ reload

    def start_probes(self) -> None:
        """Start each cluster's probe loop (at start; a reload starts those of new clusters)."""
        self._probing = True
        for key, cluster in self.clusters.items():
            self._start_probe(key, cluster)

    def _start_probe(self, key: tuple[str, int], cluster: Cluster) -> None:
        old = self._probe_tasks.pop(key, None)
        if old is not None:
            old.cancel()
        if self._probing:
            self._probe_tasks[key] = self.spawn(cluster.run())

    def apply(self, config: Config) -> list[str]:
        """Put a validated config in place without dropping a client (App.reload checked it and the keys):
        clusters and pools are updated in place, dropped servers drained, and each session told, so its next
        transaction uses the new servers. Returns what changed, as short phrases for the log."""
        old, self.config = self.config, config
        changes: list[str] = []
        self.limits.configure(config)
        self.auth_query.configure(config)
        changes.extend(f"autodb_dropped:{name}" for name in self.autodb.configure(config))
        self._apply_clusters(config, changes)
        self._apply_pools(config, changes)
        for database in list(self.shard_routers):
            if _shard_inputs(old, database) != _shard_inputs(config, database):
                del self.shard_routers[database]
                changes.append(f"shard_map:{database}")
        self.login_params.clear()  # ParameterStatus of servers that may have moved
        self.collations.clear()
        self.create_min_pools()
        for client in list(self.clients):
            client.reconfigure()
        return changes

    def _apply_clusters(self, config: Config, changes: list[str]) -> None:
        grouped: dict[tuple[str, int], list[DatabaseConfig]] = {}
        for database in config.databases:
            if database.name != WILDCARD_DATABASE:
                grouped.setdefault((database.name, database.shard), []).append(database)
        credentials = monitor_credentials(config)
        for key in [key for key in self.clusters if key not in grouped and not self.autodb.owns(key[0])]:
            task = self._probe_tasks.pop(key, None)
            if task is not None:
                task.cancel()
            self.clusters.pop(key).remove()
            changes.append(f"removed:{key[0]}/{key[1]}")
        for key, servers in grouped.items():
            found = self.clusters.get(key)
            if found is None:
                added = self.clusters[key] = Cluster(key[0], key[1], servers, config.general, credentials)
                self._start_probe(key, added)
                changes.append(f"added:{key[0]}/{key[1]}")
                continue
            cluster = found
            before = [(server.address, server.config) for server in cluster.servers]
            restart = (cluster.general.healthcheck_interval_ms != config.general.healthcheck_interval_ms
                       or cluster.credentials != credentials)
            cluster.update(servers, config.general, credentials)
            if restart:
                self._start_probe(key, cluster)
            if before != [(server.address, server.config) for server in cluster.servers]:
                changes.append(f"servers:{key[0]}/{key[1]}")

    def _apply_pools(self, config: Config, changes: list[str]) -> None:
        servers = {(db.name, db.host, db.port, db.server_database) for db in config.databases}
        names = {db.name for db in config.databases}
        for key, pool in list(self.pools.items()):
            if self.autodb.owns(key[0]):
                continue  # the wildcard's: AutoDatabases.configure dropped those it no longer serves
            if key[:4] not in servers:
                del self.pools[key]
                # a database that moved: clients still holding the pool may finish with it; one that is gone
                # refuses them
                gone = key[0] not in names
                pool.retire(f'database "{key[0]}" was removed from the configuration' if gone else "")
                changes.append(f"drained:{pool.name}")
                continue
            user = config.user(key[4])
            if user is None:
                continue  # a removed user's connected clients keep its pools as they were (auth_query's too)
            settings = self.pool_settings(user)
            if settings != pool.settings or user.backend_user != pool.user or user.backend_password != pool.password:
                pool.reconfigure(settings, user.backend_user, user.backend_password)
                changes.append(f"pool:{pool.name}")

    # ------------------------------------------------------------ cancel

    def forward_cancel(self, process_id: int, secret_key: int) -> None:
        session = self.cancel_keys.get((process_id, secret_key))
        if session is not None:
            session.cancel_running()

    def send_cancel(self, address: tuple[str, int], process_id: int, secret_key: int) -> None:
        self.spawn(self._send_cancel(address, process_id, secret_key))

    async def _send_cancel(self, address: tuple[str, int], process_id: int, secret_key: int) -> None:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 5)
            writer.write(codec.cancel_request(process_id, secret_key))
            await writer.drain()
            writer.close()
        except (TimeoutError, OSError) as exc:
            log.warning("event=cancel_failed server=%s:%s error=%r", address[0], address[1], str(exc))

    # ------------------------------------------------------------ background

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL_S)
            for pool in list(self.pools.values()):
                try:
                    pool.maintain()
                except Exception:
                    log.exception("event=janitor_error pool=%s", pool.name)
            try:
                self.limits.sweep(list(self.clients))
            except Exception:
                log.exception("event=janitor_error task=timeouts")
            try:
                self.autodb.sweep(self.limits.clients_of)
            except Exception:
                log.exception("event=janitor_error task=autodb")


def monitor_credentials(config: Config) -> tuple[str, str] | None:
    """The first user's backend login, which the cluster probes use."""
    if not config.users:
        return None
    first = config.users[0]
    return (first.backend_user, first.backend_password)


def _shard_inputs(config: Config, database: str) -> tuple[object, ...]:
    """What a database's ShardRouter is built from: a reload rebuilds it only when one of these changed."""
    jwt = config.jwt
    return (config.sharded_tables_for(database), config.omnisharded_tables_for(database),
            config.shard_count(database), config.general.allow_cross_shard_writes,
            jwt is not None and jwt.shard_by_tenant_claim)
