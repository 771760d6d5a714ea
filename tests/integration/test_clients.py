"""Real clients through the proxy: psql, pgx, pgbench, psycopg 3 (sync and async) and asyncpg.

The proxies here serve the primary only: this file checks protocol compatibility, and replica lag
would make its read-after-write checks flaky (read/write splitting has its own tests).
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Coroutine, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from localpg import Topology
from tests.harness import DirectProxy, ProxyFactory, ProxyProcess, database_entries

pytestmark = pytest.mark.timeout(180)

POOL_MODES = ["session", "transaction"]
ALL_POOL_MODES = [*POOL_MODES, "statement"]
CLIENT_TIMEOUT_S = 60.0

Proxy = ProxyProcess | DirectProxy


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def drop_table(pg: Topology, table: str) -> None:
    """Cleanup straight on the primary, so a failing proxy cannot leave tables behind."""
    assert pg.primary is not None
    pg.primary.psql(f"DROP TABLE IF EXISTS {table}", user="app", db="app")


@pytest.fixture(scope="module")
def proxy_for(pg: Topology, proxy_work_root: Path) -> Iterator[Callable[[str], Proxy]]:
    """proxy_for(pool_mode): one proxy per pool mode for this module, restarted if it died."""
    assert pg.primary is not None
    factory = ProxyFactory(pg, proxy_work_root)
    proxies: dict[str, Proxy] = {}

    def get(pool_mode: str) -> Proxy:
        current = proxies.get(pool_mode)
        if current is None or not current.is_running():
            assert pg.primary is not None
            current = factory(pool_mode=pool_mode, pool_size=10, databases=database_entries(pg.primary))
            proxies[pool_mode] = current
        return current

    yield get
    factory.close()


@pytest.fixture
def primary_only(pg: Topology) -> list[dict[str, Any]]:
    assert pg.primary is not None
    return database_entries(pg.primary)


# -- psql ---------------------------------------------------------------------------------------------


def _psql(dsn: str, *args: str, timeout_s: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return subprocess.run(
        ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_psql_script_with_copy_in_and_out(
    pool_mode: str, proxy_for: Callable[[str], Proxy], pg: Topology, tmp_path: Path
) -> None:
    proxy = proxy_for(pool_mode)
    table = unique_name("psql_copy")
    copied_in = [(i, f"csv-{i}", i * 7) for i in range(1001, 1201)]
    in_csv, out_csv = tmp_path / "in.csv", tmp_path / "out.csv"
    with in_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows(copied_in)
    script = tmp_path / "script.sql"
    script.write_text(
        f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL, amount bigint NOT NULL);\n"
        f"INSERT INTO {table} SELECT g, 'row-' || g, g * 3 FROM generate_series(1, 500) AS g;\n"
        f"\\copy {table} FROM '{in_csv}' WITH (FORMAT csv)\n"
        f"\\copy (SELECT id, name, amount FROM {table} ORDER BY id) TO '{out_csv}' WITH (FORMAT csv)\n"
        f"SELECT count(*), sum(id), sum(amount) FROM {table};\n"
        f"SELECT id, name FROM {table} WHERE id % 250 = 0 ORDER BY id;\n"
        f"DROP TABLE {table};\n"
    )
    try:
        result = _psql(proxy.dsn(), "-f", str(script))
    finally:
        drop_table(pg, table)
    assert result.returncode == 0, result.stderr

    expected = [(i, f"row-{i}", i * 3) for i in range(1, 501)] + copied_in
    summary = f"{len(expected)}|{sum(r[0] for r in expected)}|{sum(r[2] for r in expected)}"
    selected = [f"{i}|{name}" for i, name, _ in expected if i % 250 == 0]
    assert result.stdout.splitlines() == [summary, *selected]
    with out_csv.open(newline="") as handle:
        copied_out = [(int(i), name, int(amount)) for i, name, amount in csv.reader(handle)]
    assert copied_out == expected


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psql_large_objects_over_function_calls(
    pool_mode: str, proxy_for: Callable[[str], Proxy], tmp_path: Path
) -> None:
    # psql's \lo_import and \lo_export go through libpq's large-object API, which speaks the protocol's
    # FunctionCall message (lo_open, loread, lowrite, lo_close) inside a transaction psql opens.
    payload = bytes(range(256)) * 2000 + os.urandom(4096)  # over libpq's 8 KB chunk, binary throughout
    source, copy = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(payload)
    script = tmp_path / "lo.sql"
    script.write_text(
        f"\\lo_import '{source}'\n"
        "SELECT octet_length(lo_get(:LASTOID));\n"
        f"\\lo_export :LASTOID '{copy}'\n"
        "\\lo_unlink :LASTOID\n"
    )
    result = _psql(proxy_for(pool_mode).dsn(), "-f", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(len(payload))]
    assert copy.read_bytes() == payload


# -- pgx ----------------------------------------------------------------------------------------------

# What tests/clients/pgx/main.go adds up: simple query, extended query (+ len("pgx!")), a prepared
# statement in five transactions, a batch of four, COPY of 1,000 rows (count + sum), 10,000 rows.
PGX_CHECKSUM = (
    42
    + (42 + 4)
    + sum(i + 100 for i in range(5))
    + sum(i * 10 for i in range(1, 5))
    + (1000 + sum(range(1, 1001)))
    + sum(range(1, 10001))
)


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_pgx(pool_mode: str, proxy_for: Callable[[str], Proxy], pgx_client: Path) -> None:
    proxy = proxy_for(pool_mode)
    result = subprocess.run(
        [str(pgx_client), proxy.dsn(connect_timeout=10)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.stdout.strip().splitlines()[-1] == f"OK {PGX_CHECKSUM}"


# -- pgbench ------------------------------------------------------------------------------------------

PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


def _pgbench_env(password: str = "app") -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    return env


@pytest.fixture(scope="module")
def pgbench_tables(pg: Topology) -> Iterator[None]:
    """pgbench -i -s 1 run once, directly against the primary."""
    assert pg.primary is not None
    primary = pg.primary
    result = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", "-h", primary.host, "-p", str(primary.port), "-U", "app", "app"],
        capture_output=True,
        text=True,
        env=_pgbench_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    yield
    primary.psql(f"DROP TABLE IF EXISTS {', '.join(PGBENCH_TABLES)}", user="app", db="app")


def _balances(pg: Topology) -> list[int]:
    """Sums that the TPC-B-like script keeps equal: accounts, branches, tellers, history."""
    assert pg.primary is not None
    output = pg.primary.psql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),"
        " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),"
        " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
        " (SELECT count(*) FROM pgbench_history)",
        user="app",
        db="app",
    )
    return [int(value) for value in output.split("|")]


PGBENCH_CASES = [(mode, protocol) for mode in POOL_MODES for protocol in ("simple", "extended", "prepared")]
# Statement pooling forbids multi-statement transactions: run the select-only script there.
PGBENCH_CASES += [("statement", protocol) for protocol in ("simple", "extended", "prepared")]


@pytest.mark.parametrize(("pool_mode", "protocol"), PGBENCH_CASES)
def test_pgbench(
    pool_mode: str, protocol: str, proxy_for: Callable[[str], Proxy], pg: Topology, pgbench_tables: None
) -> None:
    proxy = proxy_for(pool_mode)
    history_before = _balances(pg)[4]
    select_only = pool_mode == "statement"
    command = ["pgbench", "-n", "-T", "3", "-c", "4", "-M", protocol]
    if select_only:
        command.append("-S")
    command += ["-h", proxy.host, "-p", str(proxy.port), "-U", "app", "app"]
    result = subprocess.run(command, capture_output=True, text=True, env=_pgbench_env(), timeout=60)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"

    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert processed is not None and failed is not None, result.stdout
    assert int(failed.group(1)) == 0, result.stdout
    assert int(processed.group(1)) > 0, result.stdout

    accounts, branches, tellers, history, history_rows = _balances(pg)
    assert accounts == branches == tellers == history
    if select_only:
        assert history_rows == history_before
    else:
        # Each TPC-B-like transaction inserts exactly one history row.
        assert history_rows - history_before == int(processed.group(1))


# -- psycopg 3, sync ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_psycopg_parameters_and_binary(pool_mode: str, proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for(pool_mode)
    with psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) as conn:
        row = conn.execute(
            "SELECT %s::int + %s::int, %s::text || %s::text", (19, 23, "shard", "gate")
        ).fetchone()
        assert row == (42, "shardgate")
        with conn.cursor(binary=True) as cur:
            cur.execute(
                "SELECT sum(g)::bigint, count(*)::int, %s::bytea, %s::numeric * 2"
                " FROM generate_series(1, %s) AS g",
                (b"\x00\x01\xff", Decimal("1.25"), 1000),
            )
            assert cur.fetchone() == (500500, 1000, b"\x00\x01\xff", Decimal("2.50"))
            assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1  # binary


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psycopg_pipeline(pool_mode: str, proxy_for: Callable[[str], Proxy], pg: Topology) -> None:
    proxy = proxy_for(pool_mode)
    table = unique_name("pipe")
    try:
        with psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, value int NOT NULL)")
            with conn.pipeline(), conn.cursor() as cur:
                for i in range(1, 21):
                    cur.execute(f"INSERT INTO {table} (id, value) VALUES (%s, %s)", (i, i * i))
                totals = conn.execute(f"SELECT count(*), sum(value) FROM {table}")
                doubled = conn.execute("SELECT %s::int * 2", (21,))
            assert totals.fetchone() == (20, sum(i * i for i in range(1, 21)))
            assert doubled.fetchone() == (42,)
            # A pipeline inside an explicit transaction, rolled back: nothing of it may remain.
            with conn.pipeline(), conn.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute(f"INSERT INTO {table} (id, value) VALUES (%s, %s)", (100, 1))
                inside = conn.execute(f"SELECT count(*) FROM {table}")
                cur.execute("ROLLBACK")
            assert inside.fetchone() == (21,)
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (20,)
    finally:
        drop_table(pg, table)


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_psycopg_copy(pool_mode: str, proxy_for: Callable[[str], Proxy], pg: Topology) -> None:
    proxy = proxy_for(pool_mode)
    table = unique_name("copy")
    rows = [(i, f"label-{i}") for i in range(1, 2001)]
    try:
        with psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text NOT NULL)")
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, label) FROM STDIN") as copy:
                    for row in rows[:1000]:
                        copy.write_row(row)
                with cur.copy(f"COPY {table} (id, label) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "text"])
                    for row in rows[1000:]:
                        copy.write_row(row)
                copied_out: list[tuple[Any, ...]] = []
                with cur.copy(f"COPY (SELECT id, label FROM {table} ORDER BY id) TO STDOUT") as copy:
                    copy.set_types(["int4", "text"])
                    copied_out.extend(copy.rows())
            assert copied_out == rows
    finally:
        drop_table(pg, table)


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psycopg_server_side_cursor(pool_mode: str, proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for(pool_mode)
    with psycopg.connect(proxy.dsn(connect_timeout=10)) as conn:
        with conn.transaction(), conn.cursor(name=unique_name("cur")) as cur:
            cur.itersize = 700
            cur.execute("SELECT g FROM generate_series(1, %s) AS g", (5000,))
            assert sum(row[0] for row in cur) == sum(range(1, 5001))
        if pool_mode == "session":
            # WITH HOLD outlives its transaction: only possible while the client keeps its server.
            with conn.cursor(name=unique_name("held"), withhold=True) as cur:
                cur.execute("SELECT g * 2 FROM generate_series(1, 300) AS g")
                conn.commit()
                assert [row[0] for row in cur.fetchmany(5)] == [2, 4, 6, 8, 10]
                assert sum(row[0] for row in cur.fetchall()) == sum(2 * g for g in range(6, 301))
            conn.commit()


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psycopg_prepared_statements_across_transactions(
    pool_mode: str, proxy_for: Callable[[str], Proxy]
) -> None:
    proxy = proxy_for(pool_mode)
    with psycopg.connect(proxy.dsn(connect_timeout=10)) as conn:
        total = 0
        for i in range(20):
            with conn.transaction():
                row = conn.execute("SELECT %s::int * 3", (i,), prepare=True).fetchone()
                assert row is not None
                total += row[0]
        assert total == 3 * sum(range(20))
        # psycopg prepares by itself once a query reached prepare_threshold executions.
        conn.prepare_threshold = 2
        results = []
        for i in range(10):
            with conn.transaction():
                row = conn.execute("SELECT %s::int + 1000", (i,)).fetchone()
                assert row is not None
                results.append(row[0])
        assert results == [i + 1000 for i in range(10)]


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_psycopg_same_statement_names_from_two_clients_on_one_server(
    pool_mode: str, proxy: ProxyFactory, primary_only: list[dict[str, Any]]
) -> None:
    # Both clients name their first prepared statement _pg3_0, for different SQL, and share the
    # proxy's single server connection.
    shared = proxy(pool_mode=pool_mode, pool_size=1, databases=primary_only)
    dsn = shared.dsn(connect_timeout=10)
    with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn, autocommit=True) as second:
        for i in range(10):
            doubled = first.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()
            tagged = second.execute("SELECT %s::text || '-b'", (str(i),), prepare=True).fetchone()
            assert (doubled, tagged) == ((i * 2,), (f"{i}-b",))


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_psycopg_notice(pool_mode: str, proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for(pool_mode)
    notices: list[tuple[str | None, str | None]] = []
    with psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda diag: notices.append((diag.severity_nonlocalized, diag.message_primary))
        )
        conn.execute("DO $$ BEGIN RAISE NOTICE 'shardgate notice %', 6 * 7; END $$")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert notices == [("NOTICE", "shardgate notice 42")]


def test_psycopg_listen_notify_session_mode(proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for("session")
    channel = unique_name("chan")
    dsn = proxy.dsn(connect_timeout=10)
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as notifier:
        listener.execute(f"LISTEN {channel}")
        notifier.execute("SELECT pg_notify(%s, %s)", (channel, "payload-1"))
        notifier.execute(f"NOTIFY {channel}, 'payload-2'")
        received = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=2)]
    assert received == [(channel, "payload-1"), (channel, "payload-2")]


# -- psycopg 3, async ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_psycopg_async_parameters_binary_and_notice(
    pool_mode: str, proxy_for: Callable[[str], Proxy]
) -> None:
    proxy = proxy_for(pool_mode)
    notices: list[str | None] = []

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(connect_timeout=10), autocommit=True)
        async with conn:
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
            cur = await conn.execute("SELECT %s::int * %s::int, %s::text", (6, 7, "async"))
            assert await cur.fetchone() == (42, "async")
            async with conn.cursor(binary=True) as bcur:
                await bcur.execute(
                    "SELECT sum(g)::bigint, %s::bytea FROM generate_series(1, %s) AS g", (b"\xfe", 300)
                )
                assert await bcur.fetchone() == (sum(range(1, 301)), b"\xfe")
                assert bcur.pgresult is not None and bcur.pgresult.fformat(0) == 1
            await conn.execute("DO $$ BEGIN RAISE NOTICE 'async notice %', 5 * 5; END $$")

    run_async(scenario())
    assert notices == ["async notice 25"]


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psycopg_async_pipeline_and_copy(
    pool_mode: str, proxy_for: Callable[[str], Proxy], pg: Topology
) -> None:
    proxy = proxy_for(pool_mode)
    table = unique_name("apipe")

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(connect_timeout=10), autocommit=True)
        async with conn:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text NOT NULL)")
            async with conn.pipeline(), conn.cursor() as cur:
                for i in range(1, 11):
                    await cur.execute(f"INSERT INTO {table} (id, label) VALUES (%s, %s)", (i, f"p{i}"))
                count = await conn.execute(f"SELECT count(*), sum(id) FROM {table}")
            assert await count.fetchone() == (10, 55)
            async with conn.cursor() as cur:
                async with cur.copy(f"COPY {table} (id, label) FROM STDIN") as copy:
                    for i in range(11, 511):
                        await copy.write_row((i, f"c{i}"))
                copied_out: list[tuple[Any, ...]] = []
                async with cur.copy(f"COPY (SELECT id, label FROM {table} ORDER BY id) TO STDOUT") as copy:
                    copy.set_types(["int4", "text"])
                    async for row in copy.rows():
                        copied_out.append(row)
            expected = [(i, f"p{i}") for i in range(1, 11)] + [(i, f"c{i}") for i in range(11, 511)]
            assert copied_out == expected

    try:
        run_async(scenario())
    finally:
        drop_table(pg, table)


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_psycopg_async_cursor_and_prepared(pool_mode: str, proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for(pool_mode)

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(connect_timeout=10))
        async with conn:
            async with conn.transaction(), conn.cursor(name=unique_name("acur")) as named:
                named.itersize = 400
                await named.execute("SELECT g FROM generate_series(1, %s) AS g", (3000,))
                total = 0
                async for record in named:
                    total += record[0]
                assert total == sum(range(1, 3001))
            results = []
            for i in range(15):
                async with conn.transaction():
                    cur = await conn.execute("SELECT %s::int - 1", (i,), prepare=True)
                    row = await cur.fetchone()
                    assert row is not None
                    results.append(row[0])
            assert results == [i - 1 for i in range(15)]

    run_async(scenario())


def test_psycopg_async_listen_notify_session_mode(proxy_for: Callable[[str], Proxy]) -> None:
    proxy = proxy_for("session")
    channel = unique_name("achan")

    async def scenario() -> list[tuple[str, str]]:
        dsn = proxy.dsn(connect_timeout=10)
        listener = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        notifier = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with listener, notifier:
            await listener.execute(f"LISTEN {channel}")
            for i in range(3):
                await notifier.execute("SELECT pg_notify(%s, %s)", (channel, f"async-{i}"))
            return [(n.channel, n.payload) async for n in listener.notifies(timeout=10, stop_after=3)]

    assert run_async(scenario()) == [(channel, f"async-{i}") for i in range(3)]


# -- asyncpg ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ALL_POOL_MODES)
def test_asyncpg_fetch_and_executemany(
    pool_mode: str, proxy_for: Callable[[str], Proxy], pg: Topology
) -> None:
    proxy = proxy_for(pool_mode)
    table = unique_name("apg")

    async def scenario() -> None:
        conn = await asyncpg.connect(proxy.dsn(), timeout=10)
        try:
            rows = await conn.fetch("SELECT g, g * g AS square FROM generate_series(1, $1::int) AS g", 100)
            assert [row["g"] for row in rows] == list(range(1, 101))
            assert sum(row["square"] for row in rows) == sum(g * g for g in range(1, 101))
            assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
            assert await conn.fetchval("SELECT $1::text || $2::text", "asy", "ncpg") == "asyncpg"
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text NOT NULL)")
            await conn.executemany(
                f"INSERT INTO {table} (id, label) VALUES ($1, $2)", [(i, f"m{i}") for i in range(1, 301)]
            )
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, sum(id) AS total, max(label) AS top FROM {table}"
            )
            assert row is not None
            assert (row["n"], row["total"], row["top"]) == (300, sum(range(1, 301)), "m99")
        finally:
            await conn.close()

    try:
        run_async(scenario())
    finally:
        drop_table(pg, table)


def test_asyncpg_statement_cache_in_transaction_mode(
    proxy: ProxyFactory, primary_only: list[dict[str, Any]]
) -> None:
    # Two asyncpg clients, each with its own cache of named prepared statements, share one server
    # connection: every cached statement must still be found, whichever client ran it last.
    shared = proxy(pool_mode="transaction", pool_size=1, databases=primary_only)

    async def scenario() -> list[int]:
        pool = await asyncpg.create_pool(shared.dsn(), min_size=2, max_size=2, timeout=10)
        try:

            async def one(i: int) -> int:
                async with pool.acquire() as conn, conn.transaction():
                    value = await conn.fetchval("SELECT $1::int * 7 + 1", i)
                    assert await conn.fetchval("SELECT $1::int * 7 + 1", i + 1) == value + 7
                    return int(value)

            return list(await asyncio.gather(*(one(i) for i in range(50))))
        finally:
            await pool.close()

    assert run_async(scenario()) == [i * 7 + 1 for i in range(50)]


# -- authentication -----------------------------------------------------------------------------------

LOGINS = [("app", "app"), ("md5user", "md5pw"), ("plainuser", "plainpw"), ("trustuser", None)]


@pytest.mark.parametrize(("user", "password"), LOGINS)
def test_login_with_each_auth_method(
    user: str, password: str | None, proxy_for: Callable[[str], Proxy]
) -> None:
    proxy = proxy_for("transaction")
    dsn = proxy.dsn(user=user, password=password)

    async def scenario() -> str:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return str(await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close()

    assert run_async(scenario()) == user
    with psycopg.connect(proxy.dsn(user=user, password=password, connect_timeout=10)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


def _login_sqlstate(dsn: str) -> str | None:
    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except asyncpg.PostgresError as error:
            return str(error.sqlstate)
        await conn.close()
        return None

    result: str | None = run_async(attempt())
    return result


AUTH_FAILURES = [
    pytest.param("app", "wrong", "app", "28P01", id="wrong-password-scram"),
    pytest.param("md5user", "wrong", "app", "28P01", id="wrong-password-md5"),
    pytest.param("plainuser", "wrong", "app", "28P01", id="wrong-password-plain"),
    pytest.param("nosuchuser", "whatever", "app", "28000", id="unknown-user"),
    pytest.param("app", "app", "nosuchdb", "3D000", id="unknown-database"),
]


@pytest.mark.parametrize(("user", "password", "dbname", "sqlstate"), AUTH_FAILURES)
def test_login_failures_carry_sqlstate(
    user: str,
    password: str,
    dbname: str,
    sqlstate: str,
    proxy: ProxyFactory,
    primary_only: list[dict[str, Any]],
) -> None:
    # A proxy of its own, so a failed-login limiter cannot affect the other tests.
    fresh = proxy(pool_mode="transaction", databases=primary_only)
    assert _login_sqlstate(fresh.dsn(user=user, password=password, dbname=dbname)) == sqlstate
    # The proxy still serves a correct login afterwards.
    assert _login_sqlstate(fresh.dsn()) is None
