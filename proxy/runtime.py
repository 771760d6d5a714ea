"""What every session shares: config, clusters and pools, cancel keys, caches; passed to each session."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from config.model import Config, DatabaseConfig, UserConfig
from proxy.authenticator import Authenticator
from proxy.cluster import Cluster, build_clusters
from proxy.pool import Pool, PoolSettings
from proxy.protocol import codec
from proxy.session_state import EffectScanner
from proxy.shardmap import build_shard_router
from proxy.tls import TlsContexts
from routing.router import Router
from routing.sharding import ShardRouter

log = logging.getLogger("shardgate")

JANITOR_INTERVAL_S = 1.0


class Session(Protocol):
    """What the runtime needs of a connected client (the session module is not imported here)."""

    def cancel_running(self) -> None: ...

    def fatal(self, code: str, text: str) -> None: ...

    def busy(self) -> bool: ...


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
        self.collations: dict[str, str] = {}  # database -> its collation as the merger compares text
        self.shard_routers: dict[str, ShardRouter | None] = {}

    # ------------------------------------------------------------ clusters and pools

    def cluster_for(self, database: str, shard: int = 0) -> Cluster | None:
        return self.clusters.get((database, shard))

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
            general = self.config.general
            size = user.pool_size or general.default_pool_size
            pool = Pool(
                f"{user.name}@{server.name}/{server.host}:{server.port}",
                (server.host, server.port),
                server.server_database,
                user.backend_user,
                user.backend_password,
                PoolSettings(
                    size=size,
                    min_size=min(size, user.min_pool_size if user.min_pool_size is not None else general.min_pool_size),
                    checkout_timeout_ms=general.checkout_timeout_ms,
                    idle_timeout_s=general.idle_timeout_s,
                    server_lifetime_s=general.server_lifetime_s,
                    healthcheck_idle_ms=general.healthcheck_idle_ms,
                    connect_timeout_ms=general.server_connect_timeout_ms,
                    reset_query=general.server_reset_query,
                ),
                tls=self.tls,
            )
            self.pools[key] = pool
        return pool

    def create_min_pools(self) -> None:
        """Pools with a minimum size are created at start so their servers are opened by the janitor."""
        general = self.config.general
        for user in self.config.users:
            minimum = user.min_pool_size if user.min_pool_size is not None else general.min_pool_size
            if minimum <= 0:
                continue
            for server in self.config.databases:
                self.pool_for_server(user, server)

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
