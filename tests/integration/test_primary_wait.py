"""Writes during a failover wait for a primary (primary_wait_timeout_ms) instead of failing at once: a
promoted replica or a restarted primary takes them; with no primary by the deadline the error names the
database; reads keep going to the replica meanwhile. Each test has a private topology it stops and promotes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest

from localpg import PgServer, Topology
from tests.harness import DirectProxy, ProxyFactory, ProxyProcess, database_entries, wait_wal

pytestmark = pytest.mark.timeout(240)

HEALTHCHECK_INTERVAL_MS = 200
CONNECT_TIMEOUT_S = 5
# The waiting writes are held this long before the primary is promoted or restarted: they must still be
# waiting (not refused) by then.
OUTAGE_S = 2.0
# After the promotion (or the restart), the waiting write must be done this soon: probes every 0.25 s
# while writes wait, plus the promotion's own checkpoint on a loaded machine.
TAKEN_WITHIN_S = 5.0
SHORT_WAIT_MS = 1500
LONG_WAIT_MS = 30_000
# A read during the outage is served by the replica at once (well under the wait).
READ_WITHIN_S = 1.5
WHERE_SQL = "SELECT pg_is_in_recovery(), inet_server_port()"


@dataclass
class Outcome:
    """One statement through the proxy: where it ran or its error, and when it ended."""

    ended_at: float
    port: int | None = None
    sqlstate: str | None = None
    message: str = ""


def real_proxy(started: ProxyProcess | DirectProxy) -> ProxyProcess:
    if isinstance(started, DirectProxy):
        pytest.skip("the wait is the proxy's (SHARDGATE_TEST_DIRECT=1 has no proxy)")
    return started


def start_proxy(proxy: ProxyFactory, servers: list[PgServer], wait_ms: int, roles: str = "auto") -> ProxyProcess:
    databases = [
        {"name": "app", "host": server.host, "port": server.port, "database_name": "app", "role": roles}
        for server in servers
    ]
    return real_proxy(proxy(databases=databases, general={
        "read_write_split": "exclude_primary",
        "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
        "ban_timeout_s": 1.0,
        "server_connect_timeout_ms": 2000,
        "primary_wait_timeout_ms": wait_ms,
    }))


def proxy_log(shardgate: ProxyProcess) -> str:
    return f"\n--- proxy stderr (tail) ---\n{shardgate.stderr_text()[-4000:]}"


async def write(conn: asyncpg.Connection, table: str, timeout_s: float, note: str = "waited") -> Outcome:
    try:
        port = await asyncio.wait_for(
            conn.fetchval(f"INSERT INTO {table} (note) VALUES ($1) RETURNING inet_server_port()", note),
            timeout_s)
        return Outcome(time.monotonic(), port=int(port))
    except asyncpg.PostgresError as error:
        return Outcome(time.monotonic(), sqlstate=error.sqlstate, message=str(error))


async def where(conn: asyncpg.Connection) -> tuple[bool, int]:
    row = await asyncio.wait_for(conn.fetchrow(WHERE_SQL), READ_WITHIN_S * 4)
    return bool(row[0]), int(row[1])


async def wait_log(shardgate: ProxyProcess, text: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in shardgate.stderr_text():
        assert time.monotonic() < deadline, f"no {text!r} in the proxy's log{proxy_log(shardgate)}"
        await asyncio.sleep(0.05)


async def until_written(shardgate: ProxyProcess, table: str) -> None:
    """Roles are known after the first probe; until then a write waits (or, at start, may be refused)."""
    deadline = time.monotonic() + 15
    while True:
        conn = await asyncpg.connect(shardgate.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
        try:
            if (await write(conn, table, 10, "before")).port is not None:
                return
        finally:
            await conn.close()
        assert time.monotonic() < deadline, f"no write went through{proxy_log(shardgate)}"
        await asyncio.sleep(0.1)


def metric(shardgate: ProxyProcess, name: str) -> float:
    with urllib.request.urlopen(f"{shardgate.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}{{database="app",shard="0"}} (\S+)$', text, re.MULTILINE)
    assert found is not None, f"no {name} in /metrics"
    return float(found.group(1))


def make_table(primary: PgServer, replicas: list[PgServer]) -> str:
    table = f"pwait_{uuid.uuid4().hex[:12]}"
    primary.psql(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)", user="app", db="app")
    wait_wal(primary, replicas)
    return table


def test_writes_wait_for_the_promoted_replica_or_time_out_naming_the_database(
    proxy: ProxyFactory, throwaway_topology: Topology
) -> None:
    """The primary is killed. Through a proxy waiting 1.5 s a write fails after about that long with 08006
    naming the database, and its session reads on the replica right after; through a proxy waiting 30 s
    writes (an open session's and a fresh one's) are held while reads go on, then run on the promoted
    replica."""
    old, new = throwaway_topology.primary, throwaway_topology.replicas[0]
    assert old is not None
    table = make_table(old, [new])
    short = start_proxy(proxy, [old, new], SHORT_WAIT_MS)
    long = start_proxy(proxy, [old, new], LONG_WAIT_MS)

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        await until_written(short, table)
        await until_written(long, table)
        held = await asyncpg.connect(long.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
        timing_out = await asyncpg.connect(short.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
        reader = await asyncpg.connect(long.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
        try:
            seen["held_before"] = (await write(held, table, 10, "before")).port
            await asyncio.to_thread(old.kill)
            killed_at = time.monotonic()
            # the open session's write: its parked server is dead, the probes may not have seen it yet
            held_write = asyncio.create_task(write(held, table, LONG_WAIT_MS / 1000 + 10))
            short_started = time.monotonic()
            seen["short"] = await write(timing_out, table, SHORT_WAIT_MS / 1000 + 10)
            seen["short_s"] = seen["short"].ended_at - short_started
            seen["short_after"] = await where(timing_out)
            await wait_log(long, "event=server_unhealthy")
            # a fresh session once the probes know there is no primary
            fresh = await asyncpg.connect(long.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
            fresh_write = asyncio.create_task(write(fresh, table, LONG_WAIT_MS / 1000 + 10))
            reads: list[tuple[float, tuple[bool, int]]] = []
            while time.monotonic() - killed_at < OUTAGE_S or len(reads) < 5:
                started = time.monotonic()
                landing = await where(reader)
                reads.append((time.monotonic() - started, landing))
                await asyncio.sleep(0.1)
            seen["reads"] = reads
            seen["waiting_at_promotion"] = (not held_write.done(), not fresh_write.done())
            promoted_at = time.monotonic()  # promote() returns once the server left recovery
            await asyncio.to_thread(new.promote)
            seen["held"] = await held_write
            seen["fresh"] = await fresh_write
            seen["held_s"] = seen["held"].ended_at - promoted_at
            seen["fresh_s"] = seen["fresh"].ended_at - promoted_at
            seen["held_after"] = (await write(held, table, 10)).port
            await fresh.close()
        finally:
            for conn in (held, timing_out, reader):
                conn.terminate()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 180))
    log = proxy_log(long)
    assert seen["held_before"] == old.port, seen
    short_outcome: Outcome = seen["short"]
    assert short_outcome.port is None and short_outcome.sqlstate == "08006", f"{short_outcome}{proxy_log(short)}"
    assert "database app" in short_outcome.message and "primary_wait_timeout_ms" in short_outcome.message, \
        short_outcome
    assert SHORT_WAIT_MS / 1000 * 0.8 <= seen["short_s"] < SHORT_WAIT_MS / 1000 + 3, seen["short_s"]
    assert seen["short_after"] == (True, new.port), "the session that timed out cannot read on the replica"

    assert all(landing == (True, new.port) for _, landing in seen["reads"]), seen["reads"]
    slowest_read = max(took for took, _ in seen["reads"])
    assert slowest_read < READ_WITHIN_S, f"a read during the outage took {slowest_read:.2f}s{log}"
    assert seen["waiting_at_promotion"] == (True, True), f"a write did not wait: {seen}{log}"
    for name in ("held", "fresh"):
        outcome: Outcome = seen[name]
        assert outcome.port == new.port, f"the {name} session's waiting write: {outcome}{log}"
        assert seen[f"{name}_s"] < TAKEN_WITHIN_S, f"{name}: {seen[f'{name}_s']:.2f}s after promotion{log}"
    assert seen["held_after"] == new.port
    # each waiting write ran once: held's, fresh's and held's next one (the timed-out one never ran)
    assert new.psql(f"SELECT count(*) FROM {table} WHERE note = 'waited'", user="app", db="app") == "3"
    assert short.is_running() and long.is_running()
    assert metric(short, "shardgate_primary_wait_timeouts_total") == 1
    assert metric(long, "shardgate_primary_wait_timeouts_total") == 0
    assert metric(long, "shardgate_primary_waits_total") >= 2
    assert metric(long, "shardgate_primary_waiting") == 0
    print(f"short wait failed after {seen['short_s']:.2f}s; waiting writes ran {seen['held_s']:.2f}s (open "
          f"session) and {seen['fresh_s']:.2f}s (fresh) after promotion; {len(seen['reads'])} reads during the "
          f"outage, slowest {slowest_read:.3f}s")


@pytest.mark.parametrize("stop", ["fast", "kill"])
def test_writes_wait_for_a_restarted_primary(proxy: ProxyFactory, throwaway_topology: Topology, stop: str) -> None:
    """One server, no replica: the primary stops (a clean restart, or a crash); a write on an open session
    (psycopg) and a login with a write (asyncpg) wait, and both go through once it is back. A waiting write
    the client cancels gets 57014 at once, and its session works after the restart."""
    primary = throwaway_topology.primary
    assert primary is not None
    table = make_table(primary, [])
    shardgate = real_proxy(proxy(databases=database_entries(primary), general={
        "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
        "server_connect_timeout_ms": 2000,
        "primary_wait_timeout_ms": LONG_WAIT_MS,
    }))
    insert = f"INSERT INTO {table} (note) VALUES ('restart') RETURNING inet_server_port()"

    async def held_session(conn: psycopg.AsyncConnection[Any]) -> Outcome:
        try:
            cursor = await asyncio.wait_for(conn.execute(insert), LONG_WAIT_MS / 1000 + 10)
            row = await cursor.fetchone()
            assert row is not None
            return Outcome(time.monotonic(), port=int(row[0]))
        except psycopg.Error as error:
            return Outcome(time.monotonic(), sqlstate=error.sqlstate, message=str(error))

    async def fresh_session() -> Outcome:
        conn = await asyncpg.connect(shardgate.dsn(), ssl=False, timeout=LONG_WAIT_MS / 1000 + 10)
        try:
            return Outcome(time.monotonic(), port=int(await conn.fetchval(insert)))
        finally:
            await conn.close()

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        conn = await psycopg.AsyncConnection.connect(shardgate.dsn(connect_timeout=CONNECT_TIMEOUT_S),
                                                     autocommit=True)
        canceling = await psycopg.AsyncConnection.connect(shardgate.dsn(connect_timeout=CONNECT_TIMEOUT_S),
                                                          autocommit=True)
        try:
            seen["before"] = (await held_session(conn)).port
            await held_session(canceling)
            if stop == "kill":
                await asyncio.to_thread(primary.kill)
            else:
                await asyncio.to_thread(primary.stop, "fast")
            held = asyncio.create_task(held_session(conn))
            await wait_log(shardgate, "event=server_unhealthy")
            fresh = asyncio.create_task(fresh_session())
            canceled = asyncio.create_task(held_session(canceling))
            await asyncio.sleep(0.5)
            canceled_at = time.monotonic()
            await canceling.cancel_safe(timeout=5)
            seen["canceled"] = await canceled
            seen["canceled_s"] = seen["canceled"].ended_at - canceled_at
            await asyncio.sleep(OUTAGE_S)
            seen["waiting"] = (not held.done(), not fresh.done())
            started_at = time.monotonic()  # start() returns once the server accepts connections
            await asyncio.to_thread(primary.start)
            seen["held"], seen["fresh"] = await held, await fresh
            seen["held_s"] = seen["held"].ended_at - started_at
            seen["fresh_s"] = seen["fresh"].ended_at - started_at
            seen["canceled_after"] = (await held_session(canceling)).port
        finally:
            await conn.close()
            await canceling.close()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 180))
    log = proxy_log(shardgate)
    assert seen["before"] == primary.port
    assert seen["waiting"] == (True, True), f"a write was not held: {seen}{log}"
    canceled: Outcome = seen["canceled"]
    assert canceled.sqlstate == "57014" and "waiting for a primary" in canceled.message, f"{canceled}{log}"
    assert seen["canceled_s"] < 2.0, f"the cancel took {seen['canceled_s']:.2f}s{log}"
    assert seen["canceled_after"] == primary.port, f"the canceled session: {seen['canceled_after']}{log}"
    for name in ("held", "fresh"):
        outcome: Outcome = seen[name]
        assert outcome.port == primary.port, f"{name}: {outcome}{log}"
        assert seen[f"{name}_s"] < TAKEN_WITHIN_S, f"{name}: {seen[f'{name}_s']:.2f}s after the restart{log}"
    print(f"writes ran {seen['held_s']:.2f}s (open session) and {seen['fresh_s']:.2f}s (login) after the "
          "primary accepted connections again")


@pytest.mark.parametrize("outage", ["kill", "sigstop"])
def test_a_session_mode_login_waits_for_the_primary(proxy: ProxyFactory, throwaway_topology: Topology,
                                                    outage: str) -> None:
    """Session mode needs a server to log in. `kill`: the primary dies (the lost monitor connection makes
    a probe see it at once) and the login waits for it to be restarted. `sigstop`: the postmaster is
    stopped, so new connections time out while the probe's own backend still answers (the probes see a
    primary): the login's failed connect waits for a probe round after it, connects again, and gets in once
    the postmaster goes on."""
    primary = throwaway_topology.primary
    assert primary is not None
    shardgate = real_proxy(proxy(pool_mode="session", databases=database_entries(primary), general={
        "server_connect_timeout_ms": 1000,
        "primary_wait_timeout_ms": LONG_WAIT_MS,
    }))

    async def scenario() -> tuple[int, float]:
        first = await asyncpg.connect(shardgate.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
        await first.close()
        # the server the first login used is idle in the pool: gone, so the next login needs a new one
        primary.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app' "
                     "AND application_name <> 'shardgate-monitor'")
        await asyncio.sleep(0.5)
        postmaster = primary.postmaster_pid()
        assert postmaster is not None
        if outage == "kill":
            await asyncio.to_thread(primary.kill)
        else:
            os.kill(postmaster, signal.SIGSTOP)
        try:
            login = asyncio.create_task(asyncpg.connect(shardgate.dsn(), ssl=False,
                                                        timeout=LONG_WAIT_MS / 1000 + 10))
            await asyncio.sleep(OUTAGE_S + 1)  # longer than server_connect_timeout_ms
            assert not login.done(), f"the login did not wait: {login}{proxy_log(shardgate)}"
        finally:
            if outage == "sigstop":
                os.kill(postmaster, signal.SIGCONT)
        started_at = time.monotonic()
        if outage == "kill":
            await asyncio.to_thread(primary.start)
        conn = await login
        try:
            taken_s = time.monotonic() - started_at
            return int(await conn.fetchval("SELECT inet_server_port()")), taken_s
        finally:
            await conn.close()

    port, taken_s = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert port == primary.port
    assert taken_s < TAKEN_WITHIN_S, f"the login ended {taken_s:.2f}s after the outage{proxy_log(shardgate)}"
    print(f"the waiting session-mode login ended {taken_s:.2f}s after the outage ({outage})")
