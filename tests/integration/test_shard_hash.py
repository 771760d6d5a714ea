"""routing.shard's hash agrees with PostgreSQL: thousands of random keys (bigint, integer, text, uuid) go
into real `PARTITION BY HASH` tables of modulus 2, 3 and 5, and every row's partition must be the
remainder our function computes. PostgreSQL's own seeded hash functions are compared value by value too,
so a disagreement points at the hash or at the partition combine.

One throwaway server of its own (no replicas), a few seconds. The seed is fixed so a failure replays.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from localpg import PgServer
from routing.shard import (
    HASH_PARTITION_SEED,
    INT4_MAX,
    INT4_MIN,
    INT8_MAX,
    INT8_MIN,
    HashSharder,
    KeyValue,
    hash_remainder,
    hashint4extended,
    hashint8extended,
    hashtextextended,
    uuid_hash_extended,
)
from tests.harness import create_topology, destroy_topology

pytestmark = pytest.mark.timeout(120)

SEED = 20240613
KEYS_PER_TYPE = 3000
MODULI = (2, 3, 5)
SQL_TYPES = {"bigint": "bigint", "integer": "integer", "text": "text", "uuid": "uuid"}
_SIGNED_64 = 1 << 64


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    topology = create_topology(replicas=0)
    try:
        assert topology.primary is not None
        yield topology.primary
    finally:
        destroy_topology(topology)


@pytest.fixture(scope="module")
def conn(server: PgServer) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        encoding = connection.execute("SHOW server_encoding").fetchone()
        assert encoding == ("UTF8",)
        yield connection


def _random_text(rng: random.Random) -> str:
    alphabets = (
        "abcdefghijklmnopqrstuvwxyz0123456789",
        "éèàüßøœ",
        "日本語中文한국어",
        "😀🎉🚀👍🏽🇫🇷",
        " '\"\\\t\n,{}",
    )
    length = rng.choice((0, 1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 16, 23, 24, 25, 40, 100, 200))
    return "".join(rng.choice(rng.choice(alphabets)) for _ in range(length))


def _keys(data_type: str, rng: random.Random) -> list[KeyValue]:
    if data_type in ("bigint", "integer"):
        low, high = (INT8_MIN, INT8_MAX) if data_type == "bigint" else (INT4_MIN, INT4_MAX)
        edges = [0, 1, -1, 2, -2, low, high, low + 1, high - 1, INT4_MIN, INT4_MAX, INT4_MIN - 1, INT4_MAX + 1,
                 2**32, -(2**32), 2**32 + 1, -(2**32) - 1, 2**40, -(2**40)]
        keys: list[KeyValue] = [edge for edge in edges if low <= edge <= high]
        while len(keys) < KEYS_PER_TYPE:
            scale = rng.choice((10, 1000, 2**31, 2**32, 2**48, 2**63))
            keys.append(max(low, min(high, rng.randrange(-scale, scale))))
        return keys
    if data_type == "text":
        texts: list[KeyValue] = ["", "a", "ab", "abc", "abcd", "x" * 12, "y" * 24, "🙂", "a\u0301", "A", "Ω"]
        while len(texts) < KEYS_PER_TYPE:
            texts.append(_random_text(rng))
        return texts
    uuids: list[KeyValue] = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID(int=1)]
    while len(uuids) < KEYS_PER_TYPE:
        uuids.append(uuid.UUID(int=rng.getrandbits(128)))
    return uuids


def _unique(keys: list[KeyValue]) -> list[KeyValue]:
    return list(dict.fromkeys(keys))


def _one(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The single value of a query that returns exactly one row of one column."""
    rows = conn.execute(sql, params).fetchall()
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


def _signed(value: int) -> int:
    """A uint64 as the bigint PostgreSQL's SQL-callable hash functions return."""
    return value - _SIGNED_64 if value >= 1 << 63 else value


@pytest.mark.parametrize("data_type", list(SQL_TYPES))
def test_hash_partitions_hold_what_our_function_computes(conn: psycopg.Connection[Any], data_type: str) -> None:
    rng = random.Random(f"{SEED}-{data_type}")
    keys = _unique(_keys(data_type, rng))
    sql_type = SQL_TYPES[data_type]
    for modulus in MODULI:
        table = f"hash_{data_type}_{modulus}"
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (key {sql_type}) PARTITION BY HASH (key)")
        for remainder in range(modulus):
            conn.execute(f"CREATE TABLE {table}_{remainder} PARTITION OF {table} "
                         f"FOR VALUES WITH (MODULUS {modulus}, REMAINDER {remainder})")
        with conn.cursor() as cursor, cursor.copy(f"COPY {table} (key) FROM STDIN") as copy:
            for key in keys:
                copy.write_row((key,))
        rows = conn.execute(f"SELECT key, tableoid::regclass::text FROM {table}").fetchall()
        assert len(rows) == len(keys)
        sharder = HashSharder(table, "key", data_type, modulus)
        wrong = [(key, partition) for key, partition in rows
                 if f"{table}_{sharder.shard_of(key)}" != partition]
        assert wrong[:5] == [], f"{len(wrong)} of {len(rows)} keys in another partition than computed"
        # NULL goes to remainder 0, as PostgreSQL puts it.
        conn.execute(f"INSERT INTO {table} VALUES (NULL)")
        partition = _one(conn, f"SELECT tableoid::regclass::text FROM {table} WHERE key IS NULL")
        assert partition == f"{table}_{hash_remainder(data_type, None, modulus)}" == f"{table}_0"
        conn.execute(f"DROP TABLE {table}")


_SQL_HASH: dict[str, tuple[str, Callable[[Any, int], int]]] = {
    "bigint": ("hashint8extended", hashint8extended),
    "integer": ("hashint4extended", hashint4extended),
    "text": ("hashtextextended", hashtextextended),
    "uuid": ("uuid_hash_extended", uuid_hash_extended),
}


@pytest.mark.parametrize("data_type", list(SQL_TYPES))
def test_seeded_hash_functions_match_postgresql(conn: psycopg.Connection[Any], data_type: str) -> None:
    """Value by value against PostgreSQL's SQL-callable extended hashes, with seeds 0, 1 and the partition seed."""
    rng = random.Random(f"{SEED}-functions-{data_type}")
    keys = _unique(_keys(data_type, rng))[:500]
    name, ours = _SQL_HASH[data_type]
    for seed in (0, 1, HASH_PARTITION_SEED):
        theirs = conn.execute(
            f"SELECT k, {name}(k, %s) FROM unnest(%s::{SQL_TYPES[data_type]}[]) WITH ORDINALITY AS u(k, n) ORDER BY n",
            (_signed(seed), keys),
        ).fetchall()
        assert [key for key, _ in theirs] == keys
        wrong = [(key, value) for key, value in theirs if _signed(ours(key, seed)) != value]
        assert wrong[:5] == [], f"{len(wrong)} of {len(keys)} hashes differ for seed {seed:#x}"


def test_satisfies_hash_partition_agrees_for_text_keys_sent_as_text(conn: psycopg.Connection[Any]) -> None:
    """The text a client sends (shard_of_text) lands where PostgreSQL's own check says it belongs."""
    conn.execute("DROP TABLE IF EXISTS hash_check")
    conn.execute("CREATE TABLE hash_check (key bigint) PARTITION BY HASH (key)")
    literals = ["0", " 42 ", "+7", "-9223372036854775808", "9223372036854775807", "-1", "4294967296"]
    sharder = HashSharder("hash_check", "key", "bigint", 3)
    for literal in literals:
        remainder = _one(conn, "SELECT r FROM generate_series(0, 2) AS r "
                               "WHERE satisfies_hash_partition('hash_check'::regclass, 3, r, %s::bigint)", (literal,))
        assert sharder.shard_of_text(literal) == remainder, literal
    conn.execute("DROP TABLE hash_check")
