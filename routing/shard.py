"""Shard functions: a sharded table's key value to its shard number (hash as PostgreSQL partitions, range, list).

`hash` puts a key on shard k exactly when a table `PARTITION BY HASH (column)` with `MODULUS shard_count
REMAINDER k` would hold it, so a sharded table can become native hash partitions (or the reverse) without
moving a row. It follows PostgreSQL's extended hash functions (Bob Jenkins' lookup3 as in
src/common/hashfn.c) seeded with the partition seed, on a little-endian server (x86-64, ARM64: a
big-endian server reads the bytes of text and uuid keys in another order) whose encoding is UTF8 and whose
text collation is deterministic (C, libc, or a deterministic ICU collation hash the bytes alike).
"""

from __future__ import annotations

import itertools
import struct
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from routing.errors import INVALID_PARAMETER_VALUE, RoutingError

DATA_TYPES = ("bigint", "integer", "text", "uuid")
METHODS = ("hash", "range", "list")

INVALID_TEXT_REPRESENTATION = "22P02"
NUMERIC_VALUE_OUT_OF_RANGE = "22003"
CHARACTER_NOT_IN_REPERTOIRE = "22021"

INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
INT8_MIN, INT8_MAX = -(2**63), 2**63 - 1

# A typed key value: int for bigint and integer, str for text, uuid.UUID for uuid.
KeyValue = int | str | uuid.UUID

HASH_PARTITION_SEED = 0x7A5B22367996DCFD  # src/include/catalog/partition.h
_COMBINE_CONSTANT = 0x49A0F4DD15E5A8E3  # hash_combine64's "64bit random data"
_GOLDEN = 0x9E3779B9
_LENGTH_SALT = 3923095
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_WHITESPACE = " \t\n\r\f\v"  # what PostgreSQL's integer input skips around the digits (isspace in C)
_HEX = frozenset("0123456789abcdefABCDEF")
_DISPLAY_CHARS = 64
# Keys a sharder remembers the shard of (emptied when full): hot keys skip parsing and hashing.
SHARD_CACHE_ENTRIES = 8192


# --- PostgreSQL's hash functions ------------------------------------------------------------


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3's mix() on three uint32 values."""
    a = (a - c) & _M32
    a ^= ((c << 4) | (c >> 28)) & _M32
    c = (c + b) & _M32
    b = (b - a) & _M32
    b ^= ((a << 6) | (a >> 26)) & _M32
    a = (a + c) & _M32
    c = (c - b) & _M32
    c ^= ((b << 8) | (b >> 24)) & _M32
    b = (b + a) & _M32
    a = (a - c) & _M32
    a ^= ((c << 16) | (c >> 16)) & _M32
    c = (c + b) & _M32
    b = (b - a) & _M32
    b ^= ((a << 19) | (a >> 13)) & _M32
    a = (a + c) & _M32
    c = (c - b) & _M32
    c ^= ((b << 4) | (b >> 28)) & _M32
    b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """lookup3's final() on three uint32 values; the 64-bit result is (b << 32) | c."""
    c ^= b
    c = (c - (((b << 14) | (b >> 18)) & _M32)) & _M32
    a ^= c
    a = (a - (((c << 11) | (c >> 21)) & _M32)) & _M32
    b ^= a
    b = (b - (((a << 25) | (a >> 7)) & _M32)) & _M32
    c ^= b
    c = (c - (((b << 16) | (b >> 16)) & _M32)) & _M32
    a ^= c
    a = (a - (((c << 4) | (c >> 28)) & _M32)) & _M32
    b ^= a
    b = (b - (((a << 14) | (a >> 18)) & _M32)) & _M32
    c ^= b
    c = (c - (((b << 24) | (b >> 8)) & _M32)) & _M32
    return (b << 32) | c


def _initial_state(length: int, seed: int) -> tuple[int, int, int]:
    """(a, b, c) before the key's bytes: the length, then the seed as a 12-byte chunk of its own."""
    a = b = c = (_GOLDEN + length + _LENGTH_SALT) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


def hash_bytes_extended(data: bytes, seed: int = 0) -> int:
    """PostgreSQL's hash_bytes_extended (hash_any_extended): uint64 hash of `data` with a 64-bit seed."""
    return _hash_bytes_from(_initial_state(len(data), seed & _M64), data)


_PADDING = [bytes(12 - remainder) for remainder in range(12)]
_CHUNKS = [struct.Struct(f"<{3 * chunks}I") for chunks in range(1, 65)]


def _hash_bytes_from(state: tuple[int, int, int], data: bytes) -> int:
    a, b, c = state
    length = len(data)
    # Words are read little-endian; the last 0..11 bytes are zero-padded to a whole chunk, whose third
    # word goes in shifted by a byte (the lowest byte of c holds the length).
    chunks = length // 12 + 1
    padded = data + _PADDING[length % 12]
    words = (_CHUNKS[chunks - 1] if chunks <= len(_CHUNKS) else struct.Struct(f"<{3 * chunks}I")).unpack(padded)
    last = len(words) - 3
    for index in range(0, last, 3):
        a, b, c = _mix((a + words[index]) & _M32, (b + words[index + 1]) & _M32, (c + words[index + 2]) & _M32)
    return _final((a + words[last]) & _M32, (b + words[last + 1]) & _M32, (c + (words[last + 2] << 8)) & _M32)


def hash_uint32_extended(value: int, seed: int = 0) -> int:
    """PostgreSQL's hash_bytes_uint32_extended: uint64 hash of a 32-bit value with a 64-bit seed."""
    a, b, c = _initial_state(4, seed & _M64)
    return _final((a + value) & _M32, b, c)


def fold_int8(value: int) -> int:
    """The uint32 that hashint8 hashes: the low half xor the high half (its complement when negative),
    so an int8 hashes like the int4 of the same value."""
    low, high = value & _M32, (value >> 32) & _M32
    return low ^ (high if value >= 0 else high ^ _M32)


def hashint4extended(value: int, seed: int) -> int:
    return hash_uint32_extended(value & _M32, seed)


def hashint8extended(value: int, seed: int) -> int:
    return hash_uint32_extended(fold_int8(value), seed)


def hashtextextended(value: str, seed: int) -> int:
    return hash_bytes_extended(value.encode("utf-8"), seed)


def uuid_hash_extended(value: uuid.UUID, seed: int) -> int:
    return hash_bytes_extended(value.bytes, seed)


def partition_hash(row_hashes: Iterable[int]) -> int:
    """compute_partition_hash_value: the columns' seeded hashes folded with hash_combine64 from 0."""
    row = 0
    for column_hash in row_hashes:
        row ^= (column_hash + _COMBINE_CONSTANT + (row << 54) + (row >> 7)) & _M64
    return row


# Everything that does not depend on the key, computed once. For a 4-byte key with the partition seed,
# (a, b, c) after the seed is fixed, and so are the first step of final() and b until the key reaches it.
_SEEDED_4 = _initial_state(4, HASH_PARTITION_SEED)
_SEEDED_16 = _initial_state(16, HASH_PARTITION_SEED)
_SEEDED_BY_LENGTH = [_initial_state(length, HASH_PARTITION_SEED) for length in range(129)]


def _seeded_uint32_partition_hash() -> tuple[int, int, int, int]:
    a0, b0, c0 = _SEEDED_4
    c1 = (c0 ^ b0) - (((b0 << 14) | (b0 >> 18)) & _M32)
    c1 &= _M32
    return a0, b0, c1, ((c1 << 11) | (c1 >> 21)) & _M32


_A0, _B0, _C1, _C1_ROT11 = _seeded_uint32_partition_hash()


def _uint32_row_hash(value: int) -> int:
    """partition_hash([hash_uint32_extended(value, HASH_PARTITION_SEED)]), unrolled: the per-key hot path."""
    a = ((_A0 + value) & _M32) ^ _C1
    a = (a - _C1_ROT11) & _M32
    b = _B0 ^ a
    b = (b - (((a << 25) | (a >> 7)) & _M32)) & _M32
    c = _C1 ^ b
    c = (c - (((b << 16) | (b >> 16)) & _M32)) & _M32
    a ^= c
    a = (a - (((c << 4) | (c >> 28)) & _M32)) & _M32
    b ^= a
    b = (b - (((a << 14) | (a >> 18)) & _M32)) & _M32
    c ^= b
    c = (c - (((b << 24) | (b >> 8)) & _M32)) & _M32
    return (((b << 32) | c) + _COMBINE_CONSTANT) & _M64


def _bytes_row_hash(data: bytes) -> int:
    length = len(data)
    state = _SEEDED_BY_LENGTH[length] if length < len(_SEEDED_BY_LENGTH) else _initial_state(
        length, HASH_PARTITION_SEED)
    return (_hash_bytes_from(state, data) + _COMBINE_CONSTANT) & _M64


def _int8_row_hash(value: KeyValue) -> int:
    assert isinstance(value, int)
    return _uint32_row_hash(fold_int8(value))


def _int4_row_hash(value: KeyValue) -> int:
    assert isinstance(value, int)
    return _uint32_row_hash(value & _M32)


def _text_row_hash(value: KeyValue) -> int:
    assert isinstance(value, str)
    return _bytes_row_hash(value.encode("utf-8"))


def _uuid_row_hash(value: KeyValue) -> int:
    assert isinstance(value, uuid.UUID)
    return (_hash_bytes_from(_SEEDED_16, value.bytes) + _COMBINE_CONSTANT) & _M64


_ROW_HASHES: dict[str, Callable[[KeyValue], int]] = {
    "bigint": _int8_row_hash,
    "integer": _int4_row_hash,
    "text": _text_row_hash,
    "uuid": _uuid_row_hash,
}


def row_hash(data_type: str, value: KeyValue) -> int:
    """The partition hash of a one-column key, as PostgreSQL computes it for `PARTITION BY HASH`."""
    return _ROW_HASHES[_known(data_type)](value)


def hash_remainder(data_type: str, value: KeyValue | None, modulus: int) -> int:
    """The REMAINDER of the `MODULUS modulus` hash partition holding `value` (NULL: remainder 0)."""
    if value is None:
        return 0
    return row_hash(data_type, value) % modulus


# --- key values from text and binary --------------------------------------------------------


def parse_text(data_type: str, text: str) -> KeyValue:
    """A key as PostgreSQL's input function reads it (an SQL literal's contents, a text-format parameter).

    Integers: optional whitespace and sign around decimal digits (PostgreSQL 15's syntax: no
    underscores, no 0x). Text: as is. Uuid: 32 hex digits, optionally in braces, a hyphen allowed after
    any group of four. Bad input raises RoutingError 22P02; an integer out of the type's range 22003, as
    PostgreSQL answers.
    """
    return _TEXT_PARSERS[_known(data_type)](text)


def parse_binary(data_type: str, data: bytes) -> KeyValue:
    """A key in a binary-format Bind parameter: a big-endian int2, int4 or int8 for bigint and integer,
    UTF-8 for text, 16 bytes for uuid. Bad input raises RoutingError (22P02; 22003 out of range; 22021
    for bytes that are not UTF-8 or hold a NUL, which no PostgreSQL text value holds)."""
    return _BINARY_PARSERS[_known(data_type)](data)


def _known(data_type: str) -> str:
    if data_type not in DATA_TYPES:
        raise ValueError(f"unknown data type {data_type!r} ({', '.join(DATA_TYPES)})")
    return data_type


def _parse_integer(text: str, type_name: str, minimum: int, maximum: int) -> int:
    digits = text.strip(_WHITESPACE)
    body = digits[1:] if digits[:1] in ("+", "-") else digits
    # isdecimal alone would take other scripts' digits and int() underscores: PostgreSQL 15 takes neither.
    if not (body.isascii() and body.isdecimal()):
        raise RoutingError(f'invalid input syntax for type {type_name}: "{_shorten(text)}"',
                           INVALID_TEXT_REPRESENTATION)
    value = int(digits)
    if not minimum <= value <= maximum:
        raise RoutingError(f'value "{_shorten(text)}" is out of range for type {type_name}',
                           NUMERIC_VALUE_OUT_OF_RANGE)
    return value


def _parse_bigint(text: str) -> KeyValue:
    return _parse_integer(text, "bigint", INT8_MIN, INT8_MAX)


def _parse_int4(text: str) -> KeyValue:
    return _parse_integer(text, "integer", INT4_MIN, INT4_MAX)


def _parse_text(text: str) -> KeyValue:
    return text


def _parse_uuid(text: str) -> uuid.UUID:
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":  # the canonical form
        compact = text[:8] + text[9:13] + text[14:18] + text[19:23] + text[24:]
        if _HEX.issuperset(compact):
            return uuid.UUID(hex=compact)
    body = text[1:-1] if text[:1] == "{" and text[-1:] == "}" else text
    groups: list[str] = []
    position = 0
    for group in range(8):
        chunk = body[position : position + 4]
        if len(chunk) != 4 or not _HEX.issuperset(chunk):
            break
        groups.append(chunk)
        position += 4
        if group < 7 and body[position : position + 1] == "-":
            position += 1
    if len(groups) != 8 or position != len(body):
        raise RoutingError(f'invalid input syntax for type uuid: "{_shorten(text)}"', INVALID_TEXT_REPRESENTATION)
    return uuid.UUID(hex="".join(groups))


def _binary_integer(data: bytes, type_name: str) -> int:
    if len(data) not in (2, 4, 8):
        raise RoutingError(
            f"a binary {type_name} sharding key must be 2, 4 or 8 bytes (int2, int4, int8), got {len(data)}",
            INVALID_TEXT_REPRESENTATION)
    return int.from_bytes(data, "big", signed=True)


def _binary_bigint(data: bytes) -> KeyValue:
    return _binary_integer(data, "bigint")


def _binary_int4(data: bytes) -> KeyValue:
    value = _binary_integer(data, "integer")
    if not INT4_MIN <= value <= INT4_MAX:
        raise RoutingError(f'value "{value}" is out of range for type integer', NUMERIC_VALUE_OUT_OF_RANGE)
    return value


def _binary_text(data: bytes) -> KeyValue:
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RoutingError(f'invalid byte sequence for encoding "UTF8" in a text sharding key at byte {exc.start}',
                           CHARACTER_NOT_IN_REPERTOIRE) from None
    if "\x00" in text:
        raise RoutingError('invalid byte sequence for encoding "UTF8": 0x00 in a text sharding key',
                           CHARACTER_NOT_IN_REPERTOIRE)
    return text


def _binary_uuid(data: bytes) -> KeyValue:
    if len(data) != 16:
        raise RoutingError(f"a binary uuid sharding key must be 16 bytes, got {len(data)}",
                           INVALID_TEXT_REPRESENTATION)
    return uuid.UUID(bytes=bytes(data))


_TEXT_PARSERS: dict[str, Callable[[str], KeyValue]] = {
    "bigint": _parse_bigint,
    "integer": _parse_int4,
    "text": _parse_text,
    "uuid": _parse_uuid,
}
_BINARY_PARSERS: dict[str, Callable[[bytes], KeyValue]] = {
    "bigint": _binary_bigint,
    "integer": _binary_int4,
    "text": _binary_text,
    "uuid": _binary_uuid,
}


def _shorten(text: str) -> str:
    return text if len(text) <= _DISPLAY_CHARS else text[:_DISPLAY_CHARS] + "..."


def display_key(value: KeyValue) -> str:
    """A key as it would be written in SQL, shortened: 42, 'eu', 'a0ee...-0a11'."""
    if isinstance(value, int):
        return str(value)
    shown = _shorten(str(value))
    return "'" + shown.replace("'", "''") + "'"


# --- sharders ---------------------------------------------------------------------------------


class Sharder:
    """Where the rows of one sharded table live: `shard_of(value) -> shard number`.

    Built once per [[sharded_tables]] entry (see make_sharder); `table` None stands for every table with
    the column. A key with no shard raises RoutingError 22023 naming the table, the column and the value.
    """

    __slots__ = ("_cache", "_from_binary", "_from_text", "column", "data_type", "method", "shard_count", "table")

    def __init__(self, table: str | None, column: str, data_type: str, method: str, shard_count: int) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1 (got {shard_count})")
        self.table = table
        self.column = column
        self.data_type = _known(data_type)
        self.method = method
        self.shard_count = shard_count
        self._from_text = _TEXT_PARSERS[data_type]
        self._from_binary = _BINARY_PARSERS[data_type]
        # One cache for every input form: a text form (str), binary bytes and typed values never collide
        # but where they mean the same key (text of a text key), and then they have the same shard.
        self._cache: dict[object, int] = {}

    def shard_of(self, value: KeyValue | None, table: str | None = None) -> int:
        """The shard of a typed key; `table` names the table in an error when this sharder has none."""
        raise NotImplementedError

    def shard_of_text(self, text: str, table: str | None = None) -> int:
        """The shard of a key in text form (an SQL literal's contents, a text-format parameter)."""
        shard = self._cache.get(text)
        if shard is None:
            shard = self._remember(text, self.shard_of(self._from_text(text), table))
        return shard

    def shard_of_binary(self, data: bytes, table: str | None = None) -> int:
        """The shard of a key in a binary-format Bind parameter."""
        if type(data) is not bytes:  # a memoryview or bytearray cannot be a dict key
            data = bytes(data)
        shard = self._cache.get(data)
        if shard is None:
            shard = self._remember(data, self.shard_of(self._from_binary(data), table))
        return shard

    def _remember(self, key: object, shard: int) -> int:
        if len(self._cache) >= SHARD_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = shard
        return shard

    def parse_text(self, text: str) -> KeyValue:
        return self._from_text(text)

    def parse_binary(self, data: bytes) -> KeyValue:
        return self._from_binary(data)

    def same_key(self, left: str, right: str) -> bool:
        """Whether two keys in text form are one value (' 42' and '+42'; a uuid in upper and lower case)."""
        return left == right or self._from_text(left) == self._from_text(right)

    def _where(self, table: str | None) -> str:
        name = table or self.table
        return f"{name}.{self.column}" if name else f"{self.column} (any table)"

    def _no_shard(self, value: KeyValue | None, table: str | None, where: str) -> RoutingError:
        if value is None:
            return RoutingError(f"the sharding key {self._where(table)} is NULL: no {self.method} shard holds NULL",
                                INVALID_PARAMETER_VALUE)
        return RoutingError(f"no shard for {self._where(table)} = {display_key(value)}: the value is {where} "
                            "of its [[sharded_tables]] entry", INVALID_PARAMETER_VALUE)


class HashSharder(Sharder):
    """Shard k holds the keys of hash partition REMAINDER k of MODULUS shard_count; NULL is on shard 0."""

    __slots__ = ("_row_hash",)

    def __init__(self, table: str | None, column: str, data_type: str, shard_count: int) -> None:
        super().__init__(table, column, data_type, "hash", shard_count)
        self._row_hash = _ROW_HASHES[data_type]

    def shard_of(self, value: KeyValue | None, table: str | None = None) -> int:
        if value is None:
            return 0
        shard = self._cache.get(value)
        if shard is None:
            shard = self._remember(value, self._row_hash(value) % self.shard_count)
        return shard


class RangeSharder(Sharder):
    """Ranges [start, end) of the key, each on one shard; None for start or end leaves that side open.

    Integers compare as numbers, uuids as PostgreSQL orders them (their bytes), and text by its UTF-8 bytes
    (the C collation's order), whatever the database's collation.
    """

    __slots__ = ("_ends", "_shards", "_starts")

    def __init__(self, table: str | None, column: str, data_type: str, shard_count: int,
                 ranges: Iterable[tuple[int, KeyValue | None, KeyValue | None]]) -> None:
        super().__init__(table, column, data_type, "range", shard_count)
        bounds = []
        for shard, start, end in ranges:
            _check_shard(shard, shard_count)
            low = _order_key(data_type, start) if start is not None else _lowest(data_type)
            high = _order_key(data_type, end) if end is not None else None
            if high is not None and not low < high:
                raise ValueError(f"range [{start}, {end}) of shard {shard} is empty: start must be below end")
            bounds.append((low, high, shard))
        bounds.sort(key=lambda bound: bound[0])
        for (_, previous_end, _), (next_start, _, _) in itertools.pairwise(bounds):
            if previous_end is None or next_start < previous_end:
                raise ValueError("ranges overlap")
        self._starts = [bound[0] for bound in bounds]
        self._ends = [bound[1] for bound in bounds]
        self._shards = [bound[2] for bound in bounds]

    def shard_of(self, value: KeyValue | None, table: str | None = None) -> int:
        if value is None:
            raise self._no_shard(None, table, "")
        key = _order_key(self.data_type, value)
        index = bisect_right(self._starts, key) - 1
        if index >= 0:
            end = self._ends[index]
            if end is None or key < end:
                return self._shards[index]
        raise self._no_shard(value, table, "outside every range")


class ListSharder(Sharder):
    """Listed key values, each on one shard."""

    __slots__ = ("_shards",)

    def __init__(self, table: str | None, column: str, data_type: str, shard_count: int,
                 values: Mapping[int, Iterable[KeyValue]]) -> None:
        super().__init__(table, column, data_type, "list", shard_count)
        self._shards: dict[KeyValue, int] = {}
        for shard, listed in values.items():
            _check_shard(shard, shard_count)
            for value in listed:
                typed = _typed(data_type, value)
                if self._shards.setdefault(typed, shard) != shard:
                    raise ValueError(f"value {display_key(typed)} is listed on shards {self._shards[typed]} and {shard}")

    def shard_of(self, value: KeyValue | None, table: str | None = None) -> int:
        shard = self._shards.get(value) if value is not None else None
        if shard is None:
            raise self._no_shard(value, table, "in no list")
        return shard


def make_sharder(table: str | None, column: str, data_type: str, method: str, shard_count: int, *,
                 ranges: Sequence[tuple[int, KeyValue | None, KeyValue | None]] = (),
                 values: Mapping[int, Iterable[KeyValue]] | None = None) -> Sharder:
    """The sharder of one [[sharded_tables]] entry. `ranges`: (shard, start, end) with start inclusive and
    end exclusive (None: open); `values`: shard -> its key values. Uuid bounds and values may be given as
    text. Raises ValueError for what the config loader refuses (overlaps, a shard out of range...)."""
    if method == "hash":
        return HashSharder(table, column, data_type, shard_count)
    if method == "range":
        return RangeSharder(table, column, data_type, shard_count, ranges)
    if method == "list":
        return ListSharder(table, column, data_type, shard_count, values or {})
    raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")


def _check_shard(shard: int, shard_count: int) -> None:
    if not 0 <= shard < shard_count:
        raise ValueError(f"shard {shard} is not one of 0 to {shard_count - 1}")


def _typed(data_type: str, value: KeyValue) -> KeyValue:
    """A configured bound or list value as the key type's value (a uuid may be written as text)."""
    if data_type == "uuid" and isinstance(value, str):
        return _parse_uuid(value)
    if data_type in ("bigint", "integer") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if data_type == "text" and isinstance(value, str):
        return value
    if data_type == "uuid" and isinstance(value, uuid.UUID):
        return value
    raise ValueError(f"{value!r} is not a {data_type} value")


def _order_key(data_type: str, value: KeyValue) -> Any:
    """What ranges compare: the int, a uuid's bytes, text's UTF-8 bytes (one type per sharder)."""
    typed = _typed(data_type, value)
    if isinstance(typed, str):
        return typed.encode("utf-8")
    if isinstance(typed, uuid.UUID):
        return typed.bytes
    return typed


def _lowest(data_type: str) -> Any:
    """Below or equal to every key of the type: the start of a range open at the bottom."""
    return INT8_MIN if data_type in ("bigint", "integer") else b""
