"""A BEGIN sent over the extended protocol where the proxy routes (read/write split, or several shards): the
proxy holds a lone BEGIN back until the next statement says where the transaction runs, and answers its
Parse, Bind, Describe, Execute and Sync itself. pgbench's TPC-B script (simple, extended, prepared) and
psycopg in separate round trips and in one pipeline must see one whole transaction on the primary.

Where a statement ran is read from the server: `pg_is_in_recovery()`, `inet_server_port()`,
`pg_backend_pid()` and `txid_current()` (one transaction, one server connection, one transaction id).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from localpg import PgServer, Topology
from tests.harness import (
    ProxyFactory,
    ProxyProcess,
    RawClient,
    database_entries,
    direct_mode,
    error_fields,
    message,
    wait_wal,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(direct_mode(), reason="the held-back BEGIN is the proxy's (routing needs it)"),
]

PGBENCH_SECONDS = 3
PGBENCH_CLIENTS = 4
CONNECT_TIMEOUT_S = 10
PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
SHARDED = """
[[sharded_tables]]
database = "app"
table = "orders"
column = "tenant_id"
data_type = "bigint"
method = "hash"
"""
WHERE_SQL = "SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid(), txid_current()"


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(PGPASSWORD="app", PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S))
    return env


@pytest.fixture(scope="module")
def servers(pg: Topology) -> Iterator[dict[str, Any]]:
    """The shared primary (pgbench's tables, replayed on both replicas) and a second shard of this module's
    own; pgbench's tables are not sharded, so on the two-shard layout they live on shard 0."""
    assert pg.primary is not None
    primary = pg.primary
    result = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", primary.host, "-p", str(primary.port),
                             "-U", "app", "app"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    shard1 = pg.add_server("extended_begin_shard1")
    try:
        wait_wal(primary, pg.replicas)
        yield {"primary": primary, "replicas": list(pg.replicas), "shard1": shard1}
    finally:
        shard1.stop()
        primary.psql(f"DROP TABLE IF EXISTS {', '.join(PGBENCH_TABLES)}", user="app", db="app")


def _split_proxy(proxy: ProxyFactory, servers: dict[str, Any]) -> ProxyProcess:
    started = proxy(pool_mode="transaction", pool_size=8,
                    databases=database_entries(servers["primary"], servers["replicas"]),
                    general={"read_write_split": "exclude_primary", "healthcheck_interval_ms": 200})
    assert isinstance(started, ProxyProcess)
    return started


def _sharded_proxy(proxy: ProxyFactory, servers: dict[str, Any]) -> ProxyProcess:
    databases = database_entries(servers["primary"], shard=0) + database_entries(servers["shard1"], shard=1)
    started = proxy(pool_mode="transaction", pool_size=8, databases=databases, extra_toml=SHARDED)
    assert isinstance(started, ProxyProcess)
    return started


def _balances(primary: PgServer) -> list[int]:
    """Sums the TPC-B-like script keeps equal (accounts, branches, tellers, history), and history's rows."""
    output = primary.psql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),"
        " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),"
        " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
        " (SELECT count(*) FROM pgbench_history)",
        user="app", db="app")
    return [int(value) for value in output.split("|")]


def _pgbench(shardgate: ProxyProcess, protocol: str) -> int:
    """pgbench's default TPC-B script through the proxy; returns the transactions it processed."""
    command = ["pgbench", "-n", "-T", str(PGBENCH_SECONDS), "-c", str(PGBENCH_CLIENTS), "-M", protocol,
               "-h", shardgate.host, "-p", str(shardgate.port), "-U", "app", "app"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=PGBENCH_SECONDS + 60)
    report = f"-M {protocol}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == 0, report + f"\n--- proxy stderr ---\n{shardgate.stderr_text()[-3000:]}"
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert failed is not None and processed is not None, report
    assert int(failed.group(1)) == 0, report
    assert int(processed.group(1)) > 0, report
    return int(processed.group(1))


# -- pgbench, TPC-B ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["primary_and_replicas", "two_shards"])
@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench_tpcb(layout: str, protocol: str, proxy: ProxyFactory, servers: dict[str, Any]) -> None:
    start = _split_proxy if layout == "primary_and_replicas" else _sharded_proxy
    shardgate = start(proxy, servers)
    history_before = _balances(servers["primary"])[4]
    processed = _pgbench(shardgate, protocol)
    accounts, branches, tellers, history, history_rows = _balances(servers["primary"])
    assert accounts == branches == tellers == history
    # each transaction inserts one history row, on the primary of shard 0, and committed whole
    assert history_rows - history_before == processed


# -- psycopg: BEGIN by the extended protocol, then unnamed statements ---------------------------------


@pytest.fixture
def table(servers: dict[str, Any]) -> Iterator[str]:
    primary: PgServer = servers["primary"]
    name = f"xb_{uuid.uuid4().hex[:12]}"
    # the raw client logs in as trustuser (no password exchange to write by hand)
    primary.psql(f"CREATE TABLE {name} (id serial PRIMARY KEY, note text);"
                 f" GRANT ALL ON {name}, {name}_id_seq TO trustuser", user="app", db="app")
    try:
        wait_wal(primary, servers["replicas"])
        yield name
    finally:
        primary.psql(f"DROP TABLE IF EXISTS {name}", user="app", db="app")


def _notes(primary: PgServer, table: str) -> list[str]:
    output = primary.psql(f"SELECT note FROM {table} ORDER BY id", user="app", db="app")
    return output.splitlines()


def _connect(shardgate: ProxyProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(shardgate.dsn(connect_timeout=CONNECT_TIMEOUT_S), autocommit=True)


@pytest.mark.parametrize("layout", ["primary_and_replicas", "two_shards"])
def test_psycopg_extended_begin_in_separate_round_trips(layout: str, proxy: ProxyFactory, servers: dict[str, Any],
                                                        table: str) -> None:
    """BEGIN, INSERT, SELECT and COMMIT or ROLLBACK, each an unnamed Parse/Bind/Describe/Execute/Sync
    (psycopg's execute, not prepared; binary results, or psycopg would send a statement without parameters
    as a simple Query), each waiting for the one before; repeated so the server is also taken parked and
    from the pool."""
    start = _split_proxy if layout == "primary_and_replicas" else _sharded_proxy
    shardgate = start(proxy, servers)
    primary: PgServer = servers["primary"]
    expected: list[str] = []
    with _connect(shardgate) as conn:
        for round_number in range(6):
            conn.execute("BEGIN", prepare=False, binary=True)
            assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
            note = f"r{round_number}"
            inserted = conn.execute(
                f"INSERT INTO {table} (note) VALUES (%s) RETURNING inet_server_port(), pg_backend_pid(),"
                " txid_current()", (note,), prepare=False, binary=True).fetchone()
            spot = conn.execute(WHERE_SQL, prepare=False, binary=True).fetchone()
            assert inserted is not None and spot is not None
            assert spot == (False, primary.port, inserted[1], inserted[2]), (inserted, spot)
            ending = "COMMIT" if round_number % 2 == 0 else "ROLLBACK"
            conn.execute(ending, prepare=False, binary=True)
            assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
            if ending == "COMMIT":
                expected.append(note)
        # a read between transactions is routed on its own again
        assert conn.execute("SELECT 41 + 1", prepare=False, binary=True).fetchone() == (42,)
    assert _notes(primary, table) == expected


@pytest.mark.parametrize("layout", ["primary_and_replicas", "two_shards"])
def test_psycopg_extended_begin_in_one_pipeline(layout: str, proxy: ProxyFactory, servers: dict[str, Any],
                                                table: str) -> None:
    """BEGIN (its own Sync) followed by unnamed statements in one psycopg pipeline, then COMMIT. psycopg
    flushes each statement before its Sync, so the proxy may see BEGIN alone up to its Sync or not (then it
    goes along): either way one transaction on the primary. The raw test below writes the exact bytes."""
    start = _split_proxy if layout == "primary_and_replicas" else _sharded_proxy
    shardgate = start(proxy, servers)
    primary: PgServer = servers["primary"]
    with _connect(shardgate) as conn:
        for round_number in range(4):
            with conn.pipeline() as pipeline:
                conn.execute("BEGIN", prepare=False)
                pipeline.sync()  # BEGIN alone up to its Sync: the proxy holds it back
                inserted = conn.execute(f"INSERT INTO {table} (note) VALUES (%s) RETURNING pg_backend_pid(),"
                                        " txid_current()", (f"p{round_number}",), prepare=False)
                spot = conn.execute(WHERE_SQL, prepare=False)
                conn.execute("COMMIT", prepare=False)
            first, second = inserted.fetchone(), spot.fetchone()
            assert first is not None and second is not None
            assert second == (False, primary.port, first[0], first[1]), (first, second)
            assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
    assert _notes(primary, table) == [f"p{n}" for n in range(4)]


# -- the same bytes, written at once -------------------------------------------------------------------


def _extended(sql: str, *, describe: bytes = b"P") -> bytes:
    """Unnamed Parse, Bind, Describe, Execute and Sync of `sql` with no parameters."""
    return (message(b"P", b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))
            + message(b"B", b"\x00\x00" + struct.pack("!hhh", 0, 0, 0))
            + message(b"D", describe + b"\x00")
            + message(b"E", b"\x00" + struct.pack("!i", 0))
            + message(b"S"))


def _replies(client: RawClient, syncs: int) -> list[tuple[bytes, bytes]]:
    messages: list[tuple[bytes, bytes]] = []
    for _ in range(syncs):
        messages += client.read_until_ready()
    return messages


@pytest.mark.parametrize("layout", ["primary_and_replicas", "two_shards"])
def test_extended_begin_and_statements_written_at_once(layout: str, proxy: ProxyFactory, servers: dict[str, Any],
                                                       table: str) -> None:
    """BEGIN's five messages alone in one write, then the next statements in one write (the proxy waits for
    a server meanwhile), then all of a transaction in one write: each Sync answered once, in order."""
    start = _split_proxy if layout == "primary_and_replicas" else _sharded_proxy
    shardgate = start(proxy, servers)
    primary: PgServer = servers["primary"]
    insert = f"INSERT INTO {table} (note) VALUES ('raw') RETURNING txid_current()"
    client = RawClient(shardgate.host, shardgate.port)
    try:
        client.login()
        client.send(_extended("BEGIN", describe=b"S"))
        begin = _replies(client, 1)
        assert [code for code, _ in begin] == [b"1", b"2", b"t", b"n", b"C", b"Z"], begin
        assert begin[-1][1] == b"T"
        client.send(_extended(insert) + _extended("SELECT txid_current()") + _extended("COMMIT"))
        rest = _replies(client, 3)
        errors = [error_fields(body) for code, body in rest if code == b"E"]
        assert not errors, errors
        assert [body for code, body in rest if code == b"Z"] == [b"T", b"T", b"I"], rest
        rows = [body for code, body in rest if code == b"D"]
        assert len(rows) == 2 and rows[0] == rows[1], rows  # one transaction id: one transaction
        # a whole transaction at once: BEGIN is not alone, it goes with what follows
        client.send(_extended("BEGIN") + _extended(insert) + _extended("ROLLBACK"))
        whole = _replies(client, 3)
        assert not [error_fields(body) for code, body in whole if code == b"E"], whole
        assert [body for code, body in whole if code == b"Z"] == [b"T", b"T", b"I"], whole
        assert client.query_status("SELECT 1") == b"I"
    finally:
        client.close()
    assert _notes(primary, table) == ["raw"]
