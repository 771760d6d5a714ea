"""Two-phase commit across shards, against real PostgreSQL shards: a transaction that wrote on two shards
commits on both or on neither, whatever dies in the middle (a shard, the connection to it, the proxy
itself, SIGKILLed at a chosen step of the commit round), and recovery (by the same instance restarted, or
by another one sharing the decision log) leaves no prepared transaction behind.

Where each account lives is asked of the shards themselves (the rows are inserted through the proxy, then
looked up on each server directly)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.harness import (
    REPO_ROOT,
    CuttingForwarder,
    ProxyFactory,
    ProxyProcess,
    database_entries,
    direct_mode,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(direct_mode(), reason="needs the proxy: several shards behind one database"),
]

SHARDED = """
[[sharded_tables]]
database = "app"
table = "accounts"
column = "id"
data_type = "bigint"
method = "hash"
"""
ACCOUNTS = 40
START_BALANCE = 1000
FAST_RECOVERY = {"recovery_interval_s": 0.5, "prepared_timeout_s": 1.0, "lease_s": 1.5, "commit_timeout_s": 5.0}


def _two_phase_toml(settings: dict[str, Any]) -> str:
    lines = ["[two_phase_commit]"] + [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shards(pg: Any) -> Iterator[list[Any]]:
    servers = [pg.add_server(f"twophase_shard{n}") for n in range(2)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def _direct(server: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(server.dsn(password="app"), autocommit=True)


def _fresh(proxy: ProxyFactory, shards: list[Any], **options: Any) -> tuple[ProxyProcess, int, int]:
    """Shards reset, a proxy started (see _start), the accounts seeded: the proxy, an account on shard 0 and
    one on shard 1."""
    _reset(shards)
    started = _start(proxy, shards, **options)
    placement = _seed(started, shards)
    return started, _on(placement, 0), _on(placement, 1)


def _start(proxy: ProxyFactory, shards: list[Any], settings: dict[str, Any] | None = None,
           general: dict[str, Any] | None = None) -> ProxyProcess:
    databases = []
    for index, server in enumerate(shards):
        databases += database_entries(server, shard=index)
    started = proxy(pool_mode="transaction", pool_size=6, databases=databases, general=general or {},
                    extra_toml=SHARDED + _two_phase_toml(settings or FAST_RECOVERY))
    assert isinstance(started, ProxyProcess)
    return started


def _reset(shards: list[Any]) -> None:
    """Every shard up (a fault test may have stopped one), with a fresh accounts table and no 2PC state."""
    for server in shards:
        server.start()
    for server in shards:
        with _direct(server) as conn:
            for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"):
                conn.execute(f"ROLLBACK PREPARED '{gid}'")
            conn.execute("DROP TABLE IF EXISTS accounts")
            conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL, "
                         "CONSTRAINT no_overdraft CHECK (balance >= 0))")
            conn.execute("DROP TABLE IF EXISTS shardgate_2pc_decisions")
            conn.execute("DROP TABLE IF EXISTS shardgate_2pc_instances")


def _seed(proxy: ProxyProcess, shards: list[Any]) -> dict[int, int]:
    """Accounts 1..ACCOUNTS inserted through the proxy; where each landed, asked of the shards."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for account in range(1, ACCOUNTS + 1):
            conn.execute("INSERT INTO accounts (id, balance) VALUES (%s, %s)", (account, START_BALANCE))
    placement: dict[int, int] = {}
    for index, server in enumerate(shards):
        with _direct(server) as conn:
            for (account,) in conn.execute("SELECT id FROM accounts"):
                placement[account] = index
    assert sorted(placement) == list(range(1, ACCOUNTS + 1))
    assert set(placement.values()) == {0, 1}
    return placement


def _on(placement: dict[int, int], shard: int, skip: int = 0) -> int:
    return [account for account, where in sorted(placement.items()) if where == shard][skip]


def _balances(shards: list[Any]) -> dict[int, int]:
    found: dict[int, int] = {}
    for server in shards:
        with _direct(server) as conn:
            found.update(dict(conn.execute("SELECT id, balance FROM accounts").fetchall()))
    return found


def _prepared(shards: list[Any]) -> list[str]:
    gids: list[str] = []
    for server in shards:
        if not server.is_running():
            continue
        with _direct(server) as conn:
            gids += [row[0] for row in conn.execute("SELECT gid FROM pg_prepared_xacts")]
    return gids


def _wait_for(predicate: Any, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _metric(proxy: ProxyProcess, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def _transfer(conn: psycopg.Connection[Any], source: int, target: int, amount: int) -> None:
    with conn.transaction():
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, source))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, target))


@pytest.fixture
def bank(proxy: ProxyFactory, shards: list[Any]) -> Iterator[tuple[ProxyProcess, dict[int, int]]]:
    _reset(shards)
    started = _start(proxy, shards)
    yield started, _seed(started, shards)


# ------------------------------------------------------------------ the protocol


def test_a_transaction_that_writes_on_two_shards_commits_on_both_with_2pc(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    source, target = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn:
        _transfer(conn, source, target, 70)
    balances = _balances(shards)
    assert (balances[source], balances[target]) == (START_BALANCE - 70, START_BALANCE + 70)
    assert _prepared(shards) == []
    assert _metric(proxy, "shardgate_2pc_transactions_total", 'outcome="committed"') == 1
    assert _metric(proxy, "shardgate_2pc_commit_seconds_count") == 1
    # the decision was logged on shard 0 (the default log) and is pruned once both parts are committed
    with _direct(shards[0]) as conn:
        _wait_for(lambda: conn.execute("SELECT count(*) FROM shardgate_2pc_decisions").fetchone() == (0,),
                  what="the decision to be pruned")
        assert conn.execute("SELECT count(*) FROM shardgate_2pc_instances").fetchone() == (1,)


def test_one_writer_and_a_reader_commit_without_2pc(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    source, target = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn, conn.transaction():
        conn.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (source,))
        assert conn.execute("SELECT balance FROM accounts WHERE id = %s", (target,)).fetchone() == (START_BALANCE,)
    assert _balances(shards)[source] == 1
    assert _metric(proxy, "shardgate_2pc_transactions_total", 'outcome="prepared"') == 0
    assert _metric(proxy, "shardgate_2pc_transactions_total", 'outcome="one_phase"') == 1


def test_a_failed_prepare_rolls_back_every_shard_with_the_shards_error(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    first, second = _on(placement, 0), _on(placement, 1)
    for server in shards:  # a deferred check fails at PREPARE TRANSACTION, not at the UPDATE
        with _direct(server) as conn:
            conn.execute("ALTER TABLE accounts ADD CONSTRAINT balance_once EXCLUDE USING btree (balance WITH =) "
                         "WHERE (balance = 7) DEFERRABLE INITIALLY DEFERRED")
    other = _on(placement, 1, skip=1)
    with psycopg.connect(proxy.dsn()) as conn:
        with pytest.raises(pg_errors.ExclusionViolation), conn.transaction():
            conn.execute("UPDATE accounts SET balance = 11 WHERE id = %s", (first,))
            conn.execute("UPDATE accounts SET balance = 7 WHERE id IN (%s, %s)", (second, other))
        # the session goes on
        assert conn.execute("SELECT balance FROM accounts WHERE id = %s", (first,)).fetchone() == (START_BALANCE,)
    balances = _balances(shards)
    assert balances[first] == balances[second] == balances[other] == START_BALANCE
    assert _prepared(shards) == []
    assert _metric(proxy, "shardgate_2pc_transactions_total", 'outcome="rolled_back"') == 1


def test_rollback_and_failed_transactions_leave_nothing(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    first, second = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("BEGIN")
        conn.execute("UPDATE accounts SET balance = 3 WHERE id = %s", (first,))
        conn.execute("UPDATE accounts SET balance = 3 WHERE id = %s", (second,))
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        conn.execute("UPDATE accounts SET balance = 4 WHERE id = %s", (first,))
        conn.execute("UPDATE accounts SET balance = 4 WHERE id = %s", (second,))
        with pytest.raises(pg_errors.DivisionByZero):
            conn.execute("SELECT 1 / 0 FROM accounts WHERE id = %s", (second,))
        conn.execute("COMMIT")  # in a failed transaction: PostgreSQL answers ROLLBACK
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    balances = _balances(shards)
    assert balances[first] == balances[second] == START_BALANCE
    assert _prepared(shards) == []


def test_commit_over_the_extended_protocol(bank: Any, shards: list[Any]) -> None:
    """A driver that sends COMMIT as Parse/Bind/Execute/Sync (as JDBC does) gets the same answer."""
    proxy, placement = bank
    first, second = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("UPDATE accounts SET balance = 21 WHERE id = %s", (first,))
        conn.execute("UPDATE accounts SET balance = 22 WHERE id = %s", (second,))
        conn.execute("COMMIT", prepare=True)
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT balance FROM accounts WHERE id = %s", (second,)).fetchone() == (22,)
    balances = _balances(shards)
    assert (balances[first], balances[second]) == (21, 22)
    assert _prepared(shards) == []


def test_two_phase_commit_off_commits_shard_by_shard(proxy: ProxyFactory, shards: list[Any]) -> None:
    started, first, second = _fresh(proxy, shards, general={"two_phase_commit": False})
    with psycopg.connect(started.dsn()) as conn:
        _transfer(conn, first, second, 5)
    balances = _balances(shards)
    assert (balances[first], balances[second]) == (START_BALANCE - 5, START_BALANCE + 5)
    assert _metric(started, "shardgate_2pc_transactions_total", 'outcome="prepared"') == 0
    with _direct(shards[0]) as conn:
        assert conn.execute("SELECT to_regclass('shardgate_2pc_decisions')").fetchone() == (None,)


# ------------------------------------------------------------------ faults


def _kill(proxy: ProxyProcess) -> None:
    assert proxy.process is not None
    os.kill(proxy.process.pid, signal.SIGKILL)
    proxy.process.wait(timeout=10)


def test_a_participant_killed_before_prepare_rolls_back_everywhere(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    first, second = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (first,))
        conn.execute("UPDATE accounts SET balance = 2 WHERE id = %s", (second,))
        shards[1].kill()
        with pytest.raises(psycopg.Error):
            conn.execute("COMMIT")
    shards[1].start()
    balances = _balances(shards)
    assert balances[first] == balances[second] == START_BALANCE
    assert _prepared(shards) == []


def test_a_participant_killed_after_prepare_is_committed_when_it_comes_back(
        proxy: ProxyFactory, shards: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDGATE_FAILPOINT", "after_decision:sleep=3")
    started, first, second = _fresh(proxy, shards)
    killer = threading.Timer(1.0, shards[1].kill)
    killer.start()
    with psycopg.connect(started.dsn()) as conn:
        _transfer(conn, first, second, 30)  # the decision is logged: the client is told COMMIT
    killer.join()
    assert _balances(shards[:1])[first] == START_BALANCE - 30
    shards[1].start()
    _wait_for(lambda: _prepared(shards) == [], what="recovery to commit the prepared part")
    balances = _balances(shards)
    assert (balances[first], balances[second]) == (START_BALANCE - 30, START_BALANCE + 30)
    assert _metric(started, "shardgate_2pc_recovered_total", 'outcome="committed"') == 1


@pytest.mark.parametrize("point, committed", [("after_prepare", False), ("after_decision", True)])
def test_the_proxy_killed_in_the_commit_round_is_finished_by_a_new_instance(
        proxy: ProxyFactory, shards: list[Any], monkeypatch: pytest.MonkeyPatch, point: str,
        committed: bool) -> None:
    monkeypatch.setenv("SHARDGATE_FAILPOINT", f"{point}:kill")
    doomed, first, second = _fresh(proxy, shards)
    with psycopg.connect(doomed.dsn()) as conn, pytest.raises(psycopg.OperationalError):
        _transfer(conn, first, second, 40)
    doomed.process.wait(timeout=10)  # type: ignore[union-attr]
    assert len(_prepared(shards)) == 2  # both parts prepared, and nobody to finish them
    monkeypatch.delenv("SHARDGATE_FAILPOINT")
    survivor = _start(proxy, shards)
    _wait_for(lambda: _prepared(shards) == [], what="the new instance to finish the transaction")
    balances = _balances(shards)
    expected = (START_BALANCE - 40, START_BALANCE + 40) if committed else (START_BALANCE, START_BALANCE)
    assert (balances[first], balances[second]) == expected
    outcome = "committed" if committed else "rolled_back"
    assert _metric(survivor, "shardgate_2pc_recovered_total", f'outcome="{outcome}"') == 2


@pytest.mark.parametrize("marker, committed", [(b"PREPARE TRANSACTION", False), (b"COMMIT PREPARED", True)])
def test_the_connection_to_a_shard_cut_in_the_commit_round(
        proxy: ProxyFactory, shards: list[Any], marker: bytes, committed: bool) -> None:
    """A TCP relay in front of shard 1 drops the connection that carries PREPARE TRANSACTION (before any
    decision: everything rolls back) or COMMIT PREPARED (after it: the client is told COMMIT and
    recovery commits shard 1 over a new connection)."""
    _reset(shards)
    forwarder = CuttingForwarder(shards[1].host, shards[1].port)
    try:
        relayed = {**database_entries(shards[1], shard=1)[0], "host": forwarder.host, "port": forwarder.port}
        databases = [*database_entries(shards[0], shard=0), relayed]
        started = proxy(pool_mode="transaction", pool_size=6, databases=databases,
                        extra_toml=SHARDED + _two_phase_toml(FAST_RECOVERY))
        assert isinstance(started, ProxyProcess)
        placement = _seed(started, shards)
        first, second = _on(placement, 0), _on(placement, 1)
        forwarder.cut_on(marker)
        with psycopg.connect(started.dsn()) as conn:
            if committed:
                _transfer(conn, first, second, 50)
            else:
                with pytest.raises(pg_errors.ConnectionFailure):
                    _transfer(conn, first, second, 50)
            assert forwarder.cuts == 1
            # the session goes on
            assert conn.execute("SELECT balance FROM accounts WHERE id = %s", (first,)).fetchone() is not None
        _wait_for(lambda: _prepared(shards) == [], what="recovery to finish the transaction")
        balances = _balances(shards)
        expected = (START_BALANCE - 50, START_BALANCE + 50) if committed else (START_BALANCE, START_BALANCE)
        assert (balances[first], balances[second]) == expected
    finally:
        forwarder.close()


def test_a_shard_without_prepared_transactions_is_reported_and_refused(
        proxy: ProxyFactory, shards: list[Any]) -> None:
    _reset(shards)
    shards[1].psql("ALTER SYSTEM SET max_prepared_transactions = 0")
    shards[1].stop()
    shards[1].start()
    try:
        started = _start(proxy, shards)
        placement = _seed(started, shards)
        _wait_for(lambda: "event=2pc_unavailable" in started.stderr_text(), what="the start-up check")
        assert "shard=1" in started.stderr_text().split("event=2pc_unavailable", 1)[1].splitlines()[0]
        first, second = _on(placement, 0), _on(placement, 1)
        with psycopg.connect(started.dsn()) as conn:
            with pytest.raises(pg_errors.ObjectNotInPrerequisiteState, match="max_prepared_transactions"):
                _transfer(conn, first, second, 5)
            _transfer(conn, first, _on(placement, 0, skip=1), 5)  # one shard: no 2PC needed
        balances = _balances(shards)
        assert balances[second] == START_BALANCE and balances[first] == START_BALANCE - 5
    finally:
        shards[1].psql("ALTER SYSTEM RESET max_prepared_transactions")
        shards[1].stop()
        shards[1].start()


def test_in_doubt_transactions_listed_and_resolved_by_hand(
        proxy: ProxyFactory, shards: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDGATE_FAILPOINT", "after_prepare:kill")
    doomed, first, second = _fresh(proxy, shards)
    with psycopg.connect(doomed.dsn()) as conn, pytest.raises(psycopg.OperationalError):
        _transfer(conn, first, second, 60)
    doomed.process.wait(timeout=10)  # type: ignore[union-attr]
    monkeypatch.delenv("SHARDGATE_FAILPOINT")
    patient = _start(proxy, shards, settings={**FAST_RECOVERY, "prepared_timeout_s": 600})
    with urllib.request.urlopen(patient.admin_url + "/api/prepared_transactions", timeout=10) as response:
        listed = json.loads(response.read())["prepared_transactions"]
    assert sorted(part["shard"] for part in listed) == [0, 1]
    assert {part["decision"] for part in listed} == {None}
    assert all(part["age_s"] >= 0 and part["gid"].startswith("shardgate_") for part in listed)
    command = [sys.executable, "-m", "proxy", "2pc", "-c", str(patient.config_path)]
    shown = subprocess.run([*command, "list"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert shown.returncode == 0, shown.stderr
    assert all(part["gid"] in shown.stdout for part in listed)
    refused = subprocess.run([*command, "commit", "shardgate_nothing"], capture_output=True, text=True,
                             timeout=60, cwd=REPO_ROOT)
    assert refused.returncode == 1 and "not a Shardgate global transaction id" in refused.stderr
    done = subprocess.run([*command, "commit", listed[0]["gid"]], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert _prepared(shards) == []
    balances = _balances(shards)
    assert (balances[first], balances[second]) == (START_BALANCE - 60, START_BALANCE + 60)
    with _direct(shards[0]) as conn:  # the hand-made decision is in the log, for any instance to see
        assert conn.execute("SELECT outcome FROM shardgate_2pc_decisions").fetchall() in ([("commit",)], [])


def _transfers(dsn: str, pairs: list[tuple[int, int]], stop: threading.Event, seen: list[int],
               errors: list[str], limit: int = 100_000) -> None:
    """Move 1 along each pair in turn until `stop`; `seen` counts the COMMITs the client was told of."""
    done = 0
    while not stop.is_set() and done < limit:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                while not stop.is_set() and done < limit:
                    source, target = pairs[done % len(pairs)]
                    try:
                        _transfer(conn, source, target, 1)
                        seen.append(1)
                    except pg_errors.SerializationFailure as exc:
                        errors.append(f"{exc.sqlstate}: {exc}")
                    done += 1
        except psycopg.OperationalError:
            time.sleep(0.1)  # the proxy is down: try again


def test_two_instances_share_the_log_and_the_survivor_finishes_the_dead_ones_work(
        proxy: ProxyFactory, shards: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _reset(shards)
    survivor = _start(proxy, shards)
    placement = _seed(survivor, shards)
    source, target = _on(placement, 0), _on(placement, 1)
    # the doomed instance waits between PREPARE and its decision for longer than prepared_timeout_s: the
    # survivor's recovery must see it alive (its heartbeat) and leave its transactions alone
    monkeypatch.setenv("SHARDGATE_FAILPOINT", "after_prepare:sleep=1.3")
    doomed = _start(proxy, shards)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []
    worker = threading.Thread(target=_transfers, args=(doomed.dsn(), [(source, target)], stop, seen, errors))
    worker.start()
    time.sleep(6)
    _kill(doomed)
    stop.set()
    worker.join(timeout=30)
    assert errors == []  # nothing rolled back under a live instance
    assert len(seen) >= 2
    _wait_for(lambda: _prepared(shards) == [], what="the survivor to finish the dead instance's transaction")
    balances = _balances(shards)
    moved = START_BALANCE - balances[source]
    assert balances[source] + balances[target] == 2 * START_BALANCE  # every transfer on both shards, or neither
    assert len(seen) <= moved <= len(seen) + 1  # the one in flight at the kill may have been committed


def test_transfers_between_shards_survive_two_proxy_crashes(proxy: ProxyFactory, shards: list[Any]) -> None:
    """Clients move money between accounts on different shards for a minute while the proxy is SIGKILLed
    and restarted twice: afterwards no prepared transaction is left and the total is unchanged."""
    _reset(shards)
    started = _start(proxy, shards)
    placement = _seed(started, shards)
    left = [a for a, s in sorted(placement.items()) if s == 0]
    right = [a for a, s in sorted(placement.items()) if s == 1]
    clients = 6
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []
    workers = []
    for n in range(clients):
        pairs = [(left[(n + i) % len(left)], right[(n * 3 + i) % len(right)]) for i in range(7)]
        pairs += [(b, a) for a, b in pairs]  # as much back as forth: no account runs dry
        workers.append(threading.Thread(target=_transfers, args=(started.dsn(), pairs, stop, seen, errors)))
    for worker in workers:
        worker.start()
    try:
        for _ in range(2):
            time.sleep(20)
            _kill(started)
            started.start()
        time.sleep(20)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert len(seen) > 100
    _wait_for(lambda: _prepared(shards) == [], timeout_s=30, what="recovery after the crashes")
    balances = _balances(shards)
    assert sum(balances.values()) == ACCOUNTS * START_BALANCE
    assert len(balances) == ACCOUNTS


def test_a_client_cannot_prepare_transactions_in_transaction_mode(bank: Any, shards: list[Any]) -> None:
    proxy, placement = bank
    first, second = _on(placement, 0), _on(placement, 1)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("UPDATE accounts SET balance = 9 WHERE id = %s", (first,))
        with pytest.raises(pg_errors.FeatureNotSupported, match="PREPARE TRANSACTION"):
            conn.execute("PREPARE TRANSACTION 'mine'")
        conn.rollback()
        conn.execute("UPDATE accounts SET balance = 9 WHERE id = %s", (first,))
        conn.execute("UPDATE accounts SET balance = 9 WHERE id = %s", (second,))  # over two shards now
        with pytest.raises(pg_errors.FeatureNotSupported, match="PREPARE TRANSACTION"):
            conn.execute("PREPARE TRANSACTION 'mine'")
        conn.rollback()
        assert conn.execute("SELECT balance FROM accounts WHERE id = %s", (first,)).fetchone() == (START_BALANCE,)
        # by the extended protocol too (a Parse cannot be answered in its place: FATAL, as for claim forgery)
        with pytest.raises(pg_errors.FeatureNotSupported, match="PREPARE TRANSACTION") as refused:
            conn.execute("prepare  Transaction 'mine'", prepare=True)
        assert refused.value.diag.severity == "FATAL"
    assert _prepared(shards) == []
    assert _balances(shards)[second] == START_BALANCE


def test_session_mode_passes_prepare_transaction_through(proxy: ProxyFactory, pg: Any) -> None:
    started = proxy(pool_mode="session")
    with psycopg.connect(started.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS by_hand")
        conn.execute("CREATE TABLE by_hand (n int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO by_hand VALUES (1)")
        conn.execute("PREPARE TRANSACTION 'by_hand_1'")
        assert conn.execute("SELECT count(*) FROM by_hand").fetchone() == (0,)
        conn.execute("COMMIT PREPARED 'by_hand_1'")
        assert conn.execute("SELECT count(*) FROM by_hand").fetchone() == (1,)
        conn.execute("DROP TABLE by_hand")


def test_a_client_that_leaves_during_the_commit_round_does_not_stop_it(
        proxy: ProxyFactory, shards: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDGATE_FAILPOINT", "after_prepare:sleep=1")
    started, first, second = _fresh(proxy, shards, settings={**FAST_RECOVERY, "prepared_timeout_s": 600})
    conn = psycopg.connect(started.dsn())
    conn.execute("UPDATE accounts SET balance = balance - 80 WHERE id = %s", (first,))
    conn.execute("UPDATE accounts SET balance = balance + 80 WHERE id = %s", (second,))
    conn.pgconn.send_query(b"COMMIT")
    conn.pgconn.flush()
    time.sleep(0.3)  # the COMMIT is in its prepare round
    conn.close()
    # recovery would wait 600 s: only the round itself can have finished the transaction
    _wait_for(lambda: _prepared(shards) == [] and _balances(shards)[second] != START_BALANCE, timeout_s=10,
              what="the commit round to finish")
    balances = _balances(shards)
    assert (balances[first], balances[second]) == (START_BALANCE - 80, START_BALANCE + 80)
    with psycopg.connect(started.dsn()) as again:  # the proxy's servers went back clean
        assert again.execute("SELECT balance FROM accounts WHERE id = %s", (second,)).fetchone() == (START_BALANCE + 80,)
