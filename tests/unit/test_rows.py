"""Rows of several shards combined by a MergePlan: ordered merges, LIMIT/OFFSET, aggregates, GROUP BY, DISTINCT,
hidden columns, the per-source window. Every expected value is worked out by hand (avg's scales are what
PostgreSQL 15 printed for the same sums and counts)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from decimal import Decimal

import pytest

from routing.merge_plan import Aggregate, MergePlan, SortKey
from routing.rows import (
    MergeError,
    RowMerge,
    client_description,
    is_icu,
    merge_rows,
    numeric_average,
    read_description,
    with_result_formats,
)

BOOL, INT4, INT8, TEXT, BPCHAR, FLOAT4, FLOAT8, NUMERIC = 16, 23, 20, 25, 1042, 700, 701, 1700
TIMESTAMPTZ, TIMETZ, INTERVAL, JSONB, UUID, INET, ENUM = 1184, 1266, 1186, 3802, 2950, 869, 90001

Field = bytes | str | None

# ------------------------------------------------------------ messages


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def description(*columns: tuple[str, int] | tuple[str, int, int]) -> bytes:
    """(name, type OID[, format]) per column."""
    body = struct.pack("!h", len(columns))
    for number, column in enumerate(columns, 1):
        name, type_oid = column[0], column[1]
        fmt = column[2] if len(column) == 3 else 0
        body += name.encode() + b"\x00" + struct.pack("!IhIhih", 16384, number, type_oid, -1, -1, fmt)
    return message(b"T", body)


def row(*fields: Field) -> bytes:
    body = struct.pack("!h", len(fields))
    for field in fields:
        if field is None:
            body += struct.pack("!i", -1)
        else:
            data = field.encode() if isinstance(field, str) else field
            body += struct.pack("!i", len(data)) + data
    return message(b"D", body)


def fields_of(raw: bytes, text: bool = True) -> tuple[Field, ...]:
    """A DataRow's fields back: NULL as None, the others as str (`text`) or bytes."""
    assert raw[:1] == b"D"
    count = struct.unpack_from("!h", raw, 5)[0]
    pos = 7
    fields: list[Field] = []
    for _ in range(count):
        length = struct.unpack_from("!i", raw, pos)[0]
        pos += 4
        if length < 0:
            fields.append(None)
            continue
        data = raw[pos:pos + length]
        pos += length
        fields.append(data.decode() if text else data)
    assert pos == len(raw)
    return tuple(fields)


def int8(value: int) -> bytes:
    return struct.pack("!q", value)


def float8(value: float) -> bytes:
    return struct.pack("!d", value)


def as_rows(values: Sequence[Field | tuple[Field, ...]]) -> list[bytes]:
    return [row(*value) if isinstance(value, tuple) else row(value) for value in values]


# ------------------------------------------------------------ feeding a merge


def run(plan: MergePlan, columns: bytes, *sources: Sequence[Field | tuple[Field, ...]], collation: str = "C",
        window_rows: int = 1000, text: bool = True) -> tuple[list[tuple[Field, ...]], RowMerge]:
    """Feeds the sources' rows round-robin, finishing each source after its last row; the rows sent back
    (fields as str, or as bytes when not `text`)."""
    out: list[bytes] = []
    merge = merge_rows(plan, columns, len(sources), out, collation, window_rows)
    answers = [as_rows(rows) for rows in sources]
    for position in range(max(len(rows) for rows in answers) + 1):
        for source, rows in enumerate(answers):
            if position < len(rows):
                merge.add(source, rows[position])
            elif position == len(rows):
                merge.finish(source)
    return [fields_of(raw, text) for raw in out], merge


def values(result: list[tuple[Field, ...]]) -> list[Field]:
    return [fields[0] for fields in result]


def ordered(*keys: SortKey, **plan: object) -> MergePlan:
    return MergePlan(order_by=keys, **plan)  # type: ignore[arg-type]


ASC = SortKey(0)
DESC = SortKey(0, descending=True, nulls_first=True)

# ------------------------------------------------------------ ORDER BY


def test_integers_merge_in_order_with_a_source_that_has_none() -> None:
    result, merge = run(ordered(ASC), description(("n", INT4)), ["1", "4", "7", "10"], ["2", "3", "8", "9"], [])
    assert values(result) == ["1", "2", "3", "4", "7", "8", "9", "10"]  # as numbers: 10 last, not after 1
    assert merge.rows_sent == 8


def test_text_under_c_is_byte_order() -> None:
    # each shard sorted its own rows under C: uppercase before lowercase, é (c3 a9) after z
    result, _ = run(ordered(ASC), description(("s", TEXT)), ["B", "a", "é"], ["Z", "b", "z"])
    assert values(result) == ["B", "Z", "a", "b", "z", "é"]


def test_numeric_compares_as_numbers_and_nan_is_last() -> None:
    result, _ = run(ordered(ASC), description(("x", NUMERIC)), ["-1.5", "2", "10"], ["1.25", "9.99", "NaN"])
    assert values(result) == ["-1.5", "1.25", "2", "9.99", "10", "NaN"]


def test_numeric_descending_puts_nan_first() -> None:
    result, _ = run(ordered(SortKey(0, descending=True)), description(("x", NUMERIC)),
                    ["NaN", "3", "-2"], ["Infinity", "2.5", "0"])
    assert values(result) == ["NaN", "Infinity", "3", "2.5", "0", "-2"]


def test_timestamptz_compares_instants_and_infinities() -> None:
    result, _ = run(ordered(ASC), description(("t", TIMESTAMPTZ)),
                    ["2024-01-01 10:00:00+02", "2024-01-01 12:00:00+00"],
                    ["-infinity", "2024-01-01 09:00:00+00", "infinity"])
    assert values(result) == ["-infinity", "2024-01-01 10:00:00+02", "2024-01-01 09:00:00+00",
                              "2024-01-01 12:00:00+00", "infinity"]


def test_timetz_breaks_ties_on_the_zone_as_postgresql() -> None:
    # all three are 09:00 UTC; PostgreSQL 15 orders them 10:00+01, 09:00+00, 08:00-01
    result, _ = run(ordered(ASC), description(("t", TIMETZ)), ["08:00:00-01"], ["09:00:00+00"], ["10:00:00+01"])
    assert values(result) == ["10:00:00+01", "09:00:00+00", "08:00:00-01"]


def test_nulls_last_ascending() -> None:
    result, _ = run(ordered(ASC), description(("n", INT4)), ["1", "5", None], ["3", None])
    assert values(result) == ["1", "3", "5", None, None]


def test_nulls_first_ascending() -> None:
    result, _ = run(ordered(SortKey(0, nulls_first=True)), description(("n", INT4)), [None, "1", "5"], ["3"])
    assert values(result) == [None, "1", "3", "5"]


def test_descending_nulls_first() -> None:
    result, _ = run(ordered(DESC), description(("n", INT4)), [None, "5", "1"], [None, "7", "3"])
    assert values(result) == [None, None, "7", "5", "3", "1"]


def test_descending_nulls_last() -> None:
    result, _ = run(ordered(SortKey(0, descending=True)), description(("s", TEXT)), ["b", "a", None], ["c", None])
    assert values(result) == ["c", "b", "a", None, None]


def test_two_keys_ascending_then_descending() -> None:
    plan = ordered(SortKey(0), SortKey(1, descending=True, nulls_first=True))
    columns = description(("a", INT4), ("b", TEXT))
    first = [("1", "z"), ("1", "b"), ("2", None), ("2", "a")]
    second = [("1", None), ("1", "m"), ("2", "c"), ("3", "a")]
    result, _ = run(plan, columns, first, second)
    assert result == [("1", None), ("1", "z"), ("1", "m"), ("1", "b"), ("2", None), ("2", "c"), ("2", "a"),
                      ("3", "a")]


def test_other_columns_pass_through_as_the_shards_bytes() -> None:
    columns = description(("id", INT4), ("payload", TEXT), ("blob", 17, 1))
    result, _ = run(ordered(ASC), columns, [("2", "two", b"\x00\xff")], [("1", "one", b"\x01")], text=False)
    assert result == [(b"1", b"one", b"\x01"), (b"2", b"two", b"\x00\xff")]


def test_binary_int8_and_float8() -> None:
    result, _ = run(ordered(ASC), description(("n", INT8, 1)), [int8(-5), int8(256)], [int8(-300), int8(1)],
                    text=False)
    assert [struct.unpack("!q", value)[0] for value in values(result)] == [-300, -5, 1, 256]  # type: ignore[arg-type]
    result, _ = run(ordered(SortKey(0, descending=True)), description(("x", FLOAT8, 1)),
                    [float8(2.5), float8(-1.0)], [float8(float("inf")), float8(0.5)], text=False)
    decoded = [struct.unpack("!d", value)[0] for value in values(result)]  # type: ignore[arg-type]
    assert decoded == [float("inf"), 2.5, 0.5, -1.0]


def test_binary_text_orders_by_bytes() -> None:
    result, _ = run(ordered(ASC), description(("s", TEXT, 1)), ["apple", "pear"], ["banana"])
    assert values(result) == ["apple", "banana", "pear"]


def test_bpchar_ignores_trailing_spaces() -> None:
    # PostgreSQL: 'a ' = 'a' for character; 'a' < 'a!' although ' ' (20) < '!' (21)
    result, _ = run(ordered(ASC), description(("c", BPCHAR)), ["a ", "b  "], ["a!", "a!!"])
    assert values(result) == ["a ", "a!", "a!!", "b  "]


def test_interval_in_binary_counts_a_year_as_360_days() -> None:
    year, days_364 = struct.pack("!qii", 0, 0, 12), struct.pack("!qii", 0, 364, 0)
    days_360_and_a_second = struct.pack("!qii", 1_000_000, 360, 0)
    result, _ = run(ordered(ASC), description(("i", INTERVAL, 1)), [year, days_364], [days_360_and_a_second],
                    text=False)
    assert values(result) == [year, days_360_and_a_second, days_364]


def test_uuid_orders_as_bytes() -> None:
    low, high = "00000000-0000-0000-0000-00000000000a", "f0000000-0000-0000-0000-000000000000"
    result, _ = run(ordered(ASC), description(("u", UUID)), [high], [low])
    assert values(result) == [low, high]


def test_libc_collation_is_the_proxy_libc_locale() -> None:
    try:
        result, _ = run(ordered(ASC), description(("s", TEXT)), ["a", "é"], ["b", "z"], collation="C.utf8")
    except MergeError:
        pytest.skip("no C.utf8 locale on this machine")
    assert values(result) == ["a", "b", "z", "é"]  # C.utf8 sorts by code point


def test_en_us_puts_case_after_letters_as_postgresql() -> None:
    try:
        merge_rows(ordered(ASC), description(("s", TEXT)), 2, [], "en_US.UTF-8")
    except MergeError:
        pytest.skip("no en_US.UTF-8 locale on this machine")
    # each shard sorted under en_US.UTF-8 (PostgreSQL 15 gives: 1 10 2 a A a-b ab b B e é f _x z Z)
    first = ["1", "2", "a", "a-b", "b", "e", "f", "z"]
    second = ["10", "A", "ab", "B", "é", "_x", "Z"]
    result, _ = run(ordered(ASC), description(("s", TEXT)), first, second, collation="en_US.UTF-8")
    assert values(result) == ["1", "10", "2", "a", "A", "a-b", "ab", "b", "B", "e", "é", "f", "_x", "z", "Z"]
    result, _ = run(aggregate(Aggregate(0, "min"), Aggregate(1, "max")), description(("lo", TEXT), ("hi", TEXT)),
                    [("B", "z")], [("a", "Z")], collation="en_US.UTF-8")
    assert result == [("a", "Z")]


def test_explicit_collate_c_overrides_the_database_collation() -> None:
    plan = ordered(SortKey(0, collation="C"))
    result, _ = run(plan, description(("s", TEXT)), ["B", "a"], ["C"], collation="icu")
    assert values(result) == ["B", "C", "a"]


# ------------------------------------------------------------ LIMIT / OFFSET


def test_offset_and_limit_after_the_merge() -> None:
    numbers = [str(n) for n in range(1, 11)]
    result, merge = run(ordered(ASC, offset=3, limit=4), description(("n", INT4)), numbers, numbers)
    assert values(result) == ["2", "3", "3", "4"]  # 1 1 2 | 2 3 3 4 | ...
    assert merge.rows_sent == 4


def test_rows_after_the_limit_are_dropped_and_nothing_is_held() -> None:
    out: list[bytes] = []
    merge = merge_rows(ordered(ASC, limit=2), description(("n", INT4)), 2, out, window_rows=3)
    for n in range(1, 4):
        merge.add(0, row(str(n)))
        merge.add(1, row(str(n)))
    assert [fields_of(raw) for raw in out] == [("1",), ("1",)]
    for n in range(4, 1000):
        merge.add(0, row(str(n)))
    assert not merge.held(0) and not merge.held(1)
    merge.finish(0)
    merge.finish(1)
    assert len(out) == 2 and merge.rows_sent == 2


def test_limit_zero_sends_nothing() -> None:
    result, merge = run(ordered(ASC, limit=0), description(("n", INT4)), ["1"], ["2"])
    assert result == [] and merge.rows_sent == 0


def test_limit_without_order_streams() -> None:
    out: list[bytes] = []
    merge = merge_rows(MergePlan(limit=3, offset=1), description(("n", INT4)), 2, out)
    merge.add(1, row("9"))
    assert out == []  # the offset
    merge.add(0, row("5"))
    assert [fields_of(raw) for raw in out] == [("5",)]  # sent as it came, nothing queued
    for n in ("6", "7", "8"):
        merge.add(0, row(n))
    assert values([fields_of(raw) for raw in out]) == ["5", "6", "7"]
    assert merge.rows_sent == 3


# ------------------------------------------------------------ aggregates over all rows


def aggregate(*aggregates: Aggregate, **plan: object) -> MergePlan:
    return MergePlan(aggregates=aggregates, **plan)  # type: ignore[arg-type]


def test_count_is_summed() -> None:
    result, merge = run(aggregate(Aggregate(0, "count")), description(("count", INT8)), ["3"], ["4"], ["0"])
    assert result == [("7",)] and merge.rows_sent == 1


def test_sum_of_integers_numeric_floats_and_nulls() -> None:
    plan = aggregate(Aggregate(0, "sum"), Aggregate(1, "sum"), Aggregate(2, "sum"), Aggregate(3, "sum"))
    columns = description(("a", INT8), ("b", NUMERIC), ("c", FLOAT8), ("d", INT8))
    result, _ = run(plan, columns, [("10", "1.50", "0.5", None)], [(None, "2.25", "1.25", None)], [("5", None, None, None)])
    assert result == [("15", "3.75", "1.75", None)]


def test_sum_of_numeric_is_exact() -> None:
    big = "123456789012345678901234567890.123456789"
    result, _ = run(aggregate(Aggregate(0, "sum")), description(("s", NUMERIC)), [big], ["0.000000001"])
    assert result == [("123456789012345678901234567890.123456790",)]


def test_sum_of_small_numeric_is_not_shown_in_exponent_form() -> None:
    result, _ = run(aggregate(Aggregate(0, "sum")), description(("s", NUMERIC)), ["0.0000001"], ["0.00000000"])
    assert result == [("0.00000010",)]


def test_sum_of_numeric_infinities_is_nan() -> None:
    result, _ = run(aggregate(Aggregate(0, "sum")), description(("s", NUMERIC)), ["Infinity"], ["-Infinity"])
    assert result == [("NaN",)]


def test_sum_beyond_bigint_is_out_of_range() -> None:
    with pytest.raises(MergeError) as raised:
        run(aggregate(Aggregate(0, "sum")), description(("s", INT8)), [str(2**62)], [str(2**62)])
    assert raised.value.sqlstate == "22003"


def test_min_and_max_ignore_nulls_and_keep_the_shard_bytes() -> None:
    plan = aggregate(Aggregate(0, "min"), Aggregate(1, "max"), Aggregate(2, "min"), Aggregate(3, "max"))
    columns = description(("a", INT4), ("b", NUMERIC), ("c", TEXT), ("d", INT4))
    result, _ = run(plan, columns, [("10", "2.50", "b", None)], [(None, "10", "B", None)], [("-3", None, "a", None)])
    assert result == [("-3", "10", "B", None)]


def test_bool_and_and_bool_or() -> None:
    plan = aggregate(Aggregate(0, "bool_and"), Aggregate(1, "bool_or"), Aggregate(2, "bool_and"),
                     Aggregate(3, "bool_or"))
    columns = description(("a", BOOL), ("b", BOOL), ("c", BOOL), ("d", BOOL))
    result, _ = run(plan, columns, [("t", "f", "t", None)], [("f", "t", None, None)], [(None, "f", "t", None)])
    assert result == [("f", "t", "t", None)]


def test_bool_in_binary() -> None:
    plan = aggregate(Aggregate(0, "bool_or"))
    result, _ = run(plan, description(("b", BOOL, 1)), [b"\x00"], [b"\x01"], text=False)
    assert result == [(b"\x01",)]


AVG_PLAN = aggregate(Aggregate(0, "avg", count_column=1), visible_columns=1)


def test_avg_of_integers_is_numeric_with_postgresql_scale() -> None:
    # sum(int4) is bigint on each shard; avg = (3 + 2) / (2 + 2) = 1.25 at scale 16
    result, merge = run(AVG_PLAN, description(("avg", INT8), ("count", INT8)), [("3", "2")], [("2", "2")])
    assert result == [("1.2500000000000000",)]
    assert merge.rows_sent == 1


def test_avg_rewrites_the_column_type_and_drops_the_count() -> None:
    shards = description(("avg", INT8), ("count", INT8))
    columns = read_description(client_description(shards, AVG_PLAN))
    assert [(column.name, column.type_oid, column.type_size, column.modifier) for column in columns] == [
        (b"avg", NUMERIC, -1, -1)]
    merge = merge_rows(AVG_PLAN, shards, 2, [])
    assert merge.description == client_description(shards, AVG_PLAN)
    floats = read_description(client_description(description(("avg", FLOAT4), ("count", INT8)), AVG_PLAN))
    assert [(column.type_oid, column.type_size) for column in floats] == [(FLOAT8, 8)]


def test_avg_of_zero_is_shown_with_its_scale() -> None:
    result, _ = run(AVG_PLAN, description(("avg", INT8), ("count", INT8)), [("0", "1")], [("0", "1")])
    assert result == [("0.00000000000000000000",)]


def test_avg_of_nothing_is_null() -> None:
    result, _ = run(AVG_PLAN, description(("avg", NUMERIC), ("count", INT8)), [(None, "0")], [(None, "0")])
    assert result == [(None,)]


def test_avg_of_numeric_keeps_the_sum_scale() -> None:
    # 0.33333333333333333333 + 3 over 2: scale 20 (the sum's), rounded half up
    result, _ = run(AVG_PLAN, description(("avg", NUMERIC), ("count", INT8)),
                    [("0.33333333333333333333", "1")], [("3", "1")])
    assert result == [("1.66666666666666666667",)]


def test_avg_of_floats_is_double_precision() -> None:
    result, _ = run(AVG_PLAN, description(("avg", FLOAT8), ("count", INT8)), [("1.5", "1")], [("2", "1")])
    assert result == [("1.75",)]


def test_avg_in_binary_format() -> None:
    # numeric 1.2500000000000000 in binary: 2 digits, weight 0, positive, scale 16, digits 1 and 2500
    result, _ = run(AVG_PLAN, description(("avg", INT8, 1), ("count", INT8, 1)), [(int8(3), int8(2))],
                    [(int8(2), int8(2))], text=False)
    assert result == [(struct.pack("!hhhhhh", 2, 0, 0, 16, 1, 2500),)]


@pytest.mark.parametrize(("total", "count", "shown"), [
    # what PostgreSQL 15 printed for avg over rows with this sum and count
    ("5", 3, "1.6666666666666667"),
    ("2", 2, "1.00000000000000000000"),
    ("3", 2, "1.5000000000000000"),
    ("3.60", 2, "1.8000000000000000"),
    ("100003", 2, "50001.500000000000"),
    ("0.003", 2, "0.00150000000000000000"),
    ("100000000000000000003", 2, "50000000000000000002"),
    ("3.33333333333333333333", 2, "1.66666666666666666667"),
    ("-1", 2, "-0.50000000000000000000"),
    ("0", 2, "0.00000000000000000000"),
    ("100000000", 2, "50000000.000000000000"),
    ("123456789015", 2, "61728394507.50000000"),
    ("6", 2, "3.0000000000000000"),
    ("-7", 2, "-3.5000000000000000"),
])
def test_numeric_average_matches_postgresql(total: str, count: int, shown: str) -> None:
    assert f"{numeric_average(Decimal(total), count):f}" == shown


def test_avg_next_to_other_aggregates_and_a_constant() -> None:
    plan = aggregate(Aggregate(0, "count"), Aggregate(1, "avg", count_column=3), Aggregate(2, "max"),
                     visible_columns=3)
    columns = description(("count", INT8), ("avg", INT8), ("max", INT4), ("_hidden", INT8))
    result, _ = run(plan, columns, [("2", "7", "5", "2")], [("1", "2", "9", "1")])
    assert result == [("3", "3.0000000000000000", "9")]


# ------------------------------------------------------------ GROUP BY


def test_group_by_with_order_by_an_aggregate_and_limit() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"), Aggregate(2, "sum")),
                     order_by=(SortKey(2, descending=True, nulls_first=True),), limit=2)
    columns = description(("k", TEXT), ("count", INT8), ("sum", INT8))
    first = [("a", "2", "10"), ("b", "1", "5"), ("c", "4", "1")]
    second = [("a", "1", "1"), ("c", "1", "100"), ("d", "3", "3")]
    result, merge = run(plan, columns, first, second)
    assert result == [("c", "5", "101"), ("a", "3", "11")]
    assert merge.rows_sent == 2


def test_group_by_ordered_by_the_key_with_offset() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"),), order_by=(SortKey(0),), offset=1)
    columns = description(("k", INT4), ("count", INT8))
    result, _ = run(plan, columns, [("10", "1"), ("2", "1")], [("2", "5"), ("1", "1")], [("10", "2")])
    assert result == [("2", "6"), ("10", "3")]  # 1 skipped


def test_group_by_a_null_key_is_one_group() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"),), order_by=(SortKey(0),))
    result, _ = run(plan, description(("k", TEXT), ("count", INT8)), [(None, "1"), ("x", "1")], [(None, "2")])
    assert result == [("x", "1"), (None, "3")]


def test_group_by_numeric_takes_equal_values_as_one_group() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "sum"),))
    result, _ = run(plan, description(("k", NUMERIC), ("sum", INT8)), [("1.0", "1")], [("1.00", "2")])
    assert result == [("1.0", "3")]  # one group, shown as the first shard showed it


def test_group_by_bpchar_ignores_trailing_spaces() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"),))
    result, _ = run(plan, description(("k", BPCHAR), ("count", INT8)), [("a ", "1")], [("a", "2")])
    assert result == [("a ", "3")]


def test_group_by_hidden_key_with_avg() -> None:
    plan = MergePlan(group_by=(2,), aggregates=(Aggregate(0, "avg", count_column=1),), visible_columns=1,
                     order_by=(SortKey(0),))
    columns = description(("avg", INT8), ("count", INT8), ("k", INT4))
    result, _ = run(plan, columns, [("10", "4", "1"), ("1", "1", "2")], [("2", "1", "1"), ("3", "1", "2")])
    assert result == [("2.0000000000000000",), ("2.4000000000000000",)]  # k=2: 4/2; k=1: 12/5


def test_group_by_with_no_rows_gives_no_rows_but_an_aggregate_gives_one() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"),))
    result, merge = run(plan, description(("k", INT4), ("count", INT8)), [], [])
    assert result == [] and merge.rows_sent == 0
    result, _ = run(aggregate(Aggregate(0, "count"), Aggregate(1, "sum")), description(("c", INT8), ("s", INT8)),
                    [], [])
    assert result == [("0", None)]


def test_grouping_consumes_rows_as_they_come() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "count"),))
    merge = merge_rows(plan, description(("k", INT4), ("count", INT8)), 2, [], window_rows=2)
    for _ in range(10):
        merge.add(0, row("1", "1"))
    assert not merge.held(0)


# ------------------------------------------------------------ DISTINCT


def test_distinct_without_order() -> None:
    result, merge = run(MergePlan(distinct=True), description(("s", TEXT)), ["a", "b"], ["b", "c"], ["a"])
    assert sorted(values(result)) == ["a", "b", "c"]  # type: ignore[type-var]
    assert merge.rows_sent == 3


def test_distinct_with_order_and_limit() -> None:
    plan = MergePlan(distinct=True, order_by=(SortKey(0),), limit=3)
    result, merge = run(plan, description(("n", INT4), ("s", TEXT)),
                        [("1", "x"), ("2", "y"), ("2", "y"), ("4", "x")], [("1", "x"), ("2", "z"), ("3", "x")])
    assert sorted(result[:1]) == [("1", "x")]
    assert sorted(result[1:]) == [("2", "y"), ("2", "z")]
    assert merge.rows_sent == 3


def test_distinct_numeric_equal_values_once() -> None:
    result, _ = run(MergePlan(distinct=True, order_by=(SortKey(0),)), description(("x", NUMERIC)),
                    ["1.0", "2"], ["1.00", "2.0"])
    assert values(result) == ["1.0", "2"]


def test_distinct_jsonb() -> None:
    result, _ = run(MergePlan(distinct=True), description(("j", JSONB)), ['{"a": 1.0}', "true"], ['{"a": 1.00}', "1"])
    assert values(result) == ['{"a": 1.0}', "true", "1"]  # 1.0 = 1.00 in jsonb; true is not 1


def test_distinct_after_group_by() -> None:
    plan = MergePlan(distinct=True, group_by=(1,), aggregates=(Aggregate(0, "count"),), visible_columns=1)
    columns = description(("count", INT8), ("k", INT4))
    result, _ = run(plan, columns, [("1", "1"), ("2", "2")], [("1", "3"), ("1", "2")])
    assert sorted(values(result)) == ["1", "3"]  # type: ignore[type-var]  # counts 1, 3, 1


# ------------------------------------------------------------ hidden columns


def test_hidden_sort_column_is_dropped_from_rows_and_description() -> None:
    plan = MergePlan(order_by=(SortKey(1),), visible_columns=1)
    shards = description(("name", TEXT), ("_shardgate_hidden_1", INT4))
    out: list[bytes] = []
    merge = merge_rows(plan, shards, 2, out)
    assert read_description(merge.description)[0].name == b"name"
    assert len(read_description(merge.description)) == 1
    merge.add(0, row("b", "2"))
    merge.add(1, row("a", "1"))
    merge.add(1, row("c", "3"))
    merge.finish(0)
    merge.finish(1)
    assert [fields_of(raw) for raw in out] == [("a",), ("b",), ("c",)]


# ------------------------------------------------------------ the window


def test_a_source_is_held_at_the_window_while_another_sends_nothing() -> None:
    out: list[bytes] = []
    merge = merge_rows(ordered(ASC), description(("n", INT4)), 2, out)  # window_rows 1000
    sent = 0
    while sent < 10_000 and not merge.held(0):
        merge.add(0, row(str(sent)))
        sent += 1
    assert sent == 1000 and out == []
    assert not merge.held(1)
    merge.add(1, row("500"))  # 0..500 of source 0 and source 1's 500 go; 499 rows stay queued: read again
    assert len(out) == 502 and not merge.held(0)
    merge.finish(1)  # source 1 is done: everything of source 0 goes as it comes
    while sent < 10_000:
        merge.add(0, row(str(sent)))
        sent += 1
        assert not merge.held(0)
    merge.finish(0)
    assert len(out) == 10_001 and merge.rows_sent == 10_001
    assert values([fields_of(raw) for raw in out[500:503]]) == ["500", "500", "501"]
    assert values([fields_of(raw) for raw in out[:3]]) == ["0", "1", "2"]


def test_window_of_one() -> None:
    out: list[bytes] = []
    merge = merge_rows(ordered(ASC), description(("n", INT4)), 2, out, window_rows=1)
    merge.add(0, row("1"))
    assert merge.held(0)
    merge.add(1, row("2"))
    assert [fields_of(raw) for raw in out] == [("1",)]
    assert not merge.held(0) and merge.held(1)


# ------------------------------------------------------------ refusals and errors


@pytest.mark.parametrize(("plan", "columns"), [
    (ordered(ASC), description(("e", ENUM))),
    (ordered(ASC), description(("ip", INET))),
    (ordered(ASC), description(("i", INTERVAL))),
    (MergePlan(group_by=(0,)), description(("i", INTERVAL))),
    (aggregate(Aggregate(0, "min")), description(("e", ENUM))),
    (aggregate(Aggregate(0, "sum")), description(("t", TEXT))),
    (aggregate(Aggregate(0, "bool_and")), description(("n", INT4))),
    (aggregate(Aggregate(0, "median")), description(("n", INT4))),
    (aggregate(Aggregate(0, "avg")), description(("n", INT8))),
    (ordered(SortKey(3)), description(("n", INT4))),
])
def test_what_cannot_be_merged_is_refused(plan: MergePlan, columns: bytes) -> None:
    with pytest.raises(MergeError) as raised:
        merge_rows(plan, columns, 2, [])
    assert raised.value.sqlstate == "0A000"


@pytest.mark.parametrize("collation", ["icu", "und-x-icu", "icu:en-US", "no_SUCH.locale", "a/b"])
def test_text_order_that_cannot_be_reproduced_is_refused(collation: str) -> None:
    with pytest.raises(MergeError) as raised:
        merge_rows(ordered(ASC), description(("s", TEXT)), 2, [], collation)
    assert raised.value.sqlstate == "0A000"
    assert collation in raised.value.message


def test_icu_does_not_matter_for_numbers_or_grouping() -> None:
    result, _ = run(ordered(ASC), description(("n", INT4)), ["2"], ["1"], collation="icu")
    assert values(result) == ["1", "2"]
    result, _ = run(MergePlan(distinct=True), description(("s", TEXT)), ["a"], ["a"], collation="icu")
    assert values(result) == ["a"]


def test_explicit_icu_collation_on_a_sort_key_is_refused() -> None:
    with pytest.raises(MergeError):
        merge_rows(ordered(SortKey(0, collation="en-x-icu")), description(("s", TEXT)), 2, [])
    assert is_icu("und-x-icu") and is_icu("ICU") and not is_icu("en_US.UTF-8")


def test_an_undecodable_value_is_an_error() -> None:
    merge = merge_rows(ordered(ASC), description(("x", NUMERIC)), 2, [])
    with pytest.raises(MergeError) as raised:
        merge.add(0, row("not a number"))
    assert raised.value.sqlstate == "0A000" and '"x"' in raised.value.message


def test_a_row_shorter_than_its_description_is_an_error() -> None:
    merge = merge_rows(ordered(SortKey(1)), description(("a", INT4), ("b", INT4)), 2, [])
    with pytest.raises(MergeError) as raised:
        merge.add(0, row("1"))
    assert raised.value.sqlstate == "08P01"


# ------------------------------------------------------------ descriptions


def test_with_result_formats_sets_the_bind_formats() -> None:
    statement = description(("a", INT4), ("b", TEXT))
    assert [c.format for c in read_description(with_result_formats(statement, []))] == [0, 0]
    assert [c.format for c in read_description(with_result_formats(statement, [1]))] == [1, 1]
    assert [c.format for c in read_description(with_result_formats(statement, [0, 1]))] == [0, 1]
    with pytest.raises(MergeError):
        with_result_formats(statement, [0, 1, 1])
