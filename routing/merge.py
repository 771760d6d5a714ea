"""Merges what several shards answered to the same messages into the one answer a client expects."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from routing.merge_plan import MergePlan
from routing.rows import MergeError, RowMerge, client_description, merge_rows

_ROW, _ERROR, _READY, _PARAMETER, _NOTIFY = b"DEZSA"
_DESCRIPTION, _COMPLETE, _PARSE_COMPLETE, _PARAMETER_DESCRIPTION, _SUSPENDED = b"TC1ts"
_STATUS_FAILED, _STATUS_IN_TRANSACTION = b"ET"
_PASS_THROUGH = frozenset(b"DNA")
# Where each source stops until every source has reached one; the message is then sent once, combined.
_BARRIERS = frozenset(b"TCI123tnsZ")
_COPY_RESPONSES = frozenset(b"GHW")
_COPY_DATA, _COPY_DONE = b"dc"
_COUNTED_VERBS = frozenset(("SELECT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE"))
_MESSAGE_NAMES = {
    ord("T"): "RowDescription", ord("C"): "CommandComplete", ord("I"): "EmptyQueryResponse",
    ord("1"): "ParseComplete", ord("2"): "BindComplete", ord("3"): "CloseComplete",
    ord("t"): "ParameterDescription", ord("n"): "NoData", ord("s"): "PortalSuspended",
    ord("Z"): "ReadyForQuery",
}
# What follows a column's name in a RowDescription: table OID, column number, type OID, type size,
# type modifier, format code.
_COLUMN = struct.Struct("!IhIhih")
_LENGTH = struct.Struct("!I")
FEATURE_NOT_SUPPORTED = "0A000"
INTERNAL_ERROR = "XX000"

_Column = tuple[bytes, int, int, int]  # name, type OID, type modifier, format code


class ResultMerger:
    """Fed whole backend messages from each source (`feed`), hands back the merged stream (`take`).

    DataRow, NoticeResponse and NotificationResponse pass through as they come. At a barrier
    (RowDescription, CommandComplete, ReadyForQuery, the extended protocol's completions...) a source
    stops until every source has reached one; then the barrier is sent once, combined. While a source is
    stopped (`held`), what it is fed is queued here: the caller is expected to stop reading that server
    until `held` is False again, so a queue only ever holds what a server sent ahead of the others.
    An ErrorResponse from any source, or a difference the merger cannot combine (sent as its own
    ErrorResponse, SQLSTATE 0A000), is sent once; the rest of every source's answer up to its
    ReadyForQuery is dropped and one merged ReadyForQuery ends the batch.

    `hidden_parse_completes`: how many ParseCompletes at the start of the first batch answer Parses the
    caller sent on its own; they are not sent to the client. `copy_sources`: the sources that entered
    COPY mode (never merged): the caller sends them CopyFail and may discard them from the set.

    `plan`: how the rows of a SELECT are combined (routing.rows): None, or a plan that concatenates, keeps
    the fast path above (rows pass through undecoded). Otherwise each row set (every RowDescription of
    the batch: give a plan only for a batch of one statement) is merged as the plan says; the client gets
    the RowDescription of the merged columns (avg's type, no hidden columns) and a CommandComplete counting
    the rows it got. An ORDER BY merge holds at most `window_rows` rows per source: `held` is True for a
    source at that many. `collation`: the database's collation for text: "C" or "POSIX" (byte order), a
    libc locale name (reproduced with the proxy's own libc), or "icu" (refused where text must be ordered).
    A Describe of the statement (ParameterDescription, then RowDescription) says nothing of the formats
    the rows will come in: rows of an Execute without a Describe of its portal are refused (0A000) unless
    the caller gave their description with `assume_row_description`."""

    __slots__ = (
        "_by_source",
        "_collation",
        "_combining",
        "_copy",
        "_described_statement",
        "_discarding",
        "_execute_description",
        "_headers",
        "_hidden_descriptions",
        "_hidden_parse_completes",
        "_out",
        "_parameters",
        "_plan",
        "_queues",
        "_ready_count",
        "_rows",
        "_sources",
        "_stopped_at",
        "_stopped_count",
        "_trailer",
        "_window_rows",
        "copy_sources",
    )

    def __init__(self, sources: int, hidden_parse_completes: int = 0, plan: MergePlan | None = None,
                 collation: str = "C", window_rows: int = 1000, *, by_source: bool = False,
                 headers: Sequence[bytes] = (), trailer: Sequence[bytes] = (), copy: bool = False) -> None:
        if sources < 1:
            raise ValueError("a merger needs at least one source")
        if window_rows < 1:
            raise ValueError("a merger needs a window of at least one row")
        self._sources = sources
        self._hidden_parse_completes = hidden_parse_completes
        self._hidden_descriptions = 0  # portal RowDescriptions of Describes the caller added itself
        self._stopped_at: list[bytes | None] = [None] * sources  # the barrier each source waits at
        self._stopped_count = 0
        self._queues: list[deque[bytes]] = [deque() for _ in range(sources)]
        self._out: list[bytes] = []
        self._discarding = False  # an error was sent: only each source's ReadyForQuery still counts
        self._parameters: dict[bytes, bytes] = {}  # ParameterStatus name -> the last message sent for it
        self._ready_count = 0
        self.copy_sources: set[int] = set()
        combining = plan is not None and (not plan.concatenates or plan.visible_columns is not None)
        self._plan = plan if combining else None
        self._combining = combining  # the hot path's one question
        self._collation = collation
        self._window_rows = window_rows
        self._rows: RowMerge | None = None  # the merge of the current row set
        self._described_statement = False  # the last barrier sent was a ParameterDescription
        self._execute_description: bytes | None = None
        # EXPLAIN: each source's rows kept together (a plan is a few rows), sent source by source at the
        # CommandComplete, each after its header row, then the trailer rows
        self._by_source: list[list[bytes]] | None = [[] for _ in range(sources)] if by_source else None
        self._headers = tuple(headers)
        self._trailer = tuple(trailer)
        # a COPY the caller runs on every shard: CopyInResponse, CopyOutResponse and CopyDone are sent
        # once (each a barrier), CopyData passes through
        self._copy = copy

    def feed(self, source: int, message: bytes | memoryview) -> None:
        """One whole backend message (type, length, body) from server `source`."""
        # A memoryview's buffer may be reused by the caller before take(): keep a copy.
        data = message if type(message) is bytes else bytes(message)
        if self._stopped_at[source] is not None:
            self._queues[source].append(data)
        elif data[0] == _ROW and not self._discarding:
            if self._combining:
                self._row(source, data)
            elif self._by_source is not None:
                self._by_source[source].append(data)
            else:
                self._out.append(data)
        else:
            self._advance(source, data)
            if self._stopped_count == self._sources:
                self._release()

    def take(self) -> bytes:
        """What is ready for the client since the last take(), b"" if nothing."""
        out = self._out
        if not out:
            return b""
        joined = b"".join(out)
        out.clear()
        return joined

    def held(self, source: int) -> bool:
        """True while `source` waits at a barrier for the others, or while a merge holds as many of its rows
        as it may: stop reading its server meanwhile."""
        if self._stopped_at[source] is not None:
            return True
        rows = self._rows
        return rows is not None and rows.held(source)

    def assume_row_description(self, description: bytes) -> None:
        """The RowDescription of rows that come without one (an Execute of a statement described earlier,
        with the formats its Bind asked for: routing.rows.with_result_formats), so a plan can merge them."""
        self._execute_description = description

    def hide_row_descriptions(self, count: int) -> None:
        """The caller added `count` Describes of portals the client did not ask for (the merge needs their
        columns): their RowDescriptions are used, not sent."""
        self._hidden_descriptions += count

    @property
    def hidden_parse_completes(self) -> int:
        return self._hidden_parse_completes

    @property
    def ready_count(self) -> int:
        """How many merged ReadyForQuery have been sent so far."""
        return self._ready_count

    # ------------------------------------------------------------ one message of a source that goes on

    def _advance(self, source: int, data: bytes) -> None:
        kind = data[0]
        if self._discarding:
            self._advance_discarding(source, kind, data)
        elif kind == _ROW and self._combining:
            self._row(source, data)
        elif kind in _PASS_THROUGH:
            self._out.append(data)
        elif kind in _BARRIERS:
            if self._combining and not self._rows_stop(source, kind):
                return
            self._stop(source, data)
        elif kind == _ERROR:
            self._out.append(data)
            self._discard()
        elif kind == _PARAMETER:
            self._parameter(data)
        elif self._copy and (kind in _COPY_RESPONSES or kind == _COPY_DONE):
            self._stop(source, data)
        elif self._copy and kind == _COPY_DATA:
            self._out.append(data)
        elif kind in _COPY_RESPONSES:
            self.copy_sources.add(source)
            self._fail("COPY is not supported across shards")
        else:
            self._fail(f"shards sent a message the proxy cannot merge (type {chr(kind)!r})")

    def _advance_discarding(self, source: int, kind: int, data: bytes) -> None:
        # ParameterStatus and NotificationResponse report the session, not the failed statement: they
        # still reach the client. A source entering COPY must still be known, or it would never end.
        if kind == _READY:
            self._stop(source, data)
        elif kind == _PARAMETER:
            self._parameter(data)
        elif kind == _NOTIFY:
            self._out.append(data)
        elif kind in _COPY_RESPONSES:
            self.copy_sources.add(source)

    def _stop(self, source: int, data: bytes) -> None:
        self._stopped_at[source] = data
        self._stopped_count += 1

    def _parameter(self, data: bytes) -> None:
        name = data[5 : data.index(0, 5)]
        if self._parameters.get(name) != data:
            self._parameters[name] = data
            self._out.append(data)

    def _fail(self, message: str, sqlstate: str = FEATURE_NOT_SUPPORTED) -> None:
        if not self._discarding:
            self._out.append(_error_response(sqlstate, message))
            self._discard()

    def _discard(self) -> None:
        """From now on each source's answer is dropped up to its ReadyForQuery: a source stopped at
        another barrier goes on (dropping that barrier and what it queued)."""
        self._discarding = True
        self._rows = None
        stopped_at = self._stopped_at
        for source, message in enumerate(stopped_at):
            if message is not None and message[0] != _READY:
                stopped_at[source] = None
                self._stopped_count -= 1
                self._drain(source)

    def _drain(self, source: int) -> None:
        queue = self._queues[source]
        stopped_at = self._stopped_at
        while queue and stopped_at[source] is None:
            self._advance(source, queue.popleft())

    # ------------------------------------------------------------ rows merged by a plan

    def _row(self, source: int, data: bytes) -> None:
        rows = self._rows
        if rows is None:
            rows = self._rows_without_description()
            if rows is None:
                return
        try:
            rows.add(source, data)
        except Exception as error:
            self._merge_failed(error)

    def _rows_stop(self, source: int, kind: int) -> bool:
        """A source reaches a barrier while rows are merged: False when that failed the batch."""
        rows = self._rows
        if kind == _SUSPENDED:
            self._fail("fetching a cross-shard result in parts (Execute with a row limit) is not supported when "
                       "its rows are merged (ORDER BY, LIMIT, aggregates, GROUP BY, DISTINCT): fetch all rows "
                       "at once, or filter on the sharding key to run it on one shard")
            return False
        if kind == _COMPLETE and rows is not None:
            try:
                rows.finish(source)
            except Exception as error:
                self._merge_failed(error)
                return False
        return True

    def _rows_without_description(self) -> RowMerge | None:
        description = self._execute_description
        if description is None:
            self._fail("the shards sent rows without a RowDescription, and merging them (ORDER BY, LIMIT, "
                       "aggregates, GROUP BY, DISTINCT) needs their columns: send Describe with the Execute")
            return None
        rows = self._start_rows(description)
        if rows is not None:
            try:
                for source, barrier in enumerate(self._stopped_at):
                    if barrier is not None and barrier[0] == _COMPLETE:  # finished before any row came
                        rows.finish(source)
            except Exception as error:
                self._merge_failed(error)
                return None
        return rows

    def _start_rows(self, description: bytes) -> RowMerge | None:
        assert self._plan is not None
        try:
            rows = merge_rows(self._plan, description, self._sources, self._out, self._collation,
                              self._window_rows)
        except Exception as error:
            self._merge_failed(error)
            return None
        self._rows = rows
        return rows

    def _describe(self, description: bytes, of_statement: bool) -> None:
        """The merged columns' RowDescription for the client; for a portal's, the merge of its rows."""
        plan = self._plan
        assert plan is not None
        if of_statement:  # its format codes are placeholders: rows of a later Execute need their own
            try:
                self._out.append(client_description(description, plan))
            except Exception as error:
                self._merge_failed(error)
            return
        rows = self._start_rows(description)
        if rows is not None:
            if self._hidden_descriptions:
                self._hidden_descriptions -= 1
                return
            self._out.append(rows.description)

    def _merge_failed(self, error: Exception) -> None:
        if isinstance(error, MergeError):
            self._fail(error.message, error.sqlstate)
        else:  # a bug of the merge: the batch fails, the session goes on
            self._fail(f"the proxy could not merge the shards' rows ({type(error).__name__}: {error})",
                       INTERNAL_ERROR)

    # ------------------------------------------------------------ every source at a barrier

    def _release(self) -> None:
        """While every source is stopped: send the combined barrier, then let each go on with what it
        queued meanwhile (which may bring them all to the next barrier)."""
        while self._stopped_count == self._sources:
            barriers = [message for message in self._stopped_at if message is not None]
            # cleared before combining: a failing combination must not drop these barriers a second time
            self._stopped_at = [None] * self._sources
            self._stopped_count = 0
            self._combine(barriers)
            for source in range(self._sources):
                self._drain(source)

    def _combine(self, barriers: list[bytes]) -> None:
        first = barriers[0]
        kind = first[0]
        of_statement = self._described_statement
        self._described_statement = kind == _PARAMETER_DESCRIPTION
        if any(message[0] != kind for message in barriers):
            self._fail(f"shards answered differently: {_kinds_by_source(barriers)}")
            for source, message in enumerate(barriers):
                if message[0] == _READY:  # that source's batch is over: its Z ends its discarding
                    self._stop(source, message)
        elif kind == _READY:
            self._ready(barriers)
        elif kind == _DESCRIPTION:
            difference = _column_difference(barriers)
            if difference:
                self._fail(f"shards returned different columns: {difference}")
            elif self._combining:
                self._describe(first, of_statement)
            else:
                self._out.append(first)
        elif kind == _COMPLETE:
            tag, problem = _combined_tag([_tag(message) for message in barriers])
            if problem:
                self._fail(problem)
            else:
                rows = self._rows
                if rows is not None:  # the rows the client got, not the shards' total
                    tag = _with_count(tag, rows.rows_sent)
                    self._rows = None
                grouped = self._by_source
                if grouped is not None:
                    for source, kept in enumerate(grouped):
                        if source < len(self._headers) and self._headers[source]:
                            self._out.append(self._headers[source])
                        self._out.extend(kept)
                        kept.clear()
                    self._out.extend(self._trailer)
                self._out.append(_command_complete(tag))
        elif kind == _PARSE_COMPLETE and self._hidden_parse_completes:
            self._hidden_parse_completes -= 1
        else:
            self._out.append(first)

    def _ready(self, barriers: list[bytes]) -> None:
        statuses = {message[5] for message in barriers}
        if _STATUS_FAILED in statuses:
            status = b"E"
        elif _STATUS_IN_TRANSACTION in statuses:
            status = b"T"
        else:
            status = b"I"
        self._out.append(b"Z\x00\x00\x00\x05" + status)
        self._discarding = False
        self._rows = None
        self._described_statement = False
        # hidden ParseCompletes belong to the first batch; if it failed before them they never come
        self._hidden_parse_completes = 0
        self._ready_count += 1


def _kinds_by_source(barriers: list[bytes]) -> str:
    return ", ".join(f"{_MESSAGE_NAMES.get(message[0], chr(message[0]))} from server {source}"
                     for source, message in enumerate(barriers))


def _tag(message: bytes) -> str:
    return message[5:].rstrip(b"\x00").decode("utf-8", "replace")


def _combined_tag(tags: list[str]) -> tuple[str, str]:
    """(the tag for the client, a problem or ""): row counts summed, tags without one equal."""
    counted = [_counted(tag) for tag in tags]
    first = counted[0]
    if first is not None and all(item is not None and item[0] == first[0] for item in counted):
        return f"{first[0]} {sum(item[1] for item in counted if item is not None)}", ""
    if any(tag != tags[0] for tag in tags):
        return "", f"shards answered with different command tags: {', '.join(sorted(set(tags)))}"
    return tags[0], ""


def _with_count(tag: str, count: int) -> str:
    counted = _counted(tag)
    return tag if counted is None else f"{counted[0]} {count}"


def _counted(tag: str) -> tuple[str, int] | None:
    """(the tag without its row count, the count) for a tag that carries a row count, else None."""
    words = tag.split(" ")
    verb = words[0]
    if verb == "INSERT" and len(words) == 3 and _is_count(words[1]) and _is_count(words[2]):
        return "INSERT 0", int(words[2])  # the OID of one inserted row means nothing across shards
    if verb in _COUNTED_VERBS and len(words) == 2 and _is_count(words[1]):
        return verb, int(words[1])
    return None


def _is_count(word: str) -> bool:
    return word.isascii() and word.isdigit()


def _column_difference(descriptions: list[bytes]) -> str:
    """What differs between RowDescriptions (column count, names, type OIDs, type modifiers, formats;
    not the table OIDs and column numbers, which differ from server to server), or ""."""
    reference = descriptions[0]
    try:
        reference_columns = _columns(reference)
        for source, description in enumerate(descriptions[1:], 1):
            if description == reference:
                continue
            columns = _columns(description)
            if len(columns) != len(reference_columns):
                return f"{len(reference_columns)} columns from server 0, {len(columns)} from server {source}"
            for number, (mine, theirs) in enumerate(zip(reference_columns, columns, strict=True), 1):
                if mine != theirs:
                    return _describe_column_difference(number, mine, theirs, source)
    except (ValueError, struct.error):
        return "a RowDescription could not be read"
    return ""


def _describe_column_difference(number: int, mine: _Column, theirs: _Column, source: int) -> str:
    name = mine[0].decode("utf-8", "replace")
    if mine[0] != theirs[0]:
        other = theirs[0].decode("utf-8", "replace")
        return f"column {number} is {name!r} on server 0, {other!r} on server {source}"
    _, type_oid, modifier, format_code = mine
    _, their_type_oid, their_modifier, their_format_code = theirs
    if type_oid != their_type_oid:
        what, value, other_value = "type OID", type_oid, their_type_oid
    elif modifier != their_modifier:
        what, value, other_value = "type modifier", modifier, their_modifier
    else:
        what, value, other_value = "format", format_code, their_format_code
    return f"column {number} {name!r} has {what} {value} on server 0, {other_value} on server {source}"


def _columns(description: bytes) -> list[_Column]:
    count = int.from_bytes(description[5:7], "big")
    pos = 7
    columns: list[_Column] = []
    for _ in range(count):
        end = description.index(0, pos)
        _table, _number, type_oid, _size, modifier, format_code = _COLUMN.unpack_from(description, end + 1)
        columns.append((description[pos:end], type_oid, modifier, format_code))
        pos = end + 1 + _COLUMN.size
    return columns


def _command_complete(tag: str) -> bytes:
    body = tag.encode() + b"\x00"
    return b"C" + _LENGTH.pack(len(body) + 4) + body


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = ((b"S", "ERROR"), (b"V", "ERROR"), (b"C", sqlstate), (b"M", message))
    body = b"".join(code + text.encode() + b"\x00" for code, text in fields) + b"\x00"
    return b"E" + _LENGTH.pack(len(body) + 4) + body
