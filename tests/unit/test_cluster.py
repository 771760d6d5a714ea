"""Cluster logic without sockets: read eligibility, load balancing, primary selection, bans and probe results."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import replace

import pytest

from config.model import Config, DatabaseConfig, GeneralConfig, UserConfig
from proxy.cluster import Cluster, ClusterServer, ProbeResult, build_clusters, parse_lsn
from proxy.errors import ProxyError


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make_cluster(clock: Clock, roles: tuple[str, ...] = ("primary", "replica", "replica"),
                 **general: object) -> Cluster:
    servers = [DatabaseConfig("app", "127.0.0.1", 5432 + index, "app", role) for index, role in enumerate(roles)]
    return Cluster("app", 0, servers, replace(GeneralConfig(), **general), None, now=clock)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def picks(cluster: Cluster, count: int = 12, **kwargs: object) -> list[int]:
    """Ports of `count` consecutive pick_read answers."""
    return [cluster.pick_read(**kwargs).address[1] for _ in range(count)]  # type: ignore[arg-type]


# -- initial state ------------------------------------------------------------------------------------


def test_fixed_roles_start_as_configured_and_auto_starts_unknown(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "replica", "auto"))
    assert [server.role for server in cluster.servers] == ["primary", "replica", "unknown"]
    assert all(server.healthy and server.available(clock()) for server in cluster.servers)
    assert cluster.servers[0].address == ("127.0.0.1", 5432)


def test_probing_is_off_without_credentials(clock: Clock) -> None:
    cluster = make_cluster(clock)
    asyncio.run(cluster.probe_once())
    asyncio.run(cluster.run())  # returns at once instead of looping
    assert cluster.probes == 0


def test_run_returns_at_once_when_interval_is_zero(clock: Clock) -> None:
    servers = [DatabaseConfig("app", "127.0.0.1", 1, "app", "primary")]
    cluster = Cluster("app", 0, servers, replace(GeneralConfig(), healthcheck_interval_ms=0), ("u", "p"), clock)
    asyncio.run(asyncio.wait_for(cluster.run(), 1))
    assert cluster.probes == 0


# -- primary() ---------------------------------------------------------------------------------------


def test_primary_with_one_primary(clock: Clock) -> None:
    cluster = make_cluster(clock)
    assert cluster.primary() is cluster.servers[0]


def test_primary_with_zero_primaries(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "replica"))
    with pytest.raises(ProxyError) as caught:
        cluster.primary()
    assert caught.value.sqlstate == "08006"
    assert caught.value.message == "no primary is reachable for database app shard 0"


def test_primary_unhealthy_is_not_reachable_and_a_ban_does_not_hold_it(clock: Clock) -> None:
    cluster = make_cluster(clock)
    primary = cluster.servers[0]
    primary.healthy = False
    with pytest.raises(ProxyError, match="no primary is reachable"):
        cluster.primary()
    primary.healthy = True
    cluster.ban(primary, "connect failed")  # writes have nowhere else to go
    assert not primary.banned(clock())
    assert cluster.primary() is primary


def test_refused_write_asks_for_an_early_probe(clock: Clock) -> None:
    cluster = make_cluster(clock)
    cluster.servers[0].healthy = False
    assert not cluster.wake.is_set()
    with pytest.raises(ProxyError):
        cluster.primary()
    assert cluster.wake.is_set()


def test_primary_in_recovery_is_not_primary(clock: Clock) -> None:
    """A server configured as primary that a probe found in recovery takes no writes."""
    cluster = make_cluster(clock, ("primary", "replica"))
    cluster._apply(clock(), [ProbeResult(True, 100, 0.0), ProbeResult(True, 100, 0.0)])
    assert cluster.servers[0].role == "replica"
    with pytest.raises(ProxyError, match="no primary is reachable"):
        cluster.primary()


def test_primary_follows_a_promoted_server(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "auto"))
    cluster._apply(clock(), ["connection refused", ProbeResult(False, 500, 0.0)])
    assert cluster.primary() is cluster.servers[1]


def test_split_brain_stops_writes_and_logs_once(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    cluster = make_cluster(clock, ("primary", "primary", "replica"))
    with caplog.at_level(logging.ERROR, logger="shardgate.cluster"):
        for _ in range(3):
            with pytest.raises(ProxyError) as caught:
                cluster.primary()
            assert caught.value.sqlstate == "08006"
            assert caught.value.message == (
                "split brain: 2 servers of database app claim to be primary; writes are stopped")
    assert [record.message.split()[0] for record in caplog.records] == ["event=split_brain"]
    # Resolved (one of them is demoted), then a new episode is logged again.
    cluster.servers[1].role = "replica"
    assert cluster.primary() is cluster.servers[0]
    cluster.servers[1].role = "primary"
    with caplog.at_level(logging.ERROR, logger="shardgate.cluster"), pytest.raises(ProxyError):
        cluster.primary()
    assert [record.message.split()[0] for record in caplog.records].count("event=split_brain") == 2


def test_banned_but_healthy_claimant_still_counts_for_split_brain(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "primary"))
    cluster.ban(cluster.servers[1], "test")
    with pytest.raises(ProxyError, match="split brain"):
        cluster.primary()


def test_unhealthy_old_primary_is_not_split_brain(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "auto"))
    cluster._apply(clock(), [ProbeResult(False, 100, 0.0), ProbeResult(True, 100, 0.0)])
    cluster._apply(clock(), ["connection refused", ProbeResult(False, 200, 0.0)])
    assert cluster.servers[0].role == "primary" and not cluster.servers[0].healthy
    assert cluster.primary() is cluster.servers[1]


# -- pick_read eligibility ----------------------------------------------------------------------------


def test_reads_go_to_replicas_with_exclude_primary(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    assert set(picks(cluster)) == {5433, 5434}


def test_include_primary_reads_use_primary_too(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="include_primary")
    assert Counter(picks(cluster)) == {5432: 4, 5433: 4, 5434: 4}


def test_banned_replica_takes_no_reads_until_the_ban_expires(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary", ban_timeout_s=30.0)
    replica = cluster.servers[1]
    cluster.ban(replica, "connect failed")
    assert replica.banned_until == clock() + 30.0
    assert set(picks(cluster)) == {5434}
    clock.now += 29.9
    assert set(picks(cluster)) == {5434}
    clock.now += 0.1
    assert replica.available(clock())
    assert set(picks(cluster)) == {5433, 5434}


def test_ban_is_logged_once_and_extended(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    cluster = make_cluster(clock, ban_timeout_s=10.0)
    replica = cluster.servers[1]
    with caplog.at_level(logging.WARNING, logger="shardgate.cluster"):
        cluster.ban(replica, "connect failed")
        clock.now += 5
        cluster.ban(replica, "connect failed again")
    assert len(caplog.records) == 1
    assert "event=server_banned" in caplog.records[0].message
    assert "server=127.0.0.1:5433" in caplog.records[0].message
    assert replica.banned_until == clock() + 10.0
    assert replica.ban_reason == "connect failed"


def test_unhealthy_replica_takes_no_reads(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    cluster.servers[2].healthy = False
    assert set(picks(cluster)) == {5433}


def test_lag_limits_exclude_replicas(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary", max_replica_lag_ms=1000,
                           max_replica_lag_bytes=4096)
    first, second = cluster.servers[1], cluster.servers[2]
    first.lag_ms = 1000.0  # at the limit: still fine
    second.lag_bytes = 4096
    assert set(picks(cluster)) == {5433, 5434}
    first.lag_ms = 1000.5
    assert set(picks(cluster)) == {5434}
    first.lag_ms = 0.0
    second.lag_bytes = 4097
    assert set(picks(cluster)) == {5433}


def test_zero_lag_limits_mean_no_limit(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    cluster.servers[1].lag_ms = 10**9
    cluster.servers[1].lag_bytes = 10**12
    assert set(picks(cluster)) == {5433, 5434}


def test_exclude_primary_falls_back_to_primary_when_no_replica_is_eligible(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary", max_replica_lag_bytes=100)
    cluster.ban(cluster.servers[1], "down")
    cluster.servers[2].lag_bytes = 101
    assert set(picks(cluster)) == {5432}


def test_reads_fail_only_when_no_replica_and_no_primary(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    for server in cluster.servers:
        server.healthy = False
    with pytest.raises(ProxyError) as caught:
        cluster.pick_read()
    assert caught.value.sqlstate == "08006"
    assert "no primary is reachable" in caught.value.message


def test_unknown_roles_take_no_reads(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "auto", "replica"), read_write_split="exclude_primary")
    assert set(picks(cluster)) == {5434}


def test_include_primary_skips_primary_in_split_brain(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "primary", "replica"), read_write_split="include_primary")
    assert set(picks(cluster)) == {5434}


def test_read_your_writes_needs_a_caught_up_replica(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    first, second = cluster.servers[1], cluster.servers[2]
    first.caught_up_at = 990.0
    second.caught_up_at = 1000.0
    assert set(picks(cluster, min_caught_up_at=995.0)) == {5434}
    # Nobody caught up yet: the primary, which always is.
    assert set(picks(cluster, min_caught_up_at=1000.5)) == {5432}
    clock.now += 5
    assert cluster.servers[0].caught_up_at == clock()


def test_sticky_replica_is_kept_while_eligible(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary")
    sticky = cluster.servers[2]
    assert set(picks(cluster, sticky=sticky)) == {5434}
    cluster.ban(sticky, "down")
    assert set(picks(cluster, sticky=sticky)) == {5433}


def test_sticky_is_ignored_when_lagging(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary", max_replica_lag_ms=10)
    sticky = cluster.servers[1]
    sticky.lag_ms = 50.0
    assert set(picks(cluster, sticky=sticky)) == {5434}


# -- load balancing -----------------------------------------------------------------------------------


def test_round_robin_order(clock: Clock) -> None:
    cluster = make_cluster(clock, ("replica", "primary", "replica", "replica"),
                           read_write_split="exclude_primary", load_balancing="round_robin")
    assert picks(cluster, 6) == [5432, 5434, 5435, 5432, 5434, 5435]


def test_random_spreads_reads(clock: Clock) -> None:
    cluster = make_cluster(clock, read_write_split="exclude_primary", load_balancing="random")
    counts = Counter(picks(cluster, 400))
    assert set(counts) == {5433, 5434}
    assert min(counts.values()) > 100


def test_least_connections(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "replica", "replica", "replica"),
                           read_write_split="exclude_primary", load_balancing="least_connections")
    load = {5433: 3, 5434: 1, 5435: 2}

    def active(server: ClusterServer) -> int:
        return load[server.address[1]]

    assert set(picks(cluster, active_connections=active)) == {5434}
    load[5434] = 5
    assert set(picks(cluster, active_connections=active)) == {5435}
    # Ties are spread, not always the first server.
    load.update({5433: 1, 5434: 1, 5435: 1})
    assert set(picks(cluster, 6, active_connections=active)) == {5433, 5434, 5435}


# -- probe results ------------------------------------------------------------------------------------


def test_parse_lsn() -> None:
    assert parse_lsn("0/0") == 0
    assert parse_lsn("0/3000060") == 0x3000060
    assert parse_lsn("1A/FF") == (0x1A << 32) | 0xFF
    with pytest.raises(ValueError):
        parse_lsn("garbage")


def test_probe_results_set_roles_lag_and_caught_up(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "auto", "auto"))
    started = clock()
    clock.now += 0.01
    cluster._apply(started, [ProbeResult(False, 5000, 0.0), ProbeResult(True, 5000, 0.0),
                             ProbeResult(True, 3000, 250.0)])
    primary, current, behind = cluster.servers
    assert [server.role for server in cluster.servers] == ["primary", "replica", "replica"]
    assert (current.lag_bytes, current.lag_ms, current.caught_up_at) == (0, 0.0, started)
    assert (behind.lag_bytes, behind.lag_ms, behind.caught_up_at) == (2000, 250.0, 0.0)
    assert (primary.lag_bytes, primary.lag_ms) == (0, 0.0)


def test_failed_probe_bans_and_success_lifts_the_ban_only_after_timeout(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "replica"), ban_timeout_s=10.0)
    replica = cluster.servers[1]
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), "08006 cannot connect"])
    assert not replica.healthy and replica.banned(clock())
    assert replica.last_error == "08006 cannot connect"
    clock.now += 2
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), ProbeResult(True, 10, 0.0)])
    assert replica.healthy and not replica.available(clock())
    clock.now += 8
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), ProbeResult(True, 10, 0.0)])
    assert replica.available(clock()) and replica.banned_until == 0.0


def test_failed_probe_of_the_primary_does_not_ban_it(clock: Clock) -> None:
    # A restarted primary takes writes at its first good probe, not after ban_timeout_s.
    cluster = make_cluster(clock, ("primary", "replica"), ban_timeout_s=30.0)
    primary = cluster.servers[0]
    cluster._apply(clock(), ["57P03 the database system is shutting down", ProbeResult(True, 10, 0.0)])
    assert not primary.healthy and not primary.banned(clock())
    with pytest.raises(ProxyError, match="no primary is reachable"):
        cluster.primary()
    clock.now += 1
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), ProbeResult(True, 10, 0.0)])
    assert cluster.primary() is primary


def test_banned_replica_promoted_takes_writes_at_once(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "auto"), ban_timeout_s=30.0)
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), ProbeResult(True, 10, 0.0)])
    replica = cluster.servers[1]
    cluster._apply(clock(), [ProbeResult(False, 10, 0.0), "08006 cannot connect"])
    assert replica.banned(clock())
    clock.now += 1
    cluster._apply(clock(), ["08006 cannot connect", ProbeResult(False, 20, 0.0)])
    assert replica.role == "primary" and not replica.banned(clock())
    assert cluster.primary() is replica


def test_no_primary_in_a_probe_keeps_previous_lag(clock: Clock) -> None:
    cluster = make_cluster(clock, ("auto", "auto"))
    cluster._apply(clock(), [ProbeResult(False, 900, 0.0), ProbeResult(True, 400, 0.0)])
    assert cluster.servers[1].lag_bytes == 500
    cluster._apply(clock(), ["down", ProbeResult(True, 450, 0.0)])
    assert cluster.servers[1].lag_bytes == 500


def test_stats(clock: Clock) -> None:
    cluster = make_cluster(clock, ("primary", "replica"))
    cluster.ban(cluster.servers[1], "down")
    cluster.servers[1].lag_bytes = 7
    stats = cluster.stats()
    assert stats[1] == {
        "database": "app", "shard": 0, "host": "127.0.0.1", "port": 5433, "role": "replica",
        "configured_role": "replica", "healthy": True, "banned": True, "lag_ms": 0.0, "lag_bytes": 7,
    }
    assert stats[0]["banned"] is False


def test_build_clusters_groups_by_name_and_shard() -> None:
    config = Config(
        users=(UserConfig("app", "pw", server_user="backend", server_password="secret"), UserConfig("other")),
        databases=(
            DatabaseConfig("app", port=1, shard=0),
            DatabaseConfig("app", port=2, role="replica", shard=0),
            DatabaseConfig("app", port=3, shard=1),
            DatabaseConfig("logs", port=4),
        ),
    )
    clusters = build_clusters(config)
    assert sorted(clusters) == [("app", 0), ("app", 1), ("logs", 0)]
    assert [server.address[1] for server in clusters["app", 0].servers] == [1, 2]
    assert clusters["app", 1].shard == 1
    assert clusters["app", 0].credentials == ("backend", "secret")
    assert build_clusters(replace(config, users=()))["logs", 0].credentials is None


def test_run_survives_failing_probes_until_cancelled(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    servers = [DatabaseConfig("app", "127.0.0.1", 1, "app", "primary")]
    cluster = Cluster("app", 0, servers, replace(GeneralConfig(), healthcheck_interval_ms=10), ("u", "p"), clock)
    calls = 0

    async def broken_probe() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in a probe")

    cluster.probe_once = broken_probe  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(cluster.run())
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="shardgate.cluster"):
        asyncio.run(scenario())
    assert calls >= 5
    assert "event=probe_failed" in caplog.records[0].message


# -- waiting for a primary (primary_wait_timeout_ms) ---------------------------------------------------


def waiting_cluster(clock: Clock, **general: object) -> Cluster:
    servers = [DatabaseConfig("app", "127.0.0.1", 5432 + index, "app", "auto") for index in range(2)]
    settings = replace(GeneralConfig(), **{"primary_wait_timeout_ms": 5000, **general})  # type: ignore[arg-type]
    return Cluster("app", 0, servers, settings, ("u", "p"), now=clock)


PRIMARY_AND_REPLICA = [ProbeResult(False, 100, 0.0), ProbeResult(True, 100, 0.0)]
TWO_REPLICAS = [ProbeResult(True, 100, 0.0), ProbeResult(True, 100, 0.0)]


def test_a_wait_ends_at_the_first_round_started_after_it_that_finds_a_primary(clock: Clock) -> None:
    cluster = waiting_cluster(clock)
    assert cluster.waits_for_primary()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(ProxyError) as refused:
            cluster.primary()
        waiting = asyncio.create_task(cluster.wait_for_primary(loop.time() + 5, refused.value))
        await asyncio.sleep(0)
        assert cluster.primary_waiting == 1 and cluster.wake.is_set()  # asks for a probe at once
        cluster._apply(clock() - 1, PRIMARY_AND_REPLICA)  # started before the wait: may predate the outage
        await asyncio.sleep(0.01)
        assert not waiting.done()
        cluster._apply(clock(), TWO_REPLICAS)  # after it, but still no primary
        await asyncio.sleep(0.01)
        assert not waiting.done()
        clock.now += 1
        cluster._apply(clock(), PRIMARY_AND_REPLICA)
        assert await asyncio.wait_for(waiting, 1) is cluster.servers[0]
        assert cluster.primary_waiting == 0 and cluster.primary_waits == 1 and cluster.primary_wait_timeouts == 0

    asyncio.run(scenario())


def test_a_wait_without_a_primary_ends_at_its_deadline_naming_the_database(clock: Clock) -> None:
    cluster = waiting_cluster(clock, primary_wait_timeout_ms=200)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        cluster._apply(clock(), TWO_REPLICAS)
        with pytest.raises(ProxyError) as refused:
            cluster.primary()
        started = loop.time()
        with pytest.raises(ProxyError) as caught:
            await cluster.wait_for_primary(loop.time() + 0.2, refused.value)
        assert 0.15 < loop.time() - started < 2
        assert caught.value.sqlstate == "08006"
        assert caught.value.message == ("no primary is reachable for database app shard 0 "
                                        "(waited primary_wait_timeout_ms = 200 ms)")
        assert cluster.primary_waiting == 0 and cluster.primary_wait_timeouts == 1

    asyncio.run(scenario())


def test_nothing_waits_with_the_wait_or_the_probes_off(clock: Clock) -> None:
    assert not waiting_cluster(clock, primary_wait_timeout_ms=0).waits_for_primary()
    assert not waiting_cluster(clock, healthcheck_interval_ms=0).waits_for_primary()
    assert not make_cluster(clock).waits_for_primary()  # no credentials: no probes
