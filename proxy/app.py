"""Wiring: config -> runtime and listeners; signals (stop, reload) and graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

from auth.keys import JwtSetupError
from config.loader import ConfigError, load, split_address
from config.model import Config
from proxy import catalog
from proxy.admin import start_admin
from proxy.client import ClientSession
from proxy.http_sql import HttpSql
from proxy.protocol import sqlstate
from proxy.runtime import Runtime
from proxy.tls import TlsSetupError
from proxy.twophase import recovery

log = logging.getLogger("shardgate")

WATCH_INTERVAL_S = 1.0
# settings read once, at start: a reload that changes them says so, and applies the rest
RESTART_KEYS = ("listen", "admin_listen", "log_format")


@dataclasses.dataclass(slots=True)
class ReloadResult:
    """What App.reload did: `problems` (each with its key path) when the file was rejected and the running
    config stays; `needs_restart` notes for settings that only a restart applies; `changes` applied."""

    problems: list[str] = dataclasses.field(default_factory=list)
    needs_restart: list[str] = dataclasses.field(default_factory=list)
    changes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class App:
    """Starts the listener, handles SIGTERM/SIGINT (graceful stop) and SIGHUP (reload)."""

    def __init__(self, config: Config) -> None:
        self.runtime = Runtime(config)
        self.server: asyncio.base_events.Server | None = None
        self.admin: asyncio.base_events.Server | None = None
        self.http: HttpSql | None = None  # [http]: SQL over HTTP, when http.listen is set
        self.stopped = asyncio.Event()
        self._watching = False

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
        try:  # the aggregates a merge must not take for plain functions, before the first client
            await asyncio.wait_for(catalog.read_all(self.runtime), config.general.server_connect_timeout_ms / 1000 + 1)
        except TimeoutError:
            log.warning("event=catalog_timeout")
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ClientSession(self.runtime), host, port,
                                               reuse_address=True, backlog=2048)
        if config.general.admin_listen:
            admin_host, admin_port = split_address(config.general.admin_listen)
            self.admin = await start_admin(self.runtime, admin_host, admin_port)
        if config.http.listen:
            self.http = HttpSql(self.runtime)
            await self.http.start()
        # the admin console reaches the reload and the graceful stop through the runtime
        self.runtime.reload_config = self._reload_problems
        self.runtime.request_shutdown = self._request_shutdown
        self.runtime.create_min_pools()
        self.runtime.spawn(self.runtime.janitor())
        self.runtime.start_probes()
        self.runtime.spawn(recovery.run(self.runtime.twophase))
        self.runtime.spawn(catalog.keep_known(self.runtime))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self.runtime.spawn(self.shutdown()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._watch_if_asked()
        log.info("event=listening address=%s:%s pool_mode=%s", host, port, config.general.pool_mode)

    def reload(self) -> ReloadResult:
        """Reread the config file (SIGHUP, watch_config, the admin console's RELOAD): the one entry point.
        A file with problems changes nothing; otherwise everything applies without dropping a client,
        except the settings named in `needs_restart`."""
        runtime = self.runtime
        path = runtime.config.source_path
        if not path:
            return ReloadResult(problems=["no config file to reload: the proxy was started without one"])
        try:
            new_config = load(path)
            tls = runtime.tls.prepare(new_config.tls)  # every file read before anything changes
            runtime.auth.reload(new_config)  # first: key files that cannot be used reject the reload
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("event=reload_problem path=%s problem=%r", path, problem)
            log.error("event=reload_failed path=%s problems=%d", path, len(exc.problems))
            return ReloadResult(problems=exc.problems)
        except (JwtSetupError, TlsSetupError) as exc:
            problem = f"{'tls' if isinstance(exc, TlsSetupError) else 'jwt'}: {exc}"
            log.error("event=reload_problem path=%s problem=%r", path, problem)
            log.error("event=reload_failed path=%s problems=1", path)
            return ReloadResult(problems=[problem])
        old = runtime.config.general
        # the running values stay for what only a restart changes, so the config shows what is in effect
        kept = {key: getattr(old, key) for key in RESTART_KEYS}
        needs_restart = [f'general.{key}: "{getattr(new_config.general, key)}" needs a restart (running with '
                         f'"{value}")' for key, value in kept.items() if getattr(new_config.general, key) != value]
        new_config = dataclasses.replace(new_config, general=dataclasses.replace(new_config.general, **kept))
        runtime.tls.install(tls)  # new connections get the new certificates; established ones keep theirs
        try:
            changes = runtime.apply(new_config)
        except Exception as exc:  # a bug, not the file: say so rather than lose the signal handler's call
            log.exception("event=reload_error path=%s", path)
            return ReloadResult(problems=[f"internal error while applying the new config: {exc!r}"])
        if new_config.general.log_level != old.log_level:
            logging.getLogger().setLevel(new_config.general.log_level.upper())
            changes.append("log_level")
        for note in needs_restart:
            log.warning("event=reload_needs_restart path=%s note=%r", path, note)
        self._watch_if_asked()
        log.info("event=reloaded path=%s changes=%s needs_restart=%d", path, ",".join(changes) or "none",
                 len(needs_restart))
        return ReloadResult(needs_restart=needs_restart, changes=changes)

    # ------------------------------------------------------------ watch_config

    def _watch_if_asked(self) -> None:
        if self.runtime.config.general.watch_config and self.runtime.config.source_path and not self._watching:
            self._watching = True
            self.runtime.spawn(self._watch_config(self.runtime.config.source_path))

    async def _watch_config(self, path: str) -> None:
        """Maintenance task: reload when the file's mtime, size or inode change (a file replaced by a rename
        is a new inode); stops when a reload turns watch_config off."""
        seen = _file_signature(path)
        log.info("event=watching_config path=%s interval_s=%s", path, WATCH_INTERVAL_S)
        try:
            while self.runtime.config.general.watch_config and not self.runtime.shutting_down:
                await asyncio.sleep(WATCH_INTERVAL_S)
                current = _file_signature(path)
                if current != seen:
                    seen = current  # a rejected file is not retried until it changes again
                    log.info("event=config_changed path=%s", path)
                    self.reload()
        finally:
            self._watching = False

    def _reload_problems(self) -> str | None:
        """The admin console's RELOAD: None when the file took effect, else its problems, one per line."""
        result = self.reload()
        return "\n".join(result.problems) if result.problems else None

    def _request_shutdown(self) -> None:
        self.runtime.spawn(self.shutdown())

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight transactions finish up to shutdown_timeout_s, then close."""
        runtime = self.runtime
        if runtime.shutting_down:
            return
        runtime.shutting_down = True
        log.info("event=shutdown_started clients=%d", len(runtime.clients))
        if self.server is not None:
            self.server.close()
        if self.http is not None:
            self.http.close()
        deadline = time.monotonic() + runtime.config.general.shutdown_timeout_s
        while time.monotonic() < deadline:
            if not any(client.busy() for client in runtime.clients):
                break
            await asyncio.sleep(0.05)
        for client in list(runtime.clients):
            client.fatal(sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        for pool in runtime.pools.values():
            pool.close()
        runtime.twophase.close()
        runtime.notify.close()
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


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
