"""routing.shard_key: the sharding keys a statement is restricted to, refusals, and INSERTs split by row."""

from __future__ import annotations

import pytest
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

from routing.shard_key import (
    InsertPlan,
    KeyFinding,
    Literal,
    Param,
    ParamArray,
    ShardedColumn,
    _parse,
    _regenerated,
    _space_parameters,
    find_keys,
    split_insert,
)

SHARDED = (ShardedColumn("tenant_id", "orders"), ShardedColumn("tenant_id", "items"))
OMNISHARDED = frozenset({"countries"})
POSTGRES = Postgres()


def L(text: str | None) -> Literal:  # short names: the tables of expected keys read like SQL
    return Literal(text)


def P(number: int) -> Param:
    return Param(number)


def found(sql: str) -> KeyFinding:
    return find_keys(sql, SHARDED, OMNISHARDED)


def keys(sql: str) -> tuple[Literal | Param | ParamArray, ...] | None:
    finding = found(sql)
    assert finding.refusal is None, finding.refusal
    return finding.keys


def refusal(sql: str) -> str:
    finding = found(sql)
    assert finding.refusal is not None, finding
    sqlstate, message = finding.refusal
    assert sqlstate == "0A000"
    assert finding.keys is None
    return message


# --- WHERE: literals, parameters, casts, qualified columns ------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM orders WHERE tenant_id = 5", (L("5"),)),
    ("SELECT * FROM orders WHERE 5 = tenant_id", (L("5"),)),
    ("SELECT * FROM orders WHERE tenant_id = $1", (P(1),)),
    ("SELECT * FROM orders WHERE tenant_id = $1::bigint", (P(1),)),
    ("SELECT * FROM orders WHERE tenant_id = CAST($2 AS bigint)", (P(2),)),
    ("SELECT * FROM orders WHERE $3::bigint = tenant_id", (P(3),)),
    ("SELECT * FROM orders WHERE tenant_id = '5'::bigint", (L("5"),)),
    ("SELECT * FROM orders WHERE tenant_id = bigint '5'", (L("5"),)),
    ("SELECT * FROM orders WHERE tenant_id::text = '5'", (L("5"),)),  # text keeps every key type apart
    ("SELECT * FROM orders WHERE tenant_id = -42", (L("-42"),)),
    ("SELECT * FROM orders WHERE tenant_id = 'it''s'", (L("it's"),)),
    ("SELECT * FROM orders WHERE tenant_id = E'a\\'b\\x41'", (L("a'bA"),)),
    ("SELECT * FROM orders WHERE tenant_id = $$q'r$$", (L("q'r"),)),
    ("SELECT * FROM orders o WHERE o.tenant_id = 5", (L("5"),)),
    ("SELECT * FROM orders AS o WHERE (o.tenant_id) = (5)", (L("5"),)),
    ("SELECT * FROM orders WHERE orders.tenant_id = 5", (L("5"),)),
    ("SELECT * FROM public.orders WHERE public.orders.tenant_id = 5", (L("5"),)),
    ("SELECT * FROM orders o WHERE TENANT_ID = 5", (L("5"),)),  # unquoted: lower-cased
    ('SELECT * FROM orders WHERE "tenant_id" = 5', (L("5"),)),
    ("SELECT * FROM orders WHERE tenant_id IS NOT DISTINCT FROM 5", (L("5"),)),
    ("SELECT * FROM orders WHERE tenant_id = $1 FOR UPDATE", (P(1),)),
])
def test_equality_with_a_literal_or_parameter(sql: str, expected: tuple[Literal | Param, ...]) -> None:
    finding = found(sql)
    assert finding == KeyFinding("select", expected, ("orders",), ())


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM orders WHERE tenant_id IN (1, 2, 3)", (L("1"), L("2"), L("3"))),
    ("SELECT * FROM orders WHERE tenant_id IN ($1, $2)", (P(1), P(2))),
    ("SELECT * FROM orders WHERE tenant_id IN ($1,$2)", (P(1), P(2))),  # sqlglot cannot tokenize `$1,$2`
    ("SELECT * FROM orders WHERE tenant_id IN (1, 1, 2)", (L("1"), L("2"))),
    ("SELECT * FROM orders WHERE tenant_id IN (1, NULL)", (L("1"),)),  # NULL matches no row
    ("SELECT * FROM orders WHERE tenant_id = ANY($1)", (ParamArray(1),)),
    ("SELECT * FROM orders WHERE tenant_id = ANY($2::bigint[])", (ParamArray(2),)),
    ("SELECT * FROM orders WHERE tenant_id = ANY(ARRAY[1, 2])", (L("1"), L("2"))),
    ("SELECT * FROM orders WHERE tenant_id = ANY(ARRAY[$1, $2])", (P(1), P(2))),
    ("SELECT * FROM orders WHERE tenant_id = ANY('{1,2}')", (L("1"), L("2"))),
    ("SELECT * FROM orders WHERE tenant_id = ANY('{\"a b\", c, NULL}'::text[])", (L("a b"), L("c"))),
    ("SELECT * FROM orders WHERE (tenant_id, id) IN ((1, 10), (3, 30))", (L("1"), L("3"))),
    ("SELECT * FROM orders WHERE (tenant_id, id) = (1, 10)", (L("1"),)),
    ("SELECT * FROM orders WHERE tenant_id = NULL", ()),  # no row anywhere: any one shard answers
])
def test_lists_and_arrays_are_a_union(sql: str, expected: tuple[Literal | Param | ParamArray, ...]) -> None:
    assert keys(sql) == expected


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM orders WHERE tenant_id = 1 AND status = 'open'", (L("1"),)),
    ("SELECT * FROM orders WHERE status = 'open' AND tenant_id = 1 AND id > 3", (L("1"),)),
    ("SELECT * FROM orders WHERE tenant_id IN (1, 2) AND tenant_id = 2", (L("2"),)),  # AND narrows
    ("SELECT * FROM orders WHERE tenant_id = ANY($1) AND tenant_id = $2", (P(2),)),
    ("SELECT * FROM orders WHERE tenant_id = 1 OR tenant_id = 2", (L("1"), L("2"))),
    ("SELECT * FROM orders WHERE (tenant_id = 1 AND a = 1) OR (tenant_id IN (2, 3) AND b = 2)",
     (L("1"), L("2"), L("3"))),
    ("SELECT * FROM orders WHERE tenant_id = 1 OR status = 'open'", None),  # a side without the key
    ("SELECT * FROM orders WHERE NOT tenant_id = 1", None),
    ("SELECT * FROM orders WHERE NOT (tenant_id <> 1)", None),
    ("SELECT * FROM orders WHERE tenant_id <> 1", None),
    ("SELECT * FROM orders WHERE tenant_id > 1", None),
    ("SELECT * FROM orders WHERE tenant_id BETWEEN 1 AND 1", None),
    ("SELECT * FROM orders WHERE tenant_id IS NULL", None),
    ("SELECT * FROM orders WHERE tenant_id NOT IN (1, 2)", None),
    ("SELECT * FROM orders WHERE tenant_id = other_id", None),
    ("SELECT * FROM orders WHERE tenant_id + 0 = 1", None),
    ("SELECT * FROM orders WHERE lower(tenant_id) = 'a'", None),
    ("SELECT * FROM orders WHERE tenant_id = 1 + 1", None),
    ("SELECT * FROM orders WHERE tenant_id = 5.7::int", None),  # the cast rounds: 6
    ("SELECT * FROM orders WHERE tenant_id = '5'::varchar(0)", None),  # the cast truncates
    ("SELECT * FROM orders WHERE tenant_id::int = 5", None),  # '05'::int = 5 for a text key
    ("SELECT * FROM orders WHERE tenant_id = 1 AND status = 'x' OR tenant_id = 2", (L("1"), L("2"))),
    ("SELECT * FROM orders", None),
])
def test_and_narrows_or_unites_anything_else_is_every_shard(sql: str, expected: object) -> None:
    assert keys(sql) == expected


def test_a_cast_of_the_column_is_trusted_when_the_data_type_keeps_keys_apart() -> None:
    typed = (ShardedColumn("tenant_id", "orders", "bigint"),)
    assert find_keys("SELECT * FROM orders WHERE tenant_id::bigint = 5", typed, ()).keys == (L("5"),)
    assert find_keys("SELECT * FROM orders WHERE tenant_id::int4 = $1", typed, ()).keys == (P(1),)
    text = (ShardedColumn("tenant_id", "orders", "text"),)
    assert find_keys("SELECT * FROM orders WHERE tenant_id::bigint = 5", text, ()).keys is None
    assert find_keys("SELECT * FROM orders WHERE tenant_id::varchar = 'a'", text, ()).keys == (L("a"),)


def test_quoted_names_keep_their_case() -> None:
    quoted = (ShardedColumn('"TenantId"', '"Orders"'),)
    assert find_keys('SELECT * FROM "Orders" WHERE "TenantId" = 1', quoted, ()).keys == (L("1"),)
    assert find_keys('SELECT * FROM "Orders" WHERE TenantId = 1', quoted, ()).keys is None
    assert find_keys("SELECT * FROM orders WHERE tenant_id = 1", quoted, ()).sharded_tables == ()
    assert found('SELECT * FROM "Orders" WHERE tenant_id = 1') == KeyFinding("select", None, (), ())
    assert found('SELECT * FROM orders WHERE "Tenant_Id" = 1').keys is None


def test_schema_qualified_tables_match_the_configured_name() -> None:
    assert found("SELECT * FROM app.orders WHERE tenant_id = 1").sharded_tables == ("orders",)
    qualified = (ShardedColumn("tenant_id", "public.orders"),)
    assert find_keys("SELECT * FROM orders WHERE tenant_id = 1", qualified, ()) == KeyFinding(
        "select", (L("1"),), ("public.orders",), ())
    assert find_keys("SELECT * FROM public.orders WHERE tenant_id = 1", qualified, ()).keys == (L("1"),)
    assert find_keys("SELECT * FROM other.orders WHERE tenant_id = 1", qualified, ()).sharded_tables == ()


# --- subqueries and CTEs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    # Every reference to a sharded table restricted to the same key: one shard, whatever the query does.
    ("SELECT * FROM orders WHERE tenant_id = $1 AND id IN (SELECT order_id FROM items WHERE tenant_id = $1)",
     (P(1),)),
    ("SELECT * FROM orders WHERE tenant_id = 5 AND total > (SELECT avg(total) FROM orders WHERE tenant_id = 5)",
     (L("5"),)),
    ("SELECT * FROM countries WHERE code IN (SELECT country FROM orders WHERE tenant_id = 5)", (L("5"),)),
    ("SELECT (SELECT count(*) FROM orders WHERE tenant_id = 2)", (L("2"),)),
    ("WITH r AS (SELECT * FROM orders WHERE tenant_id = 5) SELECT * FROM r", (L("5"),)),
    ("WITH r AS (SELECT * FROM orders WHERE tenant_id = 5) SELECT * FROM r JOIN items i ON i.tenant_id = r.tenant_id",
     (L("5"),)),
    ("WITH r AS (SELECT * FROM orders) SELECT * FROM r WHERE tenant_id = 3", (L("3"),)),
    ("WITH r AS (SELECT * FROM orders) SELECT * FROM r a JOIN r b ON a.tenant_id = b.tenant_id WHERE a.tenant_id = 3",
     (L("3"),)),
    ("SELECT * FROM (SELECT * FROM orders WHERE tenant_id = 5) d", (L("5"),)),
    ("SELECT * FROM (SELECT * FROM orders) d WHERE d.tenant_id = 5", (L("5"),)),
    ("SELECT * FROM (SELECT tenant_id AS t FROM orders) d WHERE d.t = 5", (L("5"),)),
    ("SELECT * FROM (SELECT * FROM orders WHERE tenant_id = 5 ORDER BY id LIMIT 10) d", (L("5"),)),
    ("SELECT * FROM orders o WHERE o.tenant_id = $1 AND EXISTS "
     "(SELECT 1 FROM items i WHERE i.tenant_id = o.tenant_id AND i.sku = 'x')", (P(1),)),
    ("SELECT * FROM orders o WHERE o.tenant_id IN (SELECT tenant_id FROM items WHERE tenant_id = 4)", (L("4"),)),
    # Each shard answers for its own rows: every sharded read is tied to the others by the key.
    ("SELECT o.id, (SELECT count(*) FROM items i WHERE i.tenant_id = o.tenant_id) FROM orders o", None),
    ("SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM items i WHERE i.tenant_id = o.tenant_id)", None),
    ("SELECT * FROM orders o WHERE o.tenant_id IN (SELECT tenant_id FROM items WHERE sku = 'x')", None),
    ("SELECT * FROM orders o JOIN (SELECT tenant_id, count(*) AS n FROM items GROUP BY tenant_id) s "
     "ON s.tenant_id = o.tenant_id", None),
    ("SELECT * FROM orders o JOIN (SELECT tenant_id, count(*) AS n FROM items GROUP BY 1) s USING (tenant_id) "
     "WHERE o.tenant_id = 8", (L("8"),)),
    ("SELECT * FROM orders o, LATERAL (SELECT * FROM items i WHERE i.tenant_id = o.tenant_id ORDER BY id LIMIT 3) x",
     None),
    ("SELECT * FROM orders o, LATERAL (SELECT * FROM items i WHERE i.tenant_id = o.tenant_id LIMIT 3) x "
     "WHERE o.tenant_id = 9", (L("9"),)),
    ("WITH recursive r AS (SELECT * FROM orders WHERE tenant_id = 1 UNION ALL "
     "SELECT o.* FROM orders o JOIN r ON o.parent = r.id AND o.tenant_id = 1) SELECT * FROM r", (L("1"),)),
])
def test_subqueries_and_ctes(sql: str, expected: object) -> None:
    assert keys(sql) == expected


def test_a_subquery_key_restricts_only_the_subquery() -> None:
    # The outer orders rows of other tenants can match too (ids repeat across shards): on every shard the
    # subquery would see its own rows only, so all shards would be a wrong answer, not a slow one.
    message = refusal("SELECT * FROM orders WHERE id IN (SELECT order_id FROM items WHERE tenant_id = 5)")
    assert "orders" in message and "items" in message and "tenant_id" in message
    assert "(in a subquery)" in message


@pytest.mark.parametrize(("sql", "words"), [
    ("SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)", ["orders", "tenant_id"]),
    ("SELECT * FROM countries WHERE code IN (SELECT country FROM orders)", ["orders", "subquery"]),
    ("SELECT (SELECT count(*) FROM orders)", ["orders"]),
    ("SELECT * FROM (SELECT * FROM orders ORDER BY id LIMIT 10) d", ["LIMIT", "orders"]),
    ("SELECT * FROM orders o JOIN (SELECT tenant_id, count(*) FROM items) s ON s.tenant_id = o.tenant_id",
     ["aggregate", "items"]),
    ("SELECT * FROM orders o WHERE o.tenant_id IN (SELECT tenant_id FROM items ORDER BY id LIMIT 5)", ["LIMIT"]),
    ("SELECT * FROM (SELECT status, count(*) FROM orders GROUP BY status) s", ["aggregate", "tenant_id"]),
    ("SELECT * FROM (SELECT DISTINCT status FROM orders) s", ["DISTINCT"]),
    ("SELECT * FROM (SELECT id, row_number() OVER () FROM orders) s", ["window"]),
    ("WITH RECURSIVE r AS (SELECT * FROM orders WHERE tenant_id = 1 UNION ALL "
     "SELECT o.* FROM orders o JOIN r ON o.parent = r.id) SELECT * FROM r", ["orders", "tenant_id"]),
    ("SELECT 1 UNION ALL SELECT tenant_id FROM orders", ["set operation"]),
])
def test_what_each_shard_would_compute_over_its_own_rows_is_refused(sql: str, words: list[str]) -> None:
    message = refusal(sql)
    for word in words:
        assert word in message


# --- joins -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM orders o JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id WHERE o.tenant_id = $1",
     (P(1),)),
    ("SELECT * FROM orders o JOIN items i ON o.tenant_id = i.tenant_id WHERE i.tenant_id = 3", (L("3"),)),
    ("SELECT * FROM orders o, items i WHERE o.tenant_id = i.tenant_id AND o.id = i.order_id", None),
    ("SELECT * FROM orders JOIN items USING (tenant_id) WHERE tenant_id = 7", (L("7"),)),
    ("SELECT * FROM orders a JOIN orders b USING (tenant_id) WHERE tenant_id IN (7, 8)", (L("7"), L("8"))),
    ("SELECT * FROM orders NATURAL JOIN items", None),
    ("SELECT * FROM orders o LEFT JOIN items i ON i.tenant_id = o.tenant_id WHERE o.tenant_id = 1", (L("1"),)),
    ("SELECT * FROM orders o LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.tenant_id = 1", None),
    ("SELECT * FROM orders o FULL JOIN items i ON i.tenant_id = o.tenant_id", None),
    ("SELECT * FROM orders o, items i WHERE o.tenant_id = 5 AND i.tenant_id = 5", (L("5"),)),
    ("SELECT * FROM orders o JOIN countries c ON c.code = o.country WHERE o.tenant_id = 2", (L("2"),)),
    ("SELECT * FROM orders o LEFT JOIN countries c ON c.code = o.country", None),
    ("SELECT * FROM orders o JOIN users u ON u.id = o.user_id WHERE o.tenant_id = 2", (L("2"),)),
    ("SELECT * FROM orders o JOIN (items i JOIN countries c ON c.code = i.country) ON i.tenant_id = o.tenant_id",
     None),
])
def test_joins_on_the_key_are_colocated(sql: str, expected: object) -> None:
    assert keys(sql) == expected


def test_joins_with_unsharded_tables_report_them() -> None:
    assert found("SELECT * FROM orders o JOIN countries c ON c.code = o.country WHERE o.tenant_id = 2") == KeyFinding(
        "select", (L("2"),), ("orders",), ("countries",))
    assert found("SELECT * FROM orders o JOIN users u ON u.id = o.user_id") == KeyFinding(
        "select", None, ("orders",), ())


@pytest.mark.parametrize("sql", [
    "SELECT * FROM orders o JOIN items i ON i.order_id = o.id",
    "SELECT * FROM orders o JOIN items i ON i.order_id = o.id WHERE o.tenant_id = 1",
    "SELECT * FROM orders o, items i WHERE o.id = i.order_id",
    "SELECT * FROM orders o JOIN items i ON i.tenant_id = o.tenant_id OR i.order_id = o.id",
    "SELECT * FROM orders o, items i WHERE o.tenant_id = $1 AND i.tenant_id = $2",  # $1 and $2 may differ
    "SELECT * FROM orders o LEFT JOIN items i ON i.order_id = o.id",
])
def test_joins_of_sharded_tables_off_the_key_are_refused(sql: str) -> None:
    message = refusal(sql)
    assert message.startswith("join of orders and items is not on the sharding key tenant_id")


def test_unsharded_rows_outer_joined_to_sharded_ones_are_refused() -> None:
    # Each shard would add the countries without orders of its own: duplicates, and wrong NULL rows.
    message = refusal("SELECT * FROM countries c LEFT JOIN orders o ON o.country = c.code")
    assert "orders" in message and "outer join" in message
    assert keys("SELECT * FROM countries c LEFT JOIN orders o ON o.country = c.code AND o.tenant_id = 1 "
                "WHERE o.tenant_id = 1") == (L("1"),)


# --- INSERT ------------------------------------------------------------------------------------------


def test_insert_values_gives_each_rows_key() -> None:
    finding = found("INSERT INTO orders (id, tenant_id, note) VALUES (1, 1, 'a'), (2, $1, $2), (3, NULL, 'c'), "
                    "(4, '7', $3), (5, -4, now()), (6, $4::bigint, DEFAULT), (7, 1, 'again') RETURNING id")
    rows = (L("1"), P(1), L(None), L("7"), L("-4"), P(4), L("1"))
    assert finding == KeyFinding("insert", (L("1"), P(1), L(None), L("7"), L("-4"), P(4)), ("orders",), (),
                                 InsertPlan(rows))


@pytest.mark.parametrize("sql", [
    "INSERT INTO orders (tenant_id, note) VALUES (1, 'a') ON CONFLICT DO NOTHING",
    "INSERT INTO orders (tenant_id, note) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note",
    "INSERT INTO orders (tenant_id, note) VALUES (1, 'a') ON CONFLICT (tenant_id, id) DO UPDATE "
    "SET tenant_id = EXCLUDED.tenant_id, note = EXCLUDED.note RETURNING *",
    "INSERT INTO public.orders AS o (tenant_id, note) VALUES (1, 'a') ON CONFLICT ON CONSTRAINT orders_pkey "
    "DO UPDATE SET note = o.note || '!'",
    "WITH c AS (SELECT code FROM countries) INSERT INTO orders (tenant_id, note) VALUES (1, (SELECT min(code) FROM c))",
])
def test_insert_on_conflict_returning_and_with_are_allowed(sql: str) -> None:
    assert found(sql) == KeyFinding("insert", (L("1"),), ("orders",), ("countries",) if "countries" in sql else (),
                                    InsertPlan((L("1"),)))


@pytest.mark.parametrize(("sql", "message"), [
    ("INSERT INTO orders (id, note) VALUES (1, 'no key')",
     "no sharding key in INSERT into orders: add column tenant_id or a /* shardgate: shard=N */ hint"),
    ("INSERT INTO orders DEFAULT VALUES",
     "no sharding key in INSERT into orders: add column tenant_id or a /* shardgate: shard=N */ hint"),
    ("INSERT INTO orders VALUES (1, 2)",
     "INSERT into sharded table orders without a column list: name the columns (tenant_id among them) so the "
     "sharding key can be found"),
    ("INSERT INTO orders (tenant_id, note) VALUES (1 + 1, 'x')",
     "the sharding key of row 1 is an expression or DEFAULT in INSERT into orders: write tenant_id as a literal "
     "or a parameter"),
    ("INSERT INTO orders (tenant_id, note) VALUES (1, 'x'), (DEFAULT, 'y')",
     "the sharding key of row 2 is an expression or DEFAULT in INSERT into orders: write tenant_id as a literal "
     "or a parameter"),
    ("INSERT INTO orders (tenant_id, note) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET tenant_id = 2",
     "INSERT ... ON CONFLICT DO UPDATE sets the sharding key tenant_id of orders: moving a row to another shard is "
     "not supported"),
    ("INSERT INTO orders (tenant_id, note) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET tenant_id = "
     "EXCLUDED.tenant_id",
     "INSERT ... ON CONFLICT DO UPDATE sets the sharding key tenant_id of orders: moving a row to another shard is "
     "not supported"),
])
def test_insert_refusals(sql: str, message: str) -> None:
    assert found(sql) == KeyFinding("insert", None, ("orders",), (), refusal=("0A000", message))


@pytest.mark.parametrize(("sql", "expected"), [
    ("INSERT INTO orders (tenant_id, note) SELECT tenant_id, note FROM items WHERE tenant_id = 5", (L("5"),)),
    ("INSERT INTO orders (tenant_id, note) SELECT 5, note FROM items WHERE tenant_id = 5", (L("5"),)),
    ("INSERT INTO orders (tenant_id, note) SELECT $1, name FROM countries", (P(1),)),
    ("INSERT INTO orders (tenant_id, note) SELECT i.tenant_id, c.name FROM items i JOIN countries c "
     "ON c.code = i.country WHERE i.tenant_id IN (1, 2)", (L("1"), L("2"))),
    ("INSERT INTO orders (tenant_id, note) SELECT tenant_id, note FROM items", None),  # each shard copies its own
])
def test_insert_select_when_the_key_is_known(sql: str, expected: object) -> None:
    finding = found(sql)
    assert finding.refusal is None and finding.insert is None
    assert (finding.statement, finding.keys) == ("insert", expected)
    assert finding.sharded_tables[0] == "orders"


@pytest.mark.parametrize(("sql", "words"), [
    ("INSERT INTO orders (tenant_id, note) SELECT 6, note FROM items WHERE tenant_id = 5", ["'6'", "other keys"]),
    ("INSERT INTO orders (tenant_id, note) SELECT tenant_id + 1, note FROM items WHERE tenant_id = 1", ["expression"]),
    ("INSERT INTO orders (tenant_id, note) SELECT * FROM items", ["name the selected columns"]),
    ("INSERT INTO orders (tenant_id) SELECT 1 UNION ALL SELECT 2", ["set operation"]),
    ("INSERT INTO orders (tenant_id, note) SELECT i.tenant_id, 'x' FROM countries c LEFT JOIN items i ON true",
     ["outer join"]),
    ("INSERT INTO countries (code) SELECT country FROM orders", ["omnisharded table countries"]),
    ("INSERT INTO orders (tenant_id, total) VALUES (5, (SELECT max(total) FROM orders))", ["orders"]),
])
def test_insert_select_refusals(sql: str, words: list[str]) -> None:
    message = refusal(sql)
    for word in words:
        assert word in message


def test_insert_into_omnisharded_and_other_tables() -> None:
    assert found("INSERT INTO countries (code, name) VALUES ('it', 'Italy'), ('es', 'Spain')") == KeyFinding(
        "insert", None, (), ("countries",))
    assert found("INSERT INTO audit (event) VALUES ('x')") == KeyFinding("insert", None, (), ())
    assert found("INSERT INTO audit (event) SELECT note FROM orders WHERE tenant_id = 3") == KeyFinding(
        "insert", (L("3"),), ("orders",), ())


def test_insert_inside_with() -> None:
    assert found("WITH n AS (INSERT INTO orders (tenant_id) VALUES (5) RETURNING id) SELECT * FROM n") == KeyFinding(
        "insert", (L("5"),), ("orders",), ())
    assert "inside WITH" in refusal("WITH n AS (INSERT INTO orders (tenant_id) VALUES (5), (6) RETURNING id) "
                                    "SELECT * FROM n")
    assert found("WITH moved AS (DELETE FROM orders WHERE tenant_id = 5 RETURNING *) "
                 "INSERT INTO archive (tenant_id, id) SELECT tenant_id, id FROM moved") == KeyFinding(
        "insert", (L("5"),), ("orders",), ())


# --- UPDATE and DELETE -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "statement", "expected"), [
    ("UPDATE orders SET note = 'x' WHERE tenant_id = 3 AND id = 1", "update", (L("3"),)),
    ("UPDATE orders SET note = $1 WHERE id = $2 AND tenant_id = $3", "update", (P(3),)),
    ("UPDATE orders SET note = 'x' WHERE id = 1", "update", None),
    ("UPDATE orders SET tenant_id = 3, note = 'x' WHERE tenant_id = 3", "update", (L("3"),)),  # not moved
    ("UPDATE orders o SET total = i.total FROM items i WHERE i.tenant_id = o.tenant_id AND o.tenant_id = 4",
     "update", (L("4"),)),
    ("UPDATE orders o SET total = (SELECT sum(i.total) FROM items i WHERE i.tenant_id = o.tenant_id)",
     "update", None),
    ("DELETE FROM orders WHERE tenant_id IN (1, 2)", "delete", (L("1"), L("2"))),
    ("DELETE FROM orders", "delete", None),
    ("DELETE FROM orders o USING items i WHERE i.tenant_id = o.tenant_id AND i.sku = 'x' AND o.tenant_id = 5",
     "delete", (L("5"),)),
    ("DELETE FROM orders WHERE tenant_id = $1 RETURNING *", "delete", (P(1),)),
    ("WITH d AS (DELETE FROM orders WHERE tenant_id = 5 RETURNING *) SELECT count(*) FROM d", "delete", (L("5"),)),
    ("WITH u AS (UPDATE orders SET note = 'x' RETURNING *) SELECT * FROM u", "update", None),
])
def test_update_and_delete_keys_come_from_where(sql: str, statement: str, expected: object) -> None:
    finding = found(sql)
    assert finding.refusal is None
    assert (finding.statement, finding.keys) == (statement, expected)


@pytest.mark.parametrize("sql", [
    "UPDATE orders SET tenant_id = 4 WHERE tenant_id = 3",
    "UPDATE orders SET tenant_id = $1 WHERE id = $2",
    "UPDATE orders SET (tenant_id, note) = (4, 'x') WHERE tenant_id = 3",
    "UPDATE orders SET (tenant_id, note) = (SELECT 4, 'x') WHERE tenant_id = 3",
])
def test_update_changing_the_key_is_refused(sql: str) -> None:
    assert found(sql) == KeyFinding("update", None, ("orders",), (), refusal=(
        "0A000", "UPDATE of orders sets its sharding key tenant_id: moving rows between shards is not supported "
                 "(delete them and insert them again)"))


def test_writes_to_omnisharded_tables() -> None:
    assert found("UPDATE countries SET name = 'X' WHERE code = 'de'") == KeyFinding("update", None, (), ("countries",))
    assert found("DELETE FROM countries WHERE code = 'de'") == KeyFinding("delete", None, (), ("countries",))
    message = refusal("DELETE FROM countries WHERE code IN (SELECT country FROM orders WHERE tenant_id = 1)")
    assert message.startswith("a write to omnisharded table countries cannot read sharded table orders")
    assert "join of orders and items" in refusal("UPDATE orders o SET total = i.total FROM items i "
                                                 "WHERE i.order_id = o.id")


# --- other statements, bad SQL, several statements ---------------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT 1", KeyFinding("select", None, (), ())),
    ("SELECT * FROM users WHERE id = 1", KeyFinding("select", None, (), ())),
    ("SELECT * FROM countries", KeyFinding("select", None, (), ("countries",))),
    ("VALUES (1), (2)", KeyFinding("select", None, (), ())),
    ("BEGIN", KeyFinding("other", None, (), ())),
    ("SET search_path = app", KeyFinding("other", None, (), ())),
    ("CREATE INDEX ON orders (id)", KeyFinding("other", None, ("orders",), ())),
    ("TRUNCATE orders, countries", KeyFinding("other", None, ("orders",), ("countries",))),
])
def test_statements_without_keys(sql: str, expected: KeyFinding) -> None:
    assert found(sql) == expected


def test_merge_into_a_sharded_table_is_refused() -> None:
    finding = found("MERGE INTO orders o USING items i ON o.id = i.order_id WHEN MATCHED THEN DELETE")
    assert finding.statement == "other" and finding.refusal is not None
    assert finding.refusal[0] == "0A000" and "MERGE" in finding.refusal[1]


@pytest.mark.parametrize(("sql", "sharded", "omnisharded"), [
    ("SELEC * FROM orders WHERE tenant_id = 1", ("orders",), ()),
    ("UPDATE orders SET WHERE", ("orders",), ()),
    ('SELECT * FROM "orders", countries WHERE', ("orders",), ("countries",)),
    ("SELECT ((((", (), ()),
    ("", (), ()),
])
def test_bad_sql_is_left_to_the_caller(sql: str, sharded: tuple[str, ...], omnisharded: tuple[str, ...]) -> None:
    finding = found(sql)
    assert (finding.statement, finding.keys, finding.refusal) == ("other", None, None)
    assert (finding.sharded_tables, finding.omnisharded_tables) == (sharded, omnisharded)
    assert finding.parsed is (sql == "")


def test_deep_nesting_does_not_raise() -> None:
    sql = "SELECT * FROM orders WHERE tenant_id = " + "(" * 3000 + "1" + ")" * 3000
    assert found(sql).keys in (None, (L("1"),))


@pytest.mark.parametrize(("sql", "expected"), [
    ("BEGIN; UPDATE orders SET note = 'x' WHERE tenant_id = 1; COMMIT",
     KeyFinding("update", (L("1"),), ("orders",), ())),
    ("SELECT * FROM orders WHERE tenant_id = 1; SELECT * FROM orders WHERE tenant_id = 2",
     KeyFinding("select", (L("1"), L("2")), ("orders",), ())),
    ("SELECT 1; SELECT * FROM orders WHERE tenant_id = 2", KeyFinding("select", (L("2"),), ("orders",), ())),
    ("SELECT * FROM orders WHERE tenant_id = 1; SELECT * FROM orders", KeyFinding("select", None, ("orders",), ())),
    ("INSERT INTO orders (tenant_id) VALUES (1); SELECT * FROM orders WHERE tenant_id = 1",
     KeyFinding("insert", (L("1"),), ("orders",), ())),
])
def test_several_statements_share_their_shards(sql: str, expected: KeyFinding) -> None:
    assert found(sql) == expected


@pytest.mark.parametrize("sql", [
    "INSERT INTO orders (tenant_id) VALUES (1); SELECT * FROM orders WHERE tenant_id = 2",
    "INSERT INTO orders (tenant_id) VALUES (1), (2); SELECT 1",
    "INSERT INTO countries (code) VALUES ('it'); SELECT * FROM orders WHERE tenant_id = 1",
    "SELECT 1; UPDATE orders SET tenant_id = 2 WHERE tenant_id = 1",
])
def test_several_statements_that_would_write_on_the_wrong_shards_are_refused(sql: str) -> None:
    finding = found(sql)
    assert finding.refusal is not None and finding.refusal[0] == "0A000"


# --- tables sharded by a column, whatever the table ---------------------------------------------------


def test_any_table_with_the_column() -> None:
    columns = (ShardedColumn("org_id"), ShardedColumn("tenant_id", "orders"))
    omnisharded = frozenset({"plans"})
    assert find_keys("SELECT * FROM invoices WHERE org_id = 1", columns, omnisharded) == KeyFinding(
        "select", (L("1"),), ("invoices",), ())
    assert find_keys("SELECT * FROM invoices", columns, omnisharded).sharded_tables == ("invoices",)
    assert find_keys("SELECT * FROM orders WHERE tenant_id = 2", columns, omnisharded).keys == (L("2"),)
    assert find_keys("SELECT * FROM orders WHERE org_id = 2", columns, omnisharded).keys is None
    assert find_keys("SELECT * FROM plans", columns, omnisharded) == KeyFinding("select", None, (), ("plans",))
    for catalog in ("SELECT * FROM pg_class", "SELECT * FROM pg_catalog.pg_type", "SELECT * FROM information_schema.tables"):
        assert find_keys(catalog, columns, omnisharded) == KeyFinding("select", None, (), ())
    assert find_keys("INSERT INTO invoices (org_id, n) VALUES ($1, 1)", columns, omnisharded).insert == InsertPlan(
        (P(1),))
    assert find_keys("WITH x AS (SELECT 1 AS org_id) SELECT * FROM x", columns, omnisharded).sharded_tables == ()


def test_findings_are_plain_data() -> None:
    finding = found("INSERT INTO orders (tenant_id) VALUES ($1), ($2)")
    assert hash(finding) == hash(found("INSERT INTO orders (tenant_id) VALUES ($1), ($2)"))
    assert finding.insert == InsertPlan((P(1), P(2)))


# --- split_insert ------------------------------------------------------------------------------------


def parses(sql: str) -> None:
    """sqlglot's postgres dialect reads `sql` as one INSERT (after spacing out `$1,$2`, which its tokenizer
    takes for a dollar quote)."""
    statements = [s for s in POSTGRES.parse(_space_parameters(sql)[0]) if s is not None]
    assert len(statements) == 1 and isinstance(statements[0], exp.Insert)


def test_split_keeps_literals_exactly_and_renumbers_parameters() -> None:
    sql = ("INSERT INTO orders (tenant_id, note, amount) VALUES (1, 'it''s', 1.50), ($1, $2, 1e3), "
           "(E'a\\nb', $$d'q$$, -0.0), ($3, $2, $1) ON CONFLICT (tenant_id, id) DO UPDATE SET note = $4 RETURNING id")
    parts = split_insert(sql, [[0, 2], [1, 3]])
    assert parts == [
        ("INSERT INTO orders (tenant_id, note, amount) VALUES (1, 'it''s', 1.50), (E'a\\nb', $$d'q$$, -0.0) "
         "ON CONFLICT (tenant_id, id) DO UPDATE SET note = $1 RETURNING id", (4,)),
        ("INSERT INTO orders (tenant_id, note, amount) VALUES ($1, $2, 1e3), ($3, $2, $1) "
         "ON CONFLICT (tenant_id, id) DO UPDATE SET note = $4 RETURNING id", (1, 2, 3, 4)),
    ]
    for part, _ in parts:
        parses(part)


def test_split_keeps_with_comments_and_parameters_before_the_rows() -> None:
    sql = ("/* shardgate: primary */ WITH c AS (SELECT $5::text AS v) INSERT INTO public.orders AS o "
           "(tenant_id, note) VALUES ($1, $2), ($3, (SELECT v FROM c)) RETURNING o.id, $6")
    assert split_insert(sql, [[1], [0]]) == [
        ("/* shardgate: primary */ WITH c AS (SELECT $1::text AS v) INSERT INTO public.orders AS o "
         "(tenant_id, note) VALUES ($2, (SELECT v FROM c)) RETURNING o.id, $3", (5, 3, 6)),
        ("/* shardgate: primary */ WITH c AS (SELECT $1::text AS v) INSERT INTO public.orders AS o "
         "(tenant_id, note) VALUES ($2, $3) RETURNING o.id, $4", (5, 1, 2, 6)),
    ]


def test_split_of_parameters_without_spaces() -> None:
    sql = "insert into orders (tenant_id,note) values ($1,$2),($3,$4),($5,'x$1,$2')"
    parts = split_insert(sql, [[2, 0], [1]])
    assert parts == [
        ("insert into orders (tenant_id,note) values ($1,'x$1,$2'), ($2,$3)", (5, 1, 2)),
        ("insert into orders (tenant_id,note) values ($1,$2)", (3, 4)),
    ]
    for part, _ in parts:
        parses(part)
    assert _space_parameters("select $1,$2, '$3,' || $4||$$ $5,$$")[0] == "select $1 ,$2 , '$3,' || $4 ||$$ $5,$$"


def test_one_group_of_every_row_is_the_text_unchanged() -> None:
    sql = "INSERT INTO orders (tenant_id, note) VALUES ($2, $1), ($1, $4)  -- note"
    assert split_insert(sql, [[0, 1]]) == [(sql, (1, 2, 3, 4))]
    assert split_insert(sql, [[1, 0]]) == [(sql, (1, 2, 3, 4))]
    literal = "insert into orders (tenant_id) values (1)"
    assert split_insert(literal, [[0]]) == [(literal, ())]


def test_split_refuses_what_is_not_an_insert_values() -> None:
    for sql in ("SELECT 1", "INSERT INTO orders (tenant_id) SELECT 1", "SELECT 1; SELECT 2"):
        with pytest.raises(ValueError):
            split_insert(sql, [[0]])
    with pytest.raises(ValueError):
        split_insert("INSERT INTO orders (tenant_id) VALUES (1), (2)", [[0], [2]])


def test_split_regenerated_from_the_tree_when_the_rows_cannot_be_cut() -> None:
    insert = _parse("INSERT INTO orders (tenant_id, note) VALUES ($1, 'a'), ($2, E'b\\n'), (3, $3)")[0]
    assert isinstance(insert, exp.Insert)
    sql, order = _regenerated(insert, [1, 2])
    assert (sql, order) == ("INSERT INTO orders (tenant_id, note) VALUES ($1, e'b\\n'), (3, $2)", (2, 3))
    parses(sql)
