"""The result merger: several shards' answers to the same messages become the one stream a client expects."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

import pytest

from routing.merge import ResultMerger

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
