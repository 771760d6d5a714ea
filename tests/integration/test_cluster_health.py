"""Cluster health against real servers: roles found by probes, a stopped replica banned and readmitted,
replay lag excluding a replica, and failover to a promoted replica (on a throwaway topology).

The `pg` topology is shared with other tests: whatever a test stops or pauses is restored in `finally`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import pytest

from config.model import DatabaseConfig, GeneralConfig
from localpg import PgServer, Topology
from proxy.cluster import Cluster, ClusterServer
from proxy.errors import ProxyError
from tests.harness import RECEIVED, wait_wal

pytestmark = pytest.mark.timeout(240)

CREDENTIALS = ("app", "app")
BAN_TIMEOUT_S = 30.0
FAILOVER_DEADLINE_S = 5.0
POLL_INTERVAL_S = 0.1


class Clock:
    """Monotonic time plus a manual offset, so ban timeouts pass without waiting."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


def run_async(coroutine: Coroutine[Any, Any, Any], *clusters: Cluster, timeout_s: float = 180.0) -> Any:
    """Run a scenario; the clusters' monitor connections are closed while their event loop still runs."""

    async def scenario() -> Any:
        try:
            return await asyncio.wait_for(coroutine, timeout_s)
        finally:
            for cluster in clusters:
                cluster.close()

    return asyncio.run(scenario())


def entries(servers: list[PgServer], roles: list[str]) -> list[DatabaseConfig]:
    return [DatabaseConfig("app", server.host, server.port, "app", role)
            for server, role in zip(servers, roles, strict=True)]


def make_cluster(servers: list[PgServer], roles: list[str], clock: Callable[[], float] = time.monotonic,
                 **general: Any) -> Cluster:
    settings = replace(GeneralConfig(), ban_timeout_s=BAN_TIMEOUT_S, server_connect_timeout_ms=3000, **general)
    return Cluster("app", 0, entries(servers, roles), settings, CREDENTIALS, now=clock)


def at(cluster: Cluster, server: PgServer) -> ClusterServer:
    found = cluster.server_at((server.host, server.port))
    assert found is not None
    return found


def read_ports(cluster: Cluster, count: int = 12, **kwargs: Any) -> set[int]:
    return {cluster.pick_read(**kwargs).address[1] for _ in range(count)}


async def probe_until(cluster: Cluster, condition: Callable[[], bool], timeout_s: float) -> float:
    """Probe until `condition()` holds; returns the seconds it took."""
    started = time.monotonic()
    while True:
        await cluster.probe_once()
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met after {timeout_s}s: {cluster.stats()}")
        await asyncio.sleep(POLL_INTERVAL_S)



# -- roles ------------------------------------------------------------------------------------------


def test_probe_finds_roles_of_auto_servers(pg: Topology) -> None:
    assert pg.primary is not None
    servers = [pg.primary, *pg.replicas]
    cluster = make_cluster(servers, ["auto"] * len(servers))

    async def scenario() -> None:
        assert [server.role for server in cluster.servers] == ["unknown"] * len(servers)
        with pytest.raises(ProxyError) as caught:
            cluster.primary()
        assert caught.value.sqlstate == "08006"
        await cluster.probe_once()

    run_async(scenario(), cluster)
    assert [server.role for server in cluster.servers] == ["primary"] + ["replica"] * len(pg.replicas)
    assert all(server.healthy for server in cluster.servers)
    assert cluster.primary() is at(cluster, pg.primary)
    assert read_ports(cluster) == {server.port for server in servers}  # include_primary by default
    stats = cluster.stats()
    assert [entry["role"] for entry in stats] == ["primary", "replica", "replica"]
    assert all(entry["lag_bytes"] == 0 or entry["role"] == "replica" for entry in stats)


def test_probe_corrects_wrong_fixed_roles(pg: Topology) -> None:
    """A replica configured as primary is demoted by the probe: writes never go to a server in recovery."""
    assert pg.primary is not None
    replica = pg.replicas[0]
    cluster = make_cluster([replica, pg.primary], ["primary", "replica"])
    assert cluster.primary() is at(cluster, replica)  # before any probe the config is believed

    async def scenario() -> None:
        await cluster.probe_once()

    run_async(scenario(), cluster)
    assert at(cluster, replica).role == "replica"
    assert cluster.primary() is at(cluster, pg.primary)


# -- a stopped replica -------------------------------------------------------------------------------


def test_stopped_replica_is_banned_and_readmitted_after_ban_timeout(pg: Topology) -> None:
    primary = pg.primary
    assert primary is not None
    victim, other = pg.replicas[0], pg.replicas[1]
    clock = Clock()
    cluster = make_cluster([primary, victim, other], ["primary", "replica", "replica"], clock,
                           read_write_split="exclude_primary")

    async def scenario() -> None:
        await cluster.probe_once()
        assert read_ports(cluster) == {victim.port, other.port}
        victim.stop()
        try:
            await cluster.probe_once()
            server = at(cluster, victim)
            assert not server.healthy
            assert server.banned(clock())
            assert server.last_error
            assert read_ports(cluster) == {other.port}
            assert cluster.primary() is at(cluster, primary)  # the primary is untouched
        finally:
            victim.start()
        # Back up, but the ban holds until ban_timeout_s after the last failed probe.
        await probe_until(cluster, lambda: at(cluster, victim).healthy, timeout_s=30)
        assert not at(cluster, victim).available(clock())
        assert read_ports(cluster) == {other.port}
        clock.advance(BAN_TIMEOUT_S)
        await cluster.probe_once()
        assert at(cluster, victim).available(clock())
        assert at(cluster, victim).banned_until == 0.0
        assert read_ports(cluster) == {victim.port, other.port}

    try:
        run_async(scenario(), cluster)
    finally:
        victim.start()


def test_lost_monitor_connection_is_reopened(pg: Topology) -> None:
    """A monitor connection killed by the server is replaced on the next probe, without a ban."""
    primary = pg.primary
    assert primary is not None
    cluster = make_cluster([primary], ["primary"])

    async def scenario() -> None:
        await cluster.probe_once()
        first = cluster.servers[0].monitor
        assert first is not None
        terminated = primary.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE pid = {first.process_id} AND application_name = 'shardgate-monitor'")
        assert terminated == "t"
        deadline = time.monotonic() + 10
        while not first.broken:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert cluster.wake.is_set()  # the run loop would probe early
        await cluster.probe_once()
        second = cluster.servers[0].monitor
        assert second is not None and second is not first
        assert cluster.servers[0].healthy

    run_async(scenario(), cluster)



def test_run_probes_in_the_background_and_early_after_a_lost_monitor(pg: Topology) -> None:
    assert pg.primary is not None
    primary = pg.primary
    # A long interval: only the lost monitor connection can explain a second probe soon after the first.
    cluster = make_cluster([primary], ["primary"], healthcheck_interval_ms=60_000)

    async def scenario() -> None:
        task = asyncio.create_task(cluster.run())
        try:
            deadline = time.monotonic() + 10
            while cluster.probes == 0:
                assert time.monotonic() < deadline, "no probe ran"
                await asyncio.sleep(0.02)
            first = cluster.servers[0].monitor
            assert first is not None and cluster.probes == 1
            await asyncio.to_thread(
                primary.psql, f"SELECT pg_terminate_backend({first.process_id})")
            while cluster.probes < 2:
                assert time.monotonic() < deadline, "the lost monitor did not trigger a probe"
                await asyncio.sleep(0.02)
            assert cluster.servers[0].healthy
            assert cluster.servers[0].monitor is not None and cluster.servers[0].monitor is not first
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert cluster.servers[0].monitor is None  # run() closes its monitor connections when cancelled

    run_async(scenario(), cluster)

# -- replay lag --------------------------------------------------------------------------------------


def test_paused_replay_excludes_replica_until_resumed(pg: Topology) -> None:
    assert pg.primary is not None
    primary, lagging, other = pg.primary, pg.replicas[0], pg.replicas[1]
    lag_limit_bytes = 64 * 1024
    clock = Clock()
    servers = [primary, lagging, other]
    roles = ["primary", "replica", "replica"]
    by_bytes = make_cluster(servers, roles, clock, read_write_split="exclude_primary",
                            max_replica_lag_bytes=lag_limit_bytes)
    by_time = make_cluster(servers, roles, clock, read_write_split="exclude_primary", max_replica_lag_ms=100)
    table = f"lag_{uuid.uuid4().hex[:12]}"

    def write_wal() -> None:
        primary.psql(f"INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g",
                     user="app", db="app")

    async def scenario() -> None:
        primary.psql(f"CREATE TABLE {table} (id int, filler text)", user="app", db="app")
        write_wal()
        wait_wal(primary, [lagging])  # so a replayed transaction timestamp exists for the time lag
        await by_bytes.probe_once()
        await by_time.probe_once()
        assert read_ports(by_bytes) == {lagging.port, other.port}
        lagging.psql("SELECT pg_wal_replay_pause()")
        try:
            write_wal()
            written_at = clock()
            wait_wal(primary, [lagging], RECEIVED)
            await asyncio.sleep(0.3)  # the time lag is measured against the last replayed commit
            await by_bytes.probe_once()
            await by_time.probe_once()
            server = at(by_bytes, lagging)
            assert server.lag_bytes > lag_limit_bytes
            assert server.healthy and server.available(clock())
            assert read_ports(by_bytes) == {other.port}
            assert at(by_time, lagging).lag_ms > 100
            assert read_ports(by_time) == {other.port}
            # Read-your-writes: the paused replica has not replayed the write, the other one has.
            await probe_until(by_bytes, lambda: at(by_bytes, other).caught_up_at >= written_at, timeout_s=10)
            assert read_ports(by_bytes, min_caught_up_at=written_at) == {other.port}
        finally:
            lagging.psql("SELECT pg_wal_replay_resume()")
        took_s = await probe_until(by_bytes, lambda: at(by_bytes, lagging).lag_bytes <= lag_limit_bytes,
                                   timeout_s=30)
        assert read_ports(by_bytes) == {lagging.port, other.port}
        await probe_until(by_time, lambda: at(by_time, lagging).lag_ms <= 100, timeout_s=30)
        assert read_ports(by_time) == {lagging.port, other.port}
        await probe_until(by_bytes, lambda: at(by_bytes, lagging).caught_up_at >= written_at, timeout_s=30)
        assert read_ports(by_bytes, min_caught_up_at=written_at) == {lagging.port, other.port}
        print(f"readmitted {took_s:.2f}s after replay resumed")

    try:
        run_async(scenario(), by_bytes, by_time)
    finally:
        if lagging.psql("SELECT pg_is_wal_replay_paused()") == "t":
            lagging.psql("SELECT pg_wal_replay_resume()")
        primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


# -- failover (own topology) -------------------------------------------------------------------------


def test_failover_to_promoted_replica_and_split_brain(throwaway_topology: Topology) -> None:
    old, new = throwaway_topology.primary, throwaway_topology.replicas[0]
    assert old is not None
    cluster = make_cluster([old, new], ["auto", "auto"], read_write_split="exclude_primary")

    async def scenario() -> None:
        await cluster.probe_once()
        assert cluster.primary() is at(cluster, old)
        assert read_ports(cluster) == {new.port}

        old.stop()
        await cluster.probe_once()
        with pytest.raises(ProxyError) as caught:
            cluster.primary()
        assert caught.value.sqlstate == "08006"
        assert caught.value.message == "no primary is reachable for database app shard 0"
        assert at(cluster, new).role == "replica"  # never a write target while in recovery
        assert read_ports(cluster) == {new.port}  # reads go on during the outage

        new.promote()
        took_s = await probe_until(cluster, lambda: cluster._primary_or_none() is at(cluster, new),
                                   timeout_s=FAILOVER_DEADLINE_S)
        assert cluster.primary() is at(cluster, new)
        assert at(cluster, new).role == "primary"
        assert read_ports(cluster) == {new.port}  # no replica left: the primary serves reads
        print(f"writes follow the promoted server {took_s:.2f}s after promotion")

        # The old primary comes back still believing it is primary: two claimants, writes stop.
        old.start()
        await probe_until(cluster, lambda: at(cluster, old).healthy, timeout_s=30)
        with pytest.raises(ProxyError) as caught:
            cluster.primary()
        assert caught.value.sqlstate == "08006"
        assert caught.value.message.startswith("split brain: 2 servers of database app claim to be primary")

    run_async(scenario(), cluster)
