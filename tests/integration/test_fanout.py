"""The fan-out executor end to end: one statement sent to two real PostgreSQL servers (shards 0 and 1 of one
database) through the proxy's own code, their answers merged into one result for psycopg, asyncpg and psql.

Shard 0 is the shared topology's primary; shard 1 an extra primary. Each holds its own rows of `fan_items`;
a reference table `fan_reference` on shard 0 holds the rows of both, so every merged answer is compared
with the same query run against one server holding all rows.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.harness import ProxyFactory, ProxyProcess, database_entries, direct_mode

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(direct_mode(), reason="needs the proxy: two servers behind one database"),
]

ALL = "/* shardgate: shard=all */ "
SHARD_ROWS = {0: [(1, "a"), (2, "b"), (3, "c")], 1: [(10, "x"), (11, "y")]}


def _seed(conninfo: str, table: str, rows: list[tuple[int, str]]) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text NOT NULL, amount numeric)")
        for row_id, label in rows:
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (row_id, label, row_id * 1.5))


@pytest.fixture(scope="module")
def shards(pg: Any) -> Iterator[tuple[Any, Any]]:
    """(shard 0, shard 1): the shared primary and an extra one, each with its own rows."""
    second = pg.add_server("fanout_shard1")
    try:
        yield pg.primary, second
    finally:
        second.stop()


@pytest.fixture
def seeded(shards: tuple[Any, Any]) -> tuple[Any, Any]:
    for index, server in enumerate(shards):
        _seed(server.dsn(password="app"), "fan_items", SHARD_ROWS[index])
    _seed(shards[0].dsn(password="app"), "fan_reference", SHARD_ROWS[0] + SHARD_ROWS[1])
    return shards


def _sharded_proxy(proxy: ProxyFactory, shards: tuple[Any, Any], pool_mode: str = "transaction",
                   pool_size: int = 4) -> ProxyProcess:
    databases = database_entries(shards[0], shard=0) + database_entries(shards[1], shard=1)
    started = proxy(pool_mode=pool_mode, pool_size=pool_size, databases=databases)
    assert isinstance(started, ProxyProcess)
    return started


def _reference(shards: tuple[Any, Any], sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(shards[0].dsn(password="app"), autocommit=True) as conn:
        return conn.execute(sql.replace("fan_items", "fan_reference")).fetchall()


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_one_statement_merged_from_both_servers(proxy: ProxyFactory, seeded: tuple[Any, Any],
                                                pool_mode: str) -> None:
    shardgate = _sharded_proxy(proxy, seeded, pool_mode)
    sql = "SELECT id, label, amount FROM fan_items"
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        cursor = conn.execute(ALL + sql)
        rows = cursor.fetchall()
        assert sorted(rows) == sorted(_reference(seeded, sql))
        assert [column.name for column in cursor.description or []] == ["id", "label", "amount"]
        assert [column.type_code for column in cursor.description or []] == [23, 25, 1700]
        assert cursor.statusmessage == f"SELECT {len(rows)}"
        # the session goes on as usual afterwards, on the home shard
        assert conn.execute("SELECT count(*) FROM fan_items").fetchone() == (len(SHARD_ROWS[0]),)


def test_extended_protocol_and_summed_tags(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        rows = conn.execute(ALL + "SELECT id FROM fan_items WHERE id > %s", (1,)).fetchall()
        assert sorted(rows) == sorted(_reference(seeded, "SELECT id FROM fan_items WHERE id > 1"))
        cursor = conn.execute(ALL + "UPDATE fan_items SET label = label || '!' WHERE id <> %s", (2,))
        assert cursor.rowcount == 4 and cursor.statusmessage == "UPDATE 4"
        cursor = conn.execute(ALL + "INSERT INTO fan_items VALUES (100, 'n', 0), (101, 'm', 0)")
        assert cursor.statusmessage == "INSERT 0 4"  # two rows on each shard
    for server in seeded:
        with psycopg.connect(server.dsn(password="app"), autocommit=True) as direct:
            assert direct.execute("SELECT count(*) FROM fan_items WHERE id >= 100").fetchone() == (2,)
            assert direct.execute("SELECT count(*) FROM fan_items WHERE label LIKE '%!'").fetchone() == (
                len([r for r in SHARD_ROWS[seeded.index(server)] if r[0] != 2]),)


def test_one_shard_by_hint(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        rows = conn.execute("/* shardgate: shard=1 */ SELECT id, label FROM fan_items").fetchall()
        assert sorted(rows) == SHARD_ROWS[1]
        with pytest.raises(pg_errors.InvalidParameterValue, match="shards 0 to 1"):
            conn.execute("/* shardgate: shard=7 */ SELECT 1")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_error_on_one_server_aborts_the_statement(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shard1 = seeded[1]
    with psycopg.connect(shard1.dsn(password="app"), autocommit=True) as direct:
        direct.execute("DROP TABLE IF EXISTS fan_only_here")
        direct.execute("CREATE TABLE fan_only_here AS SELECT generate_series(1, 1000) AS n")
    shardgate = _sharded_proxy(proxy, seeded)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.UndefinedTable):
            conn.execute(ALL + "SELECT n FROM fan_only_here").fetchall()
        # a division by zero on one shard only (ids 1..3 live on shard 0)
        with pytest.raises(pg_errors.DivisionByZero):
            conn.execute(ALL + "SELECT 1 / (id - 2) FROM fan_items").fetchall()
        # one count per shard: rows are concatenated, not aggregated
        assert sorted(conn.execute(ALL + "SELECT count(*) FROM fan_items").fetchall()) == [(2,), (3,)]
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    with psycopg.connect(shardgate.dsn()) as conn:  # inside a transaction the error aborts it
        conn.execute("SELECT 1")
        with pytest.raises(pg_errors.DivisionByZero):
            conn.execute(ALL + "SELECT 1 / (id - 2) FROM fan_items").fetchall()
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_transaction_over_both_servers(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded, pool_size=2)
    with psycopg.connect(shardgate.dsn()) as conn:
        conn.execute(ALL + "INSERT INTO fan_items VALUES (500, 'rolled back', 0)")
        conn.execute("INSERT INTO fan_items VALUES (501, 'home only, rolled back', 0)")
        conn.rollback()
        conn.execute(ALL + "INSERT INTO fan_items VALUES (600, 'committed', 0)")
        conn.execute("INSERT INTO fan_items VALUES (601, 'home only', 0)")
        conn.commit()
    counts = []
    for server in seeded:
        with psycopg.connect(server.dsn(password="app"), autocommit=True) as direct:
            counts.append(direct.execute(
                "SELECT array_agg(id ORDER BY id) FROM fan_items WHERE id >= 500").fetchone())
            assert direct.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    assert counts == [([600, 601],), ([600],)]


def test_asyncpg_and_psql(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded)
    sql = "SELECT id, label FROM fan_items"

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(shardgate.dsn(), statement_cache_size=0)
        try:
            return [tuple(record) for record in await conn.fetch(ALL + sql + " WHERE id > $1", 0)]
        finally:
            await conn.close()

    assert sorted(asyncio.run(fetch())) == sorted(_reference(seeded, sql))
    output = subprocess.run(["psql", shardgate.dsn(), "-At", "-F", ",", "-c", ALL + sql + " ORDER BY id"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    merged = sorted(tuple(line.split(",")) for line in output.splitlines())
    assert merged == sorted((str(i), label) for i, label in _reference(seeded, sql))


def test_cancel_reaches_both_servers(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded)
    sleeper = ALL + "SELECT pg_sleep(30)"
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                conn.execute(sleeper).fetchall()
            except psycopg.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert _wait_sleeping(seeded, 2), "the statement did not reach both servers"
            started = time.monotonic()
            conn.cancel_safe(timeout=5)
        finally:
            thread.join(20)
        assert isinstance(outcome.get("error"), pg_errors.QueryCanceled), outcome
        assert time.monotonic() - started < 5
        assert _wait_sleeping(seeded, 0)
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)


def _wait_sleeping(shards: tuple[Any, Any], expected: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = 0
        for server in shards:
            with psycopg.connect(server.dsn(password="app"), autocommit=True) as direct:
                found += direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
                    "AND state = 'active' AND pid <> pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        if found == expected:
            return True
        time.sleep(0.1)
    return False


def test_unhinted_statements_go_back_to_shard_0(proxy: ProxyFactory, seeded: tuple[Any, Any]) -> None:
    shardgate = _sharded_proxy(proxy, seeded)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        assert conn.execute("/* shardgate: shard=1 */ SELECT inet_server_port()").fetchone() == (seeded[1].port,)
        assert conn.execute("SELECT inet_server_port()").fetchone() == (seeded[0].port,)
        assert sorted(conn.execute("SELECT id FROM fan_items").fetchall()) == [(r[0],) for r in SHARD_ROWS[0]]
