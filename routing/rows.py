"""Combines the DataRows several shards sent for one SELECT as its MergePlan says: an ordered k-way merge,
OFFSET/LIMIT, aggregates, GROUP BY, DISTINCT, hidden columns. Pure: messages in, messages out.

Only the fields the plan needs are decoded (psycopg's loaders, no connection: text dates and timestamps
must be in DateStyle ISO, other styles fail the statement), the others go on as the shards' bytes. Text is
compared as bytes, in the encoding the servers send (the same on every shard). Memory: an ORDER BY holds
at most `window_rows` rows per source; GROUP BY and aggregates one entry per group; DISTINCT one key per
distinct row (with ORDER BY on visible columns, only the rows equal on the sort keys to the last one)."""

from __future__ import annotations

import ctypes
import functools
import heapq
import json
import locale
import operator
import re
import struct
import sys
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any

from routing.merge_plan import Aggregate, MergePlan, SortKey

FEATURE_NOT_SUPPORTED = "0A000"
NUMERIC_VALUE_OUT_OF_RANGE = "22003"
PROTOCOL_VIOLATION = "08P01"

# Type OIDs (pg_type.dat) the merge knows how to compare, group or compute.
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
FLOAT4, FLOAT8, BPCHAR, VARCHAR, NUMERIC, UUID, JSONB = 700, 701, 1042, 1043, 1700, 2950, 3802
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
FLOAT4_ARRAY, FLOAT8_ARRAY, BPCHAR_ARRAY, INTERVAL_ARRAY, NUMERIC_ARRAY = 1021, 1022, 1014, 1187, 1231
_TYPE_NAMES = {
    BOOL: "boolean", BYTEA: "bytea", CHAR: '"char"', NAME: "name", INT8: "bigint", INT2: "smallint",
    INT4: "integer", TEXT: "text", OID: "oid", FLOAT4: "real", FLOAT8: "double precision", BPCHAR: "character",
    VARCHAR: "character varying", NUMERIC: "numeric", UUID: "uuid", JSONB: "jsonb", DATE: "date",
    TIME: "time", TIMESTAMP: "timestamp", TIMESTAMPTZ: "timestamptz", INTERVAL: "interval", TIMETZ: "timetz",
    114: "json", 650: "cidr", 790: "money", 869: "inet", 829: "macaddr", 142: "xml",
}
_INTEGERS = frozenset((INT8, INT2, INT4, OID))
_FLOATS = frozenset((FLOAT4, FLOAT8))
_TEXTS = frozenset((TEXT, VARCHAR, BPCHAR, NAME))
_INTEGER_RANGES = {INT2: 2**15, INT4: 2**31, INT8: 2**63}
_TEXT_FORMAT, _BINARY_FORMAT = 0, 1

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_LENGTH = struct.Struct("!I")
_COLUMN = struct.Struct("!IhIhih")  # after a column's name: table OID, column number, type OID, size, modifier, format
_INTERVAL = struct.Struct("!qii")  # microseconds, days, months
_NULL_FIELD = b"\xff\xff\xff\xff"
_USECS_PER_DAY = 86_400_000_000
_TIMESTAMP_INFINITY = struct.pack("!q", 2**63 - 1)
_TIMESTAMP_MINUS_INFINITY = struct.pack("!q", -(2**63))
_DATE_INFINITY = struct.pack("!i", 2**31 - 1)
_DATE_MINUS_INFINITY = struct.pack("!i", -(2**31))
_TIME_24 = struct.pack("!q", _USECS_PER_DAY)
# Exact decimal arithmetic: sums never round, inf + -inf is NaN as in PostgreSQL (no trap raised).
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])
_NAN = ("NaN",)  # PostgreSQL groups NaN with NaN; Python's NaN is not even equal to itself
# PostgreSQL's numeric division (select_div_scale in numeric.c)
_NUMERIC_MIN_SIG_DIGITS = 16
_NUMERIC_MAX_DISPLAY_SCALE = 1000
_DEC_DIGITS = 4  # decimal digits per base-10000 digit of a NumericVar


class MergeError(Exception):
    """A result the proxy cannot combine correctly: sent to the client as one ErrorResponse."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# ------------------------------------------------------------ RowDescription and DataRow


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a RowDescription."""

    name: bytes
    table_oid: int
    number: int
    type_oid: int
    type_size: int
    modifier: int
    format: int  # 0 text, 1 binary

    @property
    def shown(self) -> str:
        return f'"{self.name.decode("utf-8", "replace")}"'

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type_oid, f"OID {self.type_oid}")


def read_description(description: bytes) -> list[Column]:
    """The columns of a RowDescription message."""
    try:
        count = _INT16.unpack_from(description, 5)[0]
        pos = 7
        columns = []
        for _ in range(count):
            end = description.index(0, pos)
            columns.append(Column(description[pos:end], *_COLUMN.unpack_from(description, end + 1)))
            pos = end + 1 + _COLUMN.size
    except (ValueError, struct.error):
        raise MergeError(PROTOCOL_VIOLATION, "a shard sent a RowDescription the proxy cannot read")
    if any(column.format not in (_TEXT_FORMAT, _BINARY_FORMAT) for column in columns):
        raise MergeError(PROTOCOL_VIOLATION, "a shard sent a RowDescription with an unknown format code")
    return columns


def write_description(columns: Sequence[Column]) -> bytes:
    body = _INT16.pack(len(columns)) + b"".join(
        column.name + b"\x00" + _COLUMN.pack(column.table_oid, column.number, column.type_oid, column.type_size,
                                             column.modifier, column.format)
        for column in columns)
    return b"T" + _LENGTH.pack(len(body) + 4) + body


def with_result_formats(description: bytes, formats: Sequence[int]) -> bytes:
    """A statement's RowDescription (from Describe of the statement: formats all 0) with the result formats a
    Bind asked for (none: all text; one: all of that one; else one per column), as Describe of the portal
    would give it. For `ResultMerger.assume_row_description`."""
    columns = read_description(description)
    if len(formats) > 1 and len(formats) != len(columns):
        raise MergeError(PROTOCOL_VIOLATION, f"bind message has {len(formats)} result formats but query has "
                                             f"{len(columns)} columns")
    chosen = [formats[0] if len(formats) == 1 else formats[index] if formats else 0
              for index in range(len(columns))]
    return write_description([replace(column, format=fmt) for column, fmt in zip(columns, chosen, strict=True)])


def _fields(row: bytes, count: int) -> list[bytes | None]:
    """The first `count` fields of a DataRow (None for NULL)."""
    fields: list[bytes | None] = []
    unpack = _INT32.unpack_from
    pos = 7
    try:
        if _INT16.unpack_from(row, 5)[0] < count:
            raise _short_row()
        for _ in range(count):
            length = unpack(row, pos)[0]
            pos += 4
            if length < 0:
                fields.append(None)
            else:
                fields.append(row[pos:pos + length])
                pos += length
    except struct.error:
        raise _short_row()
    return fields


def _fields_end(row: bytes, count: int) -> int:
    """Where the first `count` fields of a DataRow end."""
    unpack = _INT32.unpack_from
    pos = 7
    try:
        if _INT16.unpack_from(row, 5)[0] < count:
            raise _short_row()
        for _ in range(count):
            pos += 4 + max(unpack(row, pos)[0], 0)
    except struct.error:
        raise _short_row()
    return pos


def _short_row() -> MergeError:
    return MergeError(PROTOCOL_VIOLATION, "a shard sent a DataRow with fewer columns than its RowDescription")


def _first_columns(row: bytes, count: int) -> bytes:
    """The DataRow with its first `count` fields only."""
    end = _fields_end(row, count)
    return b"D" + _LENGTH.pack(end - 1) + _INT16.pack(count) + row[7:end]


def _data_row(fields: Sequence[bytes | None]) -> bytes:
    parts = [_INT16.pack(len(fields))]
    for field in fields:
        parts.append(_NULL_FIELD if field is None else _INT32.pack(len(field)) + field)
    body = b"".join(parts)
    return b"D" + _LENGTH.pack(len(body) + 4) + body


# ------------------------------------------------------------ psycopg's loaders and dumpers


class _Codecs:
    """psycopg's loaders and dumpers (the C implementation when psycopg[binary] or psycopg[c] is installed),
    with no connection: UTF-8 text, ISO dates, timestamptz in UTC."""

    def __init__(self) -> None:
        try:
            import psycopg
            from psycopg.adapt import Transformer
        except ImportError:
            raise MergeError(FEATURE_NOT_SUPPORTED, "merging cross-shard rows by value (ORDER BY, aggregates, "
                                                    "GROUP BY, DISTINCT) needs psycopg in the proxy: "
                                                    "pip install 'psycopg[binary]'")
        self._transformer = Transformer()
        self._adapters = psycopg.adapters
        self._formats = (psycopg.pq.Format.TEXT, psycopg.pq.Format.BINARY)

    def loader(self, column: Column) -> Callable[[bytes], Any]:
        return self._transformer.get_loader(column.type_oid, self._formats[column.format]).load

    def dumper(self, type_oid: int, fmt: int, python_type: type) -> Callable[[Any], Any]:
        return self._adapters.get_dumper_by_oid(type_oid, self._formats[fmt])(python_type).dump


@functools.cache
def _codecs() -> _Codecs:
    return _Codecs()  # a failed import is not cached: it is tried again next time


def _encoder(type_oid: int, fmt: int, python_type: type) -> Callable[[Any], bytes | None]:
    """Encodes a combined value (None: NULL) in `fmt` as type `type_oid`, refusing what overflows it."""
    dump = _codecs().dumper(type_oid, fmt, python_type)
    bound = _INTEGER_RANGES.get(type_oid)
    name = _TYPE_NAMES.get(type_oid, str(type_oid))

    def encode(value: Any) -> bytes | None:
        if value is None:
            return None
        if bound is not None and not -bound <= value < bound:
            raise MergeError(NUMERIC_VALUE_OUT_OF_RANGE, f"{name} out of range")
        if type_oid == NUMERIC and value.is_finite():
            if value.as_tuple().exponent > 0:
                value = value.quantize(Decimal(1), context=_EXACT)
            if fmt == _TEXT_FORMAT:  # PostgreSQL never shows 1E-7 or 0E-20 (psycopg's dumper would)
                return format(value, "f").encode()
        try:
            return bytes(dump(value))
        except Exception as error:
            raise MergeError(NUMERIC_VALUE_OUT_OF_RANGE if isinstance(error, OverflowError) else FEATURE_NOT_SUPPORTED,
                             f"the proxy cannot encode the combined {name} value {value!r}: {error}")

    return encode


# ------------------------------------------------------------ text as the collation orders it

_BYTEWISE_COLLATIONS = frozenset(("c", "posix", "ucs_basic", "pg_c_utf8"))
_LOCALE_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
_LIBC_COLLATIONS: dict[str, _LibcCollation] = {}
_MAX_LIBC_COLLATIONS = 64


class _LibcCollation:
    """A libc locale's LC_COLLATE opened with newlocale(3) for this object alone: strcoll_l(3) then never
    reads or changes the process's locale (locale.setlocale would change it under every thread). strcoll,
    not strxfrm: PostgreSQL compares with strcoll, and glibc's strxfrm does not always agree with it. The
    order is the proxy's libc's: the same as the servers' when their glibc has the same collation data
    (glibc 2.28 changed it for most locales)."""

    __slots__ = ("locale", "strcoll")

    def __init__(self, name: str) -> None:
        libc = _libc()
        if libc is None:
            raise MergeError(FEATURE_NOT_SUPPORTED, f'the proxy cannot sort text as collation "{name}" does: it '
                                                    f"reproduces libc collations on Linux only; use COLLATE \"C\"")
        newlocale, self.strcoll = libc
        handle = newlocale(1 << locale.LC_COLLATE, name.encode(), None) if _LOCALE_NAME.fullmatch(name) else None
        if not handle:
            raise MergeError(FEATURE_NOT_SUPPORTED,
                             f'the proxy cannot sort text as collation "{name}" does: no such locale where the '
                             "proxy runs (install it there, e.g. with locale-gen), or add COLLATE \"C\" to the "
                             "ORDER BY")
        self.locale = handle

    def key(self, text: bytes) -> _Collated:
        return _Collated(text, self)


class _Collated:
    """Text that compares as strcoll_l compares it under a locale, ties broken by the bytes (as PostgreSQL
    does for a deterministic collation: equal only when the bytes are)."""

    __slots__ = ("_collation", "text")

    def __init__(self, text: bytes, collation: _LibcCollation) -> None:
        self.text = text
        self._collation = collation

    def __lt__(self, other: _Collated) -> bool:
        if self.text == other.text:
            return False
        collation = self._collation
        order: int = collation.strcoll(self.text, other.text, collation.locale)
        return order < 0 if order else self.text < other.text

    def __gt__(self, other: _Collated) -> bool:
        return other.__lt__(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Collated) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)


@functools.cache
def _libc() -> tuple[Any, Any] | None:
    """(newlocale, strcoll_l) from the C library the process runs on, None where there are none."""
    if not sys.platform.startswith("linux"):  # LC_*_MASK is 1 << LC_* in glibc and musl, not everywhere
        return None
    try:
        libc = ctypes.CDLL(None)
        newlocale, strcoll = libc.newlocale, libc.strcoll_l
    except (OSError, AttributeError):
        return None
    newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    newlocale.restype = ctypes.c_void_p
    strcoll.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    strcoll.restype = ctypes.c_int
    return newlocale, strcoll


def is_icu(collation: str) -> bool:
    """How the caller marks a collation the proxy cannot reproduce: "icu" (a database with the ICU or
    builtin provider), "icu:<locale>", or a PostgreSQL ICU collation name (und-x-icu, unicode)."""
    lowered = collation.lower()
    return lowered in ("icu", "unicode") or lowered.startswith("icu:") or lowered.endswith("-x-icu")


def _text_key(collation: str) -> Callable[[bytes], Any] | None:
    """How text sorts under `collation`: None for byte order (C, POSIX: what PostgreSQL's memcmp gives for
    UTF-8), else a key function; refuses (0A000) what the proxy cannot reproduce."""
    lowered = collation.lower()
    if lowered in _BYTEWISE_COLLATIONS:
        return None
    if is_icu(collation):
        raise MergeError(FEATURE_NOT_SUPPORTED, f'the proxy cannot sort text as the ICU collation "{collation}" '
                                                "does across shards: add COLLATE \"C\" to the ORDER BY, or filter "
                                                "on the sharding key to run it on one shard")
    known = _LIBC_COLLATIONS.get(collation)
    if known is None:
        known = _LibcCollation(collation)
        if len(_LIBC_COLLATIONS) < _MAX_LIBC_COLLATIONS:
            _LIBC_COLLATIONS[collation] = known
    return known.key


# ------------------------------------------------------------ what a value sorts and groups as


def _order_value(column: Column, collation: str | None, default_collation: str, purpose: str) -> Callable[[bytes], Any]:
    """A function of a field's bytes whose results compare as PostgreSQL compares the values (ascending).
    `collation`: an explicit COLLATE, else None (the database's `default_collation`; "C" for name)."""
    oid = column.type_oid
    if oid in _TEXTS:
        if collation is not None and collation.lower() == "default":
            collation = None
        name = collation if collation is not None else "C" if oid == NAME else default_collation
        text_key = _text_key(name)
        if oid == BPCHAR:  # character(n) compares without its trailing spaces
            if text_key is None:
                return _strip_spaces
            return lambda data: text_key(data.rstrip(b" "))
        return _same if text_key is None else text_key
    if oid == CHAR:
        return _same
    if oid == INTERVAL and column.format == _BINARY_FORMAT:
        return _interval_value
    if oid not in _ORDERED_TYPES:
        why = ("in text format: PostgreSQL compares a month as 30 days and a year as 360, which the text does "
               "not let the proxy reproduce; request binary results" if oid == INTERVAL
               else "the proxy cannot compare its values as PostgreSQL does")
        raise MergeError(FEATURE_NOT_SUPPORTED, f"{purpose} on {column.shown} of type {column.type_name} across "
                                                f"shards is not supported: {why}")
    load = _codecs().loader(column)
    if oid in _FLOATS or oid == NUMERIC:
        return lambda data: _number_value(load(data))
    if oid in (DATE, TIMESTAMP, TIMESTAMPTZ):
        return _infinity_aware(load, column)
    if oid == TIME:
        return _time_value(load, column.format)
    if oid == TIMETZ:
        return lambda data: _timetz_value(load(data))
    return load  # integers, boolean, bytea, uuid: Python orders them as PostgreSQL does


_ORDERED_TYPES = frozenset((*_INTEGERS, BOOL, BYTEA, UUID, *_FLOATS, NUMERIC, DATE, TIMESTAMP, TIMESTAMPTZ,
                            TIME, TIMETZ))


def _same(data: bytes) -> bytes:
    return data


def _strip_spaces(data: bytes) -> bytes:
    return data.rstrip(b" ")


def _number_value(value: Any) -> tuple[int, Any]:
    return (1, 0) if value != value else (0, value)  # NaN sorts above every number, infinity included


def _interval_value(data: bytes) -> int:
    microseconds, days, months = _INTERVAL.unpack(data)
    return (months * 30 + days) * _USECS_PER_DAY + microseconds  # interval_cmp_value in timestamp.c


def _infinity_aware(load: Callable[[bytes], Any], column: Column) -> Callable[[bytes], tuple[int, Any]]:
    if column.format == _TEXT_FORMAT:
        high, low = b"infinity", b"-infinity"
    elif column.type_oid == DATE:
        high, low = _DATE_INFINITY, _DATE_MINUS_INFINITY
    else:
        high, low = _TIMESTAMP_INFINITY, _TIMESTAMP_MINUS_INFINITY

    def value(data: bytes) -> tuple[int, Any]:
        if data == high:
            return (1, 0)
        if data == low:
            return (-1, 0)
        return (0, load(data))

    return value


def _time_value(load: Callable[[bytes], Any], fmt: int) -> Callable[[bytes], tuple[int, Any]]:
    end_of_day = b"24:00:00" if fmt == _TEXT_FORMAT else _TIME_24  # valid in PostgreSQL, not in Python
    return lambda data: (1, 0) if data == end_of_day else (0, load(data))


def _timetz_value(value: Any) -> tuple[int, int]:
    # timetz_cmp_internal: the time in UTC, then the zone (seconds west of Greenwich)
    offset = value.utcoffset()
    zone = -int(offset.total_seconds()) if offset is not None else 0
    microseconds = ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
    return microseconds + zone * 1_000_000, zone


def _equality_value(column: Column, purpose: str) -> Callable[[bytes], Hashable] | None:
    """For GROUP BY and DISTINCT: a function of a field's bytes equal for values PostgreSQL takes as equal,
    or None where equal values have equal bytes (same type, same format: integers, text under a deterministic
    collation, dates...). Types the proxy does not know (enums, extensions) are compared by their bytes: an
    extension whose equality is looser than its output (citext) would be grouped case-sensitively."""
    oid = column.type_oid
    if oid == BPCHAR:
        return _strip_spaces
    if oid == INTERVAL and column.format == _BINARY_FORMAT:
        return _interval_value
    if oid == INTERVAL:
        raise MergeError(FEATURE_NOT_SUPPORTED, f"{purpose} on {column.shown} of type interval in text format "
                                                "across shards is not supported: intervals PostgreSQL takes as "
                                                "equal ('1 mon', '30 days') have different texts; request binary "
                                                "results")
    if oid in (INTERVAL_ARRAY, BPCHAR_ARRAY):
        raise MergeError(FEATURE_NOT_SUPPORTED, f"{purpose} on {column.shown} (an array of "
                                                f"{'interval' if oid == INTERVAL_ARRAY else 'character'}) across "
                                                "shards is not supported: arrays PostgreSQL takes as equal have "
                                                "different bytes")
    if oid in _FLOATS or oid == NUMERIC or oid in (FLOAT4_ARRAY, FLOAT8_ARRAY, NUMERIC_ARRAY):
        load = _codecs().loader(column)  # 1.0 = 1.00, -0 = 0, NaN = NaN
        return lambda data: _frozen(load(data))
    if oid == JSONB:
        return _jsonb_value if column.format == _TEXT_FORMAT else lambda data: _jsonb_value(data[1:])
    return None


def _frozen(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    if value != value:
        return _NAN
    return value  # type: ignore[no-any-return]


def _jsonb_value(data: bytes) -> Hashable:
    return _frozen_json(json.loads(data, parse_float=Decimal, parse_int=Decimal))


def _frozen_json(value: Any) -> Hashable:
    # tagged, so that true and 1 (equal in Python) stay apart; jsonb's text has its keys in one order already
    if isinstance(value, dict):
        return "o", tuple((key, _frozen_json(item)) for key, item in value.items())
    if isinstance(value, list):
        return "a", tuple(_frozen_json(item) for item in value)
    if isinstance(value, bool):
        return "b", value
    if isinstance(value, Decimal):
        return "n", value
    return "s", value


class _Descending:
    """A sort key that compares the other way round."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return bool(other.value < self.value)

    def __gt__(self, other: _Descending) -> bool:
        return bool(self.value < other.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(self.value == other.value)

    def __hash__(self) -> int:
        return hash(self.value)


class _SortKeys:
    """A row's ORDER BY key: per sort key (NULL rank, value), NULLs placed as the key says."""

    __slots__ = ("_columns", "_keys", "_width")

    def __init__(self, columns: Sequence[Column], order_by: Sequence[SortKey], default_collation: str) -> None:
        self._columns = columns
        self._keys = [(key.column, _order_value(columns[key.column], key.collation, default_collation, "ORDER BY"),
                       key.descending, 0 if key.nulls_first else 2) for key in order_by]
        self._width = max(key.column for key in order_by) + 1

    def __call__(self, row: bytes) -> tuple[Any, ...]:
        fields = _fields(row, self._width)
        key: list[Any] = []
        column = 0
        try:
            for column, value_of, descending, null_rank in self._keys:
                data = fields[column]
                if data is None:
                    key += (null_rank, 0)
                else:
                    value = value_of(data)
                    key += (1, _Descending(value) if descending else value)
        except MergeError:
            raise
        except Exception as error:
            raise _undecodable(self._columns[column], error)
        return tuple(key)


def _undecodable(column: Column, error: Exception) -> MergeError:
    return MergeError(FEATURE_NOT_SUPPORTED, f"the proxy cannot merge the shards' rows: a value of {column.shown} "
                                             f"(type {column.type_name}) could not be decoded ({error})")


class _RowKey:
    """A hashable key of a row's fields at `indexes`, equal for rows PostgreSQL takes as equal there."""

    __slots__ = ("_columns", "_indexes", "_prefix", "_values", "_width")

    def __init__(self, columns: Sequence[Column], indexes: Sequence[int], purpose: str) -> None:
        self._columns = columns
        self._indexes = tuple(indexes)
        self._values = [_equality_value(columns[index], purpose) for index in self._indexes]
        self._width = max(self._indexes, default=-1) + 1
        # the first N columns, all compared by their bytes: the row's bytes are the key
        self._prefix = self._indexes == tuple(range(len(self._indexes))) and not any(self._values)

    def __call__(self, row: bytes) -> Hashable:
        if self._prefix:
            return row[7:_fields_end(row, self._width)]
        return self.of_fields(_fields(row, self._width))

    def of_fields(self, fields: Sequence[bytes | None]) -> Hashable:
        key: list[Hashable] = []
        index = 0
        try:
            for index, value_of in zip(self._indexes, self._values, strict=True):
                data = fields[index]
                key.append(data if data is None or value_of is None else value_of(data))
        except Exception as error:
            raise _undecodable(self._columns[index], error)
        return tuple(key)


# ------------------------------------------------------------ what the client gets


class _Output:
    """The end of every merge: DISTINCT, OFFSET, LIMIT, hidden columns dropped, rows counted."""

    __slots__ = ("_distinct", "_offset", "_out", "_seen", "_visible", "full", "limit", "sent")

    def __init__(self, plan: MergePlan, columns: Sequence[Column], out: list[bytes]) -> None:
        visible = _visible(plan, columns)
        self._out = out
        self._visible = visible if visible < len(columns) else None
        self._distinct = _RowKey(columns, range(visible), "DISTINCT") if plan.distinct else None
        self._seen: set[Hashable] = set()
        self._offset = plan.offset
        self.limit = plan.limit
        self.sent = 0
        self.full = plan.limit == 0  # nothing more will be sent

    def emit(self, row: bytes) -> None:
        if self._distinct is not None:
            key = self._distinct(row)
            if key in self._seen:
                return
            self._seen.add(key)
        if self._offset:
            self._offset -= 1
            return
        self._out.append(row if self._visible is None else _first_columns(row, self._visible))
        self.sent += 1
        if self.sent == self.limit:
            self.full = True
            self._seen.clear()

    def new_run(self) -> None:
        """The merged order moved past the rows equal to the last one on the sort keys: with every sort key
        a visible column, no later row can repeat one already seen."""
        self._seen.clear()


def _visible(plan: MergePlan, columns: Sequence[Column]) -> int:
    return len(columns) if plan.visible_columns is None else plan.visible_columns


# ------------------------------------------------------------ aggregates


class _Aggregator:
    """Combines one aggregate's partial results: a state per group, from the shards' fields."""

    __slots__ = ("column", "count_column")

    def __init__(self, aggregate: Aggregate) -> None:
        self.column = aggregate.column
        self.count_column: int | None = None

    def start(self) -> Any:
        return None

    def add(self, state: Any, fields: Sequence[bytes | None]) -> Any:
        raise NotImplementedError

    def result(self, state: Any) -> bytes | None:
        raise NotImplementedError

    def count_result(self, state: Any) -> bytes | None:
        return None


class _Count(_Aggregator):
    __slots__ = ("_encode", "_load")

    def __init__(self, aggregate: Aggregate, column: Column) -> None:
        super().__init__(aggregate)
        _require(column, _INTEGERS, "count")
        self._load = _codecs().loader(column)
        self._encode = _encoder(column.type_oid, column.format, int)

    def start(self) -> int:
        return 0

    def add(self, state: int, fields: Sequence[bytes | None]) -> int:
        data = fields[self.column]
        return state if data is None else state + self._load(data)

    def result(self, state: int) -> bytes | None:
        return self._encode(state)


class _Sum(_Aggregator):
    __slots__ = ("_encode", "_load", "_plus")

    def __init__(self, aggregate: Aggregate, column: Column) -> None:
        super().__init__(aggregate)
        _require(column, _SUMMED, "sum")
        self._load = _codecs().loader(column)
        self._plus = _plus(column)
        self._encode = _encoder(column.type_oid, column.format, _python_type(column))

    def add(self, state: Any, fields: Sequence[bytes | None]) -> Any:
        data = fields[self.column]
        if data is None:
            return state
        value = self._load(data)
        return value if state is None else self._plus(state, value)

    def result(self, state: Any) -> bytes | None:
        return self._encode(state)


_SUMMED = frozenset((*_INTEGERS - {OID}, NUMERIC, *_FLOATS))


def _plus(column: Column) -> Callable[[Any, Any], Any]:
    return _EXACT.add if column.type_oid == NUMERIC else operator.add


def _python_type(column: Column) -> type:
    return Decimal if column.type_oid == NUMERIC else float if column.type_oid in _FLOATS else int


class _Extreme(_Aggregator):
    """min or max: the shard's bytes of the smallest (largest) value, by PostgreSQL's order."""

    __slots__ = ("_better", "_value")

    def __init__(self, aggregate: Aggregate, column: Column, default_collation: str) -> None:
        super().__init__(aggregate)
        self._value = _order_value(column, aggregate.collation, default_collation, aggregate.kind)
        self._better = operator.lt if aggregate.kind == "min" else operator.gt

    def add(self, state: tuple[Any, bytes] | None, fields: Sequence[bytes | None]) -> tuple[Any, bytes] | None:
        data = fields[self.column]
        if data is None:
            return state
        value = self._value(data)
        return (value, data) if state is None or self._better(value, state[0]) else state

    def result(self, state: tuple[Any, bytes] | None) -> bytes | None:
        return None if state is None else state[1]


class _Logical(_Aggregator):
    """bool_and / bool_or."""

    __slots__ = ("_encode", "_load", "_or")

    def __init__(self, aggregate: Aggregate, column: Column) -> None:
        super().__init__(aggregate)
        _require(column, frozenset((BOOL,)), aggregate.kind)
        self._load = _codecs().loader(column)
        self._encode = _encoder(BOOL, column.format, bool)
        self._or = aggregate.kind == "bool_or"

    def add(self, state: bool | None, fields: Sequence[bytes | None]) -> bool | None:
        data = fields[self.column]
        if data is None:
            return state
        value = bool(self._load(data))
        if state is None:
            return value
        return (state or value) if self._or else (state and value)

    def result(self, state: bool | None) -> bytes | None:
        return self._encode(state)


class _Average(_Aggregator):
    """avg from the shards' sum and count: the total sum over the total count, as PostgreSQL's avg gives it
    (numeric with numeric_div's scale for integers and numeric, double precision for floats)."""

    __slots__ = ("_encode", "_encode_count", "_load_count", "_load_sum", "_numeric", "_plus")

    def __init__(self, aggregate: Aggregate, column: Column, count: Column, final: Column) -> None:
        super().__init__(aggregate)
        self.count_column = aggregate.count_column
        _require(count, _INTEGERS, "avg's count")
        self._load_sum = _codecs().loader(column)
        self._load_count = _codecs().loader(count)
        self._plus = _plus(column)
        self._numeric = final.type_oid == NUMERIC
        self._encode = _encoder(final.type_oid, final.format, Decimal if self._numeric else float)
        self._encode_count = _encoder(count.type_oid, count.format, int)

    def start(self) -> tuple[Any, int]:
        return None, 0

    def add(self, state: tuple[Any, int], fields: Sequence[bytes | None]) -> tuple[Any, int]:
        total, count = state
        data = fields[self.column]
        if data is not None:
            value = self._load_sum(data)
            total = value if total is None else self._plus(total, value)
        assert self.count_column is not None
        counted = fields[self.count_column]
        return total, count if counted is None else count + self._load_count(counted)

    def result(self, state: tuple[Any, int]) -> bytes | None:
        total, count = state
        if not count or total is None:
            return self._encode(None)
        if self._numeric:
            return self._encode(numeric_average(Decimal(total), count))
        return self._encode(float(total) / count)

    def count_result(self, state: tuple[Any, int]) -> bytes | None:
        return self._encode_count(state[1])


def numeric_average(total: Decimal, count: int) -> Decimal:
    """total / count as PostgreSQL's numeric_div computes it: rounded half away from zero at the scale
    select_div_scale picks (at least 16 significant digits, at least the sum's scale)."""
    if not total.is_finite():
        return total  # NaN, or an infinity divided by a positive count
    scale = _division_scale(total, Decimal(count))
    sign, _, exponent = total.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int(abs(total).scaleb(-exponent, _EXACT))
    shift = exponent + scale
    numerator = coefficient * 10**shift if shift >= 0 else coefficient
    denominator = count if shift >= 0 else count * 10**-shift
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    digits = tuple(int(digit) for digit in str(quotient))
    return Decimal((sign if quotient else 0, digits, -scale))


def _division_scale(dividend: Decimal, divisor: Decimal) -> int:
    weight1, first1 = _weight_and_first_digit(dividend)
    weight2, first2 = _weight_and_first_digit(divisor)
    quotient_weight = weight1 - weight2
    if first1 <= first2:
        quotient_weight -= 1
    exponent = dividend.as_tuple().exponent
    assert isinstance(exponent, int)
    scale = max(_NUMERIC_MIN_SIG_DIGITS - quotient_weight * _DEC_DIGITS, -exponent, 0)
    return min(scale, _NUMERIC_MAX_DISPLAY_SCALE)


def _weight_and_first_digit(value: Decimal) -> tuple[int, int]:
    """The weight (power of 10000) and value of a number's first base-10000 digit, as in a NumericVar."""
    if value.is_zero():
        return 0, 0
    weight = value.adjusted() // _DEC_DIGITS
    return weight, int(abs(value).scaleb(-_DEC_DIGITS * weight, _EXACT))


def _require(column: Column, types: frozenset[int], what: str) -> None:
    if column.type_oid not in types:
        raise MergeError(FEATURE_NOT_SUPPORTED, f"{what} over {column.shown} of type {column.type_name} across "
                                                "shards cannot be combined by the proxy")


def _average_column(column: Column) -> Column:
    """What avg returns where the shards return its sum: numeric for integers and numeric, double precision
    for floats."""
    if column.type_oid in _INTEGERS - {OID} or column.type_oid == NUMERIC:
        return replace(column, type_oid=NUMERIC, type_size=-1, modifier=-1)
    if column.type_oid in _FLOATS:
        return replace(column, type_oid=FLOAT8, type_size=8, modifier=-1)
    raise MergeError(FEATURE_NOT_SUPPORTED, f"avg over {column.shown} (its sum is of type {column.type_name}) "
                                            "across shards cannot be combined by the proxy")


# ------------------------------------------------------------ the merges


class RowMerge:
    """One row set's DataRows from several sources combined as a MergePlan says, appended to `out`.

    `add` one DataRow of a source, `finish` a source at its CommandComplete; `held(source)` is True while
    the merge holds as many rows of that source as it may (stop reading it). `description` is the
    RowDescription the client gets, `rows_sent` how many rows it got. Raises MergeError."""

    __slots__ = ("_output", "description")

    def __init__(self, description: bytes, output: _Output) -> None:
        self.description = description
        self._output = output

    @property
    def rows_sent(self) -> int:
        return self._output.sent

    def add(self, source: int, row: bytes) -> None:
        raise NotImplementedError

    def finish(self, source: int) -> None:
        """`source` has sent all its rows."""

    def held(self, source: int) -> bool:
        return False


class _Streamed(RowMerge):
    """No order, no groups: each row goes on as it comes (DISTINCT, OFFSET, LIMIT, hidden columns)."""

    __slots__ = ()

    def add(self, source: int, row: bytes) -> None:
        if not self._output.full:
            self._output.emit(row)


class _Ordered(RowMerge):
    """A k-way merge of rows each source sends in the plan's order: a row goes on once every source that has
    not finished has one queued (the smallest of the sources' first rows is then the smallest of all)."""

    __slots__ = ("_finished", "_heap", "_in_heap", "_key", "_last_key", "_queues", "_runs", "_waiting",
                 "_window_rows")

    def __init__(self, description: bytes, output: _Output, sources: int, key: _SortKeys, runs: bool,
                 window_rows: int) -> None:
        super().__init__(description, output)
        self._key = key
        self._runs = runs  # DISTINCT forgets rows at each change of the sort keys
        self._last_key: tuple[Any, ...] | None = None
        self._window_rows = window_rows
        self._queues: list[deque[tuple[tuple[Any, ...], bytes]]] = [deque() for _ in range(sources)]
        self._heap: list[tuple[tuple[Any, ...], int, bytes]] = []  # each source's first row
        self._in_heap = [False] * sources
        self._finished = [False] * sources
        self._waiting = sources  # sources not finished with no row queued

    def add(self, source: int, row: bytes) -> None:
        if self._output.full:
            return
        key = self._key(row)
        if self._in_heap[source]:
            self._queues[source].append((key, row))
            return
        heapq.heappush(self._heap, (key, source, row))
        self._in_heap[source] = True
        self._waiting -= 1
        if not self._waiting:
            self._pump()

    def finish(self, source: int) -> None:
        if self._finished[source]:
            return
        self._finished[source] = True
        if not self._in_heap[source]:
            self._waiting -= 1
            if not self._waiting:
                self._pump()

    def held(self, source: int) -> bool:
        return len(self._queues[source]) + self._in_heap[source] >= self._window_rows

    def _pump(self) -> None:
        heap = self._heap
        output = self._output
        while not self._waiting and heap:
            key, source, row = heap[0]
            if self._runs and key != self._last_key:
                output.new_run()
                self._last_key = key
            output.emit(row)
            if output.full:
                self._drop()
                return
            queue = self._queues[source]
            if queue:
                next_key, next_row = queue.popleft()
                heapq.heapreplace(heap, (next_key, source, next_row))
            else:
                heapq.heappop(heap)
                self._in_heap[source] = False
                if not self._finished[source]:
                    self._waiting += 1

    def _drop(self) -> None:
        """LIMIT reached: what is queued goes; the sources are still read (to their ReadyForQuery)."""
        self._heap.clear()
        for queue in self._queues:
            queue.clear()
        self._in_heap = [False] * len(self._in_heap)


@dataclass(slots=True)
class _Group:
    fields: list[bytes | None]  # the first row of the group: the columns that are not aggregates
    states: list[Any]


class _Grouped(RowMerge):
    """GROUP BY and aggregates: rows are combined as they come into one entry per group (memory grows with
    the number of groups, not of rows); once every source finished, the groups go out ordered and limited."""

    __slots__ = ("_aggregators", "_columns", "_finished", "_global", "_group_key", "_groups", "_sort_key", "_width")

    def __init__(self, description: bytes, output: _Output, sources: int, plan: MergePlan,
                 columns: Sequence[Column], final: Sequence[Column], default_collation: str) -> None:
        super().__init__(description, output)
        self._columns = columns
        self._width = len(columns)
        self._global = plan.group_by is None
        self._group_key = _RowKey(columns, plan.group_by or (), "GROUP BY")
        self._aggregators = [_aggregator(aggregate, columns, final, default_collation)
                             for aggregate in plan.aggregates]
        self._sort_key = _SortKeys(final, plan.order_by, default_collation) if plan.order_by else None
        self._groups: dict[Hashable, _Group] = {}
        self._finished = [False] * sources

    def add(self, source: int, row: bytes) -> None:
        fields = _fields(row, self._width)
        key = self._group_key.of_fields(fields)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(fields, [aggregator.start() for aggregator in self._aggregators])
        states = group.states
        aggregator = None
        try:
            for number, aggregator in enumerate(self._aggregators):
                states[number] = aggregator.add(states[number], fields)
        except MergeError:
            raise
        except Exception as error:
            assert aggregator is not None
            raise _undecodable(self._columns[aggregator.column], error)

    def finish(self, source: int) -> None:
        self._finished[source] = True
        if all(self._finished):
            self._flush()

    def _flush(self) -> None:
        groups = list(self._groups.values())
        self._groups.clear()
        if not groups and self._global:  # an aggregate over no rows still gives one row
            groups = [_Group([None] * self._width, [aggregator.start() for aggregator in self._aggregators])]
        rows = []
        for group in groups:
            fields = group.fields
            for aggregator, state in zip(self._aggregators, group.states, strict=True):
                fields[aggregator.column] = aggregator.result(state)
                if aggregator.count_column is not None:
                    fields[aggregator.count_column] = aggregator.count_result(state)
            rows.append(_data_row(fields))
        if self._sort_key is not None:
            rows.sort(key=self._sort_key)
        output = self._output
        for row in rows:
            if output.full:
                break
            output.emit(row)


def _aggregator(aggregate: Aggregate, columns: Sequence[Column], final: Sequence[Column],
                default_collation: str) -> _Aggregator:
    column = columns[aggregate.column]
    kind = aggregate.kind
    if kind == "count":
        return _Count(aggregate, column)
    if kind == "sum":
        return _Sum(aggregate, column)
    if kind in ("min", "max"):
        return _Extreme(aggregate, column, default_collation)
    if kind in ("bool_and", "bool_or"):
        return _Logical(aggregate, column)
    if kind == "avg":
        if aggregate.count_column is None:
            raise MergeError(FEATURE_NOT_SUPPORTED, "avg across shards needs the shards' counts: the plan has none")
        return _Average(aggregate, column, columns[aggregate.count_column], final[aggregate.column])
    raise MergeError(FEATURE_NOT_SUPPORTED, f"the aggregate {kind} across shards cannot be combined by the proxy")


def _final_columns(plan: MergePlan, columns: Sequence[Column]) -> list[Column]:
    """The columns of the merged rows: avg's column changes from the shards' sum to avg's type."""
    final = list(columns)
    for aggregate in plan.aggregates:
        if aggregate.kind == "avg":
            final[aggregate.column] = _average_column(columns[aggregate.column])
    return final


def _check_columns(plan: MergePlan, width: int) -> None:
    used = [key.column for key in plan.order_by] + list(plan.group_by or ())
    for aggregate in plan.aggregates:
        used.append(aggregate.column)
        if aggregate.count_column is not None:
            used.append(aggregate.count_column)
    if plan.visible_columns is not None:
        used.append(plan.visible_columns - 1)
    wrong = [index for index in used if not 0 <= index < width]
    if wrong:
        raise MergeError(FEATURE_NOT_SUPPORTED, f"the shards returned {width} columns, but merging their rows needs "
                                                f"column {max(wrong) + 1}")


def client_description(description: bytes, plan: MergePlan) -> bytes:
    """The RowDescription the client gets for the shards' `description`: avg's type, no hidden columns."""
    columns = read_description(description)
    _check_columns(plan, len(columns))
    final = _final_columns(plan, columns)
    return write_description(final[:_visible(plan, final)])


def merge_rows(plan: MergePlan, description: bytes, sources: int, out: list[bytes], collation: str = "C",
               window_rows: int = 1000) -> RowMerge:
    """The merge of one row set that `sources` sources describe with `description` (their RowDescription,
    with the formats the rows come in). `collation`: the database's, for text (see `is_icu`); an ORDER BY
    holds at most `window_rows` rows per source. Raises MergeError for what it cannot merge correctly."""
    columns = read_description(description)
    _check_columns(plan, len(columns))
    final = _final_columns(plan, columns)
    shown = write_description(final[:_visible(plan, final)])
    output = _Output(plan, final, out)
    if plan.group_by is not None or plan.aggregates:
        return _Grouped(shown, output, sources, plan, columns, final, collation)
    if plan.order_by:
        key = _SortKeys(columns, plan.order_by, collation)
        # DISTINCT can forget what it saw at each change of the sort keys when they are all visible columns
        runs = plan.distinct and all(sort.column < _visible(plan, columns) for sort in plan.order_by)
        return _Ordered(shown, output, sources, key, runs, window_rows)
    return _Streamed(shown, output)
