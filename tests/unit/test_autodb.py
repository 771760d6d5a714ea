"""The wildcard database's bookkeeping (proxy/autodb.py): clusters made per name, explicit entries left alone,
the janitor's sweep, and what a reload drops. No server is contacted: pools are made and closed only."""

from __future__ import annotations

from typing import Any

from config.loader import parse
from config.model import Config
from proxy.autodb import AutoDatabases, PoolKey
from proxy.cluster import Cluster
from proxy.pool import Pool, PoolSettings

SETTINGS = PoolSettings(size=2, min_size=0, checkout_timeout_ms=100, idle_timeout_s=60, server_lifetime_s=60,
                        healthcheck_idle_ms=1000, connect_timeout_ms=100, reset_query="")


def config(*, wildcard: dict[str, Any] | None = None, extra: tuple[str, ...] = (), idle_s: float = 0.0) -> Config:
    databases: list[dict[str, Any]] = [{"name": "app"}, *({"name": name} for name in extra)]
    if wildcard is not None:
        databases.append({"name": "*", **wildcard})
    return parse({"general": {"autodb_idle_timeout_s": idle_s}, "users": [{"name": "app", "password": "pw"}],
                  "databases": databases})


def make(cfg: Config) -> tuple[AutoDatabases, dict[tuple[str, int], Cluster], dict[PoolKey, Pool]]:
    clusters: dict[tuple[str, int], Cluster] = {}
    pools: dict[PoolKey, Pool] = {}
    return AutoDatabases(cfg, clusters, pools, None), clusters, pools


def add_pool(pools: dict[PoolKey, Pool], cluster: Cluster, user: str = "app") -> Pool:
    server = cluster.servers[0].config
    pool = Pool(f"{user}@{cluster.name}", (server.host, server.port), server.server_database, user, "pw", SETTINGS)
    pools[(cluster.name, server.host, server.port, server.server_database, user)] = pool
    return pool


def test_a_cluster_per_name_on_the_wildcards_server() -> None:
    autodb, clusters, _ = make(config(wildcard={"host": "10.0.0.5", "port": 5433}))
    cluster = autodb.cluster_for("testdb")
    assert cluster is not None and clusters[("testdb", 0)] is cluster
    (server,) = cluster.servers
    assert (server.address, server.config.server_database, server.config.role) == (("10.0.0.5", 5433), "testdb",
                                                                                   "primary")
    assert autodb.cluster_for("testdb") is cluster  # made once
    assert autodb.owns("testdb") and not autodb.owns("app") and autodb.created == 1


def test_no_wildcard_no_cluster() -> None:
    autodb, clusters, _ = make(config())
    assert autodb.cluster_for("testdb") is None and clusters == {}


def test_the_sweep_keeps_a_database_with_clients_or_busy_servers() -> None:
    autodb, clusters, pools = make(config(wildcard={}, idle_s=0.0))
    cluster = autodb.cluster_for("testdb")
    assert cluster is not None
    pool = add_pool(pools, cluster)
    autodb.sweep(lambda name: 1 if name == "testdb" else 0)
    assert autodb.owns("testdb")
    pool.connecting = 1  # a server login under way is use
    autodb.sweep(lambda name: 0)
    assert autodb.owns("testdb")
    pool.connecting = 0
    autodb.sweep(lambda name: 0)
    assert not autodb.owns("testdb") and ("testdb", 0) not in clusters and pools == {}
    assert pool.closed and cluster.removed and autodb.closed == 1


def test_the_sweep_waits_for_the_idle_timeout() -> None:
    autodb, _, pools = make(config(wildcard={}, idle_s=3600.0))
    cluster = autodb.cluster_for("testdb")
    assert cluster is not None
    add_pool(pools, cluster)
    autodb.sweep(lambda name: 0)
    assert autodb.owns("testdb")


def test_a_reload_drops_what_the_wildcard_no_longer_serves() -> None:
    autodb, clusters, pools = make(config(wildcard={"port": 5433}))
    for name in ("kept", "now_explicit", "moved"):
        cluster = autodb.cluster_for(name)
        assert cluster is not None
        add_pool(pools, cluster)
    # an explicit entry now has "now_explicit": its wildcard database goes, its pool is drained, not refused
    held = pools[("now_explicit", "127.0.0.1", 5433, "now_explicit", "app")]
    assert autodb.configure(config(wildcard={"port": 5433}, extra=("now_explicit",))) == ["now_explicit"]
    assert held.retired == "" and not held.closed
    assert autodb.owns("kept") and ("now_explicit", 0) not in clusters
    # the wildcard moved to another server: every database it served goes
    assert sorted(autodb.configure(config(wildcard={"port": 5434}))) == ["kept", "moved"]
    assert clusters == {} and pools == {}
    assert autodb.cluster_for("kept") is not None and clusters[("kept", 0)].servers[0].address[1] == 5434
    # no wildcard: none is served
    assert autodb.configure(config()) == ["kept"]
    assert autodb.cluster_for("kept") is None
