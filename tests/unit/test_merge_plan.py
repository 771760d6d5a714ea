"""Cross-shard SELECT planner: what each shard runs and how the merger combines the rows.

Expected plans are written from PostgreSQL's semantics (ORDER BY names resolve to output columns first,
GROUP BY names to input columns first, NULLS LAST for ASC and FIRST for DESC), not copied from output."""

from __future__ import annotations

import re

import pytest
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

from routing.errors import RoutingError
from routing.merge_plan import Aggregate, MergePlan, SortKey, plan_select

H1 = "_shardgate_hidden_1"
H2 = "_shardgate_hidden_2"
H3 = "_shardgate_hidden_3"
NOT_SUPPORTED = "0A000"


def _spaces(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def _refusal(sql: str) -> RoutingError:
    with pytest.raises(RoutingError) as caught:
        plan_select(sql)
    return caught.value


def _parses_as_one_select(sql: str) -> None:
    statements = [statement for statement in Postgres().parse(sql)
                  if statement is not None and not isinstance(statement, exp.Semicolon)]
    assert len(statements) == 1
    assert isinstance(statements[0], exp.Select)


# --- plain SELECTs: the client's text, rows concatenated -------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a, b FROM t WHERE tenant = $1",
        "select * from t",
        "/* app: list */ SELECT a -- why\n FROM t WHERE b > $2 AND c = 'x'",
        "SELECT a FROM t LIMIT ALL",
        "SELECT a FROM t OFFSET 0",
        "SELECT a FROM t FOR UPDATE",
        "SELECT 1",
        "SELECT now()",
        "TABLE t",
        "VALUES (1), (2)",
        "(SELECT a FROM t)",
        "SELECT (SELECT count(*) FROM u) AS n, a FROM t",  # a subquery's aggregate is the caller's concern
        "WITH c AS (SELECT a FROM t) SELECT a FROM c",
        "SELECT a FROM t;",
        "",
    ],
)
def test_plain_select_is_sent_as_written_and_concatenated(sql: str) -> None:
    shard_sql, plan = plan_select(sql)
    assert shard_sql == sql
    assert plan == MergePlan()
    assert plan.concatenates


def test_concatenates_only_without_order_limit_offset_grouping_aggregates_or_distinct() -> None:
    assert MergePlan().concatenates
    assert MergePlan(visible_columns=2).concatenates
    assert not MergePlan(order_by=(SortKey(0),)).concatenates
    assert not MergePlan(limit=0).concatenates
    assert not MergePlan(offset=3).concatenates
    assert not MergePlan(group_by=()).concatenates
    assert not MergePlan(aggregates=(Aggregate(0, "count"),)).concatenates
    assert not MergePlan(distinct=True).concatenates


# --- ORDER BY --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "keys"),
    [
        ("SELECT a, b FROM t ORDER BY b", (SortKey(1),)),
        ("SELECT a, b FROM t ORDER BY b DESC, a", (SortKey(1, True, True), SortKey(0))),
        ("SELECT a, b FROM t ORDER BY b ASC", (SortKey(1),)),
        ("SELECT a, b FROM t ORDER BY b NULLS FIRST", (SortKey(1, False, True),)),
        ("SELECT a, b FROM t ORDER BY b DESC NULLS LAST", (SortKey(1, True, False),)),
        ("SELECT a, b FROM t ORDER BY b ASC NULLS LAST, a DESC NULLS FIRST", (SortKey(1), SortKey(0, True, True))),
        ("SELECT a, b FROM t ORDER BY 2, 1 DESC", (SortKey(1), SortKey(0, True, True))),
        ("SELECT a, b FROM t ORDER BY (2)", (SortKey(1),)),
        ("SELECT a AS x, b FROM t ORDER BY x", (SortKey(0),)),
        ('SELECT a AS "X", b FROM t ORDER BY "X"', (SortKey(0),)),
        ("SELECT t.a, b FROM t ORDER BY a", (SortKey(0),)),  # the output column named a
        ("SELECT A FROM t ORDER BY a", (SortKey(0),)),  # unquoted names are case-insensitive
        ("SELECT lower(b), a FROM t ORDER BY LOWER(B)", (SortKey(0),)),
        ("SELECT a + 1, b FROM t ORDER BY (a + 1) DESC", (SortKey(0, True, True),)),
        # An ORDER BY name is an output column first: `a` here is the alias of b, not the column a.
        ("SELECT b AS a, a AS c FROM t ORDER BY a", (SortKey(0),)),
        # A name no output column has is an input column: a is the expression of item 0.
        ("SELECT a AS b FROM t ORDER BY a", (SortKey(0),)),
        ("SELECT a, a AS x FROM t ORDER BY x, 1", (SortKey(1), SortKey(0))),
        ("SELECT a, * FROM t ORDER BY 1, a DESC", (SortKey(0), SortKey(0, True, True))),
    ],
)
def test_order_by_on_selected_columns(sql: str, keys: tuple[SortKey, ...]) -> None:
    shard_sql, plan = plan_select(sql)
    assert shard_sql == sql
    assert plan == MergePlan(order_by=keys)
    assert not plan.concatenates


@pytest.mark.parametrize(
    ("sql", "key"),
    [
        ('SELECT name FROM t ORDER BY name COLLATE "C"', SortKey(0, collation="C")),
        ('SELECT name FROM t ORDER BY name COLLATE "de_DE" DESC', SortKey(0, True, True, "de_DE")),
        ('SELECT name FROM t ORDER BY name COLLATE pg_catalog."C"', SortKey(0, collation="C")),
        ('SELECT name FROM t ORDER BY name COLLATE "default"', SortKey(0)),
        ("SELECT name FROM t ORDER BY name COLLATE C", SortKey(0, collation="c")),  # unquoted: lower-cased
        ('SELECT name FROM t ORDER BY name COLLATE app."sv_SE"', SortKey(0, collation="app.sv_SE")),
        ('SELECT name COLLATE "C" AS n FROM t ORDER BY n', SortKey(0, collation="C")),
        ('SELECT name COLLATE "C" FROM t ORDER BY 1 DESC', SortKey(0, True, True, "C")),
        ('SELECT name COLLATE "C" FROM t ORDER BY name COLLATE "C"', SortKey(0, collation="C")),
    ],
)
def test_order_by_collation(sql: str, key: SortKey) -> None:
    assert plan_select(sql) == (sql, MergePlan(order_by=(key,)))


@pytest.mark.parametrize(
    ("sql", "shard_sql", "keys", "visible"),
    [
        ("SELECT a FROM t ORDER BY b", f"SELECT a, b AS {H1} FROM t ORDER BY b", (SortKey(1),), 1),
        ("SELECT a, b FROM t ORDER BY c DESC, b",
         f"SELECT a, b, c AS {H1} FROM t ORDER BY c DESC, b", (SortKey(2, True, True), SortKey(1)), 2),
        # the same hidden expression twice is one column
        ("SELECT a FROM t ORDER BY lower(b), LOWER(b) DESC",
         f"SELECT a, lower(b) AS {H1} FROM t ORDER BY lower(b), LOWER(b) DESC",
         (SortKey(1), SortKey(1, True, True)), 1),
        ('SELECT a FROM t ORDER BY b COLLATE "C" DESC NULLS LAST',
         f'SELECT a, b COLLATE "C" AS {H1} FROM t ORDER BY b COLLATE "C" DESC NULLS LAST',
         (SortKey(1, True, False, "C"),), 1),
        ("SELECT a FROM t ORDER BY t.a", f"SELECT a, t.a AS {H1} FROM t ORDER BY t.a", (SortKey(1),), 1),
        ("SELECT id FROM items ORDER BY embedding <-> $1",
         f"SELECT id, embedding <-> $1 AS {H1} FROM items ORDER BY embedding <-> $1", (SortKey(1),), 1),
        # comments and the statement's end stay where they were
        ("SELECT a /* first */, b -- last\n FROM t ORDER BY c;",
         f"SELECT a /* first */, b, c AS {H1} -- last\n FROM t ORDER BY c;", (SortKey(2),), 2),
        ("WITH c AS (SELECT a, b FROM t) SELECT a FROM c ORDER BY b",
         f"WITH c AS (SELECT a, b FROM t) SELECT a, b AS {H1} FROM c ORDER BY b", (SortKey(1),), 1),
        ("SELECT a IS DISTINCT FROM b, c FROM t ORDER BY d",
         f"SELECT a IS DISTINCT FROM b, c, d AS {H1} FROM t ORDER BY d", (SortKey(2),), 2),
        ("SELECT ARRAY[1, 2], x[1] FROM t ORDER BY y",
         f"SELECT ARRAY[1, 2], x[1], y AS {H1} FROM t ORDER BY y", (SortKey(2),), 2),
        ("SELECT FROM t ORDER BY a", f"SELECT a AS {H1} FROM t ORDER BY a", (SortKey(0),), 0),
    ],
)
def test_order_by_expression_not_selected_is_appended_hidden(
        sql: str, shard_sql: str, keys: tuple[SortKey, ...], visible: int) -> None:
    assert plan_select(sql) == (shard_sql, MergePlan(order_by=keys, visible_columns=visible))
    _parses_as_one_select(shard_sql)


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT * FROM t ORDER BY a", "select list has *: list the columns"),
        ("SELECT * FROM t ORDER BY 1", "after * in the select list"),
        ("SELECT t.* FROM t ORDER BY t.a", "select list has *"),
        ("SELECT a, * FROM t ORDER BY 2", "after * in the select list"),
        ("SELECT *, a FROM t ORDER BY a", "after * in the select list"),
        ("SELECT DISTINCT a FROM t ORDER BY b", "of a SELECT DISTINCT across shards must be one of the selected"),
        ("SELECT DISTINCT count(*) FROM t GROUP BY a ORDER BY a", "SELECT DISTINCT"),
    ],
)
def test_order_by_that_needs_a_hidden_column_it_cannot_have_is_refused(sql: str, fragment: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == NOT_SUPPORTED
    assert fragment in str(error)


@pytest.mark.parametrize(
    ("sql", "sqlstate", "message"),
    [
        ("SELECT a FROM t ORDER BY 2", "42P10", "ORDER BY position 2 is not in select list"),
        ("SELECT a FROM t ORDER BY 0", "42P10", "ORDER BY position 0 is not in select list"),
        ("SELECT a FROM t ORDER BY -1", "42P10", "ORDER BY position -1 is not in select list"),
        ("SELECT a FROM t ORDER BY 'a'", "42601", "non-integer constant in ORDER BY"),
        ("SELECT a FROM t ORDER BY 1.5", "42601", "non-integer constant in ORDER BY"),
        ("SELECT a AS x, b AS x FROM t ORDER BY x", "42702", 'ORDER BY "x" is ambiguous'),
        ("SELECT a FROM t GROUP BY 3", "42P10", "GROUP BY position 3 is not in select list"),
        ("SELECT a FROM t GROUP BY 'a'", "42601", "non-integer constant in GROUP BY"),
        ("SELECT a, count(*) FROM t GROUP BY 2", "42803", "aggregate functions are not allowed in GROUP BY"),
        ("SELECT a FROM t GROUP BY count(*)", "42803", "aggregate functions are not allowed in GROUP BY"),
    ],
)
def test_mistakes_get_the_error_postgresql_gives(sql: str, sqlstate: str, message: str) -> None:
    error = _refusal(sql)
    assert (error.sqlstate, str(error)) == (sqlstate, message)


# --- LIMIT / OFFSET --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "shard_sql", "plan"),
    [
        ("SELECT a FROM t LIMIT 10", "SELECT a FROM t LIMIT 10", MergePlan(limit=10)),
        ("SELECT a FROM t ORDER BY a LIMIT 10", "SELECT a FROM t ORDER BY a LIMIT 10",
         MergePlan(order_by=(SortKey(0),), limit=10)),
        ("SELECT a FROM t ORDER BY a LIMIT 10 OFFSET 5", "SELECT a FROM t ORDER BY a LIMIT 15",
         MergePlan(order_by=(SortKey(0),), limit=10, offset=5)),
        ("SELECT a FROM t ORDER BY a OFFSET 5 LIMIT 10", "SELECT a FROM t ORDER BY a LIMIT 15",
         MergePlan(order_by=(SortKey(0),), limit=10, offset=5)),
        ("SELECT a FROM t LIMIT 10 OFFSET 0", "SELECT a FROM t LIMIT 10 OFFSET 0", MergePlan(limit=10)),
        ("SELECT a FROM t ORDER BY a OFFSET 5", "SELECT a FROM t ORDER BY a",
         MergePlan(order_by=(SortKey(0),), offset=5)),
        ("SELECT a FROM t OFFSET 5 ROWS", "SELECT a FROM t", MergePlan(offset=5)),
        ("SELECT a FROM t LIMIT ALL OFFSET 2", "SELECT a FROM t", MergePlan(offset=2)),
        ("SELECT a FROM t LIMIT NULL", "SELECT a FROM t LIMIT NULL", MergePlan()),
        ("SELECT a FROM t LIMIT 0 OFFSET 3", "SELECT a FROM t LIMIT 0", MergePlan(limit=0, offset=3)),
        ("SELECT a FROM t LIMIT (4) OFFSET (1)", "SELECT a FROM t LIMIT 5", MergePlan(limit=4, offset=1)),
        ("SELECT a FROM t FETCH FIRST 3 ROWS ONLY", "SELECT a FROM t FETCH FIRST 3 ROWS ONLY", MergePlan(limit=3)),
        ("SELECT a FROM t FETCH NEXT ROW ONLY", "SELECT a FROM t FETCH NEXT ROW ONLY", MergePlan(limit=1)),
        ("SELECT a FROM t ORDER BY a OFFSET 2 ROWS FETCH FIRST 3 ROWS ONLY", "SELECT a FROM t ORDER BY a LIMIT 5",
         MergePlan(order_by=(SortKey(0),), limit=3, offset=2)),
        ("SELECT a FROM t ORDER BY a LIMIT 2 OFFSET 2; -- page 2", "SELECT a FROM t ORDER BY a LIMIT 4; -- page 2",
         MergePlan(order_by=(SortKey(0),), limit=2, offset=2)),
        ("SELECT a FROM t WHERE b = $1 ORDER BY a DESC LIMIT 20 OFFSET 40",
         "SELECT a FROM t WHERE b = $1 ORDER BY a DESC LIMIT 60",
         MergePlan(order_by=(SortKey(0, True, True),), limit=20, offset=40)),
        # LIMIT + OFFSET past bigint: the shards return every row
        ("SELECT a FROM t ORDER BY a LIMIT 9223372036854775807 OFFSET 1", "SELECT a FROM t ORDER BY a",
         MergePlan(order_by=(SortKey(0),), limit=9223372036854775807, offset=1)),
        ("SELECT a FROM t ORDER BY b LIMIT 5 OFFSET 5", f"SELECT a, b AS {H1} FROM t ORDER BY b LIMIT 10",
         MergePlan(order_by=(SortKey(1),), limit=5, offset=5, visible_columns=1)),
    ],
)
def test_limit_is_pushed_down_as_limit_plus_offset(sql: str, shard_sql: str, plan: MergePlan) -> None:
    assert plan_select(sql) == (shard_sql, plan)
    _parses_as_one_select(shard_sql)


@pytest.mark.parametrize(
    ("sql", "sqlstate", "fragment"),
    [
        ("SELECT a FROM t LIMIT $1", NOT_SUPPORTED, "LIMIT with a parameter across shards is not supported"),
        ("SELECT a FROM t ORDER BY a LIMIT 10 OFFSET $2", NOT_SUPPORTED, "OFFSET with a parameter across shards"),
        ("SELECT a FROM t LIMIT $1::int", NOT_SUPPORTED, "LIMIT with a parameter across shards"),
        ("SELECT a FROM t FETCH FIRST $1 ROWS ONLY", NOT_SUPPORTED, "FETCH FIRST with a parameter across shards"),
        ("SELECT count(*) FROM t LIMIT $1", NOT_SUPPORTED, "LIMIT with a parameter across shards"),
        ("SELECT a FROM t LIMIT 1 + 1", NOT_SUPPORTED, "must be a whole number written in the statement"),
        ("SELECT a FROM t LIMIT 2.5", NOT_SUPPORTED, "must be a whole number written in the statement"),
        ("SELECT a FROM t ORDER BY a FETCH FIRST 3 ROWS WITH TIES", NOT_SUPPORTED, "WITH TIES"),
        ("SELECT a FROM t LIMIT -1", "2201W", "LIMIT must not be negative"),
        ("SELECT a FROM t OFFSET -1", "2201X", "OFFSET must not be negative"),
        ("SELECT a FROM t LIMIT 9223372036854775808", "22003", "bigint out of range"),
    ],
)
def test_limits_that_cannot_be_planned(sql: str, sqlstate: str, fragment: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == sqlstate
    assert fragment in str(error)


# --- aggregates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "aggregates"),
    [
        ("SELECT count(*) FROM t", (Aggregate(0, "count"),)),
        ("SELECT count(x), sum(y), min(z), max(w) FROM t",
         (Aggregate(0, "count"), Aggregate(1, "sum"), Aggregate(2, "min"), Aggregate(3, "max"))),
        ("SELECT bool_and(a), bool_or(b), every(c) FROM t",
         (Aggregate(0, "bool_and"), Aggregate(1, "bool_or"), Aggregate(2, "bool_and"))),
        ("SELECT COUNT(*) AS n, SUM(x) total FROM t WHERE tenant = $1", (Aggregate(0, "count"), Aggregate(1, "sum"))),
        ("SELECT count(*) FILTER (WHERE paid), sum(x) FILTER (WHERE x > $1) FROM t",
         (Aggregate(0, "count"), Aggregate(1, "sum"))),
        ("SELECT min(DISTINCT x), max(DISTINCT y), bool_or(DISTINCT b) FROM t",  # DISTINCT changes nothing there
         (Aggregate(0, "min"), Aggregate(1, "max"), Aggregate(2, "bool_or"))),
        ("SELECT count(ALL x) FROM t", (Aggregate(0, "count"),)),
        ("SELECT (count(*)) FROM t", (Aggregate(0, "count"),)),
        ('SELECT min(name COLLATE "C"), max(name) FROM t',
         (Aggregate(0, "min", collation="C"), Aggregate(1, "max"))),
        ("SELECT 'total', count(*) FROM t", (Aggregate(1, "count"),)),
        ("SELECT count(*)", (Aggregate(0, "count"),)),  # without FROM: the caller decides where it goes
    ],
)
def test_aggregates_over_all_rows(sql: str, aggregates: tuple[Aggregate, ...]) -> None:
    shard_sql, plan = plan_select(sql)
    assert shard_sql == sql
    assert plan == MergePlan(aggregates=aggregates)
    assert plan.group_by is None  # one group over every shard's rows
    assert not plan.concatenates


@pytest.mark.parametrize(
    ("sql", "shard_sql", "plan"),
    [
        ("SELECT avg(x) FROM t", f"SELECT sum(x) AS avg, count(x) AS {H1} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT AVG(x) FROM t", f"SELECT sum(x) AS avg, count(x) AS {H1} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT avg(x) AS mean FROM t", f"SELECT sum(x) AS mean, count(x) AS {H1} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT avg(x) mean FROM t", f"SELECT sum(x) mean, count(x) AS {H1} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT avg(price * qty) FILTER (WHERE qty > $1) AS m, count(*) FROM t WHERE tenant = $2",
         f"SELECT sum(price * qty) FILTER (WHERE qty > $1) AS m, count(*), "
         f"count(price * qty) FILTER (WHERE qty > $1) AS {H1} FROM t WHERE tenant = $2",
         MergePlan(aggregates=(Aggregate(0, "avg", 2), Aggregate(1, "count")), visible_columns=2)),
        ("SELECT avg(a), avg(b) FROM t",
         f"SELECT sum(a) AS avg, sum(b) AS avg, count(a) AS {H1}, count(b) AS {H2} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 2), Aggregate(1, "avg", 3)), visible_columns=2)),
        ("SELECT avg(x ORDER BY y) FROM t", f"SELECT sum(x ORDER BY y) AS avg, count(x ORDER BY y) AS {H1} FROM t",
         MergePlan(aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT avg(x) ORDER BY 1", f"SELECT sum(x) AS avg, count(x) AS {H1}",
         MergePlan(order_by=(SortKey(0),), aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
    ],
)
def test_avg_is_sent_as_sum_and_a_hidden_count(sql: str, shard_sql: str, plan: MergePlan) -> None:
    assert plan_select(sql) == (shard_sql, plan)
    _parses_as_one_select(shard_sql)


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT count(DISTINCT x) FROM t", "count(DISTINCT x) across shards cannot be merged: the same value can"),
        ("SELECT count(DISTINCT x) FILTER (WHERE y) FROM t", "count(DISTINCT x) FILTER(WHERE y) across shards"),
        ("SELECT sum(DISTINCT x) FROM t", "sum(DISTINCT x) across shards cannot be merged"),
        ("SELECT avg(DISTINCT x) FROM t", "avg(DISTINCT x) across shards cannot be merged"),
        ("SELECT string_agg(x, ',') FROM t", "string_agg(x, ',') across shards cannot be merged: the shards' lists"),
        ("SELECT array_agg(x ORDER BY y) FROM t", "array_agg(x ORDER BY y) across shards cannot be merged"),
        ("SELECT json_agg(x) FROM t", "json_agg(x) across shards cannot be merged"),
        ("SELECT jsonb_agg(x) FROM t", "jsonb_agg(x) across shards cannot be merged"),
        ("SELECT jsonb_object_agg(k, v) FROM t", "jsonb_object_agg(k, v) across shards cannot be merged"),
        ("SELECT xmlagg(x) FROM t", "xmlagg(x) across shards cannot be merged"),
        ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", "needs all the rows in one place"),
        ("SELECT percentile_disc(0.9) WITHIN GROUP (ORDER BY x) FROM t", "needs all the rows in one place"),
        ("SELECT mode() WITHIN GROUP (ORDER BY x) FROM t", "needs all the rows in one place"),
        ("SELECT stddev(x) FROM t", "stddev(x) across shards cannot be merged"),
        ("SELECT var_pop(x) FROM t", "var_pop(x) across shards cannot be merged"),
        ("SELECT corr(x, y) FROM t", "corr(x, y) across shards cannot be merged"),
        ("SELECT bit_and(x) FROM t", "only count, sum, min, max, avg, bool_and, bool_or and every"),
        ("SELECT a, string_agg(b, ',') FROM t GROUP BY a", "string_agg(b, ',') across shards"),
        ("SELECT a FROM t ORDER BY count(DISTINCT b)", "count(DISTINCT b) across shards"),
        ("SELECT pg_catalog.count(*) FROM t", "schema-qualified aggregate"),
        # an aggregate inside an expression would be computed on each shard's partial result
        ("SELECT sum(x) + 1 FROM t", "an aggregate inside an expression (sum(x) + 1)"),
        ("SELECT count(*) * 2 FROM t", "an aggregate inside an expression (count(*) * 2)"),
        ("SELECT count(*)::int FROM t", "an aggregate inside an expression"),
        ("SELECT coalesce(sum(x), 0) FROM t", "an aggregate inside an expression"),
        ("SELECT sum(x) / count(x) FROM t", "an aggregate inside an expression"),
        ("SELECT a, count(*) FROM t GROUP BY a ORDER BY count(*) + 1", "an aggregate inside an expression"),
        ("SELECT (avg(x)) FROM t", "write it as avg(expression)"),
    ],
)
def test_aggregates_that_cannot_be_merged_are_refused(sql: str, fragment: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == NOT_SUPPORTED
    assert fragment in str(error)


# --- GROUP BY --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "group_by", "aggregates"),
    [
        ("SELECT a, count(*) FROM t GROUP BY a", (0,), (Aggregate(1, "count"),)),
        ("SELECT count(*), a FROM t GROUP BY 2", (1,), (Aggregate(0, "count"),)),
        ("SELECT a, b, sum(x) FROM t GROUP BY b, a", (1, 0), (Aggregate(2, "sum"),)),
        ("SELECT a, b, sum(x) FROM t GROUP BY a, 1, A, b", (0, 1), (Aggregate(2, "sum"),)),
        ("SELECT lower(b), max(x) FROM t GROUP BY LOWER(b)", (0,), (Aggregate(1, "max"),)),
        # an alias whose expression has no column of its name: no input column is named so, the alias it is
        ("SELECT date_trunc('day', ts) AS day, count(*) FROM t GROUP BY day", (0,), (Aggregate(1, "count"),)),
        ("SELECT a + 1 AS b, count(*) FROM t GROUP BY b", (0,), (Aggregate(1, "count"),)),
        # the alias b is not the input column a
        ("SELECT a AS b, b AS a, count(*) FROM t GROUP BY a", (0,), (Aggregate(2, "count"),)),
        ("SELECT a FROM t GROUP BY a", (0,), ()),
        ("SELECT DISTINCT a FROM t GROUP BY DISTINCT a", (0,), ()),
    ],
)
def test_group_by_on_selected_columns(sql: str, group_by: tuple[int, ...], aggregates: tuple[Aggregate, ...]) -> None:
    shard_sql, plan = plan_select(sql)
    assert shard_sql == sql
    assert plan.group_by == group_by
    assert plan.aggregates == aggregates
    assert plan.visible_columns is None


@pytest.mark.parametrize(
    ("sql", "shard_sql", "plan"),
    [
        ("SELECT count(*) FROM t GROUP BY a", f"SELECT count(*), a AS {H1} FROM t GROUP BY a",
         MergePlan(group_by=(1,), aggregates=(Aggregate(0, "count"),), visible_columns=1)),
        ("SELECT sum(x) FROM t GROUP BY a, lower(b)",
         f"SELECT sum(x), a AS {H1}, lower(b) AS {H2} FROM t GROUP BY a, lower(b)",
         MergePlan(group_by=(1, 2), aggregates=(Aggregate(0, "sum"),), visible_columns=1)),
        ("SELECT t.a, count(*) FROM t GROUP BY a", f"SELECT t.a, count(*), a AS {H1} FROM t GROUP BY a",
         MergePlan(group_by=(2,), aggregates=(Aggregate(1, "count"),), visible_columns=2)),
        # PostgreSQL groups `GROUP BY name` by the input column name, not by the alias lower(name)
        ("SELECT lower(name) AS name, count(*) FROM users GROUP BY name",
         f"SELECT lower(name) AS name, count(*), name AS {H1} FROM users GROUP BY name",
         MergePlan(group_by=(2,), aggregates=(Aggregate(1, "count"),), visible_columns=2)),
        # an alias of an aggregate cannot be a group key: a is the input column
        ("SELECT count(*) AS a FROM t GROUP BY a", f"SELECT count(*) AS a, a AS {H1} FROM t GROUP BY a",
         MergePlan(group_by=(1,), aggregates=(Aggregate(0, "count"),), visible_columns=1)),
        ("SELECT avg(b) AS m FROM t GROUP BY a", f"SELECT sum(b) AS m, count(b) AS {H1}, a AS {H2} FROM t GROUP BY a",
         MergePlan(group_by=(2,), aggregates=(Aggregate(0, "avg", 1),), visible_columns=1)),
        ("SELECT a, avg(x), max(y) FROM t GROUP BY a",
         f"SELECT a, sum(x) AS avg, max(y), count(x) AS {H1} FROM t GROUP BY a",
         MergePlan(group_by=(0,), aggregates=(Aggregate(1, "avg", 3), Aggregate(2, "max")), visible_columns=3)),
    ],
)
def test_group_by_expression_not_selected_is_appended_hidden(sql: str, shard_sql: str, plan: MergePlan) -> None:
    assert plan_select(sql) == (shard_sql, plan)
    _parses_as_one_select(shard_sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a, b, count(*) FROM t GROUP BY ROLLUP (a, b)",
        "SELECT a, b, count(*) FROM t GROUP BY CUBE (a, b)",
        "SELECT a, b, count(*) FROM t GROUP BY GROUPING SETS ((a), (b), ())",
        "SELECT count(*) FROM t GROUP BY ()",
        "SELECT a, b, count(*) FROM t GROUP BY (a, b)",
    ],
)
def test_grouping_sets_are_refused(sql: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == NOT_SUPPORTED
    assert "GROUPING SETS, ROLLUP, CUBE" in str(error)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1",
        "SELECT a FROM t GROUP BY a HAVING a > 1",
        "SELECT count(*) FROM t HAVING count(*) > 0",
    ],
)
def test_having_is_refused(sql: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == NOT_SUPPORTED
    assert str(error).startswith("HAVING across shards cannot be merged: each shard would filter its own partial")


# --- DISTINCT --------------------------------------------------------------------------------------


def test_distinct() -> None:
    assert plan_select("SELECT DISTINCT a, b FROM t") == ("SELECT DISTINCT a, b FROM t", MergePlan(distinct=True))
    assert plan_select("SELECT DISTINCT * FROM t") == ("SELECT DISTINCT * FROM t", MergePlan(distinct=True))
    assert plan_select("SELECT DISTINCT a FROM t ORDER BY a LIMIT 5 OFFSET 5") == (
        "SELECT DISTINCT a FROM t ORDER BY a LIMIT 10",
        MergePlan(order_by=(SortKey(0),), limit=5, offset=5, distinct=True))
    assert plan_select("SELECT DISTINCT a AS x FROM t ORDER BY x DESC") == (
        "SELECT DISTINCT a AS x FROM t ORDER BY x DESC", MergePlan(order_by=(SortKey(0, True, True),), distinct=True))


def test_distinct_with_aggregates_plans_both() -> None:
    assert plan_select("SELECT DISTINCT count(*) FROM t GROUP BY a") == (
        f"SELECT DISTINCT count(*), a AS {H1} FROM t GROUP BY a",
        MergePlan(group_by=(1,), aggregates=(Aggregate(0, "count"),), distinct=True, visible_columns=1))


def test_distinct_on_is_refused() -> None:
    error = _refusal("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b")
    assert error.sqlstate == NOT_SUPPORTED
    assert str(error).startswith("SELECT DISTINCT ON across shards is not supported")


# --- combinations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "shard_sql", "plan"),
    [
        # grouped rows are sorted and limited at the proxy after combining: the shards return every group
        ("SELECT a, count(*) FROM t GROUP BY a ORDER BY 2 DESC, a LIMIT 10 OFFSET 5",
         "SELECT a, count(*) FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1, True, True), SortKey(0)), limit=10, offset=5, group_by=(0,),
                   aggregates=(Aggregate(1, "count"),))),
        ("SELECT a, count(*) FROM t GROUP BY a ORDER BY count DESC",
         "SELECT a, count(*) FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1, True, True),), group_by=(0,), aggregates=(Aggregate(1, "count"),))),
        ("SELECT a, max(b) m FROM t GROUP BY a ORDER BY m DESC NULLS LAST FETCH FIRST 3 ROWS ONLY",
         "SELECT a, max(b) m FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1, True, False),), limit=3, group_by=(0,), aggregates=(Aggregate(1, "max"),))),
        ("SELECT a, sum(x) AS s FROM t GROUP BY a ORDER BY sum(x)",
         "SELECT a, sum(x) AS s FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1),), group_by=(0,), aggregates=(Aggregate(1, "sum"),))),
        ("SELECT a, avg(x) FROM t GROUP BY a ORDER BY 2 DESC LIMIT 3",
         f"SELECT a, sum(x) AS avg, count(x) AS {H1} FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1, True, True),), limit=3, group_by=(0,),
                   aggregates=(Aggregate(1, "avg", 2),), visible_columns=2)),
        # a group key that is not selected, ordered by: one hidden column serves both
        ("SELECT count(*) FROM t GROUP BY a ORDER BY a LIMIT 1",
         f"SELECT count(*), a AS {H1} FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1),), limit=1, group_by=(1,), aggregates=(Aggregate(0, "count"),),
                   visible_columns=1)),
        # an aggregate that is only in ORDER BY is appended hidden
        ("SELECT a FROM t GROUP BY a ORDER BY count(*) DESC LIMIT 5",
         f"SELECT a, count(*) AS {H1} FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(1, True, True),), limit=5, group_by=(0,),
                   aggregates=(Aggregate(1, "count"),), visible_columns=1)),
        ("SELECT a, sum(y) FROM t GROUP BY a ORDER BY avg(y)",
         f"SELECT a, sum(y), sum(y) AS {H1}, count(y) AS {H2} FROM t GROUP BY a",
         MergePlan(order_by=(SortKey(2),), group_by=(0,),
                   aggregates=(Aggregate(1, "sum"), Aggregate(2, "avg", 3)), visible_columns=2)),
        ("SELECT a, avg(x) FROM t GROUP BY a, b ORDER BY b, max(z)",
         f"SELECT a, sum(x) AS avg, count(x) AS {H1}, b AS {H2}, max(z) AS {H3} FROM t GROUP BY a, b",
         MergePlan(order_by=(SortKey(3), SortKey(4)), group_by=(0, 3),
                   aggregates=(Aggregate(1, "avg", 2), Aggregate(4, "max")), visible_columns=2)),
        ("SELECT DISTINCT a, count(*) FROM t GROUP BY a, b ORDER BY 2 DESC LIMIT 1 OFFSET 1",
         f"SELECT DISTINCT a, count(*), b AS {H1} FROM t GROUP BY a, b",
         MergePlan(order_by=(SortKey(1, True, True),), limit=1, offset=1, group_by=(0, 2),
                   aggregates=(Aggregate(1, "count"),), distinct=True, visible_columns=2)),
        # an aggregate over all rows with LIMIT/OFFSET: the one merged row is limited at the proxy
        ("SELECT count(*) FROM t LIMIT 1 OFFSET 1", "SELECT count(*) FROM t",
         MergePlan(limit=1, offset=1, aggregates=(Aggregate(0, "count"),))),
        ("SELECT 1 FROM t ORDER BY avg(x) DESC",
         f"SELECT 1, sum(x) AS {H1}, count(x) AS {H2} FROM t",
         MergePlan(order_by=(SortKey(1, True, True),), aggregates=(Aggregate(1, "avg", 2),), visible_columns=1)),
        ("SELECT a FROM t GROUP BY a LIMIT 5", "SELECT a FROM t GROUP BY a", MergePlan(limit=5, group_by=(0,))),
        ("SELECT a, count(*) FROM t GROUP BY a ORDER BY 2 LIMIT 2 -- top two\n",
         "SELECT a, count(*) FROM t GROUP BY a -- top two\n",
         MergePlan(order_by=(SortKey(1),), limit=2, group_by=(0,), aggregates=(Aggregate(1, "count"),))),
        ("SELECT count(*) ORDER BY 1", "SELECT count(*)",
         MergePlan(order_by=(SortKey(0),), aggregates=(Aggregate(0, "count"),))),
        ("SELECT date_trunc('day', ts) AS day, count(*) FROM t WHERE ts > $1 GROUP BY day ORDER BY day",
         "SELECT date_trunc('day', ts) AS day, count(*) FROM t WHERE ts > $1 GROUP BY day",
         MergePlan(order_by=(SortKey(0),), group_by=(0,), aggregates=(Aggregate(1, "count"),))),
    ],
)
def test_group_by_with_order_by_and_limit(sql: str, shard_sql: str, plan: MergePlan) -> None:
    assert plan_select(sql) == (shard_sql, plan)
    _parses_as_one_select(shard_sql)


def test_parenthesized_select_is_planned_when_its_text_needs_no_change() -> None:
    assert plan_select("(SELECT a FROM t ORDER BY a LIMIT 3)") == (
        "(SELECT a FROM t ORDER BY a LIMIT 3)", MergePlan(order_by=(SortKey(0),), limit=3))
    assert plan_select("((SELECT count(*) FROM t))") == (
        "((SELECT count(*) FROM t))", MergePlan(aggregates=(Aggregate(0, "count"),)))


def test_order_by_with_row_locks_is_planned() -> None:
    assert plan_select("SELECT a FROM t ORDER BY a FOR UPDATE") == (
        "SELECT a FROM t ORDER BY a FOR UPDATE", MergePlan(order_by=(SortKey(0),)))


# --- what cannot be merged -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT a, row_number() OVER (ORDER BY a) FROM t", "window functions across shards cannot be merged"),
        ("SELECT sum(x) OVER (PARTITION BY a) FROM t", "window functions across shards"),
        ("SELECT a FROM t ORDER BY rank() OVER (ORDER BY b)", "window functions across shards"),
        ("SELECT a FROM t WINDOW w AS (ORDER BY a)", "window functions across shards"),
        ("SELECT * FROM (SELECT a, lag(a) OVER () FROM t) s", "window functions across shards"),
        ("SELECT a FROM t UNION SELECT a FROM u", "UNION across shards is not supported"),
        ("SELECT a FROM t UNION ALL SELECT a FROM u", "UNION ALL across shards is not supported"),
        ("SELECT a FROM t INTERSECT SELECT a FROM u", "INTERSECT across shards is not supported"),
        ("SELECT a FROM t EXCEPT SELECT a FROM u", "EXCEPT across shards is not supported"),
        ("SELECT a FROM t UNION SELECT a FROM u ORDER BY 1 LIMIT 3", "UNION across shards"),
        ("SELECT count(*) FROM t FOR UPDATE", "not allowed with aggregates"),
        ("SELECT a FROM t GROUP BY a FOR SHARE", "not allowed with aggregates, GROUP BY or DISTINCT"),
        ("SELECT DISTINCT a FROM t FOR UPDATE", "not allowed with aggregates, GROUP BY or DISTINCT"),
        ("SELECT a FROM t ORDER BY a LIMIT 1 FOR UPDATE SKIP LOCKED", "would lock up to LIMIT + OFFSET rows"),
        ("SELECT a INTO archive FROM t ORDER BY a", "SELECT INTO across shards"),
        ("SELECT a FROM t; SELECT b FROM u", "several statements in one query"),
        ("SELECT a FROM t ORDER BY a USING <", "could not be parsed"),
        ("SELECT FROM WHERE", "could not be parsed"),
        ("(SELECT a FROM t ORDER BY b)", "write it without the outer parentheses"),
        ("(SELECT a FROM t) ORDER BY a", "write it without the outer parentheses"),
        ("(SELECT avg(x) FROM t)", "write it without the outer parentheses"),
        ("VALUES (2), (1) ORDER BY 1", "VALUES with ORDER BY"),
    ],
)
def test_what_cannot_be_merged_is_refused_with_0a000(sql: str, fragment: str) -> None:
    error = _refusal(sql)
    assert error.sqlstate == NOT_SUPPORTED
    assert fragment in str(error)


def test_refusals_say_what_to_do() -> None:
    assert str(_refusal("SELECT count(DISTINCT user_id) FROM events")) == (
        "count(DISTINCT user_id) across shards cannot be merged: the same value can be on several shards, so the "
        "shards' DISTINCT results cannot be added up; filter on the sharding key to run it on one shard")
    assert str(_refusal("SELECT a FROM t LIMIT $1")) == (
        "LIMIT with a parameter across shards is not supported yet: write the number in the statement (the proxy "
        "applies LIMIT to the merged rows, so it needs the value when planning)")


def test_the_statement_text_is_returned_itself_when_unchanged() -> None:
    sql = "SELECT a, count(*) FROM t WHERE b = $1 GROUP BY a"
    assert plan_select(sql)[0] is sql


def test_user_defined_aggregates_are_refused_and_unknown_functions_wait_for_the_catalog() -> None:
    with pytest.raises(RoutingError, match="user-defined aggregate"):
        plan_select("SELECT my_total(amount) FROM orders", frozenset({"my_total"}))
    # a plain user function is concatenated like any column
    assert plan_select("SELECT twice(amount) FROM orders", frozenset({"my_total"}))[1].concatenates
    # before the proxy has read the catalog, an unknown function might be an aggregate: refused
    with pytest.raises(RoutingError, match="not read this database's aggregates yet"):
        plan_select("SELECT twice(amount) FROM orders", None)
    assert plan_select("SELECT count(*) FROM orders", None)[1].aggregates
