"""Shard functions: hash placement against values taken once from PostgreSQL 15, range and list edges,
the errors a key with no shard gets, and key values parsed from text and binary Bind parameters.

Every expected hash and remainder below was read from a real PostgreSQL 15 (x86-64, UTF8):
`hashint8extended(k, seed)` and friends, and `satisfies_hash_partition(parent, m, r, k)` for the remainder
of MODULUS m; tests/integration/test_shard_hash.py checks thousands more keys against a live server.
"""

from __future__ import annotations

import uuid

import pytest

from routing.errors import RoutingError
from routing.shard import (
    DATA_TYPES,
    HASH_PARTITION_SEED,
    SHARD_CACHE_ENTRIES,
    HashSharder,
    ListSharder,
    RangeSharder,
    fold_int8,
    hash_remainder,
    hashint4extended,
    hashint8extended,
    hashtextextended,
    make_sharder,
    parse_binary,
    parse_text,
    partition_hash,
    uuid_hash_extended,
)

# (data type, key as text, hash with seed 0, hash with the partition seed, remainders for MODULUS 2, 3, 5, 7),
# hashes as PostgreSQL's bigint results.
POSTGRESQL_VALUES = [
    ("bigint", "0", 4154612158245552303, -4403592609991167795, (0, 2, 3, 4)),
    ("bigint", "1", -3670598878359251130, 5968994663651403477, (0, 2, 0, 5)),
    ("bigint", "-1", -1888257769727981238, -5017072347659237694, (1, 2, 4, 0)),
    ("bigint", "42", 8010225493015854792, 7363975540656877951, (0, 0, 4, 0)),
    ("bigint", "-9223372036854775808", -9109110466470504941, -6050265599104649060, (1, 1, 4, 0)),
    ("bigint", "9223372036854775807", 1977219185673256887, 4938542303000433043, (0, 0, 1, 3)),
    ("bigint", "4294967296", -3670598878359251130, 5968994663651403477, (0, 2, 0, 5)),
    ("bigint", "123456789012", 5990271995538752477, 1825551100719034884, (1, 2, 2, 2)),
    ("integer", "0", 4154612158245552303, -4403592609991167795, (0, 2, 3, 4)),
    ("integer", "1", -3670598878359251130, 5968994663651403477, (0, 2, 0, 5)),
    ("integer", "-1", -1888257769727981238, -5017072347659237694, (1, 2, 4, 0)),
    ("integer", "42", 8010225493015854792, 7363975540656877951, (0, 0, 4, 0)),
    ("integer", "-2147483648", 1977219185673256887, 4938542303000433043, (0, 0, 1, 3)),
    ("integer", "2147483647", -9109110466470504941, -6050265599104649060, (1, 1, 4, 0)),
    ("text", "", -6939563903564495251, -5700645584453517373, (0, 2, 1, 1)),
    ("text", "a", 3591986179850072241, -6705225459120232837, (0, 2, 2, 3)),
    ("text", "eu", 8114993451080336987, -9087934104018961455, (0, 0, 4, 0)),
    ("text", "hello world!", -2866487628948787489, -1886269529411655687, (0, 2, 1, 5)),
    ("text", "tenant-1234567", -3334420050040362321, 5421058391009202135, (0, 2, 3, 1)),
    ("text", "日本語", 2870829529307104068, -8050275759738715173, (0, 0, 1, 6)),
    ("text", "🙂🎉", 2040787982711327697, -8030491136365248198, (1, 0, 1, 1)),
    ("text", "abcdefghijklmnopqrstuvwxyz", -6612928417832572997, -7171292135076916904, (1, 1, 0, 4)),
    ("uuid", "00000000-0000-0000-0000-000000000000", -6859010066814654381, -5281082146396728638, (1, 0, 0, 2)),
    ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 7543054272012930821, 424513190990560493, (0, 1, 1, 6)),
    ("uuid", "ffffffff-ffff-ffff-ffff-ffffffffffff", 293445543803463785, -148986464341306210, (1, 1, 3, 0)),
]
SQL_HASHES = {"bigint": hashint8extended, "integer": hashint4extended, "text": hashtextextended,
              "uuid": uuid_hash_extended}


def unsigned(value: int) -> int:
    return value % (1 << 64)


def test_the_partition_seed() -> None:
    assert HASH_PARTITION_SEED == 0x7A5B22367996DCFD


@pytest.mark.parametrize(("data_type", "text", "seedless", "seeded", "remainders"), POSTGRESQL_VALUES)
def test_seeded_hashes_match_postgresql(data_type: str, text: str, seedless: int, seeded: int,
                                        remainders: tuple[int, ...]) -> None:
    value = parse_text(data_type, text)
    hash_function = SQL_HASHES[data_type]
    assert hash_function(value, 0) == unsigned(seedless)  # type: ignore[operator]
    assert hash_function(value, HASH_PARTITION_SEED) == unsigned(seeded)  # type: ignore[operator]


@pytest.mark.parametrize(("data_type", "text", "seedless", "seeded", "remainders"), POSTGRESQL_VALUES)
def test_hash_remainders_match_postgresql(data_type: str, text: str, seedless: int, seeded: int,
                                          remainders: tuple[int, ...]) -> None:
    value = parse_text(data_type, text)
    for modulus, remainder in zip((2, 3, 5, 7), remainders, strict=True):
        assert hash_remainder(data_type, value, modulus) == remainder
        sharder = HashSharder("t", "k", data_type, modulus)
        assert sharder.shard_of(value) == remainder
        assert sharder.shard_of_text(text) == remainder


def test_one_column_partition_hash_adds_the_combine_constant() -> None:
    assert partition_hash([]) == 0
    assert partition_hash([0]) == 0x49A0F4DD15E5A8E3
    assert partition_hash([unsigned(-1)]) == 0x49A0F4DD15E5A8E2  # wraps around 2**64


def test_int8_folds_onto_int4_so_equal_values_hash_alike() -> None:
    assert fold_int8(5) == 5
    assert fold_int8(-5) == unsigned(-5) & 0xFFFFFFFF
    assert fold_int8(2**32) == 1  # low 0 xor high 1
    assert fold_int8(-(2**32)) == 0  # low 0 xor ~0xFFFFFFFF
    for value in (0, 1, -1, 42, -(2**31), 2**31 - 1):
        assert hashint8extended(value, HASH_PARTITION_SEED) == hashint4extended(value, HASH_PARTITION_SEED)
        assert HashSharder("t", "k", "bigint", 7).shard_of(value) == HashSharder("t", "k", "integer", 7).shard_of(value)


def test_hash_puts_null_on_shard_0_as_postgresql_does() -> None:
    for data_type in DATA_TYPES:
        assert HashSharder("t", "k", data_type, 5).shard_of(None) == 0
        assert hash_remainder(data_type, None, 5) == 0


def test_one_shard_takes_everything() -> None:
    sharder = HashSharder("t", "k", "text", 1)
    assert {sharder.shard_of_text(str(n)) for n in range(50)} == {0}


def test_text_forms_and_binary_forms_agree_and_are_cached() -> None:
    sharder = HashSharder("orders", "tenant_id", "bigint", 5)
    assert sharder.shard_of_text(" +42 ") == sharder.shard_of_text("42") == 4
    assert sharder.shard_of_binary((42).to_bytes(8, "big", signed=True)) == 4
    assert sharder.shard_of_binary((42).to_bytes(4, "big", signed=True)) == 4
    assert sharder.shard_of_binary(memoryview((42).to_bytes(2, "big", signed=True))) == 4  # type: ignore[arg-type]
    for n in range(SHARD_CACHE_ENTRIES + 10):  # the cache empties itself, answers stay right
        sharder.shard_of_text(str(n))
    assert sharder.shard_of_text("42") == 4
    text_sharder = HashSharder("t", "k", "text", 7)
    assert text_sharder.shard_of_binary("日本語".encode()) == text_sharder.shard_of("日本語") == 6
    uuid_sharder = HashSharder("t", "k", "uuid", 7)
    key = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert uuid_sharder.shard_of_binary(key.bytes) == uuid_sharder.shard_of_text("{A0EEBC999C0B4EF8BB6D6BB9BD380A11}") == 6


# --- range --------------------------------------------------------------------------------------


def test_range_edges_start_inclusive_end_exclusive() -> None:
    sharder = RangeSharder("orders", "tenant_id", "bigint", 3, [(1, 1000, 2000), (0, 0, 1000), (2, 2000, None)])
    assert sharder.shard_of(0) == 0
    assert sharder.shard_of(999) == 0
    assert sharder.shard_of(1000) == 1
    assert sharder.shard_of(1999) == 1
    assert sharder.shard_of(2000) == 2
    assert sharder.shard_of(2**63 - 1) == 2
    assert sharder.shard_of_text("1500") == 1
    assert sharder.shard_of_binary((2500).to_bytes(8, "big", signed=True)) == 2
    with pytest.raises(RoutingError) as info:
        sharder.shard_of(-1)
    assert info.value.sqlstate == "22023"
    assert str(info.value) == ("no shard for orders.tenant_id = -1: the value is outside every range"
                               " of its [[sharded_tables]] entry")


def test_range_open_at_the_bottom_and_gaps() -> None:
    sharder = RangeSharder(None, "region_code", "integer", 2, [(0, None, 10), (1, 20, 30)])
    assert sharder.shard_of(-(2**31)) == 0
    assert sharder.shard_of(9) == 0
    for gap in (10, 15, 19, 30, 2**31 - 1):
        with pytest.raises(RoutingError) as info:
            sharder.shard_of(gap)
        assert info.value.sqlstate == "22023"
    with pytest.raises(RoutingError, match=r"^no shard for items\.region_code = 15: .*outside every range"):
        sharder.shard_of_text("15", table="items")
    with pytest.raises(RoutingError, match=r"^no shard for region_code \(any table\) = 15"):
        sharder.shard_of(15)


def test_text_ranges_compare_utf8_bytes() -> None:
    sharder = RangeSharder("users", "name", "text", 3, [(0, None, "m"), (1, "m", "é"), (2, "é", None)])
    assert sharder.shard_of("") == 0
    assert sharder.shard_of("Zebra") == 0  # "Z" (0x5a) sorts before "m" bytewise
    assert sharder.shard_of("lzzzz") == 0
    assert sharder.shard_of("m") == 1
    assert sharder.shard_of("zzz") == 1  # "z" (0x7a) < "é" (0xc3 0xa9)
    assert sharder.shard_of("é") == 2
    assert sharder.shard_of("日本") == 2
    with pytest.raises(RoutingError, match=r"users\.name = 'it''s'"):
        RangeSharder("users", "name", "text", 1, [(0, "a", "b")]).shard_of("it's")


def test_uuid_ranges_compare_as_postgresql_orders_uuids() -> None:
    sharder = RangeSharder("t", "id", "uuid", 2, [(0, None, "80000000-0000-0000-0000-000000000000"),
                                                  (1, "80000000-0000-0000-0000-000000000000", None)])
    assert sharder.shard_of_text("7fffffff-ffff-ffff-ffff-ffffffffffff") == 0
    assert sharder.shard_of_text("80000000-0000-0000-0000-000000000000") == 1
    assert sharder.shard_of(uuid.UUID(int=2**128 - 1)) == 1


def test_range_null_has_no_shard() -> None:
    with pytest.raises(RoutingError, match="is NULL") as info:
        RangeSharder("t", "k", "bigint", 1, [(0, None, None)]).shard_of(None)
    assert info.value.sqlstate == "22023"


@pytest.mark.parametrize(
    ("ranges", "reason"),
    [
        ([(0, 0, 10), (1, 5, 20)], "overlap"),
        ([(0, None, 10), (1, None, 20)], "overlap"),
        ([(0, 0, None), (1, 100, 200)], "overlap"),
        ([(0, 10, 10)], "empty"),
        ([(0, 10, 5)], "empty"),
        ([(2, 0, 10)], "not one of 0 to 1"),
        ([(0, "a", "b")], "not a bigint value"),
    ],
)
def test_bad_ranges_are_refused(ranges: list[tuple[int, object, object]], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RangeSharder("t", "k", "bigint", 2, ranges)  # type: ignore[arg-type]


def test_adjacent_ranges_do_not_overlap() -> None:
    sharder = RangeSharder("t", "k", "bigint", 2, [(0, None, 0), (1, 0, None)])
    assert (sharder.shard_of(-1), sharder.shard_of(0)) == (0, 1)


# --- list ---------------------------------------------------------------------------------------


def test_list_values() -> None:
    sharder = ListSharder("customers", "region", "text", 3, {0: ["eu", "uk"], 1: ["us"], 2: ["apac", ""]})
    assert sharder.shard_of("eu") == sharder.shard_of_text("uk") == 0
    assert sharder.shard_of_binary(b"us") == 1
    assert sharder.shard_of("") == 2
    with pytest.raises(RoutingError) as info:
        sharder.shard_of("EU")
    assert info.value.sqlstate == "22023"
    assert str(info.value) == ("no shard for customers.region = 'EU': the value is in no list"
                               " of its [[sharded_tables]] entry")
    with pytest.raises(RoutingError, match="is NULL"):
        sharder.shard_of(None)


def test_list_of_integers_and_uuids() -> None:
    integers = ListSharder("t", "k", "integer", 2, {0: [1, 2, 3], 1: [-1]})
    assert integers.shard_of_text(" 2") == 0 and integers.shard_of_binary(b"\xff\xff\xff\xff") == 1
    with pytest.raises(RoutingError, match="= 4: the value is in no list"):
        integers.shard_of(4)
    uuids = ListSharder("t", "k", "uuid", 2, {1: ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"]})
    assert uuids.shard_of_text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11") == 1


def test_list_value_on_two_shards_is_refused() -> None:
    with pytest.raises(ValueError, match="listed on shards 0 and 1"):
        ListSharder("t", "k", "text", 2, {0: ["eu"], 1: ["eu"]})
    with pytest.raises(ValueError, match="not one of 0 to 1"):
        ListSharder("t", "k", "text", 2, {5: ["eu"]})


def test_make_sharder_and_unknown_names() -> None:
    assert isinstance(make_sharder("t", "k", "bigint", "hash", 2), HashSharder)
    assert isinstance(make_sharder("t", "k", "bigint", "range", 2, ranges=[(0, None, None)]), RangeSharder)
    assert isinstance(make_sharder("t", "k", "bigint", "list", 2, values={0: [1]}), ListSharder)
    with pytest.raises(ValueError, match="unknown method 'modulo'"):
        make_sharder("t", "k", "bigint", "modulo", 2)
    with pytest.raises(ValueError, match="unknown data type 'float'"):
        make_sharder("t", "k", "float", "hash", 2)
    with pytest.raises(ValueError, match="shard_count"):
        make_sharder("t", "k", "bigint", "hash", 0)


def test_same_key_compares_values_not_spelling() -> None:
    assert HashSharder("t", "k", "bigint", 2).same_key(" 42", "+42")
    assert not HashSharder("t", "k", "bigint", 2).same_key("42", "43")
    assert HashSharder("t", "k", "uuid", 2).same_key("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
                                                      "a0eebc999c0b4ef8bb6d6bb9bd380a11")
    assert not HashSharder("t", "k", "text", 2).same_key("a", "A")


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_type", "text", "expected"),
    [
        ("bigint", "0", 0),
        ("bigint", "  -17\n", -17),
        ("bigint", "+5", 5),
        ("bigint", "-9223372036854775808", -(2**63)),
        ("bigint", "9223372036854775807", 2**63 - 1),
        ("bigint", "007", 7),
        ("integer", "-2147483648", -(2**31)),
        ("integer", "2147483647", 2**31 - 1),
        ("text", "", ""),
        ("text", " spaced ", " spaced "),
        ("text", "🙂", "🙂"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("uuid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("uuid", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("uuid", "a0eebc999c0b4ef8bb6d6bb9bd380a11", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("uuid", "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ],
)
def test_parse_text(data_type: str, text: str, expected: object) -> None:
    assert parse_text(data_type, text) == expected


@pytest.mark.parametrize(
    ("data_type", "text", "sqlstate", "message"),
    [
        ("bigint", "", "22P02", 'invalid input syntax for type bigint: ""'),
        ("bigint", "12a", "22P02", 'invalid input syntax for type bigint: "12a"'),
        ("bigint", "1_000", "22P02", "invalid input syntax for type bigint"),
        ("bigint", "0x10", "22P02", "invalid input syntax for type bigint"),
        ("bigint", "1.5", "22P02", "invalid input syntax for type bigint"),
        ("bigint", "٣", "22P02", "invalid input syntax for type bigint"),  # an Arabic-Indic digit
        ("bigint", "- 1", "22P02", "invalid input syntax for type bigint"),
        ("bigint", "9223372036854775808", "22003", 'value "9223372036854775808" is out of range for type bigint'),
        ("integer", "2147483648", "22003", 'value "2147483648" is out of range for type integer'),
        ("integer", "-2147483649", "22003", "out of range for type integer"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1-", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "22P02", "invalid input syntax for type uuid"),
        ("uuid", "", "22P02", "invalid input syntax for type uuid"),
    ],
)
def test_parse_text_refuses_bad_input(data_type: str, text: str, sqlstate: str, message: str) -> None:
    with pytest.raises(RoutingError) as info:
        parse_text(data_type, text)
    assert info.value.sqlstate == sqlstate
    assert message in str(info.value)


def test_long_bad_input_is_shortened_in_the_message() -> None:
    with pytest.raises(RoutingError) as info:
        parse_text("bigint", "x" * 1000)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize(
    ("data_type", "data", "expected"),
    [
        ("bigint", b"\x00\x00\x00\x00\x00\x00\x00\x2a", 42),
        ("bigint", b"\xff\xff\xff\xff\xff\xff\xff\xff", -1),
        ("bigint", b"\x80\x00\x00\x00\x00\x00\x00\x00", -(2**63)),
        ("bigint", b"\xff\xfe", -2),
        ("bigint", b"\x7f\xff\xff\xff", 2**31 - 1),
        ("integer", b"\x80\x00\x00\x00", -(2**31)),
        ("integer", b"\x00\x00\x00\x00\x7f\xff\xff\xff", 2**31 - 1),
        ("integer", b"\x00\x07", 7),
        ("text", "日本語 🙂".encode(), "日本語 🙂"),
        ("text", b"", ""),
        ("uuid", bytes(range(16)), uuid.UUID("00010203-0405-0607-0809-0a0b0c0d0e0f")),
    ],
)
def test_parse_binary(data_type: str, data: bytes, expected: object) -> None:
    assert parse_binary(data_type, data) == expected


@pytest.mark.parametrize(
    ("data_type", "data", "sqlstate", "message"),
    [
        ("bigint", b"\x00\x00\x00", "22P02", "must be 2, 4 or 8 bytes (int2, int4, int8), got 3"),
        ("bigint", b"", "22P02", "got 0"),
        ("integer", b"\x00" * 16, "22P02", "got 16"),
        ("integer", b"\x00\x00\x00\x00\x80\x00\x00\x00", "22003", 'value "2147483648" is out of range for type integer'),
        ("text", b"\xff\xfe", "22021", 'invalid byte sequence for encoding "UTF8"'),
        ("text", b"a\x00b", "22021", "0x00"),
        ("uuid", bytes(15), "22P02", "must be 16 bytes, got 15"),
        ("uuid", b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "22P02", "must be 16 bytes, got 36"),
    ],
)
def test_parse_binary_refuses_bad_input(data_type: str, data: bytes, sqlstate: str, message: str) -> None:
    with pytest.raises(RoutingError) as info:
        parse_binary(data_type, data)
    assert info.value.sqlstate == sqlstate
    assert message in str(info.value)


def test_unknown_data_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown data type 'float'"):
        parse_text("float", "1.5")
    with pytest.raises(ValueError, match="unknown data type"):
        parse_binary("numeric", b"")


def test_bad_keys_are_not_cached_and_keep_failing() -> None:
    sharder = HashSharder("t", "k", "integer", 3)
    for _ in range(2):
        with pytest.raises(RoutingError):
            sharder.shard_of_text("nope")
