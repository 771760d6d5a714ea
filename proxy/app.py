"""Wiring: config -> pools and listeners; signals, janitor, graceful shutdown."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from auth.claims import reset_settings_sql, session_settings
from auth.errors import AuthError
from auth.identity import Identity
from auth.jwt import check_scope, identity_from_claims
from auth.keys import JwtSetupError, KeySet
from auth.scram import ScramVerifier, is_md5_hash, is_scram_verifier, md5_hash, md5_response
from auth.token_cache import CachedJwtValidator
from config.loader import ConfigError, load, split_address
from config.model import Config, DatabaseConfig, UserConfig
from proxy.admin import start_admin
from proxy.client import ClientSession
from proxy.cluster import Cluster, build_clusters
from proxy.pool import Pool, PoolSettings
from proxy.protocol import codec, sqlstate
from proxy.session_state import EffectScanner
from routing.router import Router

log = logging.getLogger("shardgate")

JANITOR_INTERVAL_S = 1.0


class Runtime:
    """Everything the sessions share: config, pools, cancel keys, caches."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[tuple[str, str, int, str, str], Pool] = {}
        self.clients: set[ClientSession] = set()
        self.cancel_keys: dict[tuple[int, int], ClientSession] = {}
        self.effects = EffectScanner()
        self.login_params: dict[Any, bytes] = {}  # (pool, startup settings) -> ParameterStatus messages
        self.shutting_down = False
        self._verifiers: dict[str, ScramVerifier] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.clusters = build_clusters(config)
        self.router = Router(config.general.volatile_functions if hasattr(config.general, "volatile_functions") else ())
        self.jwt: CachedJwtValidator | None = None
        if config.jwt is not None:
            self.jwt = CachedJwtValidator.from_config(config.jwt)

    # ------------------------------------------------------------ authentication helpers

    def verifier_for(self, user: UserConfig) -> ScramVerifier:
        """SCRAM verifier for a user: parsed from the config, or derived once from a plain password."""
        cached = self._verifiers.get(user.name)
        if cached is None:
            if is_scram_verifier(user.password):
                cached = ScramVerifier.parse(user.password)
            else:
                cached = ScramVerifier.from_password(user.password)
            self._verifiers[user.name] = cached
        return cached

    def check_md5(self, user: UserConfig, given: str, salt: bytes) -> bool:
        return hmac.compare_digest(md5_response(user.name, user.password, salt).encode(), given.encode())

    def check_plain(self, user: UserConfig, given: str) -> bool:
        stored = user.password
        if is_md5_hash(stored):
            return hmac.compare_digest(md5_hash(user.name, given).encode(), stored.encode())
        if is_scram_verifier(stored):
            verifier = self.verifier_for(user)
            derived = ScramVerifier.from_password(given, verifier.salt, verifier.iterations)
            return hmac.compare_digest(derived.stored_key, verifier.stored_key)
        return hmac.compare_digest(stored.encode(), given.encode())

    def authenticate_jwt(self, user: UserConfig, database: str, token: str) -> Identity:
        """A token sent as the password -> Identity with its claims (raises AuthError with the reason)."""
        if self.jwt is None or self.config.jwt is None:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, "JWT authentication is not configured")
        if not token:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, "JWT required")
        claims = self.jwt.validate_token(token).claims
        if user.required_scope:
            check_scope(claims, user.required_scope)
        return identity_from_claims(claims, self.config.jwt, user=user.name, database=database)

    def claims_sql(self, identity: Identity) -> tuple[str, str]:
        """(SQL setting this client's claims on a server session, SQL clearing them)."""
        cfg = self.config.jwt
        if cfg is None or identity.claims is None:
            return ("", "")
        return session_settings(identity.claims, cfg, local=False), reset_settings_sql(cfg)

    def reload_jwt(self, config: Config) -> None:
        """New keys for new logins; connected clients keep their validated identity."""
        if config.jwt is None:
            self.jwt = None
        elif self.jwt is None:
            self.jwt = CachedJwtValidator.from_config(config.jwt)
        else:
            self.jwt.reload(config.jwt, KeySet.from_config(config.jwt))

    # ------------------------------------------------------------ pools

    def cluster_for(self, database: str) -> Cluster | None:
        return self.clusters.get((database, 0))

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

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
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


class App:
    """Starts the listener, handles SIGTERM/SIGINT (graceful stop) and SIGHUP (reload)."""

    def __init__(self, config: Config) -> None:
        self.runtime = Runtime(config)
        self.server: asyncio.base_events.Server | None = None
        self.admin: asyncio.base_events.Server | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.runtime.config
        host, port = split_address(config.general.listen)
        log.info("event=starting address=%s:%s", host, port)
        # one probe round first, so servers with role = "auto" have a role before the first client
        probes = [c.probe_once() for c in self.runtime.clusters.values() if len(c.servers) > 1 or c.servers[0].config.role == "auto"]
        if probes:
            try:
                await asyncio.wait_for(asyncio.gather(*probes, return_exceptions=True),
                                       config.general.server_connect_timeout_ms / 1000 + 1)
            except TimeoutError:
                log.warning("event=initial_probe_timeout")
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ClientSession(self.runtime), host, port,
                                               reuse_address=True, backlog=2048)
        if config.general.admin_listen:
            admin_host, admin_port = split_address(config.general.admin_listen)
            self.admin = await start_admin(self.runtime, admin_host, admin_port)
        self.runtime.create_min_pools()
        self.runtime.spawn(self.runtime.janitor())
        for cluster in self.runtime.clusters.values():
            self.runtime.spawn(cluster.run())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self.runtime.spawn(self.shutdown()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("event=listening address=%s:%s pool_mode=%s", host, port, config.general.pool_mode)

    def reload(self) -> None:
        path = self.runtime.config.source_path
        if not path:
            return
        try:
            new_config = load(path)
            self.runtime.reload_jwt(new_config)
        except ConfigError as exc:
            log.error("event=reload_failed problems=%d first=%r", len(exc.problems), exc.problems[:1])
            return
        except JwtSetupError as exc:
            log.error("event=reload_failed error=%r", str(exc))
            return
        self.runtime.config = new_config
        self.runtime._verifiers.clear()
        log.info("event=reloaded path=%s", path)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight transactions finish up to shutdown_timeout_s, then close."""
        runtime = self.runtime
        if runtime.shutting_down:
            return
        runtime.shutting_down = True
        log.info("event=shutdown_started clients=%d", len(runtime.clients))
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + runtime.config.general.shutdown_timeout_s
        while time.monotonic() < deadline:
            busy = [c for c in runtime.clients if c.server is not None and (c.server.outstanding or c.server.txn_status != b"I")]
            if not busy:
                break
            await asyncio.sleep(0.05)
        for client in list(runtime.clients):
            client.fatal(sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        for pool in runtime.pools.values():
            pool.close()
        for cluster in runtime.clusters.values():
            cluster.close()
        await asyncio.sleep(0.05)
        if self.admin is not None:
            self.admin.close()
        log.info("event=shutdown_complete")
        self.stopped.set()


async def serve(config: Config, on_ready: Callable[[], None] | None = None) -> None:
    app = App(config)
    await app.start()
    if on_ready is not None:
        on_ready()
    await app.stopped.wait()
