"""Sharding by key through the proxy, against real PostgreSQL shards: rows routed by a literal, a parameter
(text and binary), IN and ANY, hints and session settings; multi-row INSERT split; writes without the key
refused; cross-shard SELECTs merged (ORDER BY, LIMIT, aggregates, GROUP BY) and compared with one server
holding every row; a three-shard layout.

Where a key lives is asked of PostgreSQL itself: `satisfies_hash_partition` on a table `PARTITION BY HASH`
with the same modulus says which remainder (shard) holds it. The reference rows are `ref_orders` on a
server of their own (the `reference` fixture), never behind the proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.harness import ProxyFactory, ProxyProcess, database_entries, direct_mode

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(direct_mode(), reason="needs the proxy: several shards behind one database"),
]

SHARDED = """
[[sharded_tables]]
database = "app"
table = "orders"
column = "tenant_id"
data_type = "bigint"
method = "hash"

[[omnisharded_tables]]
database = "app"
table = "countries"
"""
ORDERS = "CREATE TABLE orders (tenant_id bigint NOT NULL, id int NOT NULL, note text, amount numeric, PRIMARY KEY (tenant_id, id))"
ROWS = [(tenant, row, f"t{tenant}-{row}", Decimal(tenant * 10 + row) / 4)
        for tenant in (1, 2, 3, 4, 5, 6, 7, 8, -9, 10_000_000_000) for row in range(1, 4)]


def _execute(server: Any, *statements: str) -> None:
    with psycopg.connect(server.dsn(password="app"), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _shard_of(reference: Any, tenant: int, modulus: int) -> int:
    """The remainder PostgreSQL's own hash partitioning gives `tenant` for `modulus` partitions."""
    with psycopg.connect(reference.dsn(password="app"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS hash_probe_{modulus} (k bigint) PARTITION BY HASH (k)")
        for remainder in range(modulus):
            found = conn.execute(
                f"SELECT satisfies_hash_partition('hash_probe_{modulus}'::regclass, %s, %s, %s::bigint)",
                (modulus, remainder, tenant)).fetchone()
            if found is not None and found[0]:
                return remainder
    raise AssertionError(f"no remainder for {tenant}")


@pytest.fixture(scope="module")
def cluster(pg: Any) -> Iterator[dict[str, Any]]:
    """Shard 0 (the shared primary), shard 1 and shard 2 (extra primaries), and a reference server."""
    extra = {name: pg.add_server(f"sharding_{name}") for name in ("shard1", "shard2", "reference")}
    try:
        yield {"shards": [pg.primary, extra["shard1"], extra["shard2"]], "reference": extra["reference"]}
    finally:
        for server in extra.values():
            server.stop()


def _seed(cluster: dict[str, Any], shard_count: int) -> None:
    shards, reference = cluster["shards"][:shard_count], cluster["reference"]
    for index, server in enumerate(shards):
        mine = [row for row in ROWS if _shard_of(reference, row[0], shard_count) == index]
        with psycopg.connect(server.dsn(password="app"), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS orders")
            conn.execute(ORDERS)
            conn.execute("DROP TABLE IF EXISTS countries")
            conn.execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
            conn.execute("INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany')")
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO orders VALUES (%s, %s, %s, %s)", mine)
    with psycopg.connect(reference.dsn(password="app"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS ref_orders")
        conn.execute(ORDERS.replace("orders", "ref_orders"))
        with conn.cursor() as cursor:
            cursor.executemany("INSERT INTO ref_orders VALUES (%s, %s, %s, %s)", ROWS)


def _proxy(proxy: ProxyFactory, cluster: dict[str, Any], shard_count: int = 2, extra: str = "",
           general: dict[str, Any] | None = None) -> ProxyProcess:
    databases = []
    for index, server in enumerate(cluster["shards"][:shard_count]):
        databases += database_entries(server, shard=index)
    started = proxy(pool_mode="transaction", pool_size=4, databases=databases, extra_toml=SHARDED + extra,
                    general=general or {})
    assert isinstance(started, ProxyProcess)
    return started


def _on_shard(cluster: dict[str, Any], shard: int, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster["shards"][shard].dsn(password="app"), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def _reference(cluster: dict[str, Any], sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster["reference"].dsn(password="app"), autocommit=True) as conn:
        return conn.execute(sql.replace("orders", "ref_orders"), params).fetchall()


@pytest.fixture
def two(cluster: dict[str, Any]) -> dict[str, Any]:
    _seed(cluster, 2)
    return cluster


def test_point_reads_by_literal_and_parameter(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for tenant in (1, 2, 5, -9, 10_000_000_000):
            expected = sorted(_reference(two, f"SELECT id, note FROM orders WHERE tenant_id = {tenant}"))
            assert sorted(conn.execute(f"SELECT id, note FROM orders WHERE tenant_id = {tenant}").fetchall()) == expected
            # text parameter, binary parameter (%b), and with another predicate
            assert sorted(conn.execute("SELECT id, note FROM orders WHERE tenant_id = %s", (tenant,)).fetchall()) == expected
            assert sorted(conn.execute("SELECT id, note FROM orders WHERE tenant_id = %b", (tenant,)).fetchall()) == expected
            assert conn.execute("SELECT note FROM orders WHERE id = 2 AND tenant_id = %s", (tenant,)).fetchall() == [
                (f"t{tenant}-2",)]
        # the statement reached only the key's shard: inet_server_port says which server answered
        for tenant in (1, 2, 3, 4):
            shard = _shard_of(two["reference"], tenant, 2)
            port = conn.execute("SELECT inet_server_port() FROM orders WHERE tenant_id = %s LIMIT 1",
                                (tenant,)).fetchone()
            assert port == (two["shards"][shard].port,)


def test_in_lists_and_any_arrays(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    tenants = [1, 2, 3, 10_000_000_000]
    expected = sorted(_reference(two, "SELECT tenant_id, id FROM orders WHERE tenant_id IN (1, 2, 3, 10000000000)"))
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        assert sorted(conn.execute(
            "SELECT tenant_id, id FROM orders WHERE tenant_id IN (1, 2, 3, 10000000000)").fetchall()) == expected
        assert sorted(conn.execute("SELECT tenant_id, id FROM orders WHERE tenant_id = ANY(%s)",
                                   (tenants,)).fetchall()) == expected
        assert sorted(conn.execute("SELECT tenant_id, id FROM orders WHERE tenant_id = ANY(%b)",
                                   (tenants,)).fetchall()) == expected


def test_asyncpg_binary_parameters_and_prepared_statements(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)

    async def run() -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(shardgate.dsn(), ssl=False)
        try:
            found = []
            statement = await conn.prepare("SELECT id, note FROM orders WHERE tenant_id = $1 ORDER BY id")
            for tenant in (1, 2, 7, -9):
                found.append([tuple(r) for r in await statement.fetch(tenant)])
                found.append([tuple(r) for r in await conn.fetch(
                    "SELECT id, note FROM orders WHERE tenant_id = $1 ORDER BY id", tenant)])
            return found
        finally:
            await conn.close()

    found = asyncio.run(asyncio.wait_for(run(), 60))
    expected = []
    for tenant in (1, 2, 7, -9):
        rows = _reference(two, f"SELECT id, note FROM orders WHERE tenant_id = {tenant} ORDER BY id")
        expected += [rows, rows]
    assert found == expected


def test_multi_row_insert_is_split_by_key(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    new = [(tenant, 100 + tenant % 50, f"new-{tenant}") for tenant in (11, 12, 13, 14, 15, 16)]
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        values = ", ".join(f"({t}, {i}, '{n}')" for t, i, n in new)
        cursor = conn.execute(f"INSERT INTO orders (tenant_id, id, note) VALUES {values} RETURNING tenant_id, id")
        assert cursor.statusmessage == "INSERT 0 6"
        assert sorted(cursor.fetchall()) == sorted((t, i) for t, i, _ in new)
        # with parameters, renumbered per shard
        cursor = conn.execute("INSERT INTO orders (tenant_id, id, note) VALUES (%s, %s, %s), (%s, %s, %s)",
                              (21, 1, "p21", 22, 1, "p22"))
        assert cursor.statusmessage == "INSERT 0 2"
    for tenant, row_id, note in [*new, (21, 1, "p21"), (22, 1, "p22")]:
        shard = _shard_of(two["reference"], tenant, 2)
        assert _on_shard(two, shard, f"SELECT note FROM orders WHERE tenant_id = {tenant} AND id = {row_id}") == [(note,)]
        assert _on_shard(two, 1 - shard, f"SELECT note FROM orders WHERE tenant_id = {tenant}") == []


def test_writes_without_the_key(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.FeatureNotSupported, match="tenant_id"):
            conn.execute("UPDATE orders SET note = 'x' WHERE id = 1")
        with pytest.raises(pg_errors.FeatureNotSupported, match="tenant_id"):
            conn.execute("DELETE FROM orders")
        with pytest.raises(pg_errors.FeatureNotSupported, match="tenant_id"):
            conn.execute("INSERT INTO orders (id, note) VALUES (1, 'no key')")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        # with the key, one shard
        cursor = conn.execute("UPDATE orders SET note = 'one' WHERE tenant_id = 3 AND id = 1")
        assert cursor.statusmessage == "UPDATE 1"
    allowed = _proxy(proxy, two, general={"allow_cross_shard_writes": True})
    with psycopg.connect(allowed.dsn(), autocommit=True) as conn:
        cursor = conn.execute("UPDATE orders SET note = note || '!' WHERE id = 3")
        assert cursor.statusmessage == f"UPDATE {len([r for r in ROWS if r[1] == 3])}"


def test_hints_and_session_settings(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    shard_of_5 = _shard_of(two["reference"], 5, 2)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        rows = conn.execute("/* shardgate: sharding_key=5 */ SELECT DISTINCT tenant_id FROM orders").fetchall()
        assert sorted(rows) == sorted(_on_shard(two, shard_of_5, "SELECT DISTINCT tenant_id FROM orders"))
        conn.execute("SET shardgate.shard = 1")
        assert sorted(conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall()) == sorted(
            _on_shard(two, 1, "SELECT DISTINCT tenant_id FROM orders"))
        assert conn.execute("SHOW shardgate.shard").fetchone() == ("1",)
        with pytest.raises(pg_errors.InvalidParameterValue, match="shards 0 to 1"):
            conn.execute("SET shardgate.shard = 9")
        conn.execute("RESET shardgate.shard")
        conn.execute("SET shardgate.sharding_key = '5'")
        assert sorted(conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall()) == sorted(
            _on_shard(two, shard_of_5, "SELECT DISTINCT tenant_id FROM orders"))
        conn.execute("RESET ALL")
        assert len(conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall()) == len({r[0] for r in ROWS})


def test_omnisharded_tables(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        assert sorted(conn.execute("SELECT code FROM countries").fetchall()) == [("de",), ("fr",)]
        cursor = conn.execute("INSERT INTO countries VALUES ('it', 'Italy')")
        assert cursor.rowcount >= 1
    for shard in (0, 1):
        assert _on_shard(two, shard, "SELECT name FROM countries WHERE code = 'it'") == [("Italy",)]


MERGED = [
    ("SELECT tenant_id, id, note FROM orders ORDER BY tenant_id, id", True),
    ("SELECT tenant_id, id FROM orders ORDER BY tenant_id DESC, id DESC LIMIT 7", True),
    ("SELECT tenant_id, id FROM orders ORDER BY amount, tenant_id, id LIMIT 5 OFFSET 3", True),
    ("SELECT note FROM orders ORDER BY note", True),
    ("SELECT count(*) FROM orders", True),
    ("SELECT count(*), sum(amount), min(amount), max(amount) FROM orders", True),
    ("SELECT avg(amount) FROM orders", True),
    ("SELECT id, count(*), sum(amount) FROM orders GROUP BY id ORDER BY id", True),
    ("SELECT id, max(tenant_id) FROM orders GROUP BY id ORDER BY 2 DESC, 1 LIMIT 2", True),
    ("SELECT DISTINCT id FROM orders ORDER BY id", True),
    ("SELECT tenant_id, id FROM orders WHERE amount > 2", False),
]


@pytest.mark.parametrize(("sql", "ordered"), MERGED)
def test_cross_shard_selects_match_one_server(proxy: ProxyFactory, two: dict[str, Any], sql: str,
                                               ordered: bool) -> None:
    shardgate = _proxy(proxy, two)
    expected = _reference(two, sql)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        simple = conn.execute(sql).fetchall()
        # the extended protocol with binary results (psycopg's binary cursors)
        extended = conn.cursor(binary=True).execute(sql).fetchall()
    if ordered:
        assert simple == expected
        assert extended == expected
    else:
        assert sorted(simple) == sorted(expected)
        assert sorted(extended) == sorted(expected)


def test_what_cannot_be_merged_is_refused(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for sql in ("SELECT count(DISTINCT id) FROM orders",
                    "SELECT tenant_id, row_number() OVER (ORDER BY id) FROM orders",
                    "SELECT id FROM orders GROUP BY id HAVING count(*) > 1"):
            with pytest.raises(pg_errors.FeatureNotSupported):
                conn.execute(sql)
        assert conn.execute("SELECT count(*) FROM orders WHERE tenant_id = 1").fetchone() == (3,)


def test_a_transaction_moves_between_shards(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    first, second = 1, next(t for t in range(2, 50) if _shard_of(two["reference"], t, 2) != _shard_of(two["reference"], 1, 2))
    with psycopg.connect(shardgate.dsn()) as conn:
        conn.execute("INSERT INTO orders (tenant_id, id, note) VALUES (%s, 900, 'txn')", (first,))
        conn.execute("INSERT INTO orders (tenant_id, id, note) VALUES (%s, 900, 'txn')", (second,))
        assert conn.execute("SELECT count(*) FROM orders WHERE id = 900").fetchone() == (2,)
        conn.commit()
    for tenant in (first, second):
        shard = _shard_of(two["reference"], tenant, 2)
        assert _on_shard(two, shard, f"SELECT note FROM orders WHERE tenant_id = {tenant} AND id = 900") == [("txn",)]
    with psycopg.connect(shardgate.dsn()) as conn:
        conn.execute("DELETE FROM orders WHERE tenant_id = %s AND id = 900", (first,))
        conn.execute("DELETE FROM orders WHERE tenant_id = %s AND id = 900", (second,))
        conn.rollback()
    assert sum(len(_on_shard(two, shard, "SELECT 1 FROM orders WHERE id = 900")) for shard in (0, 1)) == 2


def test_three_shards(proxy: ProxyFactory, cluster: dict[str, Any]) -> None:
    _seed(cluster, 3)
    shardgate = _proxy(proxy, cluster, shard_count=3)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for tenant in (1, 2, 3, 4, 5, 6):
            shard = _shard_of(cluster["reference"], tenant, 3)
            port = conn.execute("SELECT inet_server_port() FROM orders WHERE tenant_id = %s LIMIT 1",
                                (tenant,)).fetchone()
            assert port == (cluster["shards"][shard].port,)
        assert conn.execute("SELECT count(*), sum(amount) FROM orders").fetchone() == tuple(
            _reference(cluster, "SELECT count(*), sum(amount) FROM orders")[0])
        ordered = "SELECT tenant_id, id FROM orders ORDER BY tenant_id DESC, id LIMIT 10"
        assert conn.execute(ordered).fetchall() == _reference(cluster, ordered)
