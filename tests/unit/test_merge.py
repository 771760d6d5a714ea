"""The result merger: several shards' answers to the same messages become the one stream a client expects."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

import pytest

from routing.merge import ResultMerger
from routing.merge_plan import Aggregate, MergePlan, SortKey
from routing.rows import RowMerge

# ------------------------------------------------------------ a tiny backend-message encoder of our own

INT4, TEXT, NUMERIC = 23, 25, 1700


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def description(*columns: tuple[str, int], table_oid: int = 16384, modifier: int = -1, fmt: int = 0) -> bytes:
    body = struct.pack("!h", len(columns))
    for number, (name, type_oid) in enumerate(columns, 1):
        body += name.encode() + b"\x00" + struct.pack("!IhIhih", table_oid, number, type_oid, -1, modifier, fmt)
    return message(b"T", body)


def row(*values: str) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        data = value.encode()
        body += struct.pack("!i", len(data)) + data
    return message(b"D", body)


def complete(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\x00")


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def error(code: str, text: str) -> bytes:
    return message(b"E", b"SERROR\x00VERROR\x00C" + code.encode() + b"\x00M" + text.encode() + b"\x00\x00")


def parameter(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


PARSE_DONE, BIND_DONE, NO_DATA = message(b"1"), message(b"2"), message(b"n")
NOTICE = message(b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00")
COPY_IN = message(b"G", b"\x00\x00\x01\x00\x00")
ID = description(("id", INT4))

# ------------------------------------------------------------ reading the merged stream back


def split(stream: bytes) -> list[bytes]:
    messages = []
    pos = 0
    while pos < len(stream):
        end = pos + 1 + struct.unpack_from("!I", stream, pos + 1)[0]
        messages.append(stream[pos:end])
        pos = end
    assert pos == len(stream)
    return messages


def error_fields(raw: bytes) -> dict[str, str]:
    assert raw[:1] == b"E"
    fields = {}
    for part in raw[5:].split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def run(merger: ResultMerger, feeds: Iterable[tuple[int, bytes]]) -> list[bytes]:
    out = b""
    for source, raw in feeds:
        merger.feed(source, raw)
        out += merger.take()
    return split(out)


def one_after_another(*answers: list[bytes]) -> list[tuple[int, bytes]]:
    return [(source, raw) for source, answer in enumerate(answers) for raw in answer]


def alternating(*answers: list[bytes]) -> list[tuple[int, bytes]]:
    feeds = []
    for position in range(max(len(answer) for answer in answers)):
        for source, answer in enumerate(answers):
            if position < len(answer):
                feeds.append((source, answer[position]))
    return feeds


def shuffled(seed: int, *answers: list[bytes]) -> list[tuple[int, bytes]]:
    """A random interleaving that keeps each source's own order."""
    rng = random.Random(seed)
    positions = [0] * len(answers)
    feeds = []
    while any(positions[s] < len(answers[s]) for s in range(len(answers))):
        source = rng.choice([s for s in range(len(answers)) if positions[s] < len(answers[s])])
        feeds.append((source, answers[source][positions[source]]))
        positions[source] += 1
    return feeds


def select(rows: list[bytes], status: bytes = b"I", *, table_oid: int = 16384) -> list[bytes]:
    return [description(("id", INT4), table_oid=table_oid), *rows, complete(f"SELECT {len(rows)}"), ready(status)]


ROWS_A = [row(f"a{i}") for i in range(3)]
ROWS_B = [row(f"b{i}") for i in range(2)]

# ------------------------------------------------------------ plain results


def test_two_sources_give_one_description_all_rows_summed_tag_one_ready() -> None:
    merger = ResultMerger(2)
    out = run(merger, one_after_another(select(ROWS_A), select(ROWS_B)))
    assert out == [ID, *ROWS_A, *ROWS_B, complete("SELECT 5"), ready(b"I")]
    assert merger.ready_count == 1
    assert merger.take() == b""


def test_source_one_first_gives_its_rows_first() -> None:
    out = run(ResultMerger(2), [(1, raw) for raw in select(ROWS_B)] + [(0, raw) for raw in select(ROWS_A)])
    assert out == [ID, *ROWS_B, *ROWS_A, complete("SELECT 5"), ready(b"I")]


def ordered(ordering: str, first: list[bytes], second: list[bytes]) -> list[tuple[int, bytes]]:
    if ordering == "source 0 first":
        return one_after_another(first, second)
    if ordering == "source 1 first":
        return [(1, raw) for raw in second] + [(0, raw) for raw in first]
    if ordering == "alternating":
        return alternating(first, second)
    return shuffled(int(ordering.split()[-1]), first, second)


@pytest.mark.parametrize("ordering", ["source 0 first", "source 1 first", "alternating",
                                      *(f"shuffled {seed}" for seed in range(8))])
def test_every_feeding_order_gives_same_rows_and_framing(ordering: str) -> None:
    merger = ResultMerger(2)
    out = run(merger, ordered(ordering, select(ROWS_A), select(ROWS_B)))
    rows = [raw for raw in out if raw[:1] == b"D"]
    assert [raw for raw in out if raw[:1] != b"D"] == [ID, complete("SELECT 5"), ready(b"I")]
    assert out[0] == ID and out[-2:] == [complete("SELECT 5"), ready(b"I")]
    assert sorted(rows) == sorted(ROWS_A + ROWS_B)
    assert [raw for raw in rows if raw in ROWS_A] == ROWS_A  # each source's rows keep their order
    assert [raw for raw in rows if raw in ROWS_B] == ROWS_B
    assert merger.ready_count == 1


def test_zero_rows_everywhere() -> None:
    out = run(ResultMerger(2), alternating(select([]), select([])))
    assert out == [ID, complete("SELECT 0"), ready(b"I")]


def test_zero_rows_on_one_source() -> None:
    out = run(ResultMerger(2), one_after_another(select([]), select(ROWS_B)))
    assert out == [ID, *ROWS_B, complete("SELECT 2"), ready(b"I")]


def test_three_sources() -> None:
    rows_c = [row("c0")]
    merger = ResultMerger(3)
    out = run(merger, one_after_another(select(ROWS_A), select(ROWS_B), select(rows_c)))
    assert out == [ID, *ROWS_A, *ROWS_B, *rows_c, complete("SELECT 6"), ready(b"I")]
    assert merger.ready_count == 1


def test_single_source_passes_through() -> None:
    out = run(ResultMerger(1), one_after_another(select(ROWS_A)))
    assert out == [ID, *ROWS_A, complete("SELECT 3"), ready(b"I")]


def test_table_oids_and_column_numbers_may_differ() -> None:
    first = select(ROWS_A, table_oid=16384)
    second = select(ROWS_B, table_oid=99999)
    out = run(ResultMerger(2), one_after_another(second, first))
    assert out[0] == second[0]  # the first to arrive, as a client must get one
    assert out[1:] == [*ROWS_B, *ROWS_A, complete("SELECT 5"), ready(b"I")]


def test_notices_pass_through_and_parameter_status_is_sent_once() -> None:
    first = [parameter("TimeZone", "UTC"), NOTICE, *select([])]
    second = [parameter("TimeZone", "UTC"), NOTICE, *select([])]
    out = run(ResultMerger(2), one_after_another(first, second))
    assert out == [parameter("TimeZone", "UTC"), NOTICE, NOTICE, ID, complete("SELECT 0"), ready(b"I")]


def test_a_changed_parameter_is_sent_again() -> None:
    merger = ResultMerger(1)
    feeds = [parameter("TimeZone", "UTC"), parameter("TimeZone", "CET"), parameter("TimeZone", "UTC")]
    assert run(merger, [(0, raw) for raw in feeds]) == feeds


def test_memoryview_over_a_reused_buffer_is_copied() -> None:
    merger = ResultMerger(1)
    buffer = bytearray(row("kept"))
    merger.feed(0, memoryview(buffer))
    buffer[:] = row("gone")
    assert merger.take() == row("kept")


# ------------------------------------------------------------ command tags


@pytest.mark.parametrize(("first", "second", "merged"), [
    ("INSERT 0 2", "INSERT 0 3", "INSERT 0 5"),
    ("INSERT 16500 1", "INSERT 0 4", "INSERT 0 5"),
    ("UPDATE 4", "UPDATE 0", "UPDATE 4"),
    ("DELETE 7", "DELETE 3", "DELETE 10"),
    ("MERGE 1", "MERGE 2", "MERGE 3"),
    ("FETCH 10", "FETCH 5", "FETCH 15"),
    ("MOVE 1", "MOVE 1", "MOVE 2"),
    ("BEGIN", "BEGIN", "BEGIN"),
    ("SET", "SET", "SET"),
    ("CREATE TABLE", "CREATE TABLE", "CREATE TABLE"),
])
def test_tags_are_summed_or_kept(first: str, second: str, merged: str) -> None:
    merger = ResultMerger(2)
    out = run(merger, alternating([complete(first), ready(b"T")], [complete(second), ready(b"T")]))
    assert out == [complete(merged), ready(b"T")]


@pytest.mark.parametrize(("first", "second"), [("BEGIN", "SET"), ("UPDATE 1", "DELETE 1"), ("SELECT 1", "SHOW")])
def test_different_tags_are_an_error_then_one_ready(first: str, second: str) -> None:
    merger = ResultMerger(2)
    out = run(merger, one_after_another([complete(first), ready(b"I")], [complete(second), ready(b"I")]))
    assert len(out) == 2
    fields = error_fields(out[0])
    assert (fields["S"], fields["V"], fields["C"]) == ("ERROR", "ERROR", "0A000")
    assert first in fields["M"] and second in fields["M"]
    assert out[1] == ready(b"I")
    assert merger.ready_count == 1


# ------------------------------------------------------------ errors


def test_an_error_on_one_source_is_sent_once_and_the_rest_dropped() -> None:
    failure = error("22012", "division by zero")
    first = select(ROWS_A)
    second = [ID, row("b0"), failure, ready(b"I")]
    feeds = [(0, first[0]), (1, second[0]), (1, second[1]), (0, first[1]), (1, second[2]),
             (0, first[2]), (0, first[3]), (0, first[4]), (0, first[5]), (1, second[3])]
    merger = ResultMerger(2)
    out = run(merger, feeds)
    assert out == [ID, row("b0"), ROWS_A[0], failure, ready(b"I")]
    assert merger.ready_count == 1


def test_a_second_error_is_dropped() -> None:
    failure = error("22012", "division by zero")
    other = error("23505", "duplicate key")
    out = run(ResultMerger(2), one_after_another([failure, ready(b"E")], [other, ready(b"E")]))
    assert out == [failure, ready(b"E")]


def test_an_error_releases_a_source_waiting_at_a_barrier_and_drops_what_it_queued() -> None:
    failure = error("42P01", "relation does not exist")
    merger = ResultMerger(2)
    out = run(merger, [(0, ID), (0, ROWS_A[0]), (0, complete("SELECT 1"))])
    assert out == [] and merger.held(0)
    out = run(merger, [(1, failure)])
    assert out == [failure]
    assert not merger.held(0)  # it has to reach its ReadyForQuery to end the batch
    assert run(merger, [(0, ready(b"I"))]) == []
    assert merger.held(0)
    assert run(merger, [(1, ready(b"I"))]) == [ready(b"I")]
    assert not merger.held(0) and not merger.held(1)


def test_error_with_source_in_transaction_elsewhere_autocommit() -> None:
    failure = error("22012", "division by zero")
    out = run(ResultMerger(2), one_after_another([failure, ready(b"I")], [*select(ROWS_B, b"T")]))
    assert out == [failure, ready(b"T")]


def test_session_messages_still_pass_after_an_error_but_notices_do_not() -> None:
    failure = error("22012", "division by zero")
    notification = message(b"A", struct.pack("!i", 4242) + b"jobs\x00new\x00")
    first = [failure, NOTICE, notification, ready(b"I")]
    second = [ID, NOTICE, parameter("TimeZone", "CET"), complete("SELECT 0"), ready(b"I")]
    out = run(ResultMerger(2), one_after_another(first, second))
    assert out == [failure, notification, parameter("TimeZone", "CET"), ready(b"I")]


@pytest.mark.parametrize(("statuses", "merged"), [
    (b"II", b"I"), (b"IT", b"T"), (b"TI", b"T"), (b"TT", b"T"), (b"TE", b"E"), (b"EI", b"E"),
    (b"IET", b"E"), (b"ITI", b"T"), (b"III", b"I"),
])
def test_transaction_status_is_combined(statuses: bytes, merged: bytes) -> None:
    answers = [[ready(bytes((status,)))] for status in statuses]
    merger = ResultMerger(len(statuses))
    assert run(merger, one_after_another(*answers)) == [ready(merged)]
    assert merger.ready_count == 1


# ------------------------------------------------------------ descriptions that do not agree


@pytest.mark.parametrize(("other", "named"), [
    (description(("id", TEXT)), "type OID"),
    (description(("key", INT4)), "'key'"),
    (description(("id", INT4), ("name", TEXT)), "columns"),
    (description(("id", INT4), modifier=8), "type modifier"),
    (description(("id", INT4), fmt=1), "format"),
])
def test_different_columns_are_an_error(other: bytes, named: str) -> None:
    merger = ResultMerger(2)
    first = select(ROWS_A)
    second = [other, *ROWS_B, complete("SELECT 2"), ready(b"I")]
    out = run(merger, alternating(first, second))
    assert len(out) == 2
    fields = error_fields(out[0])
    assert fields["C"] == "0A000"
    assert fields["M"].startswith("shards returned different columns: ")
    assert named in fields["M"]
    assert out[1] == ready(b"I")


def test_different_columns_with_everything_queued_still_end_in_one_ready() -> None:
    merger = ResultMerger(2)
    first = select(ROWS_A)
    second = [description(("id", TEXT)), complete("SELECT 0"), ready(b"I")]
    out = run(merger, one_after_another(first, second))
    assert [raw[:1] for raw in out] == [b"E", b"Z"]
    assert merger.ready_count == 1
    # and the next batch merges normally
    assert run(merger, alternating(select(ROWS_A), select(ROWS_B))) == [
        ID, ROWS_A[0], ROWS_B[0], ROWS_A[1], ROWS_B[1], ROWS_A[2], complete("SELECT 5"), ready(b"I")]


def test_different_barrier_kinds_are_an_error() -> None:
    merger = ResultMerger(2)
    first = [PARSE_DONE, BIND_DONE, ID, *ROWS_A, complete("SELECT 3"), ready(b"I")]
    second = [PARSE_DONE, BIND_DONE, NO_DATA, complete("INSERT 0 1"), ready(b"I")]
    out = run(merger, alternating(first, second))
    assert out[:2] == [PARSE_DONE, BIND_DONE]
    fields = error_fields(out[2])
    assert fields["C"] == "0A000"
    assert fields["M"].startswith("shards answered differently")
    assert out[3:] == [ready(b"I")]


def test_one_source_already_at_ready_when_answers_differ() -> None:
    merger = ResultMerger(2)
    out = run(merger, one_after_another([complete("SELECT 1"), ready(b"I")], [ready(b"I")]))
    assert [raw[:1] for raw in out] == [b"E", b"Z"]
    assert merger.ready_count == 1
    assert run(merger, alternating([ready(b"I")], [ready(b"I")])) == [ready(b"I")]
    assert merger.ready_count == 2


# ------------------------------------------------------------ extended protocol, several statements, pipelining


def test_extended_batch_is_merged() -> None:
    first = [PARSE_DONE, BIND_DONE, ID, *ROWS_A, complete("SELECT 3"), ready(b"I")]
    second = [PARSE_DONE, BIND_DONE, ID, *ROWS_B, complete("SELECT 2"), ready(b"I")]
    out = run(ResultMerger(2), one_after_another(first, second))
    assert out == [PARSE_DONE, BIND_DONE, ID, *ROWS_A, *ROWS_B, complete("SELECT 5"), ready(b"I")]


def test_extended_insert_without_rows() -> None:
    first = [PARSE_DONE, BIND_DONE, NO_DATA, complete("INSERT 0 1"), ready(b"I")]
    second = [PARSE_DONE, BIND_DONE, NO_DATA, complete("INSERT 0 2"), ready(b"I")]
    out = run(ResultMerger(2), alternating(first, second))
    assert out == [PARSE_DONE, BIND_DONE, NO_DATA, complete("INSERT 0 3"), ready(b"I")]


def test_hidden_parse_completes_are_not_sent() -> None:
    answer = [PARSE_DONE, PARSE_DONE, BIND_DONE, NO_DATA, complete("UPDATE 1"), ready(b"I")]
    merger = ResultMerger(2, hidden_parse_completes=1)
    out = run(merger, one_after_another(answer, answer))
    assert out == [PARSE_DONE, BIND_DONE, NO_DATA, complete("UPDATE 2"), ready(b"I")]
    # later batches show every ParseComplete
    assert run(merger, alternating([PARSE_DONE, ready(b"I")], [PARSE_DONE, ready(b"I")])) == [PARSE_DONE, ready(b"I")]


def test_hidden_parse_completes_do_not_outlive_a_failed_first_batch() -> None:
    failure = error("42601", "syntax error")
    merger = ResultMerger(2, hidden_parse_completes=1)
    assert run(merger, one_after_another([failure, ready(b"I")], [failure, ready(b"I")])) == [failure, ready(b"I")]
    assert run(merger, alternating([PARSE_DONE, ready(b"I")], [PARSE_DONE, ready(b"I")])) == [PARSE_DONE, ready(b"I")]


def test_multi_statement_simple_query() -> None:
    first = [ID, ROWS_A[0], complete("SELECT 1"), ID, ROWS_A[1], ROWS_A[2], complete("SELECT 2"), ready(b"I")]
    second = [ID, ROWS_B[0], complete("SELECT 1"), ID, ROWS_B[1], complete("SELECT 1"), ready(b"I")]
    merger = ResultMerger(2)
    out = run(merger, one_after_another(first, second))
    assert out == [ID, ROWS_A[0], ROWS_B[0], complete("SELECT 2"),
                   ID, ROWS_A[1], ROWS_A[2], ROWS_B[1], complete("SELECT 3"), ready(b"I")]
    assert merger.ready_count == 1


def test_pipelined_batches_each_get_a_ready() -> None:
    failure = error("22012", "division by zero")
    first = [failure, ready(b"I"), *select(ROWS_A)]
    second = [*select([]), *select(ROWS_B)]
    merger = ResultMerger(2)
    out = run(merger, one_after_another(first, second))
    assert out == [failure, ready(b"I"), ID, *ROWS_A, *ROWS_B, complete("SELECT 5"), ready(b"I")]
    assert merger.ready_count == 2


# ------------------------------------------------------------ backpressure


def test_held_while_waiting_at_a_barrier() -> None:
    merger = ResultMerger(2)
    assert not merger.held(0) and not merger.held(1)
    assert run(merger, [(0, ID)]) == []
    assert merger.held(0) and not merger.held(1)
    assert run(merger, [(0, ROWS_A[0])]) == []  # queued while held, not sent
    assert run(merger, [(1, ID)]) == [ID, ROWS_A[0]]
    assert not merger.held(0) and not merger.held(1)
    assert run(merger, [(1, ROWS_B[0]), (1, complete("SELECT 1"))]) == [ROWS_B[0]]
    assert merger.held(1) and not merger.held(0)
    assert run(merger, [(0, complete("SELECT 1")), (0, ready(b"I"))]) == [complete("SELECT 2")]
    assert merger.held(0) and not merger.held(1)
    assert run(merger, [(1, ready(b"I"))]) == [ready(b"I")]
    assert not merger.held(0) and not merger.held(1)


# ------------------------------------------------------------ what cannot be merged


def test_copy_is_an_error_and_names_the_sources_in_copy_mode() -> None:
    merger = ResultMerger(2)
    out = run(merger, [(0, COPY_IN)])
    assert len(out) == 1
    fields = error_fields(out[0])
    assert fields["C"] == "0A000" and fields["M"] == "COPY is not supported across shards"
    assert merger.copy_sources == {0}
    assert run(merger, [(1, COPY_IN)]) == []
    assert merger.copy_sources == {0, 1}
    # what the servers answer to the caller's CopyFail
    copy_failed = error("57014", "COPY from stdin failed")
    assert run(merger, alternating([copy_failed, ready(b"I")], [copy_failed, ready(b"I")])) == [ready(b"I")]
    assert merger.ready_count == 1


def test_an_unknown_message_is_an_error() -> None:
    out = run(ResultMerger(2), alternating([message(b"X"), ready(b"I")], [ID, ready(b"I")]))
    assert error_fields(out[0])["C"] == "0A000"
    assert out[1:] == [ready(b"I")]


def test_no_sources_is_refused() -> None:
    with pytest.raises(ValueError):
        ResultMerger(0)


# ------------------------------------------------------------ rows merged by a plan (routing.rows)

INT8, BOOL_OID = 20, 16
BY_ID = MergePlan(order_by=(SortKey(0),))
PARAMETERS = message(b"t", struct.pack("!hI", 1, INT4))
SUSPENDED = message(b"s")


def ints(*numbers: int) -> list[bytes]:
    return [row(str(number)) for number in numbers]


def rows_of(out: list[bytes]) -> list[str]:
    values = []
    for raw in out:
        if raw[:1] == b"D":
            length = struct.unpack_from("!i", raw, 7)[0]
            values.append(raw[11:11 + length].decode())
    return values


def test_a_concatenating_plan_keeps_the_fast_path() -> None:
    merger = ResultMerger(2, plan=MergePlan())
    out = run(merger, one_after_another(select(ROWS_A), select(ROWS_B)))
    assert out == [ID, *ROWS_A, *ROWS_B, complete("SELECT 5"), ready(b"I")]


@pytest.mark.parametrize("ordering", ["source 0 first", "source 1 first", "alternating",
                                      *(f"shuffled {seed}" for seed in range(8))])
def test_order_by_merges_rows_in_every_feeding_order(ordering: str) -> None:
    merger = ResultMerger(2, plan=BY_ID)
    out = run(merger, ordered(ordering, select(ints(1, 4, 5, 9)), select(ints(2, 3, 10))))
    assert out[0] == ID and out[-2:] == [complete("SELECT 7"), ready(b"I")]
    assert rows_of(out) == ["1", "2", "3", "4", "5", "9", "10"]
    assert merger.ready_count == 1


def test_order_by_with_a_source_finished_before_the_others_start() -> None:
    merger = ResultMerger(3, plan=BY_ID)
    out = run(merger, one_after_another(select([]), select(ints(3, 4)), select(ints(1, 5))))
    assert rows_of(out) == ["1", "3", "4", "5"]
    assert out[-2:] == [complete("SELECT 4"), ready(b"I")]


def test_limit_counts_the_rows_sent_in_the_tag() -> None:
    merger = ResultMerger(2, plan=MergePlan(order_by=(SortKey(0),), limit=3))
    out = run(merger, alternating(select(ints(*range(0, 100, 2))), select(ints(*range(1, 100, 2)))))
    assert rows_of(out) == ["0", "1", "2"]
    assert out[-2:] == [complete("SELECT 3"), ready(b"I")]


def test_ordered_merge_holds_a_source_at_its_window() -> None:
    merger = ResultMerger(2, plan=BY_ID, window_rows=3)
    assert run(merger, [(0, ID), (1, ID)]) == [ID]
    assert run(merger, [(0, raw) for raw in ints(1, 2)]) == []
    assert not merger.held(0)
    assert run(merger, [(0, row("3"))]) == []
    assert merger.held(0) and not merger.held(1)
    assert rows_of(run(merger, [(1, row("2"))])) == ["1", "2", "2"]
    assert not merger.held(0)
    out = run(merger, [(1, complete("SELECT 1")), (0, complete("SELECT 3")), (0, ready(b"I")), (1, ready(b"I"))])
    assert out == [row("3"), complete("SELECT 4"), ready(b"I")]
    assert not merger.held(0) and not merger.held(1)


def test_global_aggregate_gives_one_row_with_avg_typed_numeric() -> None:
    plan = MergePlan(aggregates=(Aggregate(0, "count"), Aggregate(1, "avg", count_column=2)), visible_columns=2)
    shards = description(("count", INT8), ("avg", INT8), ("_shardgate_hidden_1", INT8))
    first = [shards, row("2", "3", "2"), complete("SELECT 1"), ready(b"I")]
    second = [shards, row("2", "2", "2"), complete("SELECT 1"), ready(b"I")]
    merger = ResultMerger(2, plan=plan)
    out = run(merger, alternating(first, second))
    assert out == [description(("count", INT8), ("avg", NUMERIC)), row("4", "1.2500000000000000"),
                   complete("SELECT 1"), ready(b"I")]


def test_group_by_order_by_limit_through_the_merger() -> None:
    plan = MergePlan(group_by=(0,), aggregates=(Aggregate(1, "sum"),), order_by=(SortKey(1, descending=True,
                                                                                           nulls_first=True),),
                     limit=2)
    shards = description(("k", TEXT), ("sum", INT8))
    first = [shards, row("a", "1"), row("b", "7"), complete("SELECT 2"), ready(b"I")]
    second = [shards, row("b", "1"), row("c", "5"), row("a", "9"), complete("SELECT 3"), ready(b"I")]
    out = run(ResultMerger(2, plan=plan), shuffled(3, first, second))
    assert out == [shards, row("a", "10"), row("b", "8"), complete("SELECT 2"), ready(b"I")]


def test_a_value_that_cannot_be_decoded_fails_the_batch_and_the_session_goes_on() -> None:
    plan = MergePlan(order_by=(SortKey(0),))
    shards = description(("x", NUMERIC))
    first = [shards, row("1"), row("oops"), complete("SELECT 2"), ready(b"I")]
    second = [shards, row("2"), complete("SELECT 1"), ready(b"I")]
    merger = ResultMerger(2, plan=plan)
    out = run(merger, one_after_another(first, second))
    assert out[0] == shards
    assert [raw[:1] for raw in out[1:]] == [b"E", b"Z"]
    assert error_fields(out[1])["C"] == "0A000"
    assert merger.ready_count == 1
    # the next batch merges again
    out = run(merger, alternating([shards, row("3"), complete("SELECT 1"), ready(b"I")],
                                  [shards, row("1"), complete("SELECT 1"), ready(b"I")]))
    assert out == [shards, row("1"), row("3"), complete("SELECT 2"), ready(b"I")]


def test_a_collation_the_proxy_cannot_reproduce_is_refused_before_any_row() -> None:
    shards = description(("name", TEXT))
    answer = [shards, row("a"), complete("SELECT 1"), ready(b"I")]
    merger = ResultMerger(2, plan=BY_ID, collation="icu")
    out = run(merger, alternating(answer, answer))
    assert [raw[:1] for raw in out] == [b"E", b"Z"]
    fields = error_fields(out[0])
    assert fields["C"] == "0A000" and "ICU" in fields["M"]


def test_extended_batch_with_describe_of_the_portal_in_binary() -> None:
    shards = description(("id", INT8), fmt=1)
    def answer(*numbers: int) -> list[bytes]:
        rows = [message(b"D", struct.pack("!hi", 1, 8) + struct.pack("!q", number)) for number in numbers]
        return [PARSE_DONE, BIND_DONE, shards, *rows, complete(f"SELECT {len(rows)}"), ready(b"I")]
    out = run(ResultMerger(2, plan=BY_ID), alternating(answer(-5, 7), answer(-300, 2, 9)))
    assert out[:3] == [PARSE_DONE, BIND_DONE, shards]
    assert [struct.unpack_from("!q", raw, 11)[0] for raw in out[3:-2]] == [-300, -5, 2, 7, 9]
    assert out[-2:] == [complete("SELECT 5"), ready(b"I")]


def test_a_describe_the_caller_added_is_used_for_the_merge_and_not_sent() -> None:
    shards = description(("id", INT8), fmt=1)
    def answer(*numbers: int) -> list[bytes]:
        rows = [message(b"D", struct.pack("!hi", 1, 8) + struct.pack("!q", number)) for number in numbers]
        return [BIND_DONE, shards, *rows, complete(f"SELECT {len(rows)}"), ready(b"I")]
    merger = ResultMerger(2, plan=BY_ID)
    merger.hide_row_descriptions(1)
    out = run(merger, alternating(answer(4, 8), answer(1, 6)))
    assert out[0] == BIND_DONE
    assert [struct.unpack_from("!q", raw, 11)[0] for raw in out[1:-2]] == [1, 4, 6, 8]  # no RowDescription
    assert out[-2:] == [complete("SELECT 4"), ready(b"I")]


def test_extended_batch_without_rows_is_unchanged() -> None:
    first = [PARSE_DONE, BIND_DONE, NO_DATA, complete("UPDATE 1"), ready(b"I")]
    out = run(ResultMerger(2, plan=BY_ID), alternating(first, first))
    assert out == [PARSE_DONE, BIND_DONE, NO_DATA, complete("UPDATE 2"), ready(b"I")]


def test_rows_after_a_statement_description_need_their_own() -> None:
    # Parse, Describe (statement), Bind, Execute, Sync: the RowDescription's formats are placeholders
    hidden = MergePlan(order_by=(SortKey(1),), visible_columns=1)
    statement = description(("id", INT4), ("_shardgate_hidden_1", INT4))
    def answer(*pairs: tuple[str, str]) -> list[bytes]:
        return [PARSE_DONE, PARAMETERS, statement, BIND_DONE, *(row(*pair) for pair in pairs),
                complete(f"SELECT {len(pairs)}"), ready(b"I")]
    merger = ResultMerger(2, plan=hidden)
    out = run(merger, one_after_another(answer(("1", "2")), answer(("2", "1"))))
    assert out[:3] == [PARSE_DONE, PARAMETERS, ID]  # described without the hidden column
    assert out[3] == BIND_DONE
    assert error_fields(out[4])["C"] == "0A000" and "Describe" in error_fields(out[4])["M"]
    assert out[5:] == [ready(b"I")]
    merger = ResultMerger(2, plan=hidden)
    merger.assume_row_description(statement)
    out = run(merger, one_after_another(answer(("1", "2"), ("3", "3")), answer(("2", "1"))))
    assert out == [PARSE_DONE, PARAMETERS, ID, BIND_DONE, row("2"), row("1"), row("3"), complete("SELECT 3"),
                   ready(b"I")]


def test_assumed_description_knows_a_source_that_finished_without_rows() -> None:
    merger = ResultMerger(2, plan=BY_ID)
    merger.assume_row_description(ID)
    out = run(merger, one_after_another([BIND_DONE, complete("SELECT 0"), ready(b"I")],
                                        [BIND_DONE, *ints(2, 1), complete("SELECT 2"), ready(b"I")]))
    assert out == [BIND_DONE, *ints(2, 1), complete("SELECT 2"), ready(b"I")]  # shard order, nothing to wait for


def test_portal_suspended_is_refused_when_rows_are_merged() -> None:
    answer = [BIND_DONE, ID, *ints(1, 2), SUSPENDED, ready(b"I")]
    out = run(ResultMerger(2, plan=BY_ID), alternating(answer, answer))
    assert out[:2] == [BIND_DONE, ID]
    assert [raw[:1] for raw in out[2:]][-2:] == [b"E", b"Z"]
    assert error_fields(out[-2])["C"] == "0A000"


def test_each_row_set_of_a_batch_is_merged_on_its_own() -> None:
    first = [ID, *ints(2), complete("SELECT 1"), ID, *ints(5, 6), complete("SELECT 2"), ready(b"I")]
    second = [ID, *ints(1), complete("SELECT 1"), ID, *ints(4), complete("SELECT 1"), ready(b"I")]
    out = run(ResultMerger(2, plan=MergePlan(order_by=(SortKey(0),), limit=2)), one_after_another(first, second))
    assert out == [ID, *ints(1, 2), complete("SELECT 2"), ID, *ints(4, 5), complete("SELECT 2"), ready(b"I")]


def test_an_error_from_a_shard_while_rows_are_merged() -> None:
    failure = error("22012", "division by zero")
    merger = ResultMerger(2, plan=BY_ID)
    out = run(merger, [(0, ID), (1, ID), (0, row("1")), (1, failure), (0, row("2")), (0, complete("SELECT 2")),
                       (0, ready(b"I")), (1, ready(b"I"))])
    assert out == [ID, failure, ready(b"I")]
    assert not merger.held(0) and not merger.held(1)


def test_window_of_zero_rows_is_refused() -> None:
    with pytest.raises(ValueError):
        ResultMerger(2, plan=BY_ID, window_rows=0)


def test_a_bug_in_a_merge_fails_the_batch_not_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    import routing.merge

    class Broken(RowMerge):
        def add(self, source: int, row: bytes) -> None:
            raise RuntimeError("boom")

    monkeypatch.setattr(routing.merge, "merge_rows", lambda plan, description, *_: Broken(description, None))  # type: ignore[arg-type]
    merger = ResultMerger(2, plan=BY_ID)
    out = run(merger, alternating(select(ints(1)), select(ints(2))))
    assert [raw[:1] for raw in out] == [b"T", b"E", b"Z"]
    fields = error_fields(out[1])
    assert fields["C"] == "XX000" and "boom" in fields["M"]
