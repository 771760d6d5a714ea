"""Prepared statements in the pooled modes, kept true to PostgreSQL (issue 17): DEALLOCATE and DISCARD in
every form, a protocol-level statement used by name from SQL, a second Parse of a name, SQL PREPARE on
whichever server a transaction gets, statement caches across schema changes, and the role's
ParameterStatus values.

Most tests run the same steps directly against PostgreSQL and through the proxy and compare what the
client saw; the proxies have one or two servers, shared with a second client, so that statements move
between servers and share them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt as pyjwt
import psycopg
import pytest

from localpg import Topology
from tests.harness import ProxyFactory, ProxyProcess, database_entries, default_users, direct_mode, make_dsn

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(direct_mode(), reason="compares the proxy with PostgreSQL itself"),
]

CLIENT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10
SUPER_ROLE = "sg_truth_super"  # a superuser role `app` may SET ROLE to

Outcome = list[Any]


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


async def outcome_of(awaitable: Awaitable[Any]) -> Any:
    """A value, or the SQLSTATE of the error PostgreSQL (or the proxy) answered."""
    try:
        return await awaitable
    except asyncpg.PostgresError as error:
        return f"error {error.sqlstate}"


def psycopg_outcome(run: Callable[[], Any]) -> Any:
    try:
        return run()
    except psycopg.Error as error:
        return f"error {error.sqlstate}"


@pytest.fixture(scope="module")
def super_role(pg: Topology) -> Iterator[str]:
    assert pg.primary is not None
    pg.primary.psql(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SUPER_ROLE}') THEN "
        f"CREATE ROLE {SUPER_ROLE} SUPERUSER NOLOGIN; END IF; END$$; GRANT {SUPER_ROLE} TO app",
        user="postgres", db="app",
    )
    yield SUPER_ROLE


@pytest.fixture(scope="module")
def proxies(pg: Topology, proxy_work_root: Path) -> Iterator[Callable[[str, int], ProxyProcess]]:
    """proxies(pool_mode, pool_size): one proxy per mode and size for this module."""
    factory = ProxyFactory(pg, proxy_work_root)
    started: dict[tuple[str, int], ProxyProcess] = {}

    def get(pool_mode: str, pool_size: int) -> ProxyProcess:
        current = started.get((pool_mode, pool_size))
        if current is None or not current.is_running():
            assert pg.primary is not None
            process = factory(pool_mode=pool_mode, pool_size=pool_size, databases=database_entries(pg.primary))
            assert isinstance(process, ProxyProcess)
            current = started[(pool_mode, pool_size)] = process
        return current

    yield get
    factory.close()


def direct_url(pg: Topology, user: str = "app", password: str = "app") -> str:
    assert pg.primary is not None
    return make_dsn(pg.primary.host, pg.primary.port, user, password)


def proxy_url(proxy: ProxyProcess, user: str = "app", password: str = "app") -> str:
    return make_dsn(proxy.host, proxy.port, user, password)


async def asyncpg_connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S, **kwargs)


async def prepare(conn: asyncpg.Connection, sql: str, name: str) -> Any:
    """asyncpg's prepare() ends with a Flush, not a Sync: the client keeps its server until its next
    statement, sent here so that the other client of a one-server pool can go on."""
    try:
        return await conn.prepare(sql, name=name)
    finally:
        await conn.fetchval("SELECT 1")


# -- 1. DEALLOCATE and DISCARD -------------------------------------------------------------------------


@pytest.mark.parametrize("finish", ["commit", "rollback"])
def test_psycopg_deallocate_all_after_ddl_inside_a_transaction(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology, finish: str
) -> None:
    # psycopg with prepare_threshold = 0 prepares every statement, and sends DEALLOCATE ALL itself after
    # DDL such as CREATE TYPE; the same text prepared again after it must work, in the transaction and
    # after it, while another client prepares the same text on the same server.
    proxy = proxies("transaction", 1)

    def steps(url: str) -> Outcome:
        seen: Outcome = []
        kind = unique_name("truth_type")
        with psycopg.connect(url, prepare_threshold=0, autocommit=True) as a, \
                psycopg.connect(url, prepare_threshold=0, autocommit=True) as b:
            seen.append(b.execute("SELECT 40 + %s::int", (2,)).fetchone())
            a.execute("BEGIN")
            seen.append(a.execute("SELECT 40 + %s::int", (1,)).fetchone())
            a.execute(f"CREATE TYPE {kind} AS ENUM ('x')")
            seen.append(psycopg_outcome(lambda: a.execute("SELECT 40 + %s::int", (3,)).fetchone()))
            a.execute(f"DROP TYPE {kind}")
            seen.append(psycopg_outcome(lambda: a.execute("SELECT 40 + %s::int", (4,)).fetchone()))
            a.execute(finish.upper())
            seen.append(a.execute("SELECT 40 + %s::int", (5,)).fetchone())
            seen.append(b.execute("SELECT 40 + %s::int", (6,)).fetchone())
            seen.append(a.execute("SELECT 40 + %s::int", (7,)).fetchone())
        return seen

    expected = [(42,), (41,), (43,), (44,), (45,), (46,), (47,)]
    assert steps(direct_url(pg)) == expected
    assert steps(proxy_url(proxy)) == expected


DEALLOCATING = ["DEALLOCATE ALL", "DEALLOCATE a_stmt", "DEALLOCATE PREPARE a_stmt", "DEALLOCATE a_sql",
                "DISCARD ALL", "DISCARD PLANS", "DISCARD TEMP"]


async def _deallocating_steps(url: str, statement: str, protocol: str, place: str) -> Outcome:
    """A and B prepare the same text (on the proxy: one statement on their shared server), A also by SQL;
    A runs `statement`; then what each of A's statements, and B's, does."""
    a = await asyncpg_connect(url, statement_cache_size=0)
    b = await asyncpg_connect(url, statement_cache_size=0)
    try:
        a_stmt = await prepare(a, "SELECT 1 + $1::int", "a_stmt")
        b_stmt = await prepare(b, "SELECT 1 + $1::int", "b_stmt")
        await a.execute("PREPARE a_sql AS SELECT 100")
        run = a.execute if protocol == "simple" else a.fetch
        seen: Outcome = []
        if place != "outside":
            await a.execute("BEGIN")
        seen.append(await outcome_of(run(statement)))
        if place != "outside":
            await a.execute(place.upper())
        seen.append(await outcome_of(b_stmt.fetchval(1)))
        seen.append(await outcome_of(a_stmt.fetchval(2)))
        seen.append(await outcome_of(a.fetchval("EXECUTE a_sql")))
        # a name PostgreSQL dropped is free again; one it kept is not
        seen.append(await outcome_of(prepare(a, "SELECT 3 + $1::int", "a_stmt")))
        seen[-1] = seen[-1] if isinstance(seen[-1], str) else "prepared"
        seen.append(await outcome_of(a.fetchval("SELECT 5")))
        seen.append(await outcome_of(b_stmt.fetchval(3)))
        return seen
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("place", ["outside", "commit", "rollback"])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("statement", DEALLOCATING)
def test_asyncpg_deallocate_and_discard_leave_statements_as_postgresql_does(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology, statement: str, protocol: str, place: str
) -> None:
    # asyncpg, by the simple (execute) or the extended protocol (fetch), outside a transaction or in one
    # that commits or rolls back (DEALLOCATE is not undone by a rollback; DISCARD ALL refuses to run in
    # a transaction; DISCARD PLANS and TEMP deallocate nothing). B's statement of the same text on the
    # shared server must outlive A's DEALLOCATE of A's own.
    direct = run_async(_deallocating_steps(direct_url(pg), statement, protocol, place))
    through_proxy = run_async(_deallocating_steps(proxy_url(proxies("transaction", 1)), statement, protocol, place))
    assert direct[1] == 2, direct  # B's statement always survives
    assert through_proxy == direct


# -- 2. protocol-level statements named from SQL, names taken twice, SQL PREPARE --------------------------


async def _by_name_steps(url: str, transactions: bool) -> Outcome:
    a = await asyncpg_connect(url)
    b = await asyncpg_connect(url)
    try:
        seen: Outcome = []
        a_stmt = await prepare(a, "SELECT $1::int + 1", "foobar")
        b_stmt = await prepare(b, "SELECT $1::int + 1", "foobar")  # B's own statement of that name
        seen.append(await outcome_of(a.fetchval("EXECUTE foobar(41)")))
        seen.append(await outcome_of(a.execute("EXECUTE foobar(41)")))
        seen.append(await outcome_of(a.fetchval("execute FOOBAR (1)")))
        plan = await outcome_of(a.fetch("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE foobar(1)"))
        seen.append(plan if isinstance(plan, str) else [tuple(row) for row in plan])
        seen.append(await outcome_of(a.fetchval("EXPLAIN EXECUTE foobar(2)")))
        if transactions:
            async with a.transaction():
                seen.append(await outcome_of(a.fetchval("EXECUTE foobar(10)")))
        # a second Parse of a name the client has: 42P05, and the connection goes on
        seen.append(await outcome_of(prepare(a, "SELECT 2", "foobar")))
        seen.append(await outcome_of(a.fetchval("SELECT 7")))
        seen.append(await outcome_of(a_stmt.fetchval(5)))
        # DEALLOCATE of A's name: A's statement goes, B's of the same name and text stays
        seen.append(await outcome_of(a.execute("DEALLOCATE foobar")))
        seen.append(await outcome_of(a.execute("EXECUTE foobar(1)")))
        seen.append(await outcome_of(b.fetchval("EXECUTE foobar(1)")))
        seen.append(await outcome_of(b_stmt.fetchval(8)))
        fresh = await prepare(a, "SELECT $1::int * 3", "foobar")  # the name is free again
        seen.append(await outcome_of(fresh.fetchval(3)))
        seen.append(await outcome_of(a.execute("DEALLOCATE PREPARE foobar")))
        seen.append(await outcome_of(b.execute("EXECUTE foobar(2)")))
        # SQL PREPARE takes a name a Parse cannot take again
        seen.append(await outcome_of(a.execute("PREPARE sq AS SELECT 10")))
        seen.append(await outcome_of(a.fetchval("EXECUTE sq")))
        seen.append(await outcome_of(prepare(a, "SELECT 11", "sq")))
        seen.append(await outcome_of(a.fetchval("SELECT 8")))
        return seen
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_asyncpg_statement_prepared_by_the_protocol_is_used_by_name_from_sql(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology, pool_mode: str
) -> None:
    transactions = pool_mode != "statement"  # statement mode refuses transaction blocks
    direct = run_async(_by_name_steps(direct_url(pg), transactions))
    assert direct[:3] == [42, "SELECT 1", 2], direct
    assert run_async(_by_name_steps(proxy_url(proxies(pool_mode, 1)), transactions)) == direct


def _backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _move_to_another_server(proxy: ProxyProcess, a: psycopg.Connection[Any]) -> tuple[int, int]:
    """With a pool of two: B and C come, C takes the server parked with A, and A's next transaction takes
    the one parked with B. Returns A's (old, new) server pids."""
    old = _backend_pid(a)
    with psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True) as b, \
            psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True) as c:
        _backend_pid(b)
        assert _backend_pid(c) == old
        new = _backend_pid(a)
    return old, new


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_psycopg_execute_by_name_on_a_server_that_lacks_the_statement(
    proxies: Callable[[str, int], ProxyProcess], pool_mode: str
) -> None:
    # psycopg prepares `SELECT $1::int * 7` on server X (a protocol-level Parse named _pg3_0); once the
    # client is on server Y, `EXECUTE _pg3_0(...)` and `EXPLAIN EXECUTE` must prepare it on Y first.
    proxy = proxies(pool_mode, 2)
    with psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True,
                         prepare_threshold=0) as a:
        assert a.execute("SELECT %s::int * 7", (6,)).fetchone() == (42,)
        name = "_pg3_0"  # psycopg's name for the first statement it prepares
        old, new = _move_to_another_server(proxy, a)
        assert old != new
        assert a.execute(f"EXECUTE {name}(3)", prepare=False).fetchone() == (21,)
        assert a.execute(f"EXPLAIN (COSTS OFF) EXECUTE {name}(3)", prepare=False).fetchall() == [("Result",)]
        assert a.execute(f"EXECUTE {name}(5)", prepare=False).fetchone() == (35,)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("pool_mode", ["session", "transaction", "statement"])
def test_asyncpg_sql_prepare_then_execute_on_whichever_server(
    proxies: Callable[[str, int], ProxyProcess], pool_mode: str, protocol: str
) -> None:
    proxy = proxies(pool_mode, 3 if pool_mode == "session" else 2)  # session mode: a server per client
    url = proxy_url(proxy)

    async def steps() -> Outcome:
        a = await asyncpg_connect(url, statement_cache_size=0)
        others = [await asyncpg_connect(url, statement_cache_size=0) for _ in range(2)]
        try:
            run = a.execute if protocol == "simple" else a.fetch
            await run("PREPARE tripled (int) AS SELECT $1 * 3")
            await others[0].execute("PREPARE tripled (text) AS SELECT $1 || '-other'")
            seen: Outcome = []
            pids = set()
            for i in range(6):
                if protocol == "simple":
                    seen.append(await outcome_of(a.execute(f"EXECUTE tripled({i})")))
                seen.append(await outcome_of(a.fetchval(f"EXECUTE tripled({i})")))
                pids.add(await a.fetchval("SELECT pg_backend_pid()"))
                seen.append(await outcome_of(others[0].fetchval(f"EXECUTE tripled('{i}')")))
                # a full pool of two: the third client takes the server parked longest, A's, and A's next
                # transaction takes the one parked with the second client
                await others[1].fetchval("SELECT 1")
            seen.append(len(pids) > 1 if pool_mode != "session" else True)
            return seen
        finally:
            await a.close()
            for other in others:
                await other.close()

    seen = run_async(steps())
    expected: Outcome = []
    for i in range(6):
        expected += (["SELECT 1"] if protocol == "simple" else []) + [i * 3, f"{i}-other"]
    assert seen[:-1] == expected
    assert seen[-1], "A's transactions all ran on one server: the test did not move it"


def test_psycopg_sql_prepare_and_deallocate_outlive_a_rollback_as_directly(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology
) -> None:
    # PREPARE and DEALLOCATE are not undone by ROLLBACK; a PREPARE that fails prepares nothing. Another
    # client uses the same one server in between, with statements of the same names.
    proxy = proxies("transaction", 1)

    def steps(url: str) -> Outcome:
        seen: Outcome = []
        with psycopg.connect(url, autocommit=True) as a, psycopg.connect(url, autocommit=True) as b:
            def both(sql: str) -> None:
                seen.append(psycopg_outcome(lambda: a.execute(sql).fetchall()))
                seen.append(psycopg_outcome(lambda: b.execute(sql.replace("EXECUTE kept", "SELECT 'b'"))
                                            .fetchall()))

            b.execute("PREPARE gone AS SELECT 'b-gone'")
            a.execute("PREPARE gone AS SELECT 'a-gone'")
            a.execute("BEGIN")
            a.execute("PREPARE kept AS SELECT 'kept'")
            a.execute("DEALLOCATE gone")
            seen.append(psycopg_outcome(lambda: a.execute("SELECT 1 / 0").fetchall()))
            a.execute("ROLLBACK")
            both("EXECUTE kept")
            seen.append(psycopg_outcome(lambda: a.execute("EXECUTE gone").fetchall()))
            seen.append(psycopg_outcome(lambda: b.execute("EXECUTE gone").fetchall()))
            seen.append(psycopg_outcome(lambda: a.execute("PREPARE broken AS SELECT no_such_column").fetchall()))
            seen.append(psycopg_outcome(lambda: a.execute("EXECUTE broken").fetchall()))
            both("EXECUTE kept")
        return seen

    direct = steps(direct_url(pg))
    assert direct[1] == [("kept",)] and direct[4] == [("b-gone",)], direct
    assert steps(proxy_url(proxy)) == direct


PSQL_SCRIPT = """
PREPARE p AS SELECT 'first';
BEGIN;
PREPARE q AS SELECT 'in a transaction';
DEALLOCATE ALL;
PREPARE p AS SELECT 'second';
EXECUTE p;
ROLLBACK;
\\! psql -X -At -d '{url}' -c "PREPARE p AS SELECT 'other'" -c "EXECUTE p"
EXECUTE p;
EXECUTE q;
DEALLOCATE PREPARE p;
\\! psql -X -At -d '{url}' -c "PREPARE p AS SELECT 'other'" -c "EXECUTE p"
EXECUTE p;
DISCARD PLANS;
PREPARE p AS SELECT 'third';
EXECUTE p;
"""


def test_psql_script_of_sql_prepared_statements_as_directly(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology
) -> None:
    # psql (the simple protocol); another client (a psql the script starts) takes the one server in
    # between, so the script's next statements run with its session replayed.
    proxy = proxies("transaction", 1)

    def run(url: str) -> str:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("PREPARE p AS SELECT 'other'")
            result = subprocess.run(["psql", "-X", "-At", "-d", url], input=PSQL_SCRIPT.format(url=url),
                                    capture_output=True,
                                    text=True, env=env, timeout=CLIENT_TIMEOUT_S)
            assert other.execute("EXECUTE p").fetchone() == ("other",)
        return result.stdout + result.stderr.replace("psql:<stdin>", "")

    direct = run(direct_url(pg))
    assert "second" in direct and "third" in direct and 'prepared statement "q" does not exist' in direct
    assert run(proxy_url(proxy)) == direct


# -- 3. statement caches across schema changes ----------------------------------------------------------


async def _asyncpg_schema_steps(url: str, table: str) -> Outcome:
    conn = await asyncpg_connect(url)
    seen: Outcome = []
    try:
        await conn.execute(f"CREATE TABLE {table} (a int, b int); INSERT INTO {table} VALUES (1, 2)")
        query = f"SELECT * FROM {table}"
        seen.append(await outcome_of(conn.fetch(query)))
        for change in ("ADD COLUMN c int", "ALTER COLUMN a TYPE bigint", "ALTER COLUMN a TYPE text"):
            await conn.execute(f"ALTER TABLE {table} {change}")
            try:
                async with conn.transaction():  # asyncpg re-prepares by itself outside a transaction only
                    seen.append(await outcome_of(conn.fetch(query)))
            except asyncpg.PostgresError as error:
                seen.append(f"transaction {error.sqlstate}")
            seen.append(await outcome_of(conn.fetch(query)))
            seen.append(await outcome_of(conn.fetch(query)))
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()
    return [[tuple(row.items()) for row in item] if isinstance(item, list) else item for item in seen]


def _psycopg_schema_steps(url: str, table: str) -> Outcome:
    seen: Outcome = []
    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
        conn.execute(f"CREATE TABLE {table} (a int, b int)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 2)")
        query = f"SELECT * FROM {table}"
        seen.append(conn.execute(query).fetchall())
        for change in ("ADD COLUMN c int", "ALTER COLUMN a TYPE bigint"):
            conn.execute(f"ALTER TABLE {table} {change}")
            seen.append(psycopg_outcome(lambda: conn.execute(query).fetchall()))
            with conn.transaction():
                seen.append(psycopg_outcome(lambda: conn.execute(query).fetchall()))
            seen.append(psycopg_outcome(lambda: conn.execute(query).fetchall()))
        conn.execute(f"DROP TABLE {table}")
    return seen


def _pgx_schema_steps(binary: Path, url: str, table: str) -> Outcome:
    result = subprocess.run([str(binary), "schema-change", url, table], capture_output=True, text=True,
                            timeout=CLIENT_TIMEOUT_S)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout.split("\n")


@pytest.mark.parametrize("client", ["asyncpg", "psycopg", "pgx"])
def test_statement_caches_recover_from_schema_changes_as_directly(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology, client: str, request: pytest.FixtureRequest
) -> None:
    proxy = proxies("transaction", 1)

    def steps(url: str) -> Outcome:
        table = unique_name("truth_schema")
        if client == "asyncpg":
            return list(run_async(_asyncpg_schema_steps(url, table)))
        if client == "psycopg":
            return _psycopg_schema_steps(url, table)
        return _pgx_schema_steps(request.getfixturevalue("pgx_client"), url, table)

    direct = steps(direct_url(pg))
    if client != "psycopg":  # psycopg deallocates after DDL: no error to see
        assert any("0A000" in str(item) for item in direct), direct  # the steps do meet the error
    assert steps(proxy_url(proxy)) == direct


def test_psycopg_statement_parsed_again_after_a_schema_change_sees_the_new_columns(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology
) -> None:
    # Two clients share one server; A prepared `SELECT * FROM t`, the table gains a column, and B (whose
    # statement of the same text is new) must get three columns, as a new statement on PostgreSQL does.
    proxy = proxies("transaction", 1)
    table = unique_name("truth_reparse")
    assert pg.primary is not None
    pg.primary.psql(f"CREATE TABLE {table} (a int, b int); INSERT INTO {table} VALUES (1, 2)", user="app", db="app")
    try:
        with psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True) as a, \
                psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True) as b:
            assert a.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1, 2)]
            pg.primary.psql(f"ALTER TABLE {table} ADD COLUMN c int DEFAULT 3", user="app", db="app")
            assert b.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1, 2, 3)]
            assert b.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1, 2, 3)]
    finally:
        pg.primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


# -- 4. the role's ParameterStatus values ---------------------------------------------------------------


def _role_parameters(conn: psycopg.Connection[Any]) -> tuple[str | None, str | None]:
    return conn.info.parameter_status("is_superuser"), conn.info.parameter_status("session_authorization")


def test_psycopg_set_role_parameter_status_as_directly_also_after_a_server_change(
    proxies: Callable[[str, int], ProxyProcess], pg: Topology, super_role: str
) -> None:
    proxy = proxies("transaction", 2)

    def steps(url: str, move: Callable[[psycopg.Connection[Any]], object]) -> Outcome:
        seen: Outcome = []
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as a:
            seen.append(_role_parameters(a))
            a.execute(f"SET ROLE {super_role}")
            seen.append(_role_parameters(a))
            move(a)
            a.execute("SELECT 1")
            seen.append(_role_parameters(a))
            a.execute("RESET ROLE")
            seen.append(_role_parameters(a))
            move(a)
            a.execute("SELECT 1")
            seen.append(_role_parameters(a))
            a.execute("BEGIN")
            a.execute(f"SET LOCAL ROLE {super_role}")
            seen.append(_role_parameters(a))
            a.execute("ROLLBACK")
            seen.append(_role_parameters(a))
            a.execute(f"SET SESSION ROLE {super_role}")
            move(a)
            a.execute("SELECT 1")
            seen.append(_role_parameters(a))
            a.execute("SET ROLE NONE")
            seen.append(_role_parameters(a))
        return seen

    direct = steps(direct_url(pg), lambda _conn: None)
    assert direct[1] == ("on", "app") and direct[0] == ("off", "app"), direct
    moves: list[tuple[int, int]] = []
    assert steps(proxy_url(proxy), lambda conn: moves.append(_move_to_another_server(proxy, conn))) == direct
    assert all(old != new for old, new in moves), moves


def test_psycopg_set_session_authorization_parameter_status_as_directly(
    proxy: ProxyFactory, pg: Topology
) -> None:
    # SET SESSION AUTHORIZATION needs a superuser session; it pins the client to its server.
    assert pg.primary is not None
    users = [*default_users(), {"name": "postgres", "password": "postgres", "auth": "scram-sha-256",
                                "server_user": "postgres", "server_password": "postgres"}]
    started = proxy(pool_mode="transaction", pool_size=2, users=users, databases=database_entries(pg.primary))
    assert isinstance(started, ProxyProcess)

    def steps(url: str) -> Outcome:
        seen: Outcome = []
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            seen.append(_role_parameters(conn))
            conn.execute("SET SESSION AUTHORIZATION app")
            seen.append(_role_parameters(conn))
            conn.execute("SELECT 1")
            seen.append(_role_parameters(conn))
            conn.execute("RESET SESSION AUTHORIZATION")
            seen.append(_role_parameters(conn))
        return seen

    direct = steps(direct_url(pg, "postgres", "postgres"))
    assert direct == [("on", "postgres"), ("off", "app"), ("off", "app"), ("on", "postgres")]
    assert steps(proxy_url(started, "postgres", "postgres")) == direct
    # the next client of a server that ran SET SESSION AUTHORIZATION is told the server's own values
    with psycopg.connect(proxy_url(started, "postgres", "postgres"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert _role_parameters(conn) == ("on", "postgres")


def test_psycopg_jwt_switch_role_reports_the_roles_parameter_status(
    proxy: ProxyFactory, pg: Topology, super_role: str
) -> None:
    # A JWT client whose role claim is switched to gets what a direct connection of `app` gets after
    # SET ROLE to that role, with its first answer; two such clients alternate on one server.
    assert pg.primary is not None
    secret = "shardgate-truth-test-secret-0123456789abcdefghij"
    api_user = {"name": "api", "auth": "jwt", "server_user": "app", "server_password": "app"}
    started = proxy(pool_mode="transaction", pool_size=1, users=[*default_users(), api_user],
                    databases=database_entries(pg.primary),
                    jwt={"algorithms": ["HS256"], "secret": secret, "role_claim": "role", "switch_role": True,
                         "allowed_roles": [super_role, "app"]})
    assert isinstance(started, ProxyProcess)

    def direct_as(role: str) -> tuple[str | None, str | None]:
        with psycopg.connect(direct_url(pg), autocommit=True) as conn:
            conn.execute(f"SET ROLE {role}")
            return _role_parameters(conn)

    def token(role: str) -> str:
        return pyjwt.encode({"sub": role, "role": role, "exp": int(time.time()) + 600}, secret, algorithm="HS256")

    expected = {role: direct_as(role) for role in (super_role, "app")}
    assert expected[super_role] != expected["app"]
    with psycopg.connect(proxy_url(started, "api", token(super_role)), autocommit=True) as privileged, \
            psycopg.connect(proxy_url(started, "api", token("app")), autocommit=True) as plain:
        for _ in range(3):
            assert privileged.execute("SELECT current_user::text").fetchone() == (super_role,)
            assert _role_parameters(privileged) == expected[super_role]
            assert plain.execute("SELECT current_user::text").fetchone() == ("app",)
            assert _role_parameters(plain) == expected["app"]
