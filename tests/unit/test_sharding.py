"""ShardRouter: statements to shards from the SQL, Bind parameters, hints, session settings and the tenant
claim. A list-sharded table keeps the expected shards obvious: tenants 1-3 on shard 0, 4-6 on shard 1,
7-9 on shard 2."""

from __future__ import annotations

import pytest

from routing.shard import make_sharder
from routing.shard_key import ShardedColumn
from routing.sharding import ShardRouter, ShardSession, parse_binary_array, parse_text_array

ORDERS = ShardedColumn("tenant_id", "orders")


def router(**kwargs: object) -> ShardRouter:
    placement = make_sharder("orders", "tenant_id", "bigint", "list", 3, values={0: [1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9]})
    return ShardRouter("app", 3, [ORDERS], {ORDERS: placement}, frozenset({"countries"}), **kwargs)  # type: ignore[arg-type]


def int8(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


@pytest.mark.parametrize(("sql", "shards"), [
    ("SELECT * FROM orders WHERE tenant_id = 5", (1,)),
    ("SELECT * FROM orders WHERE tenant_id = 5 AND id = 2", (1,)),
    ("SELECT * FROM orders WHERE tenant_id IN (1, 4)", (0, 1)),
    ("SELECT * FROM orders WHERE tenant_id IN (1, 2, 3)", (0,)),
    ("SELECT * FROM orders", (0, 1, 2)),
    ("UPDATE orders SET note = 'x' WHERE tenant_id = 8", (2,)),
    ("DELETE FROM orders WHERE tenant_id = 2", (0,)),
    ("/* shardgate: shard=2 */ SELECT * FROM orders", (2,)),
    ("/* shardgate: sharding_key=7 */ SELECT * FROM orders", (2,)),
])
def test_shards_from_the_sql(sql: str, shards: tuple[int, ...]) -> None:
    decision = router().decide(sql)
    assert decision.refusal is None, decision.refusal
    assert decision.shards == shards


def test_parameters_text_binary_and_arrays() -> None:
    shard_router = router()
    sql = "SELECT * FROM orders WHERE tenant_id = $1"
    assert shard_router.decide(sql, [(0, b"4")]).shards == (1,)
    assert shard_router.decide(sql, [(1, int8(9))]).shards == (2,)
    assert shard_router.decide(sql, [(1, (3).to_bytes(4, "big"))]).shards == (0,)  # an int4 parameter
    any_sql = "SELECT * FROM orders WHERE tenant_id = ANY($1)"
    assert shard_router.decide(any_sql, [(0, b"{1,7}")]).shards == (0, 2)
    # a binary int8[]: ndim 1, no nulls, element oid 20, 2 elements from 1, then each (length, value)
    array = (1).to_bytes(4, "big") + bytes(4) + (20).to_bytes(4, "big") + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
    array += b"".join((8).to_bytes(4, "big") + int8(v) for v in (5, 6))
    assert shard_router.decide(any_sql, [(1, array)]).shards == (1,)


def test_bad_key_values_are_refused_with_their_sqlstate() -> None:
    shard_router = router()
    outside = shard_router.decide("SELECT * FROM orders WHERE tenant_id = 99")
    assert outside.refusal is not None and outside.refusal[0] == "22023" and "99" in outside.refusal[1]
    bad = shard_router.decide("SELECT * FROM orders WHERE tenant_id = $1", [(0, b"abc")])
    assert bad.refusal is not None and bad.refusal[0] == "22P02"
    missing = shard_router.decide("SELECT * FROM orders WHERE tenant_id = $2", [(0, b"1")])
    assert missing.refusal is not None and missing.refusal[0] == "08P01"


def test_writes_without_the_key() -> None:
    refused = router().decide("UPDATE orders SET note = 'x'")
    assert refused.refusal is not None and refused.refusal[0] == "0A000" and "tenant_id" in refused.refusal[1]
    allowed = router(allow_cross_shard_writes=True).decide("UPDATE orders SET note = 'x'")
    assert allowed.refusal is None and allowed.shards == (0, 1, 2)
    insert = router().decide("INSERT INTO orders (id, note) VALUES (1, 'x')")
    assert insert.refusal is not None and "tenant_id" in insert.refusal[1]


def test_insert_rows_split_by_shard() -> None:
    decision = router().decide("INSERT INTO orders (tenant_id, id) VALUES (1, 10), (5, 11), (2, 12) RETURNING id")
    assert decision.refusal is None and decision.shards == (0, 1)
    parts = {part.shard: part for part in decision.inserts}
    assert "(1, 10)" in parts[0].sql and "(2, 12)" in parts[0].sql and "(5, 11)" not in parts[0].sql
    assert "(5, 11)" in parts[1].sql and "RETURNING" in parts[1].sql.upper()
    one = router().decide("INSERT INTO orders (tenant_id, id) VALUES (4, 1), (6, 2)")
    assert one.shards == (1,) and not one.inserts
    with_params = router().decide("INSERT INTO orders (tenant_id, id) VALUES ($1, $2), ($3, $4)",
                                  [(0, b"7"), (0, b"1"), (0, b"1"), (0, b"2")])
    parts = {part.shard: part for part in with_params.inserts}
    assert parts[2].parameters == (1, 2) and parts[0].parameters == (3, 4)
    assert "$1" in parts[0].sql and "$3" not in parts[0].sql


def test_session_settings_and_tenant_claim() -> None:
    shard_router = router()
    assert shard_router.decide("SELECT * FROM orders", session=ShardSession(shard=2)).shards == (2,)
    assert shard_router.decide("SELECT * FROM orders", session=ShardSession(key="4")).shards == (1,)
    tenant = ShardSession(tenant="5")
    assert shard_router.decide("SELECT * FROM orders", session=tenant).shards == (1,)
    assert shard_router.decide("SELECT * FROM orders WHERE tenant_id = 5", session=tenant).shards == (1,)
    other = shard_router.decide("SELECT * FROM orders WHERE tenant_id = 6", session=tenant)
    assert other.refusal is not None and other.refusal[0] == "42501"


def test_omnisharded_and_unsharded_tables() -> None:
    shard_router = router()
    read = shard_router.decide("SELECT * FROM countries")
    assert read.anywhere and read.refusal is None
    write = shard_router.decide("INSERT INTO countries VALUES ('fr')")
    assert write.shards == (0, 1, 2) and write.write
    assert shard_router.decide("SELECT 1").anywhere


def test_what_cannot_be_merged_is_refused() -> None:
    shard_router = router()
    for sql in ("SELECT count(DISTINCT id) FROM orders",
                "SELECT * FROM (SELECT count(*) FROM orders) AS counted",
                "WITH recent AS (SELECT * FROM orders ORDER BY id LIMIT 5) SELECT * FROM recent"):
        decision = shard_router.decide(sql)
        assert decision.refusal is not None and decision.refusal[0] == "0A000", sql
    # on one shard the same statements are fine
    assert shard_router.decide("SELECT * FROM (SELECT count(*) FROM orders WHERE tenant_id = 1) AS c").refusal is None
    merged = shard_router.decide("SELECT avg(amount) FROM orders")
    assert merged.merge is not None and merged.shard_sql is not None and "count(" in merged.shard_sql


def test_decisions_are_counted() -> None:
    shard_router = router()
    shard_router.decide("SELECT * FROM orders WHERE tenant_id = 1")
    shard_router.decide("SELECT * FROM orders WHERE tenant_id IN (1, 5)")
    shard_router.decide("SELECT * FROM orders")
    assert shard_router.decisions == {"single": 1, "multi": 1, "all": 1}


def test_array_parsers() -> None:
    assert parse_text_array('{1, 2,"a b","c\\"d"}') == ["1", "2", "a b", 'c"d']
    assert parse_text_array("{}") == []
    with pytest.raises(Exception, match="NULL"):
        parse_text_array("{1,NULL}")
    empty = (0).to_bytes(4, "big") + bytes(4) + (20).to_bytes(4, "big")
    assert parse_binary_array(empty) == []


SIGNED_TEXTS = [
    "UPDATE orders SET amount = amount - 57 WHERE tenant_id = 33",
    "UPDATE orders SET amount = amount -57 WHERE tenant_id = -33",
    "SELECT * FROM orders WHERE tenant_id = -5",
    "SELECT * FROM orders WHERE tenant_id = - 5",
    "SELECT * FROM orders WHERE tenant_id IN (1, -9, - 4)",
    "SELECT * FROM orders WHERE tenant_id = 7 AND amount > -3",
    "SELECT amount - 4 FROM orders WHERE tenant_id BETWEEN -5 AND 5",
    "SELECT * FROM orders WHERE tenant_id = 10 - 3",
    "SELECT * FROM orders WHERE tenant_id = (2) - 1",
    "DELETE FROM orders WHERE tenant_id = -9223372036854775808",
    "INSERT INTO orders (tenant_id, id) VALUES (-1, 2), (3, -4)",
]


@pytest.mark.parametrize("sql", SIGNED_TEXTS)
def test_the_literal_shape_cache_reads_minus_signs_as_the_parser_does(sql: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts that differ only in their integers share one analysis; a minus is a sign or a subtraction as
    sqlglot reads it, so the cached route is the one a full parse gives (a wrong sign is a wrong shard)."""
    def hashed() -> ShardRouter:
        placement = make_sharder("orders", "tenant_id", "bigint", "hash", 3)
        return ShardRouter("app", 3, [ORDERS], {ORDERS: placement}, frozenset())
    cached = hashed()
    for warm in (sql, sql):  # the second decision comes from the shape cache
        found = cached.decide(warm)
    import routing.sharding as module
    monkeypatch.setattr(module, "_literal_shape", lambda text: None)
    parsed = hashed().decide(sql)
    assert (found.shards, found.refusal, found.inserts) == (parsed.shards, parsed.refusal, parsed.inserts)
    assert module._SHAPE_INTEGER.search(sql) is not None
