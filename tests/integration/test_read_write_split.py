"""Read/write splitting through the proxy with psycopg and asyncpg: reads on replicas, writes and write
transactions on the primary, read-only transactions on a replica, hints, prepared statements reused
across transactions, read-your-writes, balancing strategies, stickiness, and session mode (no split).

Where a statement ran is read from the server itself: `pg_is_in_recovery()`, `inet_server_port()` and
`pg_backend_pid()` (one transaction must stay on one server connection). The `pg` topology is shared:
whatever a test pauses is resumed in `finally`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from localpg import PgServer, Topology
from tests.harness import (
    DirectProxy,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    database_entries,
    error_fields,
    message,
    wait_wal,
)

pytestmark = pytest.mark.timeout(120)

Proxy = ProxyProcess | DirectProxy
CONNECT_TIMEOUT_S = 10
CLIENT_TIMEOUT_S = 60.0
HEALTHCHECK_INTERVAL_MS = 200
WHERE_SQL = "SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid()"
# A read the parser sends to the primary (set_config is on the volatile list) that a replica can run:
# it only changes a setting for the current transaction.
VOLATILE_READ_SQL = (
    "SELECT set_config('shardgate_test.marker', 'x', true) IS NOT NULL, pg_is_in_recovery(), inet_server_port()"
)


@dataclass(frozen=True, slots=True)
class Landing:
    """Where a statement ran."""

    in_recovery: bool
    port: int
    backend_pid: int


# -- helpers ------------------------------------------------------------------------------------------


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def landing(row: Any) -> Landing:
    assert row is not None
    return Landing(bool(row[0]), int(row[1]), int(row[2]))


def where(conn: psycopg.Connection[Any], sql: str = WHERE_SQL) -> Landing:
    return landing(conn.execute(sql).fetchone())


def connect(proxy_process: Proxy, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(proxy_process.dsn(connect_timeout=CONNECT_TIMEOUT_S), **kwargs)


async def aconnect(proxy_process: Proxy) -> asyncpg.Connection:
    return await asyncpg.connect(proxy_process.dsn(), ssl=False, timeout=CONNECT_TIMEOUT_S)


def proxy_log(proxy_process: Proxy) -> str:
    return f"\n--- proxy stderr (tail) ---\n{proxy_process.stderr_text()[-3000:]}"


@dataclass
class Split:
    """The shared topology's ports, and a factory for proxies that split reads across it."""

    primary: PgServer
    replicas: list[PgServer]
    start: Callable[..., ProxyProcess]

    @property
    def primary_port(self) -> int:
        return self.primary.port

    @property
    def replica_ports(self) -> set[int]:
        return {replica.port for replica in self.replicas}

    def on_primary(self, spot: Landing) -> bool:
        return not spot.in_recovery and spot.port == self.primary_port

    def on_replica(self, spot: Landing) -> bool:
        return spot.in_recovery and spot.port in self.replica_ports


@pytest.fixture
def split(proxy: ProxyFactory, pg: Topology) -> Split:
    """split.start(pool_mode=..., **general): a proxy for `app` on the primary and both replicas.

    read_write_split defaults to exclude_primary so every read has one right answer.
    """
    assert pg.primary is not None and len(pg.replicas) >= 2
    primary, replicas = pg.primary, list(pg.replicas)

    def start(pool_mode: str = "transaction", **general: Any) -> ProxyProcess:
        settings: dict[str, Any] = {
            "read_write_split": "exclude_primary",
            "load_balancing": "round_robin",
            "healthcheck_interval_ms": HEALTHCHECK_INTERVAL_MS,
        }
        settings.update(general)
        started = proxy(pool_mode=pool_mode, databases=database_entries(primary, replicas), general=settings)
        if isinstance(started, DirectProxy):
            pytest.skip("routing needs the proxy (SHARDGATE_TEST_DIRECT=1 points clients at the primary)")
        return started

    return Split(primary, replicas, start)


@pytest.fixture
def table(pg: Topology) -> Iterator[str]:
    """A fresh table `(id serial, note text)` with a sequence, already replayed on both replicas."""
    assert pg.primary is not None
    name = f"rw_{uuid.uuid4().hex[:12]}"
    pg.primary.psql(
        f"CREATE TABLE {name} (id serial PRIMARY KEY, note text);"
        f" CREATE SEQUENCE {name}_seq; INSERT INTO {name} (note) VALUES ('seed')",
        user="app",
        db="app",
    )
    try:
        wait_wal(pg.primary, pg.replicas)
        yield name
    finally:
        pg.primary.psql(f"DROP TABLE IF EXISTS {name}; DROP SEQUENCE IF EXISTS {name}_seq", user="app", db="app")


# -- plain reads and writes ---------------------------------------------------------------------------


def test_reads_land_on_replicas_round_robin(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        spots = [where(conn) for _ in range(6)]
        spots.append(landing(conn.execute(WHERE_SQL + " WHERE %s::int = 1", (1,)).fetchone()))
    assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
    assert {spot.port for spot in spots} == split.replica_ports, spots


def test_repeated_reads_are_routed_again_each_time(split: Split, table: str) -> None:
    """The same read again (another integer literal, or the same unnamed statement with another parameter)
    takes the proxy's short path; it must still be routed each time as the parser would route it."""
    shardgate = split.start()
    simple = WHERE_SQL + " WHERE {} > 0"
    extended = WHERE_SQL + " WHERE %s::int > 0"
    with connect(shardgate) as conn:
        spots = [where(conn, simple.format(n)) for n in range(1, 9)]
        spots += [landing(conn.execute(extended, (n,)).fetchone()) for n in range(1, 9)]
        assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
        assert {spot.port for spot in spots} == split.replica_ports, spots
        # a write between repeats goes to the primary, and the repeats after it still go to replicas
        conn.execute(f"INSERT INTO {table} (note) VALUES (%s)", ("between",))
        assert split.on_replica(where(conn, simple.format(99)))
        assert split.on_replica(landing(conn.execute(extended, (99,)).fetchone()))
        # inside a transaction that wrote, the same reads stay on its server (the primary)
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (note) VALUES ('in-txn')")
            inside = [where(conn, simple.format(7)), landing(conn.execute(extended, (7,)).fetchone())]
        assert all(split.on_primary(spot) for spot in inside), inside
        assert len({spot.backend_pid for spot in inside}) == 1, inside
        # a session role hint sends the same reads to the primary, also the one psycopg has by now prepared
        # (after five runs) while the session role was auto
        conn.execute("SET shardgate.role = 'primary'")
        hinted = [where(conn, simple.format(5)), landing(conn.execute(extended, (5,)).fetchone())]
        assert all(split.on_primary(spot) for spot in hinted), f"{hinted}{proxy_log(shardgate)}"
        conn.execute("SET shardgate.role = 'auto'")
        assert split.on_replica(where(conn, simple.format(6)))


def test_writes_land_on_primary(split: Split, table: str) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        ports = [
            conn.execute(f"INSERT INTO {table} (note) VALUES ('a') RETURNING inet_server_port()").fetchone(),
            conn.execute(
                f"INSERT INTO {table} (note) VALUES (%s) RETURNING inet_server_port()", ("b",)
            ).fetchone(),
            conn.execute(
                f"UPDATE {table} SET note = 'c' WHERE note = 'a' RETURNING inet_server_port()"
            ).fetchone(),
            conn.execute(f"DELETE FROM {table} WHERE note = 'b' RETURNING inet_server_port()").fetchone(),
            conn.execute(
                f"WITH added AS (INSERT INTO {table} (note) VALUES ('cte') RETURNING id)"
                " SELECT inet_server_port() FROM added"
            ).fetchone(),
        ]
    assert [row[0] if row else None for row in ports] == [split.primary_port] * 5, proxy_log(shardgate)


def test_nextval_and_select_for_update_on_primary(split: Split, table: str) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        nextval = where(conn, f"SELECT nextval('{table}_seq') > 0, inet_server_port(), pg_backend_pid()")
        locked = where(
            conn, f"SELECT id > 0, inet_server_port(), pg_backend_pid() FROM {table} WHERE note = 'seed' FOR UPDATE"
        )
        shared = where(
            conn, f"SELECT id > 0, inet_server_port(), pg_backend_pid() FROM {table} WHERE note = 'seed' FOR SHARE"
        )
        plain = where(conn, f"SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid() FROM {table} LIMIT 1")
    # The first column is the query's own value here, so only the port tells where it ran.
    assert [nextval.port, locked.port, shared.port] == [split.primary_port] * 3, proxy_log(shardgate)
    assert split.on_replica(plain), plain


# -- transactions -------------------------------------------------------------------------------------


def test_write_transaction_stays_on_primary(split: Split, table: str) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        conn.execute("BEGIN")
        first = where(conn)
        inserted = conn.execute(
            f"INSERT INTO {table} (note) VALUES ('txn') RETURNING inet_server_port(), pg_backend_pid()"
        ).fetchone()
        after = where(conn)
        conn.execute("COMMIT")
    assert split.on_primary(first), f"{first}{proxy_log(shardgate)}"
    assert inserted == (split.primary_port, first.backend_pid)
    assert after == first  # the same server connection for the whole transaction


def test_write_transaction_stays_on_primary_psycopg_transaction_block(split: Split, table: str) -> None:
    """psycopg without autocommit sends its own BEGIN before the first statement."""
    shardgate = split.start()
    with connect(shardgate, autocommit=False) as conn:
        with conn.transaction():
            first = where(conn)
            conn.execute(f"INSERT INTO {table} (note) VALUES (%s)", ("txn-block",))
            after = where(conn)
        # After the block, a read is routed again on its own.
        conn.autocommit = True
        later = where(conn)
    assert split.on_primary(first), f"{first}{proxy_log(shardgate)}"
    assert after == first
    assert split.on_replica(later), later


def test_read_only_transaction_on_one_replica(split: Split, table: str) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        for begin in ("BEGIN READ ONLY", "START TRANSACTION READ ONLY"):
            conn.execute(begin)
            spots = [where(conn) for _ in range(3)]
            counted = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            spots.append(where(conn))
            conn.execute("COMMIT")
            assert split.on_replica(spots[0]), f"{begin}: {spots}{proxy_log(shardgate)}"
            assert len(set(spots)) == 1, f"{begin}: the transaction moved: {spots}"
            assert counted is not None and counted[0] >= 1


def test_begin_then_set_transaction_read_only_on_one_replica(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        conn.execute("BEGIN")  # held back by the proxy: the next statement decides
        conn.execute("SET TRANSACTION READ ONLY")
        spots = [where(conn) for _ in range(3)]
        read_only = conn.execute("SHOW transaction_read_only").fetchone()
        conn.execute("COMMIT")
    assert split.on_replica(spots[0]), f"{spots}{proxy_log(shardgate)}"
    assert len(set(spots)) == 1, spots
    assert read_only == ("on",)


def test_begin_then_set_transaction_read_only_in_one_query(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        conn.execute("BEGIN; SET TRANSACTION READ ONLY")
        spots = [where(conn) for _ in range(2)]
        conn.execute("COMMIT")
    assert split.on_replica(spots[0]), f"{spots}{proxy_log(shardgate)}"
    assert len(set(spots)) == 1, spots


def test_psycopg_read_only_connection_on_replica(split: Split) -> None:
    """psycopg's read_only attribute makes it open each transaction with BEGIN READ ONLY."""
    shardgate = split.start()
    with connect(shardgate, autocommit=False) as conn:
        conn.read_only = True
        spots = [where(conn) for _ in range(3)]
        conn.commit()
    assert split.on_replica(spots[0]), f"{spots}{proxy_log(shardgate)}"
    assert len(set(spots)) == 1, spots


def test_asyncpg_read_only_and_read_write_transactions(split: Split, table: str) -> None:
    shardgate = split.start()

    async def scenario() -> tuple[list[Landing], list[Landing], Any]:
        conn = await aconnect(shardgate)
        try:
            async with conn.transaction(readonly=True):
                read_only = [landing(await conn.fetchrow(WHERE_SQL)) for _ in range(2)]
                read_only.append(landing(await conn.fetchrow(WHERE_SQL + " WHERE $1::int = 1", 1)))
            async with conn.transaction():
                read_write = [landing(await conn.fetchrow(WHERE_SQL))]
                port = await conn.fetchval(
                    f"INSERT INTO {table} (note) VALUES ($1) RETURNING inet_server_port()", "asyncpg"
                )
                read_write.append(landing(await conn.fetchrow(WHERE_SQL)))
            return read_only, read_write, port
        finally:
            await conn.close(timeout=10)

    read_only, read_write, port = run_async(scenario())
    assert split.on_replica(read_only[0]), f"{read_only}{proxy_log(shardgate)}"
    assert len(set(read_only)) == 1, read_only
    assert split.on_primary(read_write[0]), f"{read_write}{proxy_log(shardgate)}"
    assert len(set(read_write)) == 1, read_write
    assert port == split.primary_port


# -- hints --------------------------------------------------------------------------------------------


def test_comment_hints_override_the_parser(split: Split, table: str) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        parser_read = where(conn)
        hinted_primary = where(conn, "/* shardgate: primary */ " + WHERE_SQL)
        parser_write = conn.execute(VOLATILE_READ_SQL).fetchone()
        hinted_replica = conn.execute("/* shardgate: replica */ " + VOLATILE_READ_SQL).fetchone()
        # A write hinted to a replica goes there, and the replica refuses it.
        with pytest.raises(pg_errors.ReadOnlySqlTransaction):
            conn.execute(f"/* shardgate: replica */ INSERT INTO {table} (note) VALUES ('hinted')")
        still_usable = where(conn)
    assert split.on_replica(parser_read), parser_read
    assert split.on_primary(hinted_primary), f"{hinted_primary}{proxy_log(shardgate)}"
    assert parser_write is not None and parser_write[1:] == (False, split.primary_port), parser_write
    assert hinted_replica is not None and hinted_replica[1] is True, f"{hinted_replica}{proxy_log(shardgate)}"
    assert hinted_replica[2] in split.replica_ports
    assert split.on_replica(still_usable), still_usable


def test_session_role_hint_and_show(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        assert conn.execute("SHOW shardgate.role").fetchone() == ("auto",)
        conn.execute("SET shardgate.role = 'primary'")
        assert conn.execute("SHOW shardgate.role").fetchone() == ("primary",)
        pinned_to_primary = [where(conn) for _ in range(3)]
        conn.execute("SET shardgate.role = 'replica'")
        assert conn.execute("SHOW shardgate.role").fetchone() == ("replica",)
        pinned_to_replica = conn.execute(VOLATILE_READ_SQL).fetchone()
        conn.execute("SET shardgate.role = 'auto'")
        assert conn.execute("SHOW shardgate.role").fetchone() == ("auto",)
        auto_read = where(conn)
        auto_volatile = conn.execute(VOLATILE_READ_SQL).fetchone()
        conn.execute("SET shardgate.role = 'primary'")
        conn.execute("RESET shardgate.role")
        assert conn.execute("SHOW shardgate.role").fetchone() == ("auto",)
    assert all(split.on_primary(spot) for spot in pinned_to_primary), f"{pinned_to_primary}{proxy_log(shardgate)}"
    assert pinned_to_replica is not None and pinned_to_replica[1] is True, pinned_to_replica
    assert split.on_replica(auto_read), auto_read
    assert auto_volatile is not None and auto_volatile[1:] == (False, split.primary_port), auto_volatile


def test_invalid_session_role_is_refused_and_the_session_goes_on(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SET shardgate.role = 'sideways'")
        error = refused.value
        assert error.sqlstate == "22023" and not conn.closed, (
            f"sent SET shardgate.role = 'sideways'; got {type(error).__name__} sqlstate={error.sqlstate}"
            f" {error}; connection closed={conn.closed}{proxy_log(shardgate)}"
        )
        assert conn.execute("SHOW shardgate.role").fetchone() == ("auto",)
        assert split.on_replica(where(conn))


def test_session_role_is_per_client(split: Split) -> None:
    shardgate = split.start()
    with connect(shardgate) as pinned, connect(shardgate) as other:
        pinned.execute("SET shardgate.role = 'primary'")
        spots = [where(pinned), where(other), where(pinned), where(other)]
    assert split.on_primary(spots[0]) and split.on_primary(spots[2]), spots
    assert split.on_replica(spots[1]) and split.on_replica(spots[3]), spots


def test_asyncpg_session_role_set_and_show(split: Split) -> None:
    """asyncpg runs fetchval through the extended protocol; SET through the simple one."""
    shardgate = split.start()

    async def scenario() -> tuple[Any, Landing]:
        conn = await aconnect(shardgate)
        try:
            await conn.execute("SET shardgate.role = 'primary'")
            shown = await conn.fetchval("SHOW shardgate.role")
            spot = landing(await conn.fetchrow(WHERE_SQL))
            return shown, spot
        finally:
            await conn.close(timeout=10)

    shown, spot = run_async(scenario())
    assert split.on_primary(spot), f"{spot}{proxy_log(shardgate)}"
    assert shown == "primary"


# -- prepared statements ------------------------------------------------------------------------------


def test_asyncpg_prepared_statements_routed_per_transaction(split: Split, table: str) -> None:
    """asyncpg caches statements: later uses send only Bind/Execute, and the proxy must still route them."""
    shardgate = split.start()
    read_sql = WHERE_SQL + " WHERE $1::int > 0"
    insert_sql = f"INSERT INTO {table} (note) VALUES ($1) RETURNING inet_server_port(), pg_backend_pid()"

    async def scenario() -> dict[str, Any]:
        conn = await aconnect(shardgate)
        seen: dict[str, Any] = {}
        try:
            seen["reads"] = [landing(await conn.fetchrow(read_sql, n)) for n in (1, 2, 3)]
            async with conn.transaction():
                # The cached read opens a read-write transaction: it must run on the primary.
                first = landing(await conn.fetchrow(read_sql, 4))
                inserted = await conn.fetchrow(insert_sql, "prepared")
                last = landing(await conn.fetchrow(read_sql, 5))
                seen["read_write"] = (first, tuple(inserted), last)
            seen["after"] = [landing(await conn.fetchrow(read_sql, n)) for n in (6, 7)]
            async with conn.transaction(readonly=True):
                seen["read_only"] = [landing(await conn.fetchrow(read_sql, n)) for n in (8, 9)]
            prepared = await conn.prepare(read_sql)
            seen["explicit"] = [landing(await prepared.fetchrow(n)) for n in (10, 11)]
            async with conn.transaction():
                seen["explicit_in_txn"] = landing(await prepared.fetchrow(12))
                seen["insert_again"] = tuple(await conn.fetchrow(insert_sql, "again"))
        finally:
            await conn.close(timeout=10)
        return seen

    seen = run_async(scenario())
    log = proxy_log(shardgate)
    assert all(split.on_replica(spot) for spot in seen["reads"]), f"{seen['reads']}{log}"
    first, inserted, last = seen["read_write"]
    assert split.on_primary(first), f"cached read inside a read-write transaction ran on {first}{log}"
    assert inserted == (split.primary_port, first.backend_pid)
    assert last == first
    assert all(split.on_replica(spot) for spot in seen["after"]), f"{seen['after']}{log}"
    assert split.on_replica(seen["read_only"][0]) and len(set(seen["read_only"])) == 1, seen["read_only"]
    assert all(split.on_replica(spot) for spot in seen["explicit"]), seen["explicit"]
    assert split.on_primary(seen["explicit_in_txn"]), f"{seen['explicit_in_txn']}{log}"
    assert seen["insert_again"] == (split.primary_port, seen["explicit_in_txn"].backend_pid)


def test_psycopg_prepared_statements_routed(split: Split, table: str) -> None:
    """psycopg prepares a query after its first use (prepare_threshold=0) and then sends Bind/Execute."""
    shardgate = split.start()
    read_sql = WHERE_SQL + " WHERE %s::int > 0"
    with connect(shardgate, prepare_threshold=0) as conn:
        reads = [landing(conn.execute(read_sql, (n,)).fetchone()) for n in (1, 2, 3)]
        with conn.transaction():
            in_txn = landing(conn.execute(read_sql, (4,)).fetchone())
            inserted = conn.execute(
                f"INSERT INTO {table} (note) VALUES (%s) RETURNING inet_server_port(), pg_backend_pid()", ("p",)
            ).fetchone()
        after = landing(conn.execute(read_sql, (5,)).fetchone())
    assert all(split.on_replica(spot) for spot in reads), f"{reads}{proxy_log(shardgate)}"
    assert split.on_primary(in_txn), f"{in_txn}{proxy_log(shardgate)}"
    assert inserted == (split.primary_port, in_txn.backend_pid)
    assert split.on_replica(after), after


# -- read-your-writes ---------------------------------------------------------------------------------


def test_read_your_writes_finds_the_row_even_with_replay_paused(split: Split, table: str) -> None:
    """With replay paused on both replicas only the primary has the new row: reads right after a write
    must go there (or to a replica a probe showed caught up, which none is)."""
    shardgate = split.start(read_your_writes_ms=2000)
    paused: list[PgServer] = []
    try:
        with connect(shardgate) as conn:
            assert split.on_replica(where(conn))
            for replica in split.replicas:
                replica.psql("SELECT pg_wal_replay_pause()")
                paused.append(replica)
            found = []
            for index in range(5):
                row = conn.execute(f"INSERT INTO {table} (note) VALUES (%s) RETURNING id", (f"ryw{index}",)).fetchone()
                assert row is not None
                found.append(conn.execute(f"SELECT id FROM {table} WHERE id = %s", (row[0],)).fetchone())
            with conn.transaction():
                row = conn.execute(f"INSERT INTO {table} (note) VALUES ('ryw-txn') RETURNING id").fetchone()
            assert row is not None
            found.append(conn.execute(f"SELECT id FROM {table} WHERE id = %s", (row[0],)).fetchone())
    finally:
        for replica in paused:
            replica.psql("SELECT pg_wal_replay_resume()")
    assert all(row is not None for row in found), f"a row written by this client was not found: {found}"


# -- balancing and stickiness -------------------------------------------------------------------------


def test_random_balancing_uses_both_replicas(split: Split) -> None:
    shardgate = split.start(load_balancing="random")
    with connect(shardgate) as conn:
        spots = [where(conn) for _ in range(30)]
    assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
    assert {spot.port for spot in spots} == split.replica_ports  # 2 * 2**-30 odds of a false failure


def test_least_connections_prefers_the_idle_replica(split: Split) -> None:
    shardgate = split.start(load_balancing="least_connections")
    with connect(shardgate) as holder, connect(shardgate) as reader:
        spots = [where(reader) for _ in range(4)]
        assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
        assert {spot.port for spot in spots} == split.replica_ports  # ties are broken in turn
        holder.execute("BEGIN READ ONLY")
        held = where(holder)  # keeps one server connection of that replica busy
        while_held = [where(reader) for _ in range(4)]
        holder.execute("COMMIT")
    assert split.on_replica(held), held
    other_port = (split.replica_ports - {held.port}).pop()
    assert [spot.port for spot in while_held] == [other_port] * 4, while_held


def test_replica_stickiness_keeps_a_session_on_one_replica(split: Split) -> None:
    shardgate = split.start(replica_stickiness=True)
    ports_per_session = []
    for _ in range(3):
        with connect(shardgate) as conn:
            spots = [where(conn) for _ in range(5)]
            conn.execute("BEGIN READ ONLY")
            spots.append(where(conn))
            conn.execute("COMMIT")
        assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
        ports_per_session.append({spot.port for spot in spots})
    assert all(len(ports) == 1 for ports in ports_per_session), ports_per_session


def test_without_stickiness_a_session_alternates(split: Split) -> None:
    """The control for the stickiness test: round robin moves one session's reads between replicas."""
    shardgate = split.start(replica_stickiness=False)
    with connect(shardgate) as conn:
        ports = {where(conn).port for _ in range(4)}
    assert ports == split.replica_ports


# -- pool modes ---------------------------------------------------------------------------------------


def test_session_pool_mode_does_not_split(split: Split, table: str) -> None:
    shardgate = split.start(pool_mode="session")
    with connect(shardgate) as conn:
        spots = [where(conn) for _ in range(4)]
        conn.execute("BEGIN READ ONLY")
        spots.append(where(conn))
        conn.execute("COMMIT")
        port = conn.execute(f"INSERT INTO {table} (note) VALUES ('s') RETURNING inet_server_port()").fetchone()
    assert all(split.on_primary(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
    assert len({spot.backend_pid for spot in spots}) == 1  # one server for the whole session
    assert port == (split.primary_port,)


def test_statement_pool_mode_splits(split: Split, table: str) -> None:
    shardgate = split.start(pool_mode="statement")
    with connect(shardgate) as conn:
        spots = [where(conn) for _ in range(4)]
        port = conn.execute(f"INSERT INTO {table} (note) VALUES ('st') RETURNING inet_server_port()").fetchone()
    assert all(split.on_replica(spot) for spot in spots), f"{spots}{proxy_log(shardgate)}"
    assert {spot.port for spot in spots} == split.replica_ports
    assert port == (split.primary_port,)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(b"x", id="parse-name-unterminated"),
        pytest.param(b"\x00SELECT 1", id="parse-query-unterminated"),
    ],
)
def test_malformed_parse_that_starts_a_routed_transaction_is_refused(split: Split, fault: bytes) -> None:
    # The router reads the statement of a transaction's first Parse to choose primary or replica; a Parse
    # whose strings are not terminated must not be read past its end or crash the proxy. It is refused
    # (named) or answered by PostgreSQL (unnamed), and other clients go on.
    routed = split.start()
    client = RawClient(routed.host, routed.port)
    try:
        client.login()
        client.send(message(b"P", fault))  # alone: no later message holds a NUL
        replies = client.read_until_closed(timeout_s=3)
        errors = [error_fields(body) for code, body in replies if code == b"E"]
        assert [e["C"] for e in errors] == ["08P01"], replies
    finally:
        client.close()
    with psycopg.connect(routed.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True) as bystander:
        assert bystander.execute("SELECT 41 + 1").fetchone() == (42,)
    assert "Traceback" not in routed.stderr_text()
