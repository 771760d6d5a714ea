"""Faults with real processes behind the proxy: a stopped replica, both replicas stopped, a replica whose
replay is paused (excluded by lag, then readmitted), and failover to a promoted replica.

The `pg` topology is shared: stopped replicas are restarted and paused replay is resumed in `finally`,
and the shared primary is never stopped. Failover runs on a private topology of its own.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import astuple, dataclass
from typing import Any

import asyncpg
import psycopg
import pytest

from localpg import PgServer, Topology, free_port
from tests.harness import RECEIVED, DirectProxy, ProxyFactory, ProxyProcess, database_entries, wait_wal

pytestmark = pytest.mark.timeout(240)

Proxy = ProxyProcess | DirectProxy
CONNECT_TIMEOUT_S = 5
HEALTHCHECK_INTERVAL_MS = 200
BAN_TIMEOUT_S = 1.0
STREAMING_TIMEOUT_S = 60.0
READMIT_TIMEOUT_S = 15.0
EXCLUDE_TIMEOUT_S = 5.0
LAG_LIMIT_BYTES = 64 * 1024
# Writes with no primary must be refused this fast (the connect timeout to a dead server is longer).
WRITE_FAILS_WITHIN_S = 2.0
# Writes must reach the promoted server this soon after it left recovery.
FAILOVER_DEADLINE_S = 5.0
# A client gives up on one statement after this: anything slower counts as a hang.
STATEMENT_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.1
WHERE_SQL = "SELECT pg_is_in_recovery(), inet_server_port()"


@dataclass(frozen=True, slots=True)
class Landing:
    """Where a statement ran."""

    in_recovery: bool
    port: int


# -- helpers ------------------------------------------------------------------------------------------


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = 180.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def connect(proxy_process: Proxy) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy_process.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True)


def where(conn: psycopg.Connection[Any]) -> Landing:
    row = conn.execute(WHERE_SQL).fetchone()
    assert row is not None
    return Landing(bool(row[0]), int(row[1]))


def proxy_log(proxy_process: Proxy) -> str:
    return f"\n--- proxy stderr (tail) ---\n{proxy_process.stderr_text()[-4000:]}"


def real_proxy(started: Proxy) -> ProxyProcess:
    if isinstance(started, DirectProxy):
        pytest.skip("faults are observed through the proxy (SHARDGATE_TEST_DIRECT=1 has none)")
    return started


def slot_name(replica: PgServer) -> str:
    """The replication slot localpg gave the replica when it cloned it."""
    return re.sub(r"[^a-z0-9_]", "_", replica.name.lower())


def wait_streaming(primary: PgServer, replica: PgServer, timeout_s: float = STREAMING_TIMEOUT_S) -> None:
    query = (
        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid "
        f"WHERE s.slot_name = '{slot_name(replica)}' AND r.state = 'streaming'"
    )
    deadline = time.monotonic() + timeout_s
    while primary.psql(query) != "1":
        assert time.monotonic() < deadline, f"{replica.name} is not streaming from {primary.name}"
        time.sleep(POLL_INTERVAL_S)


def restore_replica(primary: PgServer, replica: PgServer) -> None:
    """Running, streaming and caught up again, as the other tests expect the shared topology."""
    if not replica.is_running():
        replica.start()
    wait_streaming(primary, replica)
    wait_wal(primary, [replica])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `check` until true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)
    return time.monotonic() - started


def reads(conn: psycopg.Connection[Any], count: int) -> tuple[list[Landing], list[str]]:
    """`count` reads; any client error is recorded (SQLSTATE and message), not raised."""
    spots: list[Landing] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            spots.append(where(conn))
        except psycopg.Error as error:
            errors.append(f"{error.sqlstate}: {error}")
            if conn.closed:
                break
    return spots, errors


@pytest.fixture
def shared_split(proxy: ProxyFactory, pg: Topology) -> Callable[..., ProxyProcess]:
    """start(**general): a proxy splitting reads across the shared primary and its two replicas."""
    assert pg.primary is not None and len(pg.replicas) >= 2
    primary, replicas = pg.primary, list(pg.replicas)

    def start(**general: Any) -> ProxyProcess:
        settings: dict[str, Any] = {
            "read_write_split": "exclude_primary",
            "load_balancing": "round_robin",
            "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
            "ban_timeout_s": BAN_TIMEOUT_S,
            # Also the probe timeout: a short one fails healthy servers on a loaded machine. A stopped
            # server refuses connections at once, so the tests do not wait for it.
            "server_connect_timeout_ms": 5000,
        }
        settings.update(general)
        return real_proxy(proxy(databases=database_entries(primary, replicas), general=settings))

    return start



# -- stopped replicas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("healthcheck_interval_ms", [HEALTHCHECK_INTERVAL_MS, 0], ids=["probes", "no-probes"])
def test_stopped_replica_reads_continue_on_the_other(shared_split: Callable[..., ProxyProcess],
                                                     pg: Topology, healthcheck_interval_ms: int) -> None:
    """With probes off only the failed connect can ban the stopped replica, and the read is retried."""
    assert pg.primary is not None
    primary, victim, survivor = pg.primary, pg.replicas[0], pg.replicas[1]
    shardgate = shared_split(healthcheck_interval_ms=healthcheck_interval_ms)
    try:
        with connect(shardgate) as warm:
            # Both replicas served reads: the proxy holds idle server connections to the victim.
            assert {where(warm).port for _ in range(4)} == {victim.port, survivor.port}
            victim.stop()
            with connect(shardgate) as fresh:
                spots, errors = reads(warm, 10)
                fresh_spots, fresh_errors = reads(fresh, 10)
            assert errors == [] and fresh_errors == [], f"{errors} {fresh_errors}{proxy_log(shardgate)}"
            assert {spot.port for spot in spots + fresh_spots} == {survivor.port}, spots + fresh_spots
            assert all(spot.in_recovery for spot in spots + fresh_spots)

            victim.start()
            wait_streaming(primary, victim)
            took_s = wait_until(lambda: where(warm).port == victim.port, READMIT_TIMEOUT_S,
                                f"reads to reach {victim.name} again after its restart")
            print(f"{victim.name} readmitted {took_s:.2f}s after it streamed again")
    finally:
        restore_replica(primary, victim)


def test_both_replicas_stopped_reads_go_to_primary(shared_split: Callable[..., ProxyProcess],
                                                   pg: Topology) -> None:
    assert pg.primary is not None
    primary, replicas = pg.primary, list(pg.replicas)
    shardgate = shared_split()
    try:
        with connect(shardgate) as warm:
            assert {where(warm).port for _ in range(4)} == {replica.port for replica in replicas}
            for replica in replicas:
                replica.stop()
            with connect(shardgate) as fresh:
                spots, errors = reads(warm, 6)
                fresh_spots, fresh_errors = reads(fresh, 6)
                write = fresh.execute("SELECT txid_current() > 0, inet_server_port()").fetchone()
            assert errors == [] and fresh_errors == [], f"{errors} {fresh_errors}{proxy_log(shardgate)}"
            assert set(spots + fresh_spots) == {Landing(False, primary.port)}, spots + fresh_spots
            assert write == (True, primary.port)

            for replica in replicas:
                replica.start()
            for replica in replicas:
                wait_streaming(primary, replica)
            wait_until(lambda: where(warm).in_recovery, READMIT_TIMEOUT_S,
                       "reads to go back to a replica after both restarted")
    finally:
        for replica in replicas:
            restore_replica(primary, replica)


# -- replay lag ---------------------------------------------------------------------------------------


def test_paused_replay_excludes_replica_by_lag_bytes_until_resumed(
    shared_split: Callable[..., ProxyProcess], pg: Topology
) -> None:
    assert pg.primary is not None
    primary, lagging, other = pg.primary, pg.replicas[0], pg.replicas[1]
    table = f"lag_{uuid.uuid4().hex[:12]}"
    primary.psql(f"CREATE TABLE {table} (id int, filler text)", user="app", db="app")
    paused = False
    try:
        wait_wal(primary, [lagging, other])
        shardgate = shared_split(max_replica_lag_bytes=LAG_LIMIT_BYTES)
        with connect(shardgate) as conn:
            assert {where(conn).port for _ in range(4)} == {lagging.port, other.port}
            lagging.psql("SELECT pg_wal_replay_pause()")
            paused = True
            # About 1.5 MB of WAL, written through the proxy: far over the limit on the paused replica.
            inserted = conn.execute(
                f"INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g"
                " RETURNING inet_server_port()"
            ).fetchall()
            assert set(inserted) == {(primary.port,)}
            wait_wal(primary, [lagging], RECEIVED)

            def excluded() -> bool:
                return all(where(conn).port == other.port for _ in range(4))

            took_s = wait_until(excluded, EXCLUDE_TIMEOUT_S, f"reads to leave the lagging {lagging.name}")
            spots, errors = reads(conn, 10)
            assert errors == [], f"{errors}{proxy_log(shardgate)}"
            assert {spot.port for spot in spots} == {other.port}, f"{spots}{proxy_log(shardgate)}"
            wait_wal(primary, [other])
            count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert count == (5000,), "a read went to the replica that has not replayed the insert"
            print(f"{lagging.name} excluded {took_s:.2f}s after the lag built up")

            lagging.psql("SELECT pg_wal_replay_resume()")
            paused = False
            took_s = wait_until(lambda: where(conn).port == lagging.port, READMIT_TIMEOUT_S,
                                f"reads to reach {lagging.name} again after replay resumed")
            print(f"{lagging.name} readmitted {took_s:.2f}s after replay resumed")
    finally:
        if paused or lagging.psql("SELECT pg_is_wal_replay_paused()") == "t":
            lagging.psql("SELECT pg_wal_replay_resume()")
        primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


# -- no primary at all -------------------------------------------------------------------------------


def test_refused_write_without_primary_keeps_the_session_usable(proxy: ProxyFactory, pg: Topology) -> None:
    """Servers of role auto where the would-be primary is a port nothing listens on: writes are refused
    with 08006 (a plain ERROR, not FATAL), and the same session reads on a replica right after.

    asyncpg prepares with Parse/Describe/Flush and sends Sync only after it saw the error: the proxy must
    answer that like PostgreSQL does (one ReadyForQuery, after the Sync), or asyncpg drops the connection.
    """
    assert pg.primary is not None
    primary, replicas = pg.primary, list(pg.replicas)
    table = f"noprimary_{uuid.uuid4().hex[:12]}"
    primary.psql(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)", user="app", db="app")
    try:
        for replica in replicas:
            wait_wal(primary, [replica])
        dead_port = free_port()
        databases = [
            {"name": "app", "host": "127.0.0.1", "port": port, "database_name": "app", "role": "auto"}
            for port in (dead_port, *(replica.port for replica in replicas))
        ]
        shardgate = real_proxy(proxy(databases=databases, general={
            "read_write_split": "exclude_primary",
            "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
            "server_connect_timeout_ms": 1000,
            "primary_wait_timeout_ms": 0,  # refused at once (waiting: tests/integration/test_primary_wait.py)
        }))
        replica_ports = {replica.port for replica in replicas}
        insert_sql = f"INSERT INTO {table} (note) VALUES ('nowhere') RETURNING inet_server_port()"

        def session_reads() -> bool:
            try:
                with connect(shardgate) as conn:
                    return where(conn).port in replica_ports
            except psycopg.Error:
                return False  # no probe has found the replicas' roles yet

        wait_until(session_reads, 10, "the probes to find the replicas")

        def psycopg_session() -> tuple[str | None, float, Any]:
            with connect(shardgate) as conn:
                started = time.monotonic()
                try:
                    conn.execute(insert_sql)
                    code: str | None = "no error"
                except psycopg.Error as error:
                    code = error.sqlstate
                elapsed_s = time.monotonic() - started
                try:
                    after: Any = astuple(where(conn))
                except psycopg.Error as error:
                    after = f"{type(error).__name__} {error.sqlstate}: {error} (closed={conn.closed})"
                return code, elapsed_s, after

        async def asyncpg_session() -> tuple[str | None, float, Any]:
            conn = await asyncpg.connect(shardgate.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
            try:
                started = time.monotonic()
                try:
                    await asyncio.wait_for(conn.fetchval(insert_sql), STATEMENT_DEADLINE_S)
                    code: str | None = "no error"
                except asyncpg.PostgresError as error:
                    code = error.sqlstate
                elapsed_s = time.monotonic() - started
                try:
                    after: Any = tuple(await asyncio.wait_for(conn.fetchrow(WHERE_SQL), STATEMENT_DEADLINE_S))
                except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                    after = f"{type(error).__name__}: {error}"
                return code, elapsed_s, after
            finally:
                conn.terminate()

        outcomes = {"psycopg": psycopg_session(), "asyncpg": run_async(asyncpg_session())}
        for client, (code, elapsed_s, _) in outcomes.items():
            assert code == "08006", f"{client}: the write gave {code}"
            assert elapsed_s < WRITE_FAILS_WITHIN_S, f"{client}: the write took {elapsed_s:.2f}s to fail"
        broken = {client: after for client, (_, _, after) in outcomes.items()
                  if not (isinstance(after, tuple) and after[0] is True and after[1] in replica_ports)}
        assert not broken, (
            f"after a write refused with 08006, a read on the same connection did not reach a replica:"
            f" {broken}{proxy_log(shardgate)}"
        )
    finally:
        primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


# -- failover (private topology) ----------------------------------------------------------------------


@dataclass
class WriteAttempt:
    """One write through the proxy: where it ran, or the error, how long it took, and whether the proxy
    closed the session with it (a FATAL error)."""

    elapsed_s: float
    port: int | None = None
    sqlstate: str | None = None
    error: str = ""
    closed: bool = False


async def aconnect(proxy_process: ProxyProcess) -> psycopg.AsyncConnection[Any]:
    return await asyncio.wait_for(
        psycopg.AsyncConnection.connect(proxy_process.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True),
        STATEMENT_DEADLINE_S,
    )


async def attempt_write(proxy_process: ProxyProcess, table: str,
                        conn: psycopg.AsyncConnection[Any] | None = None) -> WriteAttempt:
    """INSERT ... RETURNING inet_server_port() (extended protocol) on `conn` or a fresh connection,
    bounded in time. psycopg reports the SQLSTATE of a FATAL error too, before the connection closes."""
    own = conn is None
    started = time.monotonic()
    try:
        if conn is None:
            conn = await aconnect(proxy_process)
            started = time.monotonic()  # time the statement, not the login
        cursor = await asyncio.wait_for(
            conn.execute(f"INSERT INTO {table} (note) VALUES (%s) RETURNING inet_server_port()", ("failover",)),
            STATEMENT_DEADLINE_S,
        )
        row = await cursor.fetchone()
        assert row is not None
        return WriteAttempt(time.monotonic() - started, port=int(row[0]))
    except TimeoutError:
        return WriteAttempt(time.monotonic() - started, error=f"no answer within {STATEMENT_DEADLINE_S}s")
    except psycopg.Error as error:
        return WriteAttempt(time.monotonic() - started, sqlstate=error.sqlstate,
                            error=f"{type(error).__name__}: {error}", closed=conn is not None and conn.closed)
    finally:
        if own and conn is not None:
            await conn.close()


async def attempt_fresh_write(proxy_process: ProxyProcess, table: str) -> WriteAttempt:
    """`attempt_write` on a fresh asyncpg connection: asyncpg reports the SQLSTATE of an error that refuses
    the login itself (psycopg only has its message then); such a refusal counts as closed."""
    started = time.monotonic()
    try:
        conn = await asyncpg.connect(proxy_process.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)
    except asyncpg.PostgresError as error:
        return WriteAttempt(time.monotonic() - started, sqlstate=error.sqlstate,
                            error=f"login: {type(error).__name__}: {error}", closed=True)
    try:
        started = time.monotonic()
        port = await asyncio.wait_for(
            conn.fetchval(f"INSERT INTO {table} (note) VALUES ($1) RETURNING inet_server_port()", "failover"),
            STATEMENT_DEADLINE_S)
        return WriteAttempt(time.monotonic() - started, port=int(port))
    except TimeoutError:
        return WriteAttempt(time.monotonic() - started, error=f"no answer within {STATEMENT_DEADLINE_S}s")
    except asyncpg.PostgresError as error:
        return WriteAttempt(time.monotonic() - started, sqlstate=error.sqlstate,
                            error=f"{type(error).__name__}: {error}", closed=conn.is_closed())
    finally:
        await conn.close()


async def read_once(proxy_process: ProxyProcess) -> Landing:
    conn = await aconnect(proxy_process)
    try:
        cursor = await asyncio.wait_for(conn.execute(WHERE_SQL), STATEMENT_DEADLINE_S)
        row = await cursor.fetchone()
        assert row is not None
        return Landing(bool(row[0]), int(row[1]))
    finally:
        await conn.close()


def test_failover_writes_fail_fast_then_follow_the_promoted_replica(
    proxy: ProxyFactory, throwaway_topology: Topology
) -> None:
    old, new = throwaway_topology.primary, throwaway_topology.replicas[0]
    assert old is not None
    table = f"failover_{uuid.uuid4().hex[:12]}"
    old.psql(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)", user="app", db="app")
    wait_wal(old, [new])
    databases = [
        {"name": "app", "host": server.host, "port": server.port, "database_name": "app", "role": "auto"}
        for server in (old, new)
    ]
    shardgate = real_proxy(proxy(databases=databases, general={
        "read_write_split": "exclude_primary",
        "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
        "ban_timeout_s": BAN_TIMEOUT_S,
        "server_connect_timeout_ms": 1000,
        "checkout_timeout_ms": 2000,
        "primary_wait_timeout_ms": 0,  # refused at once (waiting: tests/integration/test_primary_wait.py)
    }))
    proxy_pid = shardgate.pid

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        # Roles are known after the first probe; until then the proxy has no primary.
        deadline = time.monotonic() + 10
        while (first := await attempt_write(shardgate, table)).port is None:
            assert time.monotonic() < deadline, f"no write went through before the outage: {first}"
            await asyncio.sleep(POLL_INTERVAL_S)
        seen["before"] = first.port
        seen["read_before"] = await read_once(shardgate)
        held = await aconnect(shardgate)
        try:
            seen["held_before"] = (await attempt_write(shardgate, table, held)).port

            await asyncio.to_thread(old.stop, "immediate")
            # An open session's next write, then fresh sessions while the probes notice the outage.
            outage = [await attempt_write(shardgate, table, held)]
        finally:
            await held.close()
        outage_until = time.monotonic() + 1.5
        while time.monotonic() < outage_until:
            outage.append(await attempt_write(shardgate, table))
            await asyncio.sleep(POLL_INTERVAL_S)
        seen["outage"] = outage
        seen["read_during"] = await read_once(shardgate)

        await asyncio.to_thread(new.promote)
        promoted_at = time.monotonic()
        after: list[WriteAttempt] = []
        while True:
            result = await attempt_write(shardgate, table)
            after.append(result)
            if result.port is not None or time.monotonic() - promoted_at > FAILOVER_DEADLINE_S:
                break
            await asyncio.sleep(POLL_INTERVAL_S)
        seen["after"] = after
        seen["failover_s"] = time.monotonic() - promoted_at
        seen["read_after"] = await read_once(shardgate)
        return seen

    seen = run_async(scenario())
    log = proxy_log(shardgate)
    assert seen["before"] == old.port and seen["held_before"] == old.port, seen
    assert seen["read_before"] == Landing(True, new.port), seen["read_before"]

    outage: list[WriteAttempt] = seen["outage"]
    assert all(attempt.port is None for attempt in outage), f"a write succeeded with no primary: {outage}"
    assert all(attempt.sqlstate == "08006" for attempt in outage), f"writes without a primary: {outage}{log}"
    slowest = max(attempt.elapsed_s for attempt in outage)
    assert slowest < WRITE_FAILS_WITHIN_S, f"a write took {slowest:.2f}s to fail: {outage}{log}"
    assert seen["read_during"] == Landing(True, new.port), f"reads during the outage: {seen['read_during']}{log}"

    after: list[WriteAttempt] = seen["after"]
    assert after[-1].port == new.port, f"writes did not follow the promoted server: {after}{log}"
    # Until the probes see the promotion, writes are refused, never sent to a server in recovery (25006).
    assert all(attempt.sqlstate == "08006" for attempt in after[:-1]), f"{after}{log}"
    assert seen["read_after"] == Landing(False, new.port)  # the only server left serves reads too
    assert shardgate.is_running() and shardgate.pid == proxy_pid
    print(f"writes followed the promoted server {seen['failover_s']:.2f}s after promotion;"
          f" {len(outage)} writes refused during the outage, slowest {slowest:.2f}s,"
          f" {sum(attempt.closed for attempt in outage)} of them closed the session (FATAL)")


# -- a restarted primary (private topology) -----------------------------------------------------------

# Writes must go through again this soon after a restarted primary accepts connections (the probes run
# every 5 s by default and a failed one used to hold the primary out for ban_timeout_s).
RESTART_DEADLINE_S = 3.0
PROBE_SEES_OUTAGE_S = 15.0


@pytest.mark.parametrize("with_replica", [False, True], ids=["primary-only", "primary-and-replica"])
def test_restarted_primary_takes_writes_again_at_once(
    proxy: ProxyFactory, throwaway_topology: Topology, with_replica: bool
) -> None:
    primary, replica = throwaway_topology.primary, throwaway_topology.replicas[0]
    assert primary is not None
    table = f"restart_{uuid.uuid4().hex[:12]}"
    primary.psql(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)", user="app", db="app")
    shardgate = real_proxy(proxy(
        databases=database_entries(primary, [replica] if with_replica else []),
        # probes every 5 s (default); refused at once (waiting: tests/integration/test_primary_wait.py)
        general={"ban_timeout_s": 30, "server_connect_timeout_ms": 1000, "primary_wait_timeout_ms": 0},
    ))

    async def scenario() -> tuple[WriteAttempt, list[WriteAttempt], WriteAttempt, WriteAttempt, float]:
        held = await aconnect(shardgate)
        try:
            before = await attempt_write(shardgate, table, held)
            await asyncio.to_thread(primary.stop, "fast")
            # The writes during the outage wait until a probe has seen it (the lost monitor connection
            # wakes one at once): a fresh session logging in before or after that is refused at a
            # different step, so the writes are made when the proxy's view is settled.
            seen_down_by = time.monotonic() + PROBE_SEES_OUTAGE_S
            while "event=server_unhealthy" not in shardgate.stderr_text():
                assert time.monotonic() < seen_down_by, f"no probe saw the primary down{proxy_log(shardgate)}"
                await asyncio.sleep(POLL_INTERVAL_S)
            during = [await attempt_fresh_write(shardgate, table), await attempt_write(shardgate, table, held)]
            await asyncio.to_thread(primary.start)
            restarted_at = time.monotonic()
            while (after := await attempt_write(shardgate, table)).port is None:
                if time.monotonic() - restarted_at > RESTART_DEADLINE_S:
                    break
                await asyncio.sleep(POLL_INTERVAL_S)
            back_after_s = time.monotonic() - restarted_at
            held_after = await attempt_write(shardgate, table, held)
            return before, during, after, held_after, back_after_s
        finally:
            await held.close()

    before, during, after, held_after, back_after_s = run_async(scenario())
    log = proxy_log(shardgate)
    assert before.port == primary.port, before
    assert all(attempt.port is None and attempt.sqlstate == "08006" for attempt in during), f"{during}{log}"
    # with no server known to be up a fresh session is refused at login; with a replica it logs in (reads
    # work) and only its write is refused
    assert during[0].closed is (not with_replica), f"{during[0]}{log}"
    assert not during[1].closed, f"the held session was closed by a refused write: {during[1]}"
    assert after.port == primary.port, f"no write within {RESTART_DEADLINE_S}s of the restart: {after}{log}"
    assert held_after.port == primary.port, f"the held session did not recover: {held_after}{log}"
    assert shardgate.is_running()
    print(f"a fresh session wrote again {back_after_s:.2f}s after the primary accepted connections")
