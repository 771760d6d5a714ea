"""COPY ... FROM STDIN into a sharded table: the client's rows (text, CSV or binary format) cut into whole
rows and sent to the shard of each row's key, across CopyData boundaries."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from routing.errors import RoutingError

FEATURE_NOT_SUPPORTED = "0A000"
BAD_COPY_FILE_FORMAT = "22P04"
NULL_NOT_ALLOWED = "23502"

_COPY_TABLE = re.compile(
    r"""\s*copy\s+(?P<table>(?:"[^"]+"|[\w$]+)(?:\s*\.\s*(?:"[^"]+"|[\w$]+))?)\s*
        (?:\((?P<columns>[^)]*)\))?\s*
        (?P<direction>from\s+stdin|to\s+stdout)\b(?P<options>.*?)\s*;?\s*$""",
    re.IGNORECASE | re.DOTALL | re.VERBOSE)
_COPY_QUERY = re.compile(r"\s*copy\s*\((?P<query>.*)\)\s*to\s+stdout\b(?P<options>.*?)\s*;?\s*$",
                         re.IGNORECASE | re.DOTALL)
_OPTION = re.compile(r"(\w+)(?:\s+('(?:[^']|'')*'|\w+))?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CopyStatement:
    """One COPY the proxy understood: into or out of `table` (None for COPY (query) TO STDOUT)."""

    table: str | None
    columns: tuple[str, ...] | None
    incoming: bool  # FROM STDIN
    query: str | None  # COPY (query) TO STDOUT
    format: str  # text | csv | binary
    delimiter: str
    quote: str
    escape: str
    header: bool


def parse_copy(sql: str) -> CopyStatement | None:
    """The COPY statement's parts, None when it is not a COPY from STDIN / to STDOUT the proxy reads."""
    found = _COPY_QUERY.match(sql)
    if found is not None:
        return _with_options(None, None, False, found.group("query"), found.group("options"))
    found = _COPY_TABLE.match(sql)
    if found is None:
        return None
    table = _identifier(found.group("table").split(".")[-1].strip())
    columns = None
    if found.group("columns") is not None:
        columns = tuple(_identifier(part.strip()) for part in found.group("columns").split(","))
    incoming = found.group("direction").lower().startswith("from")
    return _with_options(table, columns, incoming, None, found.group("options"))


def _identifier(text: str) -> str:
    return text[1:-1] if text.startswith('"') and text.endswith('"') else text.lower()


def _with_options(table: str | None, columns: tuple[str, ...] | None, incoming: bool, query: str | None,
                  raw: str) -> CopyStatement:
    text = raw.strip()
    if text.lower().startswith("with"):
        text = text[4:].strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    options: dict[str, str] = {}
    legacy = text.lower().split()
    if "csv" in legacy and "format" not in legacy:
        options["format"] = "csv"
    if "binary" in legacy and "format" not in legacy:
        options["format"] = "binary"
    if "header" in legacy:
        options["header"] = "true"
    for part in text.split(","):
        match = _OPTION.match(part.strip())
        if match is not None and match.group(2) is not None:
            value = match.group(2)
            if value.startswith("'"):
                value = value[1:-1].replace("''", "'")
            options[match.group(1).lower()] = value
        elif match is not None and match.group(1).lower() == "header":
            options["header"] = "true"
    format_ = options.get("format", "text").lower()
    delimiter = options.get("delimiter", "," if format_ == "csv" else "\t")
    quote = options.get("quote", '"')
    return CopyStatement(table, columns, incoming, query, format_, delimiter, quote, options.get("escape", quote),
                         options.get("header", "false").lower() in ("true", "on", "1", "match"))


class CopySplitter:
    """Fed the client's CopyData payloads, hands back each shard's whole rows. `shard_of(text)` maps a key
    in text form to its shard; `key_index` is the key's column; None sends every row to every shard."""

    def __init__(self, statement: CopyStatement, key_index: int | None, shards: tuple[int, ...],
                 shard_of: Callable[[str], int], column: str) -> None:
        if len(statement.delimiter) != 1 or len(statement.quote) != 1 or len(statement.escape) != 1:
            raise RoutingError("COPY delimiter, quote and escape must be one character each", FEATURE_NOT_SUPPORTED)
        self.statement = statement
        self.key_index = key_index
        self.shards = shards
        self.shard_of = shard_of
        self.column = column
        self.csv = statement.format == "csv"
        self.delimiter = statement.delimiter.encode()
        self.quote = statement.quote.encode()
        self.escape = statement.escape.encode()
        self.pending = bytearray()
        self.header_pending = statement.header
        self.rows = 0
        self.ended = False

    def feed(self, data: bytes) -> dict[int, list[bytes]]:
        """Whole rows per shard from what has arrived so far (a partial row waits for the rest)."""
        out: dict[int, list[bytes]] = {}
        if self.ended:
            return out
        pending = self.pending
        pending += data
        pos = 0
        size = len(pending)
        while pos < size:
            end = self._row_end(pending, pos)
            if end < 0:
                break
            row = bytes(pending[pos:end])
            pos = end
            self._route(row, out)
            if self.ended:
                break
        del pending[:pos]
        return out

    def finish(self) -> dict[int, list[bytes]]:
        """CopyDone: the last row (without its newline) routed; a row left unfinished is an error."""
        out: dict[int, list[bytes]] = {}
        if self.pending and not self.ended:
            row = bytes(self.pending)
            if self.csv and self._open_quote(row):
                raise RoutingError("unterminated CSV quoted field at the end of the COPY data", BAD_COPY_FILE_FORMAT)
            self.pending.clear()
            self._route(row + b"\n", out)
        return out

    # ------------------------------------------------------------ one row

    def _route(self, row: bytes, out: dict[int, list[bytes]]) -> None:
        if self.header_pending:
            self.header_pending = False
            for shard in self.shards:
                out.setdefault(shard, []).append(row)
            return
        if not self.csv and row.rstrip(b"\r\n") == b"\\.":
            self.ended = True
            return
        if self.key_index is None:
            for shard in self.shards:
                out.setdefault(shard, []).append(row)
            self.rows += 1
            return
        key = self._field(row.rstrip(b"\r\n"), self.key_index)
        if key is None:
            raise RoutingError(f"row {self.rows + 1} of the COPY has a NULL or missing {self.column}: "
                               "it has no shard", NULL_NOT_ALLOWED)
        out.setdefault(self.shard_of(key), []).append(row)
        self.rows += 1

    def _row_end(self, data: bytearray, pos: int) -> int:
        """Where the row from `pos` ends (after its newline), -1 while it has not all arrived."""
        newline = data.find(b"\n", pos)
        if newline < 0:
            return -1
        if not self.csv or self.quote not in data[pos:newline]:
            return newline + 1
        # CSV with quotes: a newline inside a quoted field does not end the row
        in_quotes = False
        index = pos
        quote, escape = self.quote[0], self.escape[0]
        size = len(data)
        while index < size:
            byte = data[index]
            if in_quotes:
                if index + 1 >= size and byte in (quote, escape):
                    return -1  # what follows decides whether it closes the field: wait for it
                if byte == escape and escape != quote and data[index + 1] in (quote, escape):
                    index += 2
                    continue
                if byte == quote:
                    if escape == quote and data[index + 1] == quote:  # a doubled quote
                        index += 2
                        continue
                    in_quotes = False
            elif byte == quote:
                in_quotes = True
            elif byte == 0x0A:
                return index + 1
            index += 1
        return -1

    def _open_quote(self, row: bytes) -> bool:
        return row.count(self.quote) % 2 == 1

    def _field(self, line: bytes, index: int) -> str | None:
        """Column `index` of one row as text (None for NULL or a missing column)."""
        if self.csv:
            return self._csv_field(line, index)
        fields = _split_text(line, self.delimiter[0])
        if index >= len(fields):
            return None
        raw = fields[index]
        if raw == b"\\N":
            return None
        return _unescape_text(raw).decode("utf-8")

    def _csv_field(self, line: bytes, index: int) -> str | None:
        quote, escape, delimiter = self.quote[0], self.escape[0], self.delimiter[0]
        fields: list[tuple[bytes, bool]] = []
        current = bytearray()
        quoted = in_quotes = False
        pos, size = 0, len(line)
        while pos < size:
            byte = line[pos]
            if in_quotes:
                if byte == escape and pos + 1 < size and line[pos + 1] in (quote, escape):
                    current.append(line[pos + 1])
                    pos += 2
                    continue
                if byte == quote:
                    in_quotes = False
                else:
                    current.append(byte)
            elif byte == quote:
                in_quotes = quoted = True
            elif byte == delimiter:
                fields.append((bytes(current), quoted))
                current = bytearray()
                quoted = False
            else:
                current.append(byte)
            pos += 1
        fields.append((bytes(current), quoted))
        if index >= len(fields):
            return None
        value, was_quoted = fields[index]
        if not value and not was_quoted:
            return None  # CSV's NULL: an unquoted empty field
        return value.decode("utf-8")


BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_BINARY_HEADER_BYTES = len(BINARY_SIGNATURE) + 8  # the signature, the flags and the extension length
_TRAILER = b"\xff\xff"


class BinaryCopySplitter:
    """COPY in binary format: the file header goes to every shard, then each tuple to the shard of its key
    (`shard_of(raw)` maps the key field's binary value to its shard), then the trailer to every shard."""

    def __init__(self, key_index: int | None, shards: tuple[int, ...], shard_of: Callable[[bytes], int],
                 column: str) -> None:
        self.key_index = key_index
        self.shards = shards
        self.shard_of = shard_of
        self.column = column
        self.pending = bytearray()
        self.header_done = False
        self.rows = 0
        self.ended = False

    def feed(self, data: bytes) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        if self.ended:
            return out
        pending = self.pending
        pending += data
        pos = 0
        if not self.header_done:
            pos = self._header(pending, out)
            if pos < 0:
                return out
        size = len(pending)
        while size - pos >= 2 and not self.ended:
            end = self._tuple(pending, pos, out)
            if end < 0:
                break
            pos = end
        del pending[:pos]
        return out

    def finish(self) -> dict[int, list[bytes]]:
        """CopyDone: what is left must be nothing (the trailer may be missing, as PostgreSQL allows)."""
        if self.pending and not self.ended:
            raise RoutingError(f"binary COPY data ends inside {'its header' if not self.header_done else 'a row'}",
                               BAD_COPY_FILE_FORMAT)
        return {}

    def _header(self, data: bytearray, out: dict[int, list[bytes]]) -> int:
        if len(data) < _BINARY_HEADER_BYTES:
            if not BINARY_SIGNATURE.startswith(bytes(data[: len(BINARY_SIGNATURE)])):
                raise RoutingError("binary COPY data does not start with the PGCOPY signature", BAD_COPY_FILE_FORMAT)
            return -1
        if not data.startswith(BINARY_SIGNATURE):
            raise RoutingError("binary COPY data does not start with the PGCOPY signature", BAD_COPY_FILE_FORMAT)
        extension = int.from_bytes(data[_BINARY_HEADER_BYTES - 4 : _BINARY_HEADER_BYTES], "big")
        end = _BINARY_HEADER_BYTES + extension
        if len(data) < end:
            return -1
        header = bytes(data[:end])
        for shard in self.shards:
            out.setdefault(shard, []).append(header)
        self.header_done = True
        return end

    def _tuple(self, data: bytearray, pos: int, out: dict[int, list[bytes]]) -> int:
        """Where the tuple at `pos` ends, routed; -1 while it has not all arrived."""
        size = len(data)
        count = int.from_bytes(data[pos : pos + 2], "big", signed=True)
        if count == -1:
            for shard in self.shards:
                out.setdefault(shard, []).append(_TRAILER)
            self.ended = True
            return pos + 2
        if count < 0:
            raise RoutingError(f"binary COPY row {self.rows + 1} has a negative field count", BAD_COPY_FILE_FORMAT)
        field = pos + 2
        key: bytes | None = None
        for index in range(count):
            if field + 4 > size:
                return -1
            length = int.from_bytes(data[field : field + 4], "big", signed=True)
            field += 4
            if length < -1:
                raise RoutingError(f"binary COPY row {self.rows + 1} has a bad field length", BAD_COPY_FILE_FORMAT)
            if length == -1:
                continue
            if field + length > size:
                return -1
            if index == self.key_index:
                key = bytes(data[field : field + length])
            field += length
        row = bytes(data[pos:field])
        if self.key_index is None:
            for shard in self.shards:
                out.setdefault(shard, []).append(row)
        else:
            if key is None:
                raise RoutingError(f"row {self.rows + 1} of the COPY has a NULL or missing {self.column}: "
                                   "it has no shard", NULL_NOT_ALLOWED)
            try:
                shard = self.shard_of(key)
            except ValueError as exc:
                raise RoutingError(f"row {self.rows + 1} of the COPY: {self.column}: {exc}",
                                   BAD_COPY_FILE_FORMAT) from exc
            out.setdefault(shard, []).append(row)
        self.rows += 1
        return field


def _split_text(line: bytes, delimiter: int) -> list[bytes]:
    """Text-format fields: a backslash escapes the next byte (a delimiter among them)."""
    if b"\\" not in line:
        return line.split(bytes((delimiter,)))
    fields: list[bytes] = []
    start = pos = 0
    size = len(line)
    while pos < size:
        byte = line[pos]
        if byte == 0x5C:
            pos += 2
            continue
        if byte == delimiter:
            fields.append(line[start:pos])
            start = pos + 1
        pos += 1
    fields.append(line[start:])
    return fields


_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("v"): b"\v"}


def _unescape_text(raw: bytes) -> bytes:
    if b"\\" not in raw:
        return raw
    out = bytearray()
    pos, size = 0, len(raw)
    while pos < size:
        byte = raw[pos]
        if byte == 0x5C and pos + 1 < size:
            following = raw[pos + 1]
            if following in _ESCAPES:
                out += _ESCAPES[following]
                pos += 2
                continue
            if 0x30 <= following <= 0x37:  # \ooo
                digits = re.match(rb"[0-7]{1,3}", raw[pos + 1 : pos + 4])
                assert digits is not None
                out.append(int(digits.group(), 8) & 0xFF)
                pos += 1 + len(digits.group())
                continue
            out.append(following)
            pos += 2
            continue
        out.append(byte)
        pos += 1
    return bytes(out)
