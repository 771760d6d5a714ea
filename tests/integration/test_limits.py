"""Limits and abuse protection against the real proxy and PostgreSQL: auth-failure cool-offs (passwords and
JWTs), max_connections per user and per database, query, idle-in-transaction and idle timeouts, server
logins in flight per pool, and the accept pace."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import Coroutine
from typing import Any

import asyncpg
import jwt as pyjwt
import psycopg
import pytest
from psycopg import errors as pg_errors

from localpg import Topology
from tests.harness import ProxyFactory, ProxyProcess, database_entries, default_users, direct_mode

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(direct_mode(), reason="checks limits the proxy enforces itself"),
]

CONNECT_TIMEOUT_S = 10
JWT_SECRET = "shardgate-limits-test-secret-0123456789abcdef"
WRONG_SECRET = "shardgate-limits-test-secret-not-the-right-one"


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def connect(shardgate: ProxyProcess, user: str = "app", password: str = "app") -> psycopg.Connection[Any]:
    return psycopg.connect(host=shardgate.host, port=shardgate.port, user=user, password=password, dbname="app",
                           autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


def refusal(shardgate: ProxyProcess, user: str = "app", password: str = "app") -> asyncpg.PostgresError:
    """The error a login is refused with (asyncpg reports its SQLSTATE)."""

    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user=user, password=password,
                                         database="app", ssl=False, timeout=CONNECT_TIMEOUT_S)
        except asyncpg.PostgresError as error:
            return error
        await conn.close()
        raise AssertionError(f"the proxy let {user} in")

    return run_async(attempt())


def metric(shardgate: ProxyProcess, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(shardgate.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (labels if labels else "")) and (labels or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def startup_answer(shardgate: ProxyProcess, user: str) -> bytes:
    """Send a startup packet on a raw socket and return the first message the proxy answers with."""
    body = b"".join(key + b"\x00" + value.encode() + b"\x00" for key, value in
                    ((b"user", user), (b"database", "app"))) + b"\x00"
    with socket.create_connection((shardgate.host, shardgate.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
        data = b""
        while len(data) < 5 or len(data) < 1 + struct.unpack("!i", data[1:5])[0]:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def entries(pg: Topology) -> list[dict[str, Any]]:
    assert pg.primary is not None
    return database_entries(pg.primary)


def superuser(pg: Topology, sql: str) -> str:
    assert pg.primary is not None
    return pg.primary.psql(sql, user="postgres", db="app")


# -- authentication failures ---------------------------------------------------------------------------


def test_wrong_passwords_start_a_cooloff_that_refuses_the_right_one_until_it_ends(proxy: ProxyFactory,
                                                                                  pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg),
                      general={"auth_failure_limit": 3, "auth_failure_window_s": 30, "auth_failure_cooloff_s": 4,
                               "auth_failure_exempt": []})
    assert isinstance(shardgate, ProxyProcess)
    for attempt in range(3):
        error = refusal(shardgate, password=f"wrong-guess-{attempt}")
        assert "password authentication failed" in str(error)
    started = time.monotonic()
    error = refusal(shardgate)  # the right password, during the cool-off
    assert error.sqlstate == "53300"
    assert "too many authentication failures" in str(error)
    assert '"127.0.0.1"' in str(error)
    # a user the config does not have gets the same answer: the cool-off does not tell who exists
    unknown = refusal(shardgate, user="nobody_here", password="x")
    assert unknown.sqlstate == "53300" and "too many authentication failures" in str(unknown)
    # refused at the startup packet: no authentication request (no SCRAM round) is ever sent
    answer = startup_answer(shardgate, "app")
    assert answer[:1] == b"E" and b"53300" in answer
    while time.monotonic() - started < 4.5:
        time.sleep(0.1)
    with connect(shardgate) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert metric(shardgate, "shardgate_auth_failures_total", '{reason="scram"}') == 3
    assert metric(shardgate, "shardgate_clients_refused_total", '{reason="auth_cooloff"}') >= 3
    log = shardgate.stderr_text() + shardgate.stdout_text()
    assert "event=auth_failed user='app' address=127.0.0.1 reason=scram" in log
    assert "wrong-guess" not in log  # the secret is never logged


def test_cleartext_failures_are_counted_and_a_failure_free_user_is_not_cooled_off(proxy: ProxyFactory,
                                                                                    pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg),
                      general={"auth_failure_limit": 2, "auth_failure_cooloff_s": 30,
                               "auth_failure_exempt": ["10.0.0.0/8"]})
    assert isinstance(shardgate, ProxyProcess)
    assert refusal(shardgate, user="plainuser", password="nope").sqlstate == "28P01"
    with connect(shardgate) as conn:  # one failure: below the limit, everybody still gets in
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert refusal(shardgate, user="md5user", password="nope").sqlstate == "28P01"
    # two failures from this address: the address cools off, for every user
    assert refusal(shardgate).sqlstate == "53300"
    assert metric(shardgate, "shardgate_auth_failures_total", '{reason="password"}') == 1
    assert metric(shardgate, "shardgate_auth_failures_total", '{reason="md5"}') == 1


def test_a_jwt_with_a_bad_signature_counts_as_a_failure(proxy: ProxyFactory, pg: Topology) -> None:
    users = [*default_users(), {"name": "api", "auth": "jwt", "server_user": "app", "server_password": "app"}]
    shardgate = proxy(databases=entries(pg), users=users,
                      jwt={"algorithms": ["HS256"], "secret": JWT_SECRET},
                      general={"auth_failure_limit": 2, "auth_failure_cooloff_s": 30, "auth_failure_exempt": []})
    assert isinstance(shardgate, ProxyProcess)
    claims = {"sub": "someone", "exp": int(time.time()) + 600}
    good = pyjwt.encode(claims, JWT_SECRET, algorithm="HS256")
    forged = pyjwt.encode(claims, WRONG_SECRET, algorithm="HS256")
    with connect(shardgate, "api", good) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    for _ in range(2):
        assert refusal(shardgate, "api", forged).sqlstate in ("28000", "28P01")
    error = refusal(shardgate, "api", good)
    assert error.sqlstate == "53300" and "too many authentication failures" in str(error)
    assert metric(shardgate, "shardgate_auth_failures_total", '{reason="jwt"}') == 2
    assert forged not in shardgate.stderr_text() + shardgate.stdout_text()


# -- max_connections -------------------------------------------------------------------------------------


def test_max_connections_per_user_and_per_database(proxy: ProxyFactory, pg: Topology) -> None:
    users = default_users()
    users[0]["max_connections"] = 2  # app
    databases = entries(pg)
    databases[0]["max_connections"] = 3
    shardgate = proxy(databases=databases, users=users)
    assert isinstance(shardgate, ProxyProcess)
    first, second = connect(shardgate), connect(shardgate)
    error = refusal(shardgate)
    assert error.sqlstate == "53300" and 'too many connections for role "app"' in str(error)
    third = connect(shardgate, "md5user", "md5pw")  # another role: the database has room for one more
    error = refusal(shardgate, "md5user", "md5pw")
    assert error.sqlstate == "53300" and 'too many connections for database "app"' in str(error)
    for conn in (first, second, third):
        assert conn.execute("SELECT 1").fetchone() == (1,)
    first.close()
    deadline = time.monotonic() + 10
    while True:  # the proxy sees the close a moment later
        try:
            again = connect(shardgate, "md5user", "md5pw")
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "a closed client's place was not given back"
            time.sleep(0.1)
    assert again.execute("SELECT 2").fetchone() == (2,)
    for conn in (second, third, again):
        conn.close()
    assert metric(shardgate, "shardgate_clients_refused_total", '{reason="max_connections_user"}') == 1
    assert metric(shardgate, "shardgate_clients_refused_total", '{reason="max_connections_database"}') >= 1


# -- timeouts ------------------------------------------------------------------------------------------


def test_query_timeout_cancels_a_long_statement_and_the_session_goes_on(proxy: ProxyFactory, pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg), general={"query_timeout_ms": 1500})
    assert isinstance(shardgate, ProxyProcess)
    notices: list[str] = []
    with connect(shardgate) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        started = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        took = time.monotonic() - started
        assert 1.4 <= took <= 4.0, f"canceled after {took:.1f} s with query_timeout_ms = 1500"
        assert any("query_timeout_ms = 1500" in notice for notice in notices), notices
        # short statements, many of them over the same time, are not canceled
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert conn.execute("SELECT pg_sleep(0.2), 7").fetchone() == ("", 7)
    assert metric(shardgate, "shardgate_timeouts_total", '{kind="query"}') == 1


def test_query_timeout_of_a_user_overrides_general(proxy: ProxyFactory, pg: Topology) -> None:
    users = default_users()
    users[0]["query_timeout_ms"] = 1000
    shardgate = proxy(databases=entries(pg), users=users, general={"query_timeout_ms": 0})
    assert isinstance(shardgate, ProxyProcess)

    async def run() -> float:
        conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user="app", password="app",
                                     database="app", ssl=False, timeout=CONNECT_TIMEOUT_S)
        try:
            started = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.fetchval("SELECT pg_sleep(10)")
            took = time.monotonic() - started
            assert await conn.fetchval("SELECT 40 + 2") == 42
            return took
        finally:
            await conn.close()

    took = run_async(run())
    assert 0.9 <= took <= 3.5
    with connect(shardgate, "md5user", "md5pw") as conn:  # general's 0: no timeout for the others
        assert conn.execute("SELECT pg_sleep(2.5), 1").fetchone() == ("", 1)


def test_idle_in_transaction_closes_the_client_and_rolls_its_server_back(proxy: ProxyFactory,
                                                                          pg: Topology) -> None:
    table = f"limits_iit_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    superuser(pg, f"CREATE TABLE {table} (id int); GRANT ALL ON {table} TO app")
    shardgate = proxy(databases=entries(pg), general={"idle_in_transaction_timeout_ms": 1500})
    assert isinstance(shardgate, ProxyProcess)
    conn = connect(shardgate)
    conn.autocommit = False
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    time.sleep(3.5)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT 1")
    assert caught.value.sqlstate == "25P03"
    assert "idle-in-transaction timeout" in str(caught.value)
    conn.close()
    deadline = time.monotonic() + 10
    while True:  # the server was given back with ROLLBACK: nothing of the transaction is left
        stuck = superuser(pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                          "AND state LIKE 'idle in transaction%'").strip()
        if stuck == "0":
            break
        assert time.monotonic() < deadline, "the server stayed idle in transaction"
        time.sleep(0.1)
    assert superuser(pg, f"SELECT count(*) FROM {table}").strip() == "0"
    # a client that keeps working inside its transaction is left alone
    with connect(shardgate) as busy, busy.transaction():
        for _ in range(6):
            busy.execute(f"INSERT INTO {table} VALUES (2)")
            time.sleep(0.5)
    assert superuser(pg, f"SELECT count(*) FROM {table}").strip() == "6"
    assert metric(shardgate, "shardgate_timeouts_total", '{kind="idle_in_transaction"}') == 1
    superuser(pg, f"DROP TABLE {table}")


def test_client_idle_timeout_closes_an_idle_client_only(proxy: ProxyFactory, pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg), general={"client_idle_timeout_s": 1.5})
    assert isinstance(shardgate, ProxyProcess)
    idle, busy = connect(shardgate), connect(shardgate)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        assert busy.execute("SELECT 2").fetchone() == (2,)
        time.sleep(0.3)
    with pytest.raises(psycopg.Error) as caught:
        idle.execute("SELECT 1")
    assert caught.value.sqlstate == "57P05"
    assert "idle-session timeout" in str(caught.value)
    assert busy.execute("SELECT 3").fetchone() == (3,)
    idle.close()
    busy.close()
    assert metric(shardgate, "shardgate_timeouts_total", '{kind="client_idle"}') == 1


def test_client_login_timeout_closes_a_client_that_never_logs_in(proxy: ProxyFactory, pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg), general={"client_login_timeout_s": 1})
    assert isinstance(shardgate, ProxyProcess)
    with socket.create_connection((shardgate.host, shardgate.port), timeout=10) as sock:
        started = time.monotonic()
        data = sock.recv(4096)  # nothing sent: the proxy closes it
        took = time.monotonic() - started
    assert data[:1] == b"E" and b"client_login_timeout_s" in data
    assert 0.9 <= took <= 4.0


# -- connection storms -----------------------------------------------------------------------------------


class SlowLoginForwarder:
    """A loopback TCP forwarder in front of PostgreSQL that holds every new connection for `delay_s` before
    connecting it: each server login takes at least that long, so the logins under way at once can be
    counted (`peak`) by the connections held."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.holding = 0
        self.peak = 0
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
            self.holding += 1
            self.peak = max(self.peak, self.holding)
            self.sockets.append(downstream)
        time.sleep(self.delay_s)
        with self.lock:
            self.holding -= 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            downstream.close()
            return
        with self.lock:
            self.sockets.append(upstream)
        pairs = {downstream: upstream, upstream: downstream}
        try:
            while True:
                ready, _, _ = select.select(list(pairs), [], [], 60)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pairs[sock].sendall(data)
        except OSError:
            return
        finally:
            downstream.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.close()
                except OSError:
                    pass


def test_max_server_connects_in_flight_bounds_concurrent_server_logins(proxy: ProxyFactory, pg: Topology) -> None:
    assert pg.primary is not None
    forwarder = SlowLoginForwarder((pg.primary.host, pg.primary.port), delay_s=0.3)
    try:
        databases = [{"name": "app", "host": forwarder.host, "port": forwarder.port, "database_name": "app"}]
        shardgate = proxy(pool_mode="session", pool_size=60, databases=databases,
                          general={"max_server_connects_in_flight": 4, "healthcheck_interval_ms": 0,
                                   "checkout_timeout_ms": 60000})
        assert isinstance(shardgate, ProxyProcess)

        async def storm() -> list[int]:
            async def one(index: int) -> int:
                conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user="app", password="app",
                                             database="app", ssl=False, timeout=60)
                try:
                    return int(await conn.fetchval("SELECT $1::int", index))
                finally:
                    await conn.close()

            return list(await asyncio.gather(*(one(index) for index in range(50))))

        started = time.monotonic()
        assert sorted(run_async(storm())) == list(range(50))
        took = time.monotonic() - started
        assert forwarder.accepted >= 50  # session mode: one server per client
        assert 2 <= forwarder.peak <= 4, f"{forwarder.peak} server logins at once with a limit of 4"
        assert took >= 50 / 4 * 0.3 * 0.9  # the logins went a few at a time
    finally:
        forwarder.close()


def test_accept_rate_paces_a_burst_and_refuses_the_excess(proxy: ProxyFactory, pg: Topology) -> None:
    shardgate = proxy(databases=entries(pg), general={"max_new_connections_per_s": 5})
    assert isinstance(shardgate, ProxyProcess)

    async def burst() -> tuple[list[float], list[str]]:
        started = time.monotonic()

        async def one() -> float | str:
            try:
                conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user="trustuser",
                                             database="app", ssl=False, timeout=30)
            except asyncpg.PostgresError as error:
                return f"{error.sqlstate}: {error}"
            took = time.monotonic() - started
            await conn.close()
            return took

        results = await asyncio.gather(*(one() for _ in range(25)))
        return ([r for r in results if isinstance(r, float)], [r for r in results if isinstance(r, str)])

    accepted, refused = run_async(burst())
    assert 5 <= len(accepted) <= 14, (accepted, refused)
    assert len(refused) >= 8
    assert all(text.startswith("53300") and "max_new_connections_per_s = 5" in text for text in refused)
    assert max(accepted) >= 0.6  # the burst beyond one second's worth waited for its turn
    assert metric(shardgate, "shardgate_clients_refused_total", '{reason="accept_rate"}') == len(refused)
