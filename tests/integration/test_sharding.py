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
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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


def test_repeated_point_reads_each_reach_their_keys_shard(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    """The same statement again with another key (the form applications and pgbench repeat) is routed
    without the parser: each key must still reach its own shard, by literal, text and binary parameter,
    and a session setting, a hint or a negative key in between must still be honoured."""
    shardgate = _proxy(proxy, two)
    tenants = [1, 2, 3, 4, 5, 6, 7, 8, 10_000_000_000] * 3
    ports = {tenant: two["shards"][_shard_of(two["reference"], tenant, 2)].port for tenant in set(tenants)}
    assert len(set(ports.values())) == 2  # the keys are on both shards
    notes = {tenant: sorted(_reference(two, f"SELECT note FROM orders WHERE tenant_id = {tenant}"))
             for tenant in set(tenants)}
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for tenant in tenants:
            # a Query whose one integer is the key (psycopg sends a text without parameters as a Query)
            literal = conn.execute(f"SELECT inet_server_port(), note FROM orders WHERE tenant_id = {tenant}").fetchall()
            assert {row[0] for row in literal} == {ports[tenant]}, tenant
            assert sorted((row[1],) for row in literal) == notes[tenant]
            for placeholder in ("%s", "%b"):  # an unnamed Parse/Bind batch, text and binary parameter
                rows = conn.execute(f"SELECT inet_server_port(), note FROM orders WHERE tenant_id = {placeholder}",
                                    (tenant,)).fetchall()
                assert {row[0] for row in rows} == {ports[tenant]}, (tenant, placeholder)
                assert sorted((row[1],) for row in rows) == notes[tenant]
        # a negative key after positive ones: the minus is part of the key
        assert conn.execute("SELECT inet_server_port() FROM orders WHERE tenant_id = -9 LIMIT 1").fetchone() == (
            two["shards"][_shard_of(two["reference"], -9, 2)].port,)
        # SET shardgate.shard wins over the key from the next statement on, as on the first time
        other = next(t for t in ports if ports[t] != two["shards"][1].port)
        conn.execute("SELECT inet_server_port() FROM orders WHERE tenant_id = 1")
        conn.execute("SET shardgate.shard = 1")
        assert conn.execute(f"SELECT inet_server_port() FROM orders WHERE tenant_id = {other}").fetchall() == []
        assert conn.execute(f"SELECT inet_server_port() FROM orders WHERE tenant_id = {other} OR true LIMIT 1"
                            ).fetchone() == (two["shards"][1].port,)
        conn.execute("RESET shardgate.shard")
        assert conn.execute(f"SELECT inet_server_port() FROM orders WHERE tenant_id = {other}").fetchone() == (
            ports[other],)
    # the repeats are counted as single-shard statements like the ones the router decided
    with urllib.request.urlopen(shardgate.admin_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    single = re.search(r'^shardgate_shard_statements_total\{database="app",kind="single"\} (\d+)', metrics, re.M)
    assert single is not None and int(single.group(1)) >= len(tenants) * 3


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


def test_asyncpg_prepared_statements_merged_across_shards(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    """asyncpg describes a statement once and then sends Bind/Execute without a Describe: a statement whose
    rows are merged (ORDER BY, LIMIT, aggregates, GROUP BY) still gets the right rows, every time."""
    shardgate = _proxy(proxy, two)
    queries = ["SELECT tenant_id, id, amount FROM orders WHERE id <= $1 ORDER BY amount DESC, tenant_id, id LIMIT 5",
               "SELECT tenant_id, count(*), sum(amount) FROM orders WHERE id <= $1 GROUP BY tenant_id "
               "ORDER BY tenant_id",
               "SELECT count(*), max(note) FROM orders WHERE id >= $1"]

    async def run() -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(shardgate.dsn(), ssl=False)
        try:
            found = []
            for sql in queries:
                statement = await conn.prepare(sql)
                for value in (2, 3, 2):
                    found.append([tuple(r) for r in await statement.fetch(value)])
                    found.append([tuple(r) for r in await conn.fetch(sql, value)])  # asyncpg's statement cache
            return found
        finally:
            await conn.close()

    found = asyncio.run(asyncio.wait_for(run(), 60))
    expected = []
    for sql in queries:
        for value in (2, 3, 2):
            rows = _reference(two, sql.replace("$1", str(value)))
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


def test_user_defined_aggregates_are_refused_and_user_functions_still_run(
        proxy: ProxyFactory, two: dict[str, Any]) -> None:
    """A user-defined aggregate's per-shard results cannot be combined: refused, never concatenated. A
    user-defined plain function across shards still works (the proxy reads which are aggregates)."""
    for server in two["shards"][:2]:
        _execute(server, "DROP AGGREGATE IF EXISTS my_total(numeric)",
                 "CREATE AGGREGATE my_total(numeric) (SFUNC = numeric_add, STYPE = numeric, INITCOND = '0')",
                 "CREATE OR REPLACE FUNCTION twice(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2'")
    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.FeatureNotSupported, match="user-defined aggregate"):
            conn.execute("SELECT my_total(amount) FROM orders")
        with pytest.raises(pg_errors.FeatureNotSupported, match="user-defined aggregate"):
            conn.execute("SELECT tenant_id, MY_TOTAL(amount) FROM orders GROUP BY tenant_id")
        # on one shard it is PostgreSQL's own answer
        assert conn.execute("SELECT my_total(amount) FROM orders WHERE tenant_id = 1").fetchone() == (
            sum(row[3] for row in ROWS if row[0] == 1),)
        doubled = conn.execute("SELECT twice(amount) FROM orders ORDER BY tenant_id, id").fetchall()
        assert doubled == [(row[3] * 2,) for row in sorted(ROWS)]


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


def test_explain_shows_each_shard_and_the_decision(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    shard_of_5 = _shard_of(two["reference"], 5, 2)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        one = [row[0] for row in conn.execute("EXPLAIN SELECT * FROM orders WHERE tenant_id = 5").fetchall()]
        assert one[0] == f"Shard {shard_of_5} (127.0.0.1:{two['shards'][shard_of_5].port}):"
        assert any("Scan" in line for line in one[1:-2])
        assert one[-2].startswith(f"Shardgate: shards {shard_of_5}")
        assert one[-1] == "Shardgate: decided by tenant_id = '5'"
        every = [row[0] for row in conn.execute("EXPLAIN (COSTS OFF) SELECT count(*) FROM orders").fetchall()]
        assert [line for line in every if line.startswith("Shard ")] == [
            f"Shard {index} (127.0.0.1:{server.port}):" for index, server in enumerate(two["shards"][:2])]
        assert every[-1] == "Shardgate: decided by no sharding key: all shards"
        analyzed = conn.execute("EXPLAIN ANALYZE SELECT * FROM orders WHERE tenant_id = %s", (5,)).fetchall()
        assert analyzed[-1][0] == "Shardgate: decided by tenant_id = $1 (5)"
        assert conn.execute("SELECT count(*) FROM orders WHERE tenant_id = 5").fetchone() == (3,)


def test_jwt_tenant_claim_picks_the_shard(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    import jwt as pyjwt

    secret = "shardgate-sharding-test-secret-0123456789abcdef"
    databases = []
    for index, server in enumerate(two["shards"][:2]):
        databases += database_entries(server, shard=index)
    shardgate = proxy(
        pool_mode="transaction", pool_size=4, databases=databases, extra_toml=SHARDED,
        users=[{"name": "app", "password": "app", "auth": "scram-sha-256", "server_user": "app",
                "server_password": "app"},
               {"name": "api", "auth": "jwt", "server_user": "app", "server_password": "app"}],
        jwt={"algorithms": ["HS256"], "secret": secret, "tenant_claim": "tenant_id", "shard_by_tenant_claim": True})
    assert isinstance(shardgate, ProxyProcess)

    def token(tenant: Any) -> str:
        claims = {"sub": "someone", "exp": int(__import__("time").time()) + 600}
        if tenant is not None:
            claims["tenant_id"] = tenant
        return pyjwt.encode(claims, secret, algorithm="HS256")

    with psycopg.connect(shardgate.dsn(user="api", password=token("5")), autocommit=True) as conn:
        # no key in the statement: the tenant's shard answers, with only what that shard holds
        expected = sorted(_on_shard(two, _shard_of(two["reference"], 5, 2), "SELECT DISTINCT tenant_id FROM orders"))
        assert sorted(conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall()) == expected
        assert conn.execute("SELECT count(*) FROM orders WHERE tenant_id = 5").fetchone() == (3,)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM orders WHERE tenant_id = 6")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("UPDATE orders SET note = 'x' WHERE tenant_id = %s", (6,))
        assert conn.execute("SELECT note FROM orders WHERE tenant_id = 5 AND id = 1").fetchone() == ("t5-1",)
    with pytest.raises(psycopg.OperationalError, match="tenant_id"):
        psycopg.connect(shardgate.dsn(user="api", password=token(None)), autocommit=True)


def _generated_selects(seed: int, count: int) -> list[tuple[str, bool]]:
    """Random SELECTs over orders: filters, ORDER BY keys and directions, NULLs, LIMIT/OFFSET, aggregates,
    GROUP BY, DISTINCT. (sql, ordered): ordered when ORDER BY fixes the order of every row."""
    import random

    rng = random.Random(seed)
    filters = ["", "WHERE amount > 1", "WHERE id <> 2", "WHERE note LIKE 't1%'", "WHERE tenant_id IN (1, 5, 8)",
               "WHERE tenant_id = 3", "WHERE amount IS NULL OR id = 1", "WHERE tenant_id > 4 AND id < 3"]
    out: list[tuple[str, bool]] = []
    for _ in range(count):
        where = rng.choice(filters)
        shape = rng.randrange(5)
        if shape == 0:  # rows ordered by a full key
            direction = [rng.choice(["", " DESC"]) for _ in range(2)]
            nulls = rng.choice(["", " NULLS FIRST", " NULLS LAST"])
            limit = rng.choice(["", " LIMIT 5", " LIMIT 3 OFFSET 4", " OFFSET 10", " LIMIT 0"])
            out.append((f"SELECT tenant_id, id, note, amount FROM orders {where} ORDER BY amount{nulls}, "
                        f"tenant_id{direction[0]}, id{direction[1]}{limit}", True))
        elif shape == 1:  # global aggregates
            aggregates = rng.sample(["count(*)", "count(amount)", "sum(amount)", "min(note)", "max(amount)",
                                     "avg(amount)", "min(tenant_id)", "bool_and(id > 1)", "bool_or(id = 3)"], 3)
            out.append((f"SELECT {', '.join(aggregates)} FROM orders {where}", True))
        elif shape == 2:  # grouped, ordered by the group key
            key = rng.choice(["id", "tenant_id"])
            limit = rng.choice(["", " LIMIT 2", " LIMIT 3 OFFSET 1"])
            out.append((f"SELECT {key}, count(*), sum(amount), max(note) FROM orders {where} GROUP BY {key} "
                        f"ORDER BY {key}{rng.choice(['', ' DESC'])}{limit}", True))
        elif shape == 3:  # distinct
            column = rng.choice(["id", "tenant_id", "note"])
            ordered = rng.random() < 0.5
            out.append((f"SELECT DISTINCT {column} FROM orders {where}" + (f" ORDER BY {column}" if ordered else ""),
                        ordered))
        else:  # plain rows, any order
            out.append((f"SELECT tenant_id, id, amount FROM orders {where}", False))
    return out


def test_generated_selects_match_one_server(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    """Hundreds of generated SELECTs: through the proxy, exactly the reference server's rows (ordered where
    ORDER BY fixes the order, as a multiset otherwise), or a 0A000 refusal; never a different answer."""
    shardgate = _proxy(proxy, two)
    _execute(two["reference"], "UPDATE ref_orders SET amount = NULL WHERE id = 2 AND tenant_id % 3 = 0")
    for _index, server in enumerate(two["shards"][:2]):
        _execute(server, "UPDATE orders SET amount = NULL WHERE id = 2 AND tenant_id % 3 = 0")
    seed = 20261207
    refused = 0
    queries = _generated_selects(seed, 300)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for sql, ordered in queries:
            expected = _reference(two, sql)
            try:
                got = conn.execute(sql).fetchall()
            except pg_errors.FeatureNotSupported:
                refused += 1
                continue
            if ordered:
                assert got == expected, f"seed {seed}: {sql}"
            else:
                assert sorted(got, key=repr) == sorted(expected, key=repr), f"seed {seed}: {sql}"
    assert refused < len(queries) // 10, f"{refused} of {len(queries)} refused"


def test_api_shards_and_metrics(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    import json
    import urllib.request

    shardgate = _proxy(proxy, two)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        conn.execute("SELECT * FROM orders WHERE tenant_id = 1").fetchall()
        conn.execute("SELECT * FROM orders WHERE tenant_id = 2").fetchall()
        conn.execute("SELECT count(*) FROM orders").fetchall()
    with urllib.request.urlopen(shardgate.admin_url + "/api/shards", timeout=10) as response:
        report = json.loads(response.read())
    app = report["databases"]["app"]
    assert [shard["shard"] for shard in app["shards"]] == [0, 1]
    assert [shard["servers"][0]["port"] for shard in app["shards"]] == [s.port for s in two["shards"][:2]]
    assert app["sharded_tables"] == [{"table": "orders", "column": "tenant_id", "data_type": "bigint",
                                      "method": "hash"}]
    assert app["omnisharded_tables"] == ["countries"]
    assert app["statements"]["single"] >= 2 and app["statements"]["all"] >= 1
    with urllib.request.urlopen(shardgate.admin_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'shardgate_shard_statements_total{database="app",kind="all"}' in metrics
    # an extended batch (Parse and Bind together) is routed once
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        for tenant in (1, 2, 3):
            conn.execute("SELECT * FROM orders WHERE tenant_id = %s", (tenant,)).fetchall()
    with urllib.request.urlopen(shardgate.admin_url + "/api/shards", timeout=10) as response:
        after = json.loads(response.read())["databases"]["app"]["statements"]
    assert after["single"] == app["statements"]["single"] + 3


@contextmanager
def cursor_binary_copy(conn: psycopg.Connection[Any], statement: str) -> Iterator[Any]:
    """psycopg's binary COPY (it writes the PGCOPY header, binary tuples and the trailer itself)."""
    with conn.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(["bigint", "integer", "text"])
        yield copy


def test_copy_in_splits_rows_and_copy_out_streams_from_every_shard(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    shardgate = _proxy(proxy, two)
    tenants = list(range(100, 140))
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        with conn.cursor() as cursor:
            with cursor.copy("COPY orders (tenant_id, id, note) FROM STDIN") as copy:
                for tenant in tenants:
                    copy.write_row((tenant, 1, f"copied\t{tenant}"))
            assert cursor.rowcount == len(tenants)
            with cursor.copy("COPY orders (id, tenant_id, note) FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
                copy.write('id,tenant_id,note\n2,100,"line\nbreak, and ""quotes"""\n2,101,plain\n')
            assert cursor.rowcount == 2
            # a row without a key: nothing is copied anywhere
            with pytest.raises(psycopg.Error, match="tenant_id"), \
                    cursor.copy("COPY orders (tenant_id, id) FROM STDIN") as copy:
                copy.write("300\t1\n\\N\t2\n")
        assert conn.execute("SELECT count(*) FROM orders WHERE tenant_id = 300").fetchone() == (0,)
        with cursor_binary_copy(conn, "COPY orders (tenant_id, id, note) FROM STDIN (FORMAT binary)") as copy:
            for tenant in tenants:
                copy.write_row((tenant, 3, f"binary {tenant}"))
        lines = []
        with conn.cursor() as cursor, \
                cursor.copy("COPY (SELECT tenant_id, id FROM orders WHERE note LIKE 'copied%') TO STDOUT") as copy:
            for row in copy.rows():
                lines.append((int(row[0]), int(row[1])))
        assert sorted(lines) == [(tenant, 1) for tenant in tenants]
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    for tenant in tenants:
        shard = _shard_of(two["reference"], tenant, 2)
        assert _on_shard(two, shard, f"SELECT note FROM orders WHERE tenant_id = {tenant} AND id = 1") == [
            (f"copied\t{tenant}",)]
        assert _on_shard(two, 1 - shard, f"SELECT 1 FROM orders WHERE tenant_id = {tenant}") == []
        assert _on_shard(two, shard, f"SELECT note FROM orders WHERE tenant_id = {tenant} AND id = 3") == [
            (f"binary {tenant}",)]
    shard = _shard_of(two["reference"], 100, 2)
    assert _on_shard(two, shard, "SELECT note FROM orders WHERE tenant_id = 100 AND id = 2") == [
        ('line\nbreak, and "quotes"',)]


def test_a_shard_with_a_replica_serves_its_reads(proxy: ProxyFactory, pg: Any, two: dict[str, Any]) -> None:
    """Shard 1 gets a streaming replica: with exclude_primary its key's reads (one shard or a fan-out
    leg) run on the replica, its writes on its primary; shard 0 has none and serves both."""
    shard1 = two["shards"][1]
    replica = pg.add_replica("sharding_shard1_replica", primary=shard1)
    try:
        from tests.harness import wait_wal

        wait_wal(shard1, [replica])
        databases = database_entries(two["shards"][0], shard=0) + database_entries(shard1, [replica], shard=1)
        shardgate = proxy(pool_mode="transaction", pool_size=4, databases=databases, extra_toml=SHARDED,
                          general={"read_write_split": "exclude_primary", "healthcheck_interval_ms": 200})
        assert isinstance(shardgate, ProxyProcess)
        on_one = next(t for t in range(1, 50) if _shard_of(two["reference"], t, 2) == 1)
        with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
            spot = conn.execute("SELECT inet_server_port(), pg_is_in_recovery() FROM orders WHERE tenant_id = %s "
                                "LIMIT 1", (on_one,)).fetchone()
            assert spot == (replica.port, True)
            ports = {row[0] for row in conn.execute("SELECT DISTINCT inet_server_port() FROM orders").fetchall()}
            assert ports == {two["shards"][0].port, replica.port}
            cursor = conn.execute("UPDATE orders SET note = note WHERE tenant_id = %s RETURNING inet_server_port()",
                                  (on_one,))
            assert {row[0] for row in cursor.fetchall()} == {shard1.port}
    finally:
        pg.drop_replica(replica, primary=shard1)  # later tests share the topology's replica list


def test_psql_through_sharded_proxy(proxy: ProxyFactory, two: dict[str, Any]) -> None:
    import subprocess

    shardgate = _proxy(proxy, two)
    script = ("SELECT count(*), sum(amount) FROM orders;\n"
              "SELECT id, note FROM orders WHERE tenant_id = 5 ORDER BY id;\n"
              "INSERT INTO orders (tenant_id, id, note) VALUES (51, 1, 'psql'), (52, 1, 'psql');\n"
              "SELECT tenant_id FROM orders WHERE note = 'psql' ORDER BY tenant_id;\n")
    output = subprocess.run(["psql", shardgate.dsn(), "-X", "-At", "-F", ",", "-v", "ON_ERROR_STOP=1"],
                            input=script, capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    expected_total = _reference(two, "SELECT count(*), sum(amount) FROM orders")[0]
    assert output.stdout.splitlines() == [
        f"{expected_total[0]},{expected_total[1]}", "1,t5-1", "2,t5-2", "3,t5-3", "INSERT 0 2", "51", "52"]
