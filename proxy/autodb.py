"""Databases of the wildcard entry (`name = "*"`): a cluster per database name asked for, made on first use,
closed by the janitor once idle."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from config.model import Config, DatabaseConfig
from proxy.cluster import Cluster
from proxy.pool import Pool
from proxy.tls import TlsContexts

log = logging.getLogger("shardgate.autodb")

# A client naming databases at random must not grow memory without bound: past this many the oldest idle
# ones are swept first, and a new name is refused until some are.
MAX_AUTO_DATABASES = 10_000

# (logical database, host, port, server database, user): the runtime's pool key
PoolKey = tuple[str, str, int, str, str]


class AutoDatabases:
    """The databases the wildcard entry serves now. Each is a one-server Cluster in the runtime's `clusters`
    (so views, pools and sessions treat it as any other) and its pools in `pools`; only this object adds or
    removes them, and only the janitor's `sweep` removes them."""

    def __init__(self, config: Config, clusters: dict[tuple[str, int], Cluster], pools: dict[PoolKey, Pool],
                 tls: TlsContexts | None) -> None:
        self.clusters = clusters
        self.pools = pools
        self.tls = tls
        self.names: dict[str, float] = {}  # database -> monotonic time it was last seen in use
        self.created = 0
        self.closed = 0
        self.configure(config)

    def configure(self, config: Config) -> list[str]:
        """Start or reload: the wildcard entry and the idle timeout. Returns the auto databases dropped because
        the wildcard changed or is gone, or an explicit entry now has their name (their clients keep their
        pools until they leave; new logins get the new entry)."""
        self.config = config
        self.wildcard = config.wildcard()
        self.idle_timeout_s = config.general.autodb_idle_timeout_s
        explicit = {db.name for db in config.databases}
        dropped = [name for name, _ in list(self.names.items())
                   if self.wildcard is None or name in explicit
                   or self._entry(name) != self.clusters[(name, 0)].servers[0].config]
        for name in dropped:
            self._close(name, "reload")
        return dropped

    def _entry(self, database: str) -> DatabaseConfig:
        assert self.wildcard is not None
        return dataclasses.replace(self.wildcard, name=database, database_name=database)

    def owns(self, database: str) -> bool:
        return database in self.names

    def cluster_for(self, database: str) -> Cluster | None:
        """The cluster of `database` when the wildcard serves it, made now if it is new; None without a
        wildcard (or with too many auto databases open)."""
        if self.wildcard is None or not database:
            return None
        cluster = self.clusters.get((database, 0))
        if cluster is not None:
            return cluster
        if len(self.names) >= MAX_AUTO_DATABASES:
            log.warning("event=autodb_refused database=%r reason=too_many open=%d", database, len(self.names))
            return None
        general = self.config.general
        # no probe loop: one primary, healthy until its servers say otherwise (a probe would hold a
        # connection to the database and keep DROP DATABASE from running)
        cluster = Cluster(database, 0, [self._entry(database)], general, None)
        cluster.tls = self.tls
        self.clusters[(database, 0)] = cluster
        self.names[database] = time.monotonic()
        self.created += 1
        log.info("event=autodb_created database=%r server=%s:%d", database, self.wildcard.host, self.wildcard.port)
        return cluster

    def sweep(self, clients_of: Callable[[str], int]) -> None:
        """Janitor: close the pools of an auto database with no client and no server in use for
        autodb_idle_timeout_s (idle servers do not count as use), and forget it."""
        if not self.names:
            return
        now = time.monotonic()
        in_use = {key[0] for key, pool in self.pools.items()
                  if key[0] in self.names and (pool.busy or pool.connecting or pool.waiters)}
        for name, last_used in list(self.names.items()):
            if name in in_use or clients_of(name) > 0:
                self.names[name] = now
            elif now - last_used >= self.idle_timeout_s:
                self._close(name, "idle")

    def _close(self, database: str, reason: str) -> None:
        for key in [key for key in self.pools if key[0] == database]:
            pool = self.pools.pop(key)
            if reason == "idle":
                pool.close()
            else:
                pool.retire()  # clients holding it finish with it; its servers close as they come back
        cluster = self.clusters.pop((database, 0), None)
        if cluster is not None:
            cluster.remove()
        self.names.pop(database, None)
        self.closed += 1
        log.info("event=autodb_closed database=%r reason=%s", database, reason)
