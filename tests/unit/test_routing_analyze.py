"""sqlglot analysis: read/write verdict, tables and $n parameters."""

from __future__ import annotations

import pytest

from routing.analyze import DEFAULT_VOLATILE_FUNCTIONS, analyze, volatile_function_set


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT * FROM t FOR UPDATE", "row lock (FOR UPDATE/SHARE)"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "writing delete inside a query"),
        ("SELECT * INTO n FROM t", "SELECT INTO creates a table"),
        ("SELECT nextval('s')", "volatile function nextval"),
        ("UPDATE t SET a = 1", "write: update"),
        ("SELECT 1", "read"),
    ],
)
def test_reasons(sql: str, reason: str) -> None:
    assert analyze(sql).reason == reason


@pytest.mark.parametrize("function", sorted(DEFAULT_VOLATILE_FUNCTIONS))
def test_every_default_volatile_function_is_a_write(function: str) -> None:
    assert analyze(f"SELECT {function}(1)").write
    assert analyze(f"SELECT * FROM t WHERE a = (SELECT {function.upper()}(1))").write


def test_tables_without_cte_names() -> None:
    analysis = analyze(
        'WITH recent AS (SELECT * FROM orders) SELECT * FROM recent JOIN Users u ON true, "Mixed"."Case" m, '
        "app.items i WHERE EXISTS (SELECT 1 FROM orders) AND u.id IN (SELECT uid FROM generate_series(1, 3) g)"
    )
    assert sorted(analysis.tables) == ["Mixed.Case", "app.items", "orders", "users"]


def test_parameters_are_distinct_and_sorted() -> None:
    analysis = analyze("SELECT * FROM t WHERE a = $3 AND b = $1 AND c IN ($3, $12) AND d = '$2'")
    assert analysis.parameters == (1, 3, 12)


def test_multi_statement_any_write() -> None:
    analysis = analyze("SELECT 1; SELECT * FROM t FOR SHARE")
    assert analysis.write and analysis.statement_count == 2
    assert not analyze("SELECT 1; SELECT 2").write


def test_unparseable_is_a_write() -> None:
    analysis = analyze("SELECT * FROM WHERE")
    assert analysis.write and not analysis.parsed
    assert analysis.reason.startswith("unparseable")


def test_deep_nesting_is_a_write_not_a_crash() -> None:
    analysis = analyze("SELECT " + "(" * 5000 + "1" + ")" * 5000)
    assert analysis.write or analysis.parsed  # either sqlglot copes, or the safe default applies


def test_volatile_function_set() -> None:
    functions = volatile_function_set([" App.Next_Id ", "audit"])
    assert {"app.next_id", "audit", "nextval"} <= functions
    assert analyze("SELECT audit()", functions).write
    assert analyze("SELECT app.next_id()", functions).write
    assert not analyze("SELECT next_id()", functions).write
    assert not analyze("SELECT audit()").write


def test_typed_sqlglot_functions_match_by_name() -> None:
    # sqlglot parses random() into a built-in node rather than an anonymous call.
    assert analyze("SELECT random()", volatile_function_set(["random"])).write
    assert not analyze("SELECT random()").write
