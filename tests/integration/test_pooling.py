"""Pooling against the real proxy and PostgreSQL: pool sizes and limits, session-state isolation in
transaction mode, session mode pass-through, cancel, and server maintenance (minimum, idle, lifetime,
broken servers).

Server connections are counted on the primary through pg_stat_activity by a direct superuser
connection: the proxy logs in as `app`, the observer as `postgres`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from localpg import Topology
from tests.harness import (
    CuttingForwarder,
    DirectProxy,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    data_row,
    database_entries,
    default_users,
    error_fields,
    make_dsn,
    message,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

Proxy = ProxyProcess | DirectProxy
SERVER_USER = "app"
CONNECT_TIMEOUT_S = 10
POLL_INTERVAL_S = 0.05
# The proxy's health probe keeps one monitor connection per server, named by its application_name;
# it is not a pooled server connection, so the counts below leave it out.
MONITOR_APPLICATION_NAME = "shardgate-monitor"
POOLED_BACKENDS_WHERE = (
    "usename = {user} AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    f" AND application_name IS DISTINCT FROM '{MONITOR_APPLICATION_NAME}'"
)
SERVER_BACKENDS_SQL = (
    "SELECT pid FROM pg_stat_activity WHERE " + POOLED_BACKENDS_WHERE.format(user="%s") + " ORDER BY pid"
)


# -- helpers ------------------------------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def real_proxy(proxy_process: Proxy) -> ProxyProcess:
    """These tests observe the proxy itself (its server connections, its pids): not in direct mode."""
    if isinstance(proxy_process, DirectProxy):
        pytest.skip("needs the proxy (SHARDGATE_TEST_DIRECT=1 points clients at PostgreSQL)")
    return proxy_process


@pytest.fixture
def primary_proxy(proxy: ProxyFactory, pg: Topology) -> Callable[..., ProxyProcess]:
    """primary_proxy(pool_mode, pool_size, **general): a proxy serving only the primary."""
    assert pg.primary is not None
    primary = pg.primary

    def start(
        pool_mode: str = "transaction",
        pool_size: int = 10,
        users: list[dict[str, Any]] | None = None,
        **general: Any,
    ) -> ProxyProcess:
        return real_proxy(
            proxy(
                pool_mode=pool_mode,
                pool_size=pool_size,
                users=users,
                databases=database_entries(primary),
                general=general,
            )
        )

    return start


@pytest.fixture
def admin(pg: Topology) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to the primary (autocommit: every pg_stat_activity read is fresh)."""
    assert pg.primary is not None
    with psycopg.connect(
        pg.primary.dsn("postgres", dbname="postgres"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
    ) as conn:
        yield conn


def connect(proxy_process: Proxy, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(proxy_process.dsn(connect_timeout=CONNECT_TIMEOUT_S), **kwargs)


def server_backends(admin_conn: psycopg.Connection[Any], user: str = SERVER_USER) -> list[int]:
    """Pids of the client backends logged in as `user` (the proxy's server connections)."""
    return [row[0] for row in admin_conn.execute(SERVER_BACKENDS_SQL, (user,)).fetchall()]



def one(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0] if len(row) == 1 else row


def wait_for_active_query(admin_conn: psycopg.Connection[Any], query: str, timeout_s: float = 5.0) -> int:
    """Wait until a backend runs exactly `query`; returns its pid."""
    found: list[int] = []

    def running() -> bool:
        row = admin_conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query = %s", (query,)
        ).fetchone()
        if row is not None:
            found.append(row[0])
        return row is not None

    wait_until(running, timeout_s, f"query {query!r} to run on a server")
    return found[0]


def drop_table(pg: Topology, table: str) -> None:
    assert pg.primary is not None
    pg.primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


# -- many clients, few servers ------------------------------------------------------------------------

CLIENT_COUNT = 1000
CONNECT_BATCH = 100
QUERIES_PER_CLIENT = 3
POOL_SIZE = 10


def test_thousand_clients_share_ten_servers(primary_proxy: Callable[..., ProxyProcess], pg: Topology) -> None:
    # A generous checkout timeout: this test is about sharing, test_checkout_timeout about waiting.
    shared = primary_proxy("transaction", POOL_SIZE, checkout_timeout_ms=30_000)
    assert pg.primary is not None
    admin_dsn = make_dsn(pg.primary.host, pg.primary.port, "postgres", "postgres", "postgres")
    samples: list[int] = []

    async def sample(stop: asyncio.Event) -> None:
        observer = await asyncpg.connect(admin_dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            while not stop.is_set():
                count = await observer.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE " + POOLED_BACKENDS_WHERE.format(user="$1"),
                    SERVER_USER,
                )
                samples.append(int(count))
                await asyncio.sleep(POLL_INTERVAL_S)
        finally:
            await observer.close()

    async def work(client_index: int, conn: asyncpg.Connection) -> list[int]:
        echoed = []
        for query_index in range(QUERIES_PER_CLIENT):
            value = client_index * 10 + query_index
            echoed.append(await conn.fetchval("SELECT $1::int", value))
        return echoed

    async def scenario() -> list[list[int]]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        conns: list[asyncpg.Connection] = []
        try:
            for _ in range(0, CLIENT_COUNT, CONNECT_BATCH):
                conns.extend(
                    await asyncio.gather(
                        *(asyncpg.connect(shared.dsn(), timeout=30) for _ in range(CONNECT_BATCH))
                    )
                )
            assert len(conns) == CLIENT_COUNT
            results = await asyncio.gather(*(work(index, conn) for index, conn in enumerate(conns)))
            # Every client is still connected after the run: none was dropped to make room.
            assert sum(1 for conn in conns if not conn.is_closed()) == CLIENT_COUNT
            return list(results)
        finally:
            stop.set()
            await asyncio.gather(*(conn.close(timeout=10) for conn in conns), return_exceptions=True)
            await sampler

    started = time.monotonic()
    results = run_async(scenario(), timeout_s=150)
    elapsed_s = time.monotonic() - started
    assert results == [
        [index * 10 + query_index for query_index in range(QUERIES_PER_CLIENT)]
        for index in range(CLIENT_COUNT)
    ]
    assert len(samples) >= 5, f"only {len(samples)} samples of pg_stat_activity in {elapsed_s:.1f}s"
    assert 1 <= max(samples) <= POOL_SIZE, f"server connections seen over time: max {max(samples)}"
    # The samples can miss a short burst; the proxy's own count of server logins cannot.
    created = _metric_total(shared, "shardgate_pool_servers_created_total")
    assert 1 <= created <= POOL_SIZE, f"{created:.0f} server connections opened for a pool of {POOL_SIZE}"


# -- session state in transaction mode ----------------------------------------------------------------

STATE_SQL = (
    "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
    " current_setting('application_name')"
)
DEFAULT_SEARCH_PATH = '"$user", public'


@pytest.fixture
def two_clients_one_server(
    primary_proxy: Callable[..., ProxyProcess],
) -> Iterator[tuple[psycopg.Connection[Any], psycopg.Connection[Any]]]:
    """Clients A and B (application_name client-a / client-b) on a transaction-mode pool of size 1."""
    shared = primary_proxy("transaction", 1)
    with connect(shared, application_name="client-a") as a, connect(shared, application_name="client-b") as b:
        # Pool size 1: both clients run on the same server connection.
        assert one(a, "SELECT pg_backend_pid()") == one(b, "SELECT pg_backend_pid()")
        yield a, b


def test_set_isolated_between_clients_and_kept_across_transactions(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    a, b = two_clients_one_server
    a.execute("SET search_path = shardgate_a, public")
    a.execute("SET statement_timeout = '4321ms'")
    a.execute("SET application_name = 'a-changed'")
    a_state = ("shardgate_a, public", "4321ms", "a-changed")
    b_state = (DEFAULT_SEARCH_PATH, "0", "client-b")
    for round_index in range(25):
        if round_index == 10:
            b.execute("SET search_path TO shardgate_b")
            b_state = ("shardgate_b", "0", "client-b")
        if round_index % 3 == 0:
            a.execute("BEGIN")
            assert one(a, STATE_SQL) == a_state, f"round {round_index} (A in a transaction)"
            a.execute("COMMIT")
        else:
            assert one(a, STATE_SQL) == a_state, f"round {round_index} (A)"
        assert one(b, STATE_SQL) == b_state, f"round {round_index} (B)"


def test_reset_all_returns_to_startup_values(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    a, b = two_clients_one_server
    a.execute("SET search_path = shardgate_a, public")
    a.execute("SET statement_timeout = '4321ms'")
    a.execute("SET application_name = 'a-changed'")
    assert one(b, STATE_SQL) == (DEFAULT_SEARCH_PATH, "0", "client-b")
    a.execute("RESET ALL")
    # As on PostgreSQL: RESET ALL goes back to the values of the startup packet (application_name).
    a_state = (DEFAULT_SEARCH_PATH, "0", "client-a")
    assert one(a, STATE_SQL) == a_state, "right after RESET ALL, on the same server"
    assert one(b, STATE_SQL) == (DEFAULT_SEARCH_PATH, "0", "client-b")
    assert one(a, STATE_SQL) == a_state, "after B used the server"


def test_set_in_rolled_back_transaction_not_kept(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    a, b = two_clients_one_server
    a_state = (DEFAULT_SEARCH_PATH, "0", "client-a")
    b_state = (DEFAULT_SEARCH_PATH, "0", "client-b")
    a.execute("BEGIN")
    a.execute("SET search_path = rolled_back")
    assert one(a, "SELECT current_setting('search_path')") == "rolled_back"
    a.execute("ROLLBACK")
    assert one(a, STATE_SQL) == a_state, "right after ROLLBACK"
    assert one(b, STATE_SQL) == b_state
    assert one(a, STATE_SQL) == a_state, "after B used the server"

    # Nor one in a transaction that failed.
    a.execute("BEGIN")
    a.execute("SET statement_timeout = '999ms'")
    with pytest.raises(pg_errors.DivisionByZero):
        a.execute("SELECT 1 / 0")
    a.execute("ROLLBACK")
    assert one(a, STATE_SQL) == a_state
    assert one(b, STATE_SQL) == b_state
    assert one(a, STATE_SQL) == a_state

    # A committed SET is kept; SET LOCAL is not.
    a.execute("BEGIN")
    a.execute("SET statement_timeout = '777ms'")
    a.execute("COMMIT")
    a.execute("BEGIN")
    a.execute("SET LOCAL search_path = local_only")
    a.execute("COMMIT")
    a_state = (DEFAULT_SEARCH_PATH, "777ms", "client-a")
    assert one(a, STATE_SQL) == a_state
    assert one(b, STATE_SQL) == b_state
    assert one(a, STATE_SQL) == a_state


def test_set_config_session_scope_carried(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    a, b = two_clients_one_server
    assert one(a, "SELECT set_config('shardgate.flag', 'on-a', false)") == "on-a"
    assert one(a, "SELECT set_config('shardgate.local_flag', 'tx-only', true)") == "tx-only"
    for round_index in range(3):
        assert one(b, "SELECT current_setting('shardgate.flag', true)") in (None, ""), round_index
        assert one(a, "SELECT current_setting('shardgate.flag', true)") == "on-a", round_index
        assert one(a, "SELECT current_setting('shardgate.local_flag', true)") in (None, ""), round_index

def test_set_role_isolated_between_clients_and_kept_across_transactions(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]], admin: psycopg.Connection[Any]
) -> None:
    """SET ROLE has no `=` or TO; it must not leak to the next client on the server (a privilege leak)."""
    a, b = two_clients_one_server
    role = unique_name("reader")
    admin.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        admin.execute(f'GRANT "{role}" TO "{SERVER_USER}"')
        a.execute(f'SET ROLE "{role}"')
        for round_index in range(3):
            assert one(b, "SELECT current_user") == SERVER_USER, round_index
            assert one(a, "SELECT current_user") == role, round_index
        a.execute("RESET ROLE")
        assert one(a, "SELECT current_user") == SERVER_USER
    finally:
        a.execute("RESET ROLE")
        a.close()
        b.close()
        admin.execute(f'DROP ROLE "{role}"')


def test_set_config_in_an_unnamed_extended_statement_carried(
    two_clients_one_server: tuple[psycopg.Connection[Any], psycopg.Connection[Any]],
) -> None:
    """A statement with parameters goes as an unnamed Parse/Bind/Execute (psycopg, JDBC, asyncpg without its
    statement cache): its set_config is tracked as a Query's is."""
    a, b = two_clients_one_server
    row = one(a, "SELECT set_config('shardgate.flag', 'unnamed-a', false), %s::int", (7,))
    assert row == ("unnamed-a", 7)
    for round_index in range(3):
        assert one(b, "SELECT current_setting('shardgate.flag', true)") in (None, ""), round_index
        assert one(a, "SELECT current_setting('shardgate.flag', true)") == "unnamed-a", round_index


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_state_change_after_a_run_of_plain_statements_is_tracked(
    primary_proxy: Callable[..., ProxyProcess], protocol: str
) -> None:
    """A client that keeps its parked server between plain statements (the relay's steady state) still has
    a SET or set_config noticed when it comes, in either protocol and whether or not its batch repeats the
    shape of the ones before."""
    shared = primary_proxy("transaction", 1)
    with connect(shared, application_name="client-a") as a:
        for value in range(4):  # the same statement, new values: the steady state
            if protocol == "simple":
                assert one(a, f"SELECT {value}") == value
            else:
                assert one(a, "SELECT %s::int", (value,)) == value
        if protocol == "simple":
            a.execute("SET search_path = shardgate_steady")
        else:
            assert one(a, "SELECT set_config('search_path', 'shardgate_steady', false), %s::int", (1,)) == (
                "shardgate_steady", 1)
        with connect(shared, application_name="client-b") as b:
            # pool of 1: B takes A's parked server; A's setting must not come with it
            assert one(b, "SELECT current_setting('search_path')") == DEFAULT_SEARCH_PATH
            for value in range(3):
                assert one(a, "SELECT current_setting('search_path'), %s::int", (value,)) == (
                    "shardgate_steady", value)
                assert one(b, "SELECT current_setting('search_path'), %s::int", (value,)) == (
                    DEFAULT_SEARCH_PATH, value)


def test_a_role_taken_after_a_privileged_setting_is_replayed_after_it(
    primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    # The client changes a superuser-only parameter its login role was granted, then takes on a role that
    # was not. On PostgreSQL both stay. Through a pool of one, each time it comes back from another client
    # the proxy replays them, in an order the server accepts: the setting as the login role, then the role.
    shared = primary_proxy("transaction", 1)
    reader = unique_name("reader")
    admin.execute(f"CREATE ROLE {reader}")
    admin.execute(f"GRANT {reader} TO {SERVER_USER}")
    admin.execute(f"GRANT SET ON PARAMETER track_functions TO {SERVER_USER}")
    try:
        with connect(shared) as a, connect(shared) as b:
            a.execute("SET track_functions = 'pl'")
            a.execute(f"SET ROLE {reader}")
            for round_index in range(3):
                assert one(a, "SELECT current_user::text, current_setting('track_functions')") == (
                    reader, "pl"), round_index
                assert one(b, "SELECT current_user::text, current_setting('track_functions')") == (
                    SERVER_USER, "none"), round_index
    finally:
        admin.execute(f"REVOKE SET ON PARAMETER track_functions FROM {SERVER_USER}")
        admin.execute(f"DROP ROLE {reader}")


def test_set_config_of_a_bound_value_pins_the_client(primary_proxy: Callable[..., ProxyProcess]) -> None:
    """set_config(name, $1, false): the proxy cannot read the value, so the client keeps its server (pinned)
    and the server is reset when the client leaves; the next client never sees the value."""
    shared = primary_proxy("transaction", 1)
    with connect(shared, application_name="client-b") as b:
        with connect(shared, application_name="client-a") as a:
            row = one(a, "SELECT set_config('search_path', %s, false), pg_backend_pid()", ("bound_by_a",))
            assert row[0] == "bound_by_a"
            for _ in range(3):
                assert one(a, "SELECT current_setting('search_path'), pg_backend_pid()") == row
        assert one(b, "SELECT current_setting('search_path'), pg_backend_pid()") == (DEFAULT_SEARCH_PATH, row[1])


# -- startup parameters ---------------------------------------------------------------------------------

BEHAVIOUR_SQL = (
    "SELECT '01/02/2024'::date::text, interval '1 day 2 hours'::text,"
    " current_setting('TimeZone'), current_setting('application_name')"
)
REPORTED = ("DateStyle", "TimeZone", "IntervalStyle", "application_name")
# Client A: libpq `options` and application_name, plus PGDATESTYLE and PGTZ, which libpq sends as the
# startup parameters datestyle and timezone. Client C (asyncpg): the mixed-case names in the packet.
A_KWARGS = {"options": "-c intervalstyle=iso_8601", "application_name": "startup-a"}
A_ENV = {"PGDATESTYLE": "iso,dmy", "PGTZ": "europe/paris"}
A_CANONICAL = {
    "DateStyle": "ISO, DMY",
    "TimeZone": "Europe/Paris",
    "IntervalStyle": "iso_8601",
    "application_name": "startup-a",
}
C_SETTINGS = {
    "DateStyle": "sql,dmy",
    "TimeZone": "america/new_york",
    "IntervalStyle": "sql_standard",
    "application_name": "startup-c",
}
C_CANONICAL = {
    "DateStyle": "SQL, DMY",
    "TimeZone": "America/New_York",
    "IntervalStyle": "sql_standard",
    "application_name": "startup-c",
}


def _connect_a(dsn: str, monkeypatch: pytest.MonkeyPatch) -> psycopg.Connection[Any]:
    with monkeypatch.context() as env:
        for name, value in A_ENV.items():
            env.setenv(name, value)
        return psycopg.connect(
            dsn, autocommit=True, options=A_KWARGS["options"], application_name=A_KWARGS["application_name"]
        )


async def _asyncpg_c(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings=C_SETTINGS, timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_startup_parameter_status_is_canonical(
    pool_mode: str, primary_proxy: Callable[..., ProxyProcess], pg: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = primary_proxy(pool_mode, 1)
    assert pg.primary is not None
    with _connect_a(pg.primary.dsn("app"), monkeypatch) as direct_a:
        # The expectations hold on PostgreSQL itself.
        assert {name: direct_a.info.parameter_status(name) for name in REPORTED} == A_CANONICAL
    with _connect_a(shared.dsn(connect_timeout=CONNECT_TIMEOUT_S), monkeypatch) as a:
        assert {name: a.info.parameter_status(name) for name in REPORTED} == A_CANONICAL

    async def statuses() -> list[dict[str, str]]:
        found = []
        for dsn in (make_dsn(pg.primary.host, pg.primary.port), shared.dsn()):  # type: ignore[union-attr]
            conn = await _asyncpg_c(dsn)
            try:
                found.append({name: getattr(conn.get_settings(), name) for name in REPORTED})
            finally:
                await conn.close()
        return found

    assert run_async(statuses(), 30) == [C_CANONICAL, C_CANONICAL]


def test_startup_parameters_kept_on_a_shared_server(
    primary_proxy: Callable[..., ProxyProcess], pg: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = primary_proxy("transaction", 1)
    assert pg.primary is not None
    # What PostgreSQL itself answers for the same startup packets, over direct connections.
    with _connect_a(pg.primary.dsn("app"), monkeypatch) as direct_a:
        expected_a = one(direct_a, BEHAVIOUR_SQL)
    with psycopg.connect(pg.primary.dsn("app"), autocommit=True) as direct_b:
        expected_b = one(direct_b, BEHAVIOUR_SQL)
        b_status = {name: direct_b.info.parameter_status(name) for name in REPORTED}
    assert expected_a[:2] == ("2024-02-01", "P1DT2H")  # DMY and ISO 8601 really apply
    assert expected_b[:2] == ("2024-01-02", "1 day 02:00:00")

    async def client_c() -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
        direct_c = await _asyncpg_c(make_dsn(pg.primary.host, pg.primary.port))  # type: ignore[union-attr]
        try:
            expected_c = tuple(await direct_c.fetchrow(BEHAVIOUR_SQL))
        finally:
            await direct_c.close()
        c = await _asyncpg_c(shared.dsn())
        try:
            seen = []
            for _ in range(5):
                seen.append(tuple(await c.fetchrow(BEHAVIOUR_SQL)))
                await asyncio.sleep(0.05)  # let the psycopg clients use the one server in between
            return seen, expected_c
        finally:
            await c.close()

    with _connect_a(shared.dsn(connect_timeout=CONNECT_TIMEOUT_S), monkeypatch) as a, connect(shared) as b:
        # Unnamed statements only for A and B: named ones shared between clients have their own test.
        a.prepare_threshold = b.prepare_threshold = None
        thread, outcome = _in_thread(lambda: run_async(client_c(), 60))
        try:
            for round_index in range(10):
                assert one(a, BEHAVIOUR_SQL) == expected_a, f"round {round_index} (A)"
                assert one(b, BEHAVIOUR_SQL) == expected_b, f"round {round_index} (B)"
        finally:
            thread.join(60)
        assert "result" in outcome, outcome
        c_seen, expected_c = outcome["result"]
        assert expected_c[:2] == ("01/02/2024", "1 2:00:00")
        assert c_seen == [expected_c] * 5
        # Moving the server between clients must not leak ParameterStatus messages to them.
        assert b.info.parameter_status("DateStyle") == b_status["DateStyle"]
        assert b.info.parameter_status("TimeZone") == b_status["TimeZone"]


def test_prepared_statement_parsed_under_its_clients_datestyle(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    # Two clients prepare the same text (protocol-level Parse) on one server. On PostgreSQL each
    # connection parses it under its own DateStyle, so the literal means 1 February for A and
    # 2 January for B; through the proxy it must mean the same.
    shared = primary_proxy("transaction", 1)
    sql = "SELECT '01/02/2024'::date::text"
    with connect(shared, options="-c datestyle=iso,dmy") as a, connect(shared) as b:
        for round_index in range(4):
            assert a.execute(sql, prepare=True).fetchone() == ("2024-02-01",), f"round {round_index} (A)"
            assert b.execute(sql, prepare=True).fetchone() == ("2024-01-02",), f"round {round_index} (B)"
        assert one(b, "SHOW datestyle") == "ISO, MDY"


def _parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def _bind_execute_sync(statement: str, value: str) -> bytes:
    bind = b"\x00" + statement.encode() + b"\x00" + struct.pack("!hhi", 0, 1, len(value)) + value.encode()
    return (message(b"B", bind + struct.pack("!h", 0)) + message(b"E", b"\x00" + struct.pack("!i", 0))
            + message(b"S", b""))


def _batch_view(messages: list[tuple[bytes, bytes]]) -> list[str]:
    """What a client sees of one batch: message types, with data rows and error codes spelled out."""
    view = []
    for code, body in messages:
        if code == b"D":
            view.append(f"D{data_row(body)}")
        elif code == b"E":
            view.append(f"E:{error_fields(body)['C']}")
        elif code in (b"1", b"2", b"C", b"Z", b"3"):
            view.append(code.decode())
    return view


def test_pipelined_batches_keep_replies_to_renamed_statements_in_their_batch(
    primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    # One write carries four extended-protocol batches to a server that lost the client's statement.
    # The first fails to parse, so its reply never comes; the second uses the lost statement, which the
    # proxy prepares again (and must hide that ParseComplete from the client); the last two add and
    # reuse statements. Every reply must stay in its own batch, as PostgreSQL sends them to a client
    # that talks to it directly.
    shared = primary_proxy("transaction", 1)
    client = RawClient(shared.host, shared.port)
    try:
        client.login()
        client.send(_parse("doubled", "SELECT $1::int * 2") + message(b"S", b""))
        assert _batch_view(client.read_until_ready()) == ["1", "Z"]
        pid = int(client.simple_query("SELECT pg_backend_pid()")[0][0] or 0)
        assert one(admin, "SELECT pg_terminate_backend(%s)", (pid,)) is True
        wait_until(lambda: pid not in server_backends(admin, "trustuser"), 10, "the server to go")
        time.sleep(0.2)  # the proxy sees its server closed before the next transaction
        client.send(
            _parse("broken", "SELEC 1") + message(b"S", b"")
            + _bind_execute_sync("doubled", "21")
            + _parse("seven", "SELECT $1::int + 7") + _bind_execute_sync("seven", "0")
            + _bind_execute_sync("doubled", "5")
        )
        batches = [_batch_view(client.read_until_ready()) for _ in range(4)]
        assert batches == [
            ["E:42601", "Z"],
            ["2", "D['42']", "C", "Z"],
            ["1", "2", "D['7']", "C", "Z"],
            ["2", "D['10']", "C", "Z"],
        ]
        # and the statements still work in the next transaction
        client.send(_bind_execute_sync("seven", "35") + _bind_execute_sync("doubled", "50"))
        assert [_batch_view(client.read_until_ready()) for _ in range(2)] == [
            ["2", "D['42']", "C", "Z"],
            ["2", "D['100']", "C", "Z"],
        ]
    finally:
        client.close()


# What PostgreSQL ends a one-row SELECT with: CommandComplete "SELECT 1", then ReadyForQuery (idle).
ONE_ROW_REPLY_END = message(b"C", b"SELECT 1\x00") + message(b"Z", b"I")
SERVER_SEND_BUFFER = 8192  # PostgreSQL sends a long reply in writes of its 8 KB output buffer


def _bytea_round_trip(value: bytes) -> bytes:
    """Parse/Bind/Execute/Sync of `SELECT $1::bytea`, the value and the result both in binary: its reply
    is ParseComplete, BindComplete, one DataRow holding `value` byte for byte, CommandComplete, Ready."""
    parse = message(b"P", b"\x00SELECT $1::bytea\x00" + struct.pack("!hI", 1, 17))
    bind = message(b"B", b"\x00\x00" + struct.pack("!hhhi", 1, 1, 1, len(value)) + value
                   + struct.pack("!hh", 1, 1))
    return parse + bind + message(b"E", b"\x00" + struct.pack("!i", 0)) + message(b"S", b"")


def test_a_row_holding_the_end_of_a_reply_is_not_taken_for_it(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    # After a few small replies of the same statement, a long row whose bytes spell the end of such a
    # reply (CommandComplete, ReadyForQuery) exactly where the server's output buffer ends: a relay that
    # took a read ending there for the whole reply would give the server back mid-row and lose the rest.
    shared = primary_proxy("transaction", 1)
    client = RawClient(shared.host, shared.port)
    try:
        client.login()
        for index in range(3):
            client.send(_bytea_round_trip(b"small %d" % index))
            assert [code for code, _ in client.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]
        value_at = 10 + 11  # ParseComplete, BindComplete; then the DataRow's header, column count, length
        value = bytearray(b"x" * (40 * SERVER_SEND_BUFFER))
        for boundary in range(SERVER_SEND_BUFFER, len(value), SERVER_SEND_BUFFER):
            start = boundary - value_at - len(ONE_ROW_REPLY_END)
            value[start : start + len(ONE_ROW_REPLY_END)] = ONE_ROW_REPLY_END
        client.send(_bytea_round_trip(bytes(value)))
        reply = client.read_until_ready()
        assert [code for code, _ in reply] == [b"1", b"2", b"D", b"C", b"Z"]
        assert reply[2][1] == struct.pack("!hi", 1, len(value)) + value
        assert client.simple_query("SELECT 'after'") == [["after"]]
    finally:
        client.close()


def test_a_named_statement_prepared_on_another_server_is_prepared_on_the_clients_new_one(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    # A prepares a statement on server X and reuses it there. B and C arrive on a full pool of two: C takes
    # X, parked with A. A's next plain statement takes Y, parked with B, and A is settled on Y. A's prepared
    # statement must then be prepared on Y before its Bind, as on any server that lacks it.
    shared = primary_proxy("transaction", 2)
    sql = "SELECT pg_backend_pid(), %s::int"
    with connect(shared) as a, connect(shared) as b, connect(shared) as c:
        first_pid = a.execute(sql, (1,), prepare=True).fetchone()[0]  # type: ignore[index]
        assert a.execute(sql, (2,), prepare=True).fetchone() == (first_pid, 2)
        second_pid = one(b, "SELECT pg_backend_pid()")
        assert one(c, "SELECT pg_backend_pid()") == first_pid  # X, taken from A
        assert one(a, "SELECT pg_backend_pid()") == second_pid  # Y, taken from B
        for value in range(3, 6):
            assert a.execute(sql, (value,), prepare=True).fetchone() == (second_pid, value)


def test_a_named_statement_closed_and_parsed_again_binds_the_new_text(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    # The same statement name, closed and parsed again with another text, between runs of Binds that
    # repeat byte for byte: the Binds after it run the new text.
    shared = primary_proxy("transaction", 1)
    client = RawClient(shared.host, shared.port)
    try:
        client.login()
        for text, expected in (("SELECT $1::int + 100", "107"), ("SELECT $1::int + 200", "207")):
            client.send(_parse("reused", text) + message(b"S", b""))
            assert _batch_view(client.read_until_ready()) == ["1", "Z"]
            for _ in range(3):
                client.send(_bind_execute_sync("reused", "7"))
                assert _batch_view(client.read_until_ready()) == ["2", f"D['{expected}']", "C", "Z"]
            client.send(message(b"C", b"Sreused\x00") + message(b"S", b""))
            assert _batch_view(client.read_until_ready()) == ["3", "Z"]
    finally:
        client.close()


def test_prepared_statement_resolved_under_its_clients_search_path(
    primary_proxy: Callable[..., ProxyProcess], pg: Topology
) -> None:
    shared = primary_proxy("transaction", 1)
    assert pg.primary is not None
    schema_a, schema_b = unique_name("sa"), unique_name("sb")
    pg.primary.psql(
        f"CREATE SCHEMA {schema_a}; CREATE TABLE {schema_a}.t AS SELECT 'from-a'::text AS v;"
        f"CREATE SCHEMA {schema_b}; CREATE TABLE {schema_b}.t AS SELECT 'from-b'::text AS v;",
        user="app",
        db="app",
    )
    try:
        with (
            connect(shared, options=f"-c search_path={schema_a}") as a,
            connect(shared, options=f"-c search_path={schema_b}") as b,
        ):
            for round_index in range(4):
                assert a.execute("SELECT v FROM t", prepare=True).fetchone() == ("from-a",), round_index
                assert b.execute("SELECT v FROM t", prepare=True).fetchone() == ("from-b",), round_index
    finally:
        pg.primary.psql(f"DROP SCHEMA IF EXISTS {schema_a}, {schema_b} CASCADE", user="app", db="app")


# -- SQL prepared statements ----------------------------------------------------------------------------


def test_sql_prepare_execute_deallocate_across_transactions(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    shared = primary_proxy("transaction", 1)
    with connect(shared) as a, connect(shared) as b:
        a.execute("PREPARE shared_name (int) AS SELECT $1 * 2")
        b.execute("PREPARE shared_name (text) AS SELECT $1 || '-b'")
        for i in range(10):
            if i % 2:
                a.execute("BEGIN")
                assert one(a, f"EXECUTE shared_name({i})") == i * 2
                a.execute("COMMIT")
            else:
                assert one(a, f"EXECUTE shared_name({i})") == i * 2
            assert one(b, f"EXECUTE shared_name('{i}')") == f"{i}-b"
        assert one(a, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'shared_name'") == 1

        a.execute("DEALLOCATE shared_name")
        assert one(b, "EXECUTE shared_name('still')") == "still-b"
        with pytest.raises(pg_errors.InvalidSqlStatementName):
            a.execute("EXECUTE shared_name(1)")
        assert one(b, "EXECUTE shared_name('after')") == "after-b"

        a.execute("PREPARE shared_name (int) AS SELECT $1 + 1000")
        assert one(a, "EXECUTE shared_name(5)") == 1005
        assert one(b, "EXECUTE shared_name('x')") == "x-b"
        b.execute("DEALLOCATE ALL")
        with pytest.raises(pg_errors.InvalidSqlStatementName):
            b.execute("EXECUTE shared_name('x')")
        assert one(a, "EXECUTE shared_name(6)") == 1006


# -- session mode -----------------------------------------------------------------------------------------


def test_session_mode_backend_pid_and_terminate(
    primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    session = primary_proxy("session", 3)
    channel = unique_name("pidchan")
    with connect(session) as listener, connect(session) as notifier:
        told = listener.info.backend_pid
        assert told == one(listener, "SELECT pg_backend_pid()")
        assert notifier.info.backend_pid == one(notifier, "SELECT pg_backend_pid()")
        assert told in server_backends(admin)

        listener.execute(f"LISTEN {channel}")
        notifier.execute(f"NOTIFY {channel}, 'who'")
        received = [(n.payload, n.pid) for n in listener.notifies(timeout=5, stop_after=1)]
        assert received == [("who", notifier.info.backend_pid)]

        assert one(admin, "SELECT pg_terminate_backend(%s)", (told,)) is True
        wait_until(lambda: told not in server_backends(admin), 5, f"backend {told} to exit")
        # The server's FATAL reaches the client as PostgreSQL sent it, and the connection is gone.
        with pytest.raises(psycopg.OperationalError) as raised:
            listener.execute("SELECT 1")
        assert raised.value.sqlstate == "57P01", raised.value
        assert listener.closed
        assert notifier.execute("SELECT 2").fetchone() == (2,)

    with connect(session) as later:
        assert one(later, "SELECT pg_backend_pid()") == later.info.backend_pid != told


def test_session_mode_reset_between_clients(
    primary_proxy: Callable[..., ProxyProcess],
) -> None:
    session = primary_proxy("session", 1)
    with connect(session, application_name="leaver") as first:
        first_pid = one(first, "SELECT pg_backend_pid()")
        first.execute("SET search_path = leftover, public")
        first.execute("SET statement_timeout = '999ms'")
        first.execute("PREPARE leftover_statement AS SELECT 1")
        first.execute("CREATE TEMP TABLE leftover_temp (x int)")
        first.execute("SELECT set_config('shardgate.leftover', 'yes', false)")
        first.execute("LISTEN leftover_channel")
        assert one(first, "SELECT count(*) FROM pg_prepared_statements") == 1

    with connect(session) as second:
        # Pool size 1: the same server connection, cleaned by the reset query.
        assert one(second, "SELECT pg_backend_pid()") == first_pid
        assert one(second, STATE_SQL) == (DEFAULT_SEARCH_PATH, "0", "")
        assert one(second, "SELECT count(*) FROM pg_prepared_statements") == 0
        assert one(second, "SELECT to_regclass('pg_temp.leftover_temp')::text") is None
        assert one(second, "SELECT current_setting('shardgate.leftover', true)") in (None, "")
        assert one(second, "SELECT count(*) FROM pg_listening_channels()") == 0


# -- transaction mode: disconnect ----------------------------------------------------------------------


def test_disconnect_mid_transaction_rolls_back(
    primary_proxy: Callable[..., ProxyProcess], pg: Topology, admin: psycopg.Connection[Any]
) -> None:
    shared = primary_proxy("transaction", 1)
    table = unique_name("midtx")
    assert pg.primary is not None
    pg.primary.psql(f"CREATE TABLE {table} (id int PRIMARY KEY)", user="app", db="app")
    try:
        leaver = connect(shared)
        leaver.execute("BEGIN")
        leaver.execute(f"INSERT INTO {table} VALUES (1)")
        server_pid = one(leaver, "SELECT pg_backend_pid()")
        # Close the socket under the client: no Terminate message, just a FIN.
        with socket.socket(fileno=os.dup(leaver.fileno())) as raw:
            raw.shutdown(socket.SHUT_RDWR)
        leaver.close()

        with connect(shared) as next_client:
            assert one(next_client, "SELECT pg_backend_pid()") == server_pid  # the server was reused
            assert one(next_client, f"SELECT count(*) FROM {table}") == 0
            next_client.execute(f"INSERT INTO {table} VALUES (2)")
            assert one(next_client, f"SELECT array_agg(id) FROM {table}") == [2]
        states = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (server_pid,)).fetchall()
        assert states == [("idle",)]
    finally:
        drop_table(pg, table)


def _parse_bind_execute(sql: str) -> bytes:
    return (message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00") + message(b"B", b"\x00" * 8)
            + message(b"E", b"\x00\x00\x00\x00\x00"))


LEFT_BEFORE_SYNC = [
    # the server keeps the results for the next Sync: the next client would read them as its own
    pytest.param(lambda secret: _parse_bind_execute(f"SELECT '{secret}'"), id="results-held-for-sync"),
    # an Execute too short to name its portal: the server errors and skips everything up to a Sync,
    # the next client's query included
    pytest.param(lambda secret: message(b"E") + _parse_bind_execute(f"SELECT '{secret}'"), id="skipping-to-sync"),
]


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize("batch", LEFT_BEFORE_SYNC)
def test_a_server_left_before_its_sync_is_not_lent_as_it_is(
    primary_proxy: Callable[..., ProxyProcess], pool_mode: str, batch: Callable[[str], bytes]
) -> None:
    shared = primary_proxy(pool_mode, 1)
    secret = unique_name("unsynced")
    leaver = RawClient(shared.host, shared.port)
    try:
        leaver.login()
        leaver.send(batch(secret))
        time.sleep(0.2)  # the server has it
    finally:
        leaver.close()
    follower = RawClient(shared.host, shared.port)
    try:
        follower.login()
        assert follower.simple_query("SELECT 'mine'") == [["mine"]]
        assert follower.simple_query("SELECT 2") == [["2"]]
    finally:
        follower.close()


@pytest.mark.parametrize("fault", [
    pytest.param(message(b"D", b"S"), id="describe-without-name"),
    pytest.param(message(b"\x01"), id="unknown-type"),
])
def test_a_malformed_message_that_waited_for_a_server_closes_its_client(
    primary_proxy: Callable[..., ProxyProcess], fault: bytes
) -> None:
    # The message is read only once a server is free, in the task that waited for it: the client still
    # gets FATAL 08P01 and is closed, and the pool goes on.
    shared = primary_proxy("transaction", 1)
    holder, waiter = RawClient(shared.host, shared.port), RawClient(shared.host, shared.port)
    try:
        holder.login()
        assert holder.query_status("BEGIN") == b"T"  # the only server
        waiter.login()
        waiter.send(message(b"Q", b"SELECT 1\x00") + fault)
        time.sleep(0.2)
        assert holder.query_status("COMMIT") == b"I"
        replies = waiter.read_until_closed()
        assert waiter.closed_by_peer, replies
        assert [error_fields(body)["C"] for code, body in replies if code == b"E"] == ["08P01"], replies
        assert holder.simple_query("SELECT 'after'") == [["after"]]
    finally:
        holder.close()
        waiter.close()
    assert "Traceback" not in shared.stderr_text()


# A statement whose effect lives in the server session beyond its transaction, and a later statement that
# only works on that same session.
PINNING = [
    pytest.param("SELECT pg_advisory_lock(424242)", "SELECT pg_advisory_unlock(424242)", True,
                 id="advisory-lock"),
    pytest.param("DECLARE {name} CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) AS g",
                 "SELECT count(*) FROM pg_cursors WHERE name = '{name}' AND is_holdable", 1, id="with-hold"),
    pytest.param("CREATE TEMP TABLE {name} AS SELECT 7 AS x", "SELECT x FROM {name}", 7, id="temp-table"),
]


@pytest.mark.parametrize(("pinner", "check", "expected"), PINNING)
def test_session_features_pin_the_client_in_transaction_mode(
    primary_proxy: Callable[..., ProxyProcess], pinner: str, check: str, expected: Any
) -> None:
    # A pinned client's server is not lent out even when another client needs one: with a pool of two, one
    # server pinned and the other in a transaction, a third client waits and times out instead of taking
    # the pinned server (which an unpinned, parked client would lose to it).
    shared = primary_proxy("transaction", 2, checkout_timeout_ms=500)
    name = unique_name("pinned")
    with connect(shared) as pinned, connect(shared) as holder, connect(shared) as waiter:
        pinned.execute(pinner.format(name=name))
        pid = one(pinned, "SELECT pg_backend_pid()")
        holder.execute("BEGIN")
        assert one(holder, "SELECT pg_backend_pid()") != pid
        with pytest.raises(pg_errors.TooManyConnections):
            waiter.execute("SELECT 1")
        holder.execute("COMMIT")
        assert one(waiter, "SELECT pg_backend_pid()") != pid
        assert one(pinned, "SELECT pg_backend_pid()") == pid
        assert one(pinned, check.format(name=name)) == expected


# -- statement mode ---------------------------------------------------------------------------------------


def test_statement_mode_rejects_transactions(primary_proxy: Callable[..., ProxyProcess]) -> None:
    statement = primary_proxy("statement", 2)
    with connect(statement) as conn:
        for opener in ("BEGIN", "start transaction isolation level serializable", "  begin;"):
            with pytest.raises(pg_errors.FeatureNotSupported) as raised:
                conn.execute(opener)
            assert raised.value.sqlstate == "0A000"
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert one(conn, "SELECT %s::int * 2", (21,)) == 42
        for i in range(5):
            assert one(conn, "SELECT count(*) FROM generate_series(1, %s)", (i,)) == i


# -- limits ------------------------------------------------------------------------------------------------


def test_checkout_timeout(primary_proxy: Callable[..., ProxyProcess]) -> None:
    checkout_timeout_ms = 500
    shared = primary_proxy("transaction", 1, checkout_timeout_ms=checkout_timeout_ms)
    with connect(shared) as holder, connect(shared) as waiter:
        holder.execute("BEGIN")
        assert one(holder, "SELECT 1") == 1
        for sql, params in (("SELECT 2", None), ("SELECT %s::int", (3,))):  # simple, then extended query
            started = time.monotonic()
            with pytest.raises(pg_errors.TooManyConnections) as raised:
                waiter.execute(sql, params)
            waited_s = time.monotonic() - started
            assert raised.value.sqlstate == "53300"
            assert checkout_timeout_ms / 1000 * 0.8 <= waited_s < 3.0, f"error after {waited_s:.2f}s"
        holder.execute("COMMIT")
        assert one(waiter, "SELECT 4") == 4
        assert one(waiter, "SELECT %s::int", (5,)) == 5


def _login_error(dsn: str) -> str | None:
    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        except asyncpg.PostgresError as error:
            return str(error.sqlstate)
        await conn.close()
        return None

    result: str | None = run_async(attempt(), 30)
    return result


def test_max_client_connections(primary_proxy: Callable[..., ProxyProcess]) -> None:
    limit = 3
    limited = primary_proxy("transaction", 2, max_client_connections=limit)
    with ExitStack() as stack:
        conns = [stack.enter_context(connect(limited)) for _ in range(limit)]
        assert [one(conn, "SELECT %s::int", (i,)) for i, conn in enumerate(conns)] == list(range(limit))
        assert _login_error(limited.dsn()) == "53300"
        assert one(conns[0], "SELECT 1") == 1
        conns[-1].close()

        # Once one client left there is room again (the proxy may need a moment to see the close).
        outcomes: list[str | None] = []

        def admitted() -> bool:
            outcomes.append(_login_error(limited.dsn()))
            return outcomes[-1] is None

        wait_until(admitted, 5, "a free client slot")
        assert outcomes[-1] is None and set(outcomes[:-1]) <= {"53300"}, outcomes


# -- cancel -------------------------------------------------------------------------------------------------


def _in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = target()
        except Exception as error:  # handed to the test thread
            outcome["error"] = error
        outcome["finished"] = time.monotonic()
        outcome["elapsed_s"] = outcome["finished"] - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_cancel(
    pool_mode: str, primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    # In transaction mode both clients share the one server; in session mode each has its own.
    shared = primary_proxy(pool_mode, 1 if pool_mode == "transaction" else 2)
    with connect(shared) as a, connect(shared) as b:
        sleeper = "SELECT pg_sleep(10)"
        thread, outcome = _in_thread(lambda: a.execute(sleeper).fetchone())
        try:
            wait_for_active_query(admin, sleeper)
            cancel_sent = time.monotonic()
            a.cancel_safe(timeout=5)
        finally:
            thread.join(15)
        assert isinstance(outcome.get("error"), pg_errors.QueryCanceled), outcome
        assert outcome["error"].sqlstate == "57014"
        assert outcome["finished"] - cancel_sent < 2.0
        assert one(a, "SELECT 'a usable'") == "a usable"

        # A's cancel after its query finished must not reach B's query on the same server.
        for round_index in range(2):
            assert one(a, "SELECT 1") == 1
            nap = f"SELECT 42 + {round_index} FROM pg_sleep(1)"
            thread, outcome = _in_thread(lambda sql=nap: b.execute(sql).fetchone())  # type: ignore[misc]
            try:
                wait_for_active_query(admin, nap)
                a.cancel_safe(timeout=5)
            finally:
                thread.join(15)
            assert outcome.get("result") == (42 + round_index,), outcome
            assert outcome["elapsed_s"] >= 0.9


# -- server maintenance --------------------------------------------------------------------------------------


def test_min_pool_size_and_idle_timeout(
    primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    app_only = [user for user in default_users() if user["name"] == SERVER_USER]
    shared = primary_proxy("transaction", 6, users=app_only, min_pool_size=3, idle_timeout_s=1)
    wait_until(lambda: len(server_backends(admin)) == 3, 8, "3 servers opened with no client")
    time.sleep(1.5)  # past idle_timeout_s: the minimum is kept, not closed and reopened
    assert len(server_backends(admin)) == 3
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(shared)) for _ in range(6)]
        for client in clients:
            client.execute("BEGIN")
        pids = {one(client, "SELECT pg_backend_pid()") for client in clients}
        assert len(pids) == 6
        assert set(server_backends(admin)) == pids
        for client in clients:
            client.execute("COMMIT")
    counts: list[int] = []

    def back_to_minimum() -> bool:
        counts.append(len(server_backends(admin)))
        return counts[-1] == 3

    wait_until(back_to_minimum, 10, "idle servers above the minimum to close")
    time.sleep(1.5)
    counts.append(len(server_backends(admin)))
    assert min(counts) >= 3 and counts[-1] == 3, counts


@pytest.mark.parametrize("healthcheck_idle_ms", [0, 1000])
def test_terminated_servers_are_replaced(
    healthcheck_idle_ms: int, primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    shared = primary_proxy("transaction", 3, healthcheck_idle_ms=healthcheck_idle_ms)
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(shared)) for _ in range(3)]
        for client in clients:
            client.execute("BEGIN")
        old_pids = {one(client, "SELECT pg_backend_pid()") for client in clients}
        for client in clients:
            client.execute("COMMIT")
        assert set(server_backends(admin)) == old_pids and len(old_pids) == 3

        terminated = admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
            + POOLED_BACKENDS_WHERE.format(user="%s"),
            (SERVER_USER,),
        ).fetchall()
        assert sorted(terminated) == sorted((pid, True) for pid in old_pids)
        wait_until(lambda: not set(server_backends(admin)) & old_pids, 5, "terminated servers to exit")

        # Simple and extended queries, then a transaction: none may see the dead servers.
        new_pids = {one(clients[0], "SELECT pg_backend_pid()")}
        new_pids.add(one(clients[1], "SELECT pg_backend_pid() + %s::int", (0,)))
        clients[2].execute("BEGIN")
        new_pids.add(one(clients[2], "SELECT pg_backend_pid()"))
        clients[2].execute("COMMIT")
        assert not new_pids & old_pids
        assert [one(client, "SELECT %s::int", (i,)) for i, client in enumerate(clients)] == [0, 1, 2]


CutProxy = Callable[[str, int], tuple[ProxyProcess, CuttingForwarder]]


@pytest.fixture
def cut_proxy(proxy: ProxyFactory, pg: Topology) -> Iterator[CutProxy]:
    """cut_proxy(pool_mode, pool_size): a proxy that reaches the primary through a CuttingForwarder."""
    assert pg.primary is not None
    primary = pg.primary
    forwarders: list[CuttingForwarder] = []

    def start(pool_mode: str, pool_size: int) -> tuple[ProxyProcess, CuttingForwarder]:
        forwarder = CuttingForwarder(primary.host, primary.port)
        forwarders.append(forwarder)
        entries = database_entries(primary)
        entries[0].update(host=forwarder.host, port=forwarder.port)
        return real_proxy(proxy(pool_mode=pool_mode, pool_size=pool_size, databases=entries)), forwarder

    try:
        yield start
    finally:
        for forwarder in forwarders:
            forwarder.close()


@pytest.mark.parametrize("statement", ["named", "unnamed", "simple"])
def test_a_server_lost_before_answering_is_replaced_transparently(cut_proxy: CutProxy, statement: str) -> None:
    # A client in its steady state (its server parked with it); in its next transaction the server dies as
    # the statement reaches it, before answering. The proxy retries on a new server. A named statement was
    # prepared on the old server only: the retry prepares it on the new one, as for any server that lacks it.
    shared, forwarder = cut_proxy("transaction", 2)
    cursor_factory = psycopg.ClientCursor if statement == "simple" else psycopg.Cursor
    with connect(shared, cursor_factory=cursor_factory) as client:

        def echo(value: str) -> Any:
            return client.execute("SELECT %s::text", (value,), prepare=statement == "named").fetchone()

        for value in ("first", "second"):
            assert echo(value) == (value,)
        marker = unique_name("cut")
        forwarder.cut_on(marker.encode())
        assert echo(marker) == (marker,)
        assert forwarder.cuts == 1
        assert echo("after") == ("after",)


def test_a_write_lost_before_its_answer_is_not_run_again(cut_proxy: CutProxy, pg: Topology) -> None:
    # The server may have committed a write and died before answering: running it again on another server
    # could make it twice. The client gets 08006 instead, as from PostgreSQL itself.
    shared, forwarder = cut_proxy("transaction", 2)
    table = unique_name("lostwrite")
    assert pg.primary is not None
    pg.primary.psql(f"CREATE TABLE {table} (note text)", user="app", db="app")
    try:
        with connect(shared) as client:
            assert one(client, "SELECT 1") == 1
            marker = unique_name("write")
            forwarder.cut_on(marker.encode())
            with pytest.raises(psycopg.OperationalError) as raised:
                client.execute(f"INSERT INTO {table} VALUES (%s)", (marker,))
            assert raised.value.sqlstate == "08006"
        assert forwarder.cuts == 1
        with connect(shared) as after:
            assert one(after, f"SELECT count(*) FROM {table}") == 0
    finally:
        drop_table(pg, table)


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_server_lost_while_a_login_sets_it_up_is_replaced(cut_proxy: CutProxy, pool_mode: str) -> None:
    # A login with startup settings the proxy has not seen needs a server to set them on; that server dies
    # as the settings reach it. The login goes on with another server instead of hanging.
    shared, forwarder = cut_proxy(pool_mode, 2)
    marker = unique_name("login")
    forwarder.cut_on(marker.encode())
    with connect(shared, application_name=marker) as client:
        assert one(client, "SELECT current_setting('application_name')") == marker
    assert forwarder.cuts == 1


def test_a_server_lost_while_a_clients_session_is_restored_on_it_is_replaced(cut_proxy: CutProxy) -> None:
    # A's setting must be replayed on the server A gets back from B; that server dies as the replay reaches
    # it. A's statement runs on another server, with the setting, instead of A being disconnected.
    shared, forwarder = cut_proxy("transaction", 1)
    marker = unique_name("restore")
    with connect(shared) as a, connect(shared) as b:
        a.execute(f"SET application_name = '{marker}'")
        assert one(b, "SELECT current_setting('application_name')") != marker  # B took the server
        forwarder.cut_on(marker.encode())
        assert one(a, "SELECT current_setting('application_name')") == marker
        assert forwarder.cuts == 1
        assert one(b, "SELECT 1") == 1


def test_server_lifetime(primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]) -> None:
    pool_size = 2
    shared = primary_proxy("transaction", pool_size, server_lifetime_s=1)
    seen: list[int] = []
    with connect(shared) as first, connect(shared) as second:
        deadline = time.monotonic() + 3.5
        iteration = 0
        while time.monotonic() < deadline and iteration < 200:
            client = first if iteration % 2 else second
            pid, echoed = one(client, "SELECT pg_backend_pid(), %s::int", (iteration,))
            assert echoed == iteration
            seen.append(pid)
            iteration += 1
            time.sleep(0.05)
    assert len(set(seen)) >= 3, f"server pids over 3.5s: {sorted(set(seen))}"
    # Replaced servers were closed, not leaked.
    wait_until(lambda: len(server_backends(admin)) <= pool_size, 5, "at most pool_size servers")


# -- parked servers (a client keeps its server between transactions while nobody waits) ---------------


def _metrics_text(proxy_process: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy_process.admin_url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def _metric_total(proxy_process: ProxyProcess, name: str) -> float:
    """A labelled metric from /metrics, summed over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics_text(proxy_process).splitlines()
               if line.startswith(name + "{"))


def _pool_servers(proxy_process: ProxyProcess) -> dict[str, float]:
    """shardgate_pool_servers by state, summed over pools, from /metrics."""
    totals: dict[str, float] = {}
    for line in _metrics_text(proxy_process).splitlines():
        if line.startswith("shardgate_pool_servers{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            totals[state] = totals.get(state, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_each_client_keeps_its_server_while_nobody_waits(primary_proxy: Callable[..., ProxyProcess]) -> None:
    shared = primary_proxy("transaction", 4)
    with connect(shared) as a, connect(shared) as b:
        a_pids, b_pids = set(), set()
        for _ in range(20):  # alternating: a returned server would go to the other client (last in, first out)
            a_pids.add(one(a, "SELECT pg_backend_pid()"))
            b_pids.add(one(b, "SELECT pg_backend_pid()"))
        assert len(a_pids) == 1 and len(b_pids) == 1 and a_pids != b_pids, (a_pids, b_pids)
        # A parked server counts as idle, not active, in the metrics.
        assert _pool_servers(shared) == {"idle": 2.0, "active": 0.0, "connecting": 0.0}


def test_parked_server_goes_to_the_client_that_needs_it(primary_proxy: Callable[..., ProxyProcess]) -> None:
    # Pool of one: B's checkout must take the server parked with A at once, not wait for a timeout.
    shared = primary_proxy("transaction", 1, checkout_timeout_ms=2000)
    with connect(shared) as a, connect(shared) as b:
        a.execute("SET application_name = 'parked-a'")
        server_pid = one(a, "SELECT pg_backend_pid()")
        started = time.monotonic()
        assert one(b, "SELECT pg_backend_pid(), current_setting('application_name')") == (server_pid, "")
        assert time.monotonic() - started < 1.0
        # A gets the server back with its own session state restored; B's is not left on it.
        assert one(a, "SELECT pg_backend_pid(), current_setting('application_name')") == (server_pid, "parked-a")
        assert one(b, "SELECT current_setting('application_name')") == ""


def test_parked_server_returns_to_the_pool_after_a_second(
    primary_proxy: Callable[..., ProxyProcess], admin: psycopg.Connection[Any]
) -> None:
    # idle_timeout_s 1: a server parked with an idle client goes back to the idle list, and from there it is
    # closed like any idle server, while its client stays connected and usable.
    shared = primary_proxy("transaction", 2, idle_timeout_s=1, min_pool_size=0)
    with connect(shared) as client:
        first = one(client, "SELECT pg_backend_pid()")
        assert first in server_backends(admin)
        wait_until(lambda: first not in server_backends(admin), 10, "the idle parked server to be closed")
        assert one(client, "SELECT pg_backend_pid()") != first
