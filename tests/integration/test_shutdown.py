"""Graceful shutdown on SIGTERM: the listener closes at once, an open transaction may still commit
within shutdown_timeout_s, and a client idle in transaction past it is disconnected with 57P01;
then the proxy exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from localpg import Topology
from tests.harness import (
    RAW_USER,
    DirectProxy,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    database_entries,
    error_fields,
)

pytestmark = pytest.mark.timeout(120)

EXIT_TIMEOUT_S = 15.0


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start_proxy(proxy: ProxyFactory, pg: Topology) -> Callable[..., ProxyProcess]:
    assert pg.primary is not None
    primary = pg.primary

    def start(pool_mode: str, shutdown_timeout_s: float) -> ProxyProcess:
        started = proxy(
            pool_mode=pool_mode,
            pool_size=4,
            databases=database_entries(primary),
            general={"shutdown_timeout_s": shutdown_timeout_s},
        )
        if isinstance(started, DirectProxy):
            pytest.skip("signals the proxy process: needs the proxy")
        return started

    return start


@pytest.fixture
def table(pg: Topology) -> Iterator[str]:
    """A table readable and writable by every test user, dropped directly on the primary afterwards."""
    assert pg.primary is not None
    name = unique_name("shutdown")
    pg.primary.psql(
        f"CREATE TABLE {name} (id int PRIMARY KEY); GRANT ALL ON {name} TO PUBLIC", user="app", db="app"
    )
    yield name
    pg.primary.psql(f"DROP TABLE IF EXISTS {name}", user="app", db="app")


def committed_ids(pg: Topology, table: str) -> list[int]:
    assert pg.primary is not None
    output = pg.primary.psql(
        f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM {table}", db="app"
    )
    return [int(value) for value in output.split(",") if value]


def wait_exit(proxy_process: ProxyProcess, timeout_s: float = EXIT_TIMEOUT_S) -> int:
    assert proxy_process.process is not None
    try:
        return proxy_process.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"proxy still running {timeout_s:.0f}s after SIGTERM\n{proxy_process.stderr_text()[-4000:]}"
        )


def refused(proxy_process: ProxyProcess) -> str | None:
    """How a new connection fails now: 'refused', 'reset', or the SQLSTATE of a startup error; None if
    it was accepted."""

    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(proxy_process.dsn(), timeout=3)
        except ConnectionRefusedError:
            return "refused"
        except (ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError):
            # Accepted by the kernel into the listen backlog just before the listener closed.
            return "reset"
        except asyncpg.PostgresError as error:
            return str(error.sqlstate)
        await conn.close()
        return None

    outcome: str | None = asyncio.run(asyncio.wait_for(attempt(), 10))
    return outcome


def wait_refused(proxy_process: ProxyProcess, timeout_s: float = 3.0) -> str:
    """New connections must stop being accepted promptly after SIGTERM."""
    deadline = time.monotonic() + timeout_s
    outcomes: list[str | None] = []
    while time.monotonic() < deadline and len(outcomes) < 100:
        outcomes.append(refused(proxy_process))
        if outcomes[-1] is not None:
            return outcomes[-1]
        time.sleep(0.05)
    raise AssertionError(f"new connections still accepted {timeout_s:.0f}s after SIGTERM: {outcomes}")


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_sigterm_lets_open_transaction_commit(
    pool_mode: str, start_proxy: Callable[..., ProxyProcess], pg: Topology, table: str
) -> None:
    shutdown_timeout_s = 10.0
    proxy_process = start_proxy(pool_mode, shutdown_timeout_s)
    with psycopg.connect(proxy_process.dsn(connect_timeout=10), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert proxy_process.process is not None
        signalled = time.monotonic()
        proxy_process.process.send_signal(signal.SIGTERM)

        how = wait_refused(proxy_process)
        assert how in ("refused", "reset", "57P03"), how
        # The transaction that was open at SIGTERM still works and commits.
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
        conn.execute("COMMIT")
        committed_at = time.monotonic()

        exit_code = wait_exit(proxy_process)
        exited_at = time.monotonic()
    assert exit_code == 0, proxy_process.stderr_text()[-4000:]
    assert committed_ids(pg, table) == [1, 2]
    # It left as soon as nothing was in flight, not at the end of shutdown_timeout_s.
    assert exited_at - committed_at < 5.0
    assert exited_at - signalled < shutdown_timeout_s
    stderr = proxy_process.stderr_text()
    assert "event=shutdown_started" in stderr and "event=shutdown_complete" in stderr, stderr[-4000:]


def test_sigterm_disconnects_idle_in_transaction_after_timeout(
    start_proxy: Callable[..., ProxyProcess], pg: Topology, admin_conn: psycopg.Connection[Any], table: str
) -> None:
    shutdown_timeout_s = 1.5
    proxy_process = start_proxy("transaction", shutdown_timeout_s)
    lingering = RawClient(proxy_process.host, proxy_process.port)
    idle = RawClient(proxy_process.host, proxy_process.port)
    try:
        lingering.login()
        idle.login()
        assert lingering.query_status(f"BEGIN; INSERT INTO {table} VALUES (7)") == b"T"
        assert idle.query_status("SELECT 1") == b"I"
        server_pids = admin_backends(admin_conn)
        assert server_pids, "the open transaction has a server connection"

        assert proxy_process.process is not None
        signalled = time.monotonic()
        proxy_process.process.send_signal(signal.SIGTERM)
        messages = lingering.read_until_closed(shutdown_timeout_s + 8)
        closed_at = time.monotonic()
        assert lingering.closed_by_peer, f"still connected; got {messages}"
        errors = [error_fields(body) for code, body in messages if code == b"E"]
        assert [(fields.get("S"), fields.get("C")) for fields in errors] == [("FATAL", "57P01")], messages
        waited_s = closed_at - signalled
        assert shutdown_timeout_s * 0.8 <= waited_s < shutdown_timeout_s + 5, (
            f"disconnected after {waited_s:.2f}s"
        )

        # The client idle between transactions is told the same.
        idle_messages = idle.read_until_closed(5)
        assert idle.closed_by_peer
        assert [error_fields(body).get("C") for code, body in idle_messages if code == b"E"] == ["57P01"]

        exit_code = wait_exit(proxy_process)
    finally:
        lingering.close()
        idle.close()
    assert exit_code == 0, proxy_process.stderr_text()[-4000:]
    # The unfinished transaction was rolled back and its server connection closed.
    assert committed_ids(pg, table) == []
    deadline = time.monotonic() + 5
    while set(admin_backends(admin_conn)) & set(server_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(admin_backends(admin_conn)) & set(server_pids)


@pytest.fixture
def admin_conn(pg: Topology) -> Iterator[psycopg.Connection[Any]]:
    assert pg.primary is not None
    with psycopg.connect(
        pg.primary.dsn("postgres", dbname="postgres"), autocommit=True, connect_timeout=10
    ) as conn:
        yield conn


def admin_backends(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'", (RAW_USER,)
    ).fetchall()
    return [row[0] for row in rows]
