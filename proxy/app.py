"""Wiring: config -> runtime and listeners; signals (stop, reload) and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from auth.keys import JwtSetupError
from config.loader import ConfigError, load, split_address
from config.model import Config
from proxy.admin import start_admin
from proxy.client import ClientSession
from proxy.protocol import sqlstate
from proxy.runtime import Runtime
from proxy.tls import TlsSetupError

log = logging.getLogger("shardgate")

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
            tls = self.runtime.tls.prepare(new_config.tls)  # every file read before anything changes
            self.runtime.auth.reload(new_config)
        except ConfigError as exc:
            log.error("event=reload_failed problems=%d first=%r", len(exc.problems), exc.problems[:1])
            return
        except (JwtSetupError, TlsSetupError) as exc:
            log.error("event=reload_failed error=%r", str(exc))
            return
        self.runtime.tls.install(tls)  # new connections get the new certificates; established ones keep theirs
        self.runtime.config = new_config
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
            if not any(client.busy() for client in runtime.clients):
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
