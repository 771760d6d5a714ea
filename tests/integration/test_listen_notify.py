"""LISTEN/NOTIFY in transaction and statement modes: the proxy answers LISTEN itself and delivers, through one
listening server connection per database and user, every notification to each client on its channel, with
the payload and the notifying backend's pid. Real clients (psycopg, asyncpg, psql, a raw protocol client)
against real PostgreSQL; the hub's server is watched from pg_stat_activity by a direct superuser connection.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from localpg import Topology
from tests.harness import (
    DirectProxy,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    database_entries,
    default_users,
    message,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

Proxy = ProxyProcess | DirectProxy
CONNECT_TIMEOUT_S = 10
HUB_APPLICATION_NAME = "shardgate-listen"
QUIET_S = 0.7  # how long "nothing arrives" is watched for
POLL_INTERVAL_S = 0.05


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))



def real_proxy(proxy_process: Proxy) -> ProxyProcess:
    if isinstance(proxy_process, DirectProxy):
        pytest.skip("observes the proxy's own listening connection")
    return proxy_process


@pytest.fixture
def start(proxy: ProxyFactory, pg: Topology) -> Callable[..., Proxy]:
    """start(pool_mode, pool_size, **general): a proxy in front of the primary alone."""
    assert pg.primary is not None
    primary = pg.primary

    def started(pool_mode: str = "transaction", pool_size: int = 4, **general: Any) -> Proxy:
        return proxy(pool_mode=pool_mode, pool_size=pool_size, databases=database_entries(primary), general=general)

    return started


@pytest.fixture
def admin(pg: Topology) -> Iterator[psycopg.Connection[Any]]:
    assert pg.primary is not None
    with psycopg.connect(pg.primary.dsn("postgres", dbname="postgres"), autocommit=True,
                         connect_timeout=CONNECT_TIMEOUT_S) as conn:
        yield conn


def connect(proxy_process: Proxy, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(proxy_process.dsn(connect_timeout=CONNECT_TIMEOUT_S), **kwargs)


def received(conn: psycopg.Connection[Any], count: int, timeout_s: float = 5.0) -> list[tuple[str, str, int]]:
    return [(n.channel, n.payload, n.pid) for n in conn.notifies(timeout=timeout_s, stop_after=count)]


def nothing_for(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    return [(n.channel, n.payload, n.pid) for n in conn.notifies(timeout=QUIET_S)]


def notify_in_transaction(notifier: psycopg.Connection[Any], channel: str, payload: str,
                          function: bool = False) -> int:
    """NOTIFY (or pg_notify) inside a transaction; returns that transaction's backend pid."""
    with notifier.transaction():
        pid = notifier.execute("SELECT pg_backend_pid()").fetchone()
        if function:
            notifier.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        else:
            notifier.execute(f'NOTIFY "{channel}", \'{payload}\'')
    assert pid is not None
    return int(pid[0])


def hub_backends(admin_conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    rows = admin_conn.execute("SELECT pid, query FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
                              (HUB_APPLICATION_NAME,)).fetchall()
    return [(int(pid), str(query)) for pid, query in rows]


def metric(proxy_process: ProxyProcess, name: str) -> float:
    with urllib.request.urlopen(proxy_process.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- delivery -----------------------------------------------------------------------------------------------


def test_two_listeners_get_payload_and_the_notifiers_real_pid(start: Callable[..., Proxy]) -> None:
    shared = start()
    channel = unique_name("chan")
    with connect(shared) as first, connect(shared) as second, connect(shared, autocommit=False) as notifier:
        assert first.execute(f"LISTEN {channel}").statusmessage == "LISTEN"
        second.execute(f"LISTEN {channel}")
        pid_notify = notify_in_transaction(notifier, channel, "one")
        pid_function = notify_in_transaction(notifier, channel, "two", function=True)
        expected = [(channel, "one", pid_notify), (channel, "two", pid_function)]
        assert received(first, 2) == expected
        assert received(second, 2) == expected


def test_asyncpg_listener_added_removed_and_added_again(start: Callable[..., Proxy]) -> None:
    shared = start()
    channel = unique_name("apg")

    async def scenario() -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]], int, int]:
        listener = await asyncpg.connect(shared.dsn(), timeout=CONNECT_TIMEOUT_S)
        notifier = await asyncpg.connect(shared.dsn(), timeout=CONNECT_TIMEOUT_S)
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()

        def callback(_conn: object, pid: int, chan: str, payload: str) -> None:
            got.put_nowait((pid, chan, payload))

        async def notify(payload: str) -> int:
            async with notifier.transaction():
                pid = int(await notifier.fetchval("SELECT pg_backend_pid()"))
                await notifier.execute("SELECT pg_notify($1, $2)", channel, payload)
            return pid

        try:
            await listener.add_listener(channel, callback)
            first_pid = await notify("first")
            first = [await asyncio.wait_for(got.get(), 5)]
            await listener.remove_listener(channel, callback)
            await notify("while-removed")
            await asyncio.sleep(QUIET_S)
            assert got.empty(), "delivered after remove_listener"
            # the second LISTEN runs asyncpg's cached statement: a Bind and Execute, no Parse
            await listener.add_listener(channel, callback)
            again_pid = await notify("again")
            again = [await asyncio.wait_for(got.get(), 5)]
            return first, again, first_pid, again_pid
        finally:
            await listener.close()
            await notifier.close()

    first, again, first_pid, again_pid = run_async(scenario())
    assert first == [(first_pid, channel, "first")]
    assert again == [(again_pid, channel, "again")]


def test_psql_gets_its_own_notification(start: Callable[..., Proxy]) -> None:
    # its own notification comes through the hub just after its commit's answer (directly: just before it),
    # so psql prints it after a later command
    shared = real_proxy(start())
    channel = unique_name("psql")
    result = subprocess.run(
        ["psql", shared.dsn(), "-X", "-v", "ON_ERROR_STOP=1", "-c", f"LISTEN {channel}",
         "-c", f"SELECT pg_notify('{channel}', 'from-psql')", "-c", "SELECT pg_sleep(0.5)", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert f'Asynchronous notification "{channel}" with payload "from-psql" received' in result.stdout, result.stdout


def test_channel_names_fold_as_postgresql_does(start: Callable[..., Proxy]) -> None:
    shared = start()
    base = unique_name("Fold")
    with connect(shared) as folded, connect(shared) as quoted, connect(shared) as notifier:
        folded.execute(f"LISTEN {base}")  # unquoted: lower-cased
        quoted.execute(f'LISTEN "{base}"')  # quoted: as written
        notifier.execute("SELECT pg_notify(%s, 'lower')", (base.lower(),))
        notifier.execute("SELECT pg_notify(%s, 'exact')", (base,))
        assert [(c, p) for c, p, _ in received(folded, 1)] == [(base.lower(), "lower")]
        assert [(c, p) for c, p, _ in received(quoted, 1)] == [(base, "exact")]
        assert nothing_for(folded) == [] and nothing_for(quoted) == []


def test_unlisten_and_unlisten_all_stop_delivery(start: Callable[..., Proxy]) -> None:
    shared = start()
    one, two = unique_name("un1"), unique_name("un2")
    with connect(shared) as listener, connect(shared) as notifier:
        listener.execute(f"LISTEN {one}; LISTEN {two}")
        assert listener.execute(f"UNLISTEN {one}").statusmessage == "UNLISTEN"
        notifier.execute(f"NOTIFY {one}, 'gone'")
        notifier.execute(f"NOTIFY {two}, 'still'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(two, "still")]
        listener.execute("UNLISTEN *")
        notifier.execute(f"NOTIFY {two}, 'after-all'")
        assert nothing_for(listener) == []
        listener.execute(f"LISTEN {one}")
        listener.execute("DISCARD ALL")  # as in PostgreSQL, it UNLISTENs everything
        notifier.execute(f"NOTIFY {one}, 'after-discard'")
        assert nothing_for(listener) == []


def test_statement_mode_listen(start: Callable[..., Proxy]) -> None:
    statement = start("statement")
    channel = unique_name("stmt")
    with connect(statement) as listener, connect(statement) as notifier:
        listener.execute(f"LISTEN {channel}")
        notifier.execute(f"NOTIFY {channel}, 'in-statement-mode'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(channel, "in-statement-mode")]


# -- transactions ---------------------------------------------------------------------------------------------


def test_listen_in_rolled_back_transaction_does_not_register(start: Callable[..., Proxy]) -> None:
    shared = start()
    rolled, committed = unique_name("rb"), unique_name("cm")
    with connect(shared) as listener, connect(shared) as notifier:
        listener.execute("BEGIN")
        assert listener.execute(f"LISTEN {rolled}").statusmessage == "LISTEN"
        listener.execute("ROLLBACK")
        listener.execute("BEGIN")
        listener.execute(f"LISTEN {committed}")
        listener.execute("COMMIT")
        notifier.execute(f"NOTIFY {rolled}, 'not-for-you'")
        notifier.execute(f"NOTIFY {committed}, 'yours'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(committed, "yours")]
        assert nothing_for(listener) == []


def test_listen_in_failed_transaction_is_refused(start: Callable[..., Proxy]) -> None:
    shared = start()
    channel = unique_name("failed")
    with connect(shared) as listener, connect(shared) as notifier:
        listener.execute("BEGIN")
        with pytest.raises(pg_errors.DivisionByZero):
            listener.execute("SELECT 1/0")
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            listener.execute(f"LISTEN {channel}")
        listener.execute("ROLLBACK")
        notifier.execute(f"NOTIFY {channel}, 'x'")
        assert nothing_for(listener) == []


def _read_for(raw: RawClient, seconds: float) -> list[tuple[bytes, bytes]]:
    messages = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        found = raw.read_message(timeout_s=left)
        if found is None:
            break
        messages.append(found)
    return messages


def _notification(body: bytes) -> tuple[int, str, str]:
    pid = int.from_bytes(body[:4], "big")
    channel, payload, _ = body[4:].split(b"\x00", 2)
    return pid, channel.decode(), payload.decode()


def test_idle_client_gets_notification_at_once_and_one_in_a_transaction_after_it(
    start: Callable[..., Proxy],
) -> None:
    shared = real_proxy(start())
    channel = unique_name("raw")
    raw = RawClient(shared.host, shared.port)
    try:
        raw.login()
        assert raw.query_status(f"LISTEN {channel}") == b"I"
        with connect(shared, autocommit=False) as notifier:
            pid = notify_in_transaction(notifier, channel, "idle")
            # idle: it arrives with nothing asked, as PostgreSQL sends it
            assert [(code, _notification(body)) for code, body in _read_for(raw, 2.0)] == [
                (b"A", (pid, channel, "idle"))]
            assert raw.query_status("BEGIN") == b"T"
            pid_in = notify_in_transaction(notifier, channel, "in-transaction")
            assert _read_for(raw, QUIET_S) == []  # held while the client is in its transaction
            raw.send(message(b"Q", b"SELECT 1\x00"))
            answer = raw.read_until_ready()
            assert b"A" not in [code for code, _ in answer], answer
            raw.send(message(b"Q", b"COMMIT\x00"))
            after = raw.read_until_ready() + _read_for(raw, 1.0)
            codes = [code for code, _ in after]
            assert codes.count(b"A") == 1, after
            assert codes.index(b"A") > codes.index(b"C"), after  # after the COMMIT, not before
            assert _notification(after[codes.index(b"A")][1]) == (pid_in, channel, "in-transaction")
    finally:
        raw.close()


def test_listen_over_the_extended_protocol_in_a_transaction(start: Callable[..., Proxy]) -> None:
    shared = real_proxy(start())
    channel = unique_name("ext")
    raw = RawClient(shared.host, shared.port)
    parse_bind_execute = (message(b"P", b"\x00" + f"LISTEN {channel}".encode() + b"\x00\x00\x00")
                          + message(b"B", b"\x00" * 8) + message(b"E", b"\x00\x00\x00\x00\x00") + message(b"S"))
    try:
        raw.login()
        assert raw.query_status("BEGIN") == b"T"
        raw.send(parse_bind_execute)
        answer = raw.read_until_ready()
        assert [code for code, _ in answer] == [b"1", b"2", b"C", b"Z"], answer
        assert raw.query_status("ROLLBACK") == b"I"
        with connect(shared) as notifier:
            notifier.execute(f"NOTIFY {channel}, 'rolled-back'")
            assert _read_for(raw, QUIET_S) == []
            assert raw.query_status("BEGIN") == b"T"
            raw.send(parse_bind_execute)
            raw.read_until_ready()
            assert raw.query_status("COMMIT") == b"I"
            notifier.execute(f"NOTIFY {channel}, 'committed'")
            got = _read_for(raw, 2.0)
            assert [(code, _notification(body)[1:]) for code, body in got] == [(b"A", (channel, "committed"))]
    finally:
        raw.close()


# -- pooling: no pin, cleanup, reconnect --------------------------------------------------------------------


def test_a_listening_client_does_not_pin_a_server(start: Callable[..., Proxy]) -> None:
    single = start(pool_size=1, checkout_timeout_ms=2000)
    channel = unique_name("nopin")
    with connect(single) as listener, connect(single) as other, connect(single) as notifier:
        listener.execute(f"LISTEN {channel}")
        other.execute("BEGIN")  # holds the only server: the listener must not be holding it
        assert other.execute("SELECT 41 + 1").fetchone() == (42,)
        other.execute("COMMIT")
        # the pooled server itself listens to nothing: the hub does
        assert listener.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        notifier.execute(f"NOTIFY {channel}, 'shared-server'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(channel, "shared-server")]


def test_disconnect_and_unlisten_clean_up_the_hub(
    start: Callable[..., Proxy], admin: psycopg.Connection[Any]
) -> None:
    shared = real_proxy(start())
    only_first, both = unique_name("solo"), unique_name("both")
    first, second = connect(shared), connect(shared)
    try:
        first.execute(f"LISTEN {only_first}; LISTEN {both}")
        second.execute(f"LISTEN {both}")
        assert len(hub_backends(admin)) == 1  # one listening connection for the database and user
        wait_until(lambda: metric(shared, "shardgate_listen_channels") == 2, 5, "two channels on the hub")
        assert metric(shared, "shardgate_listen_clients") == 2
        first.close()
        wait_until(lambda: hub_backends(admin)[0][1] == f'UNLISTEN "{only_first}"', 5,
                   "the hub to UNLISTEN the channel nobody listens to")
        assert metric(shared, "shardgate_listen_channels") == 1
        second.execute(f"UNLISTEN {both}")
        wait_until(lambda: hub_backends(admin) == [], 5, "the hub to close its connection")
        second.execute(f"LISTEN {both}")  # opened again when needed
        assert len(hub_backends(admin)) == 1
        with connect(shared) as notifier:
            notifier.execute(f"NOTIFY {both}, 'back'")
            assert [(c, p) for c, p, _ in received(second, 1)] == [(both, "back")]
        assert metric(shared, "shardgate_notifications_delivered_total") >= 1
    finally:
        first.close()
        second.close()
    wait_until(lambda: hub_backends(admin) == [], 5, "the hub to close once its clients are gone")


def test_hub_reconnects_and_listens_again(start: Callable[..., Proxy], admin: psycopg.Connection[Any]) -> None:
    shared = real_proxy(start())
    channel = unique_name("reconn")
    with connect(shared) as listener, connect(shared) as notifier:
        listener.execute(f"LISTEN {channel}")
        [(hub_pid, _)] = hub_backends(admin)
        assert admin.execute("SELECT pg_terminate_backend(%s)", (hub_pid,)).fetchone() == (True,)

        def relistened() -> bool:
            found = hub_backends(admin)
            return len(found) == 1 and found[0][0] != hub_pid and found[0][1] == f'LISTEN "{channel}"'

        wait_until(relistened, 10, "a new hub connection that LISTENs again")
        time.sleep(0.2)  # its LISTEN answered
        notifier.execute(f"NOTIFY {channel}, 'after-reconnect'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(channel, "after-reconnect")]
        assert listener.execute("SELECT 1").fetchone() == (1,)  # the client never noticed
        assert metric(shared, "shardgate_listen_reconnects_total") == 1


def test_session_mode_listens_on_the_clients_own_server(
    start: Callable[..., Proxy], admin: psycopg.Connection[Any]
) -> None:
    session = real_proxy(start("session"))
    channel = unique_name("sess")
    with connect(session) as listener, connect(session) as notifier:
        listener.execute(f"LISTEN {channel}")
        assert listener.execute("SELECT array_agg(c) FROM pg_listening_channels() AS c").fetchone() == ([channel],)
        notifier.execute(f"NOTIFY {channel}, 'session'")
        got = received(listener, 1)
        assert [(c, p) for c, p, _ in got] == [(channel, "session")]
        assert got[0][2] == notifier.info.backend_pid  # the real backend, as session mode passes it through
        assert hub_backends(admin) == []


def test_many_notifications_reach_every_listener_in_order(start: Callable[..., Proxy]) -> None:
    shared = start()
    channel = unique_name("burst")
    count = 300
    with connect(shared) as first, connect(shared) as second, connect(shared) as notifier:
        first.execute(f"LISTEN {channel}")
        second.execute(f"LISTEN {channel}")
        notifier.execute(f"SELECT pg_notify('{channel}', g::text) FROM generate_series(1, {count}) AS g")
        for conn in (first, second):
            assert [p for _, p, _ in received(conn, count, 10)] == [str(i) for i in range(1, count + 1)]


# -- listen_user ------------------------------------------------------------------------------------------------


def _users_with_listener(server_password: str) -> list[dict[str, Any]]:
    users = default_users()
    users.append({"name": "listener", "password": "unused", "auth": "scram-sha-256", "server_user": "app",
                  "server_password": server_password})
    return users


def test_listen_user_makes_one_hub_per_database(
    proxy: ProxyFactory, pg: Topology, admin: psycopg.Connection[Any]
) -> None:
    assert pg.primary is not None
    shared = real_proxy(proxy(databases=database_entries(pg.primary), users=_users_with_listener("app"),
                              general={"listen_user": "listener"}))
    channel = unique_name("shared_hub")
    with psycopg.connect(shared.dsn(), autocommit=True) as as_app, \
            psycopg.connect(shared.dsn("md5user", "md5pw"), autocommit=True) as as_md5:
        as_app.execute(f"LISTEN {channel}")
        as_md5.execute(f"LISTEN {channel}")
        found = admin.execute("SELECT usename FROM pg_stat_activity WHERE application_name = %s",
                              (HUB_APPLICATION_NAME,)).fetchall()
        assert found == [("app",)]  # one connection, the listen_user's server login, for both users
        as_md5.execute(f"NOTIFY {channel}, 'both'")
        assert [(c, p) for c, p, _ in received(as_app, 1)] == [(channel, "both")]
        assert [(c, p) for c, p, _ in received(as_md5, 1)] == [(channel, "both")]


def test_listen_fails_with_the_reason_when_the_hub_cannot_log_in(proxy: ProxyFactory, pg: Topology) -> None:
    assert pg.primary is not None
    broken = real_proxy(proxy(databases=database_entries(pg.primary), users=_users_with_listener("wrong"),
                              general={"listen_user": "listener"}))
    channel = unique_name("nohub")
    with connect(broken) as client:
        with pytest.raises(psycopg.OperationalError) as raised:
            client.execute(f"LISTEN {channel}")
        assert raised.value.sqlstate == "08006"
        assert "notification connection" in str(raised.value) and "password" in str(raised.value)
        assert client.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    assert "Traceback" not in broken.stderr_text()


def test_listen_with_read_write_splitting(proxy: ProxyFactory, pg: Topology) -> None:
    # a primary and two replicas: reads go to replicas, the hub and every NOTIFY to the primary
    split = proxy(pool_mode="transaction")
    channel = unique_name("split")
    with connect(split) as listener, connect(split) as notifier:
        listener.execute(f"LISTEN {channel}")
        assert listener.execute("SELECT 1").fetchone() == (1,)
        with notifier.transaction():
            notifier.execute("SELECT pg_notify(%s, 'in-block')", (channel,))
        listener.execute("BEGIN")  # held back by the router until the next statement says where it goes
        listener.execute(f'LISTEN "{channel}_2"')
        listener.execute("COMMIT")
        notifier.execute(f"NOTIFY {channel}_2, 'second'")
        assert [(c, p) for c, p, _ in received(listener, 2)] == [(channel, "in-block"), (f"{channel}_2", "second")]


# -- failover ---------------------------------------------------------------------------------------------------


def test_hub_follows_a_failover_to_the_promoted_server(proxy: ProxyFactory, throwaway_topology: Topology) -> None:
    old, new = throwaway_topology.primary, throwaway_topology.replicas[0]
    assert old is not None
    databases = [{"name": "app", "host": server.host, "port": server.port, "database_name": "app", "role": "auto"}
                 for server in (old, new)]
    failing = real_proxy(proxy(databases=databases, general={
        "healthcheck_interval_ms": 200, "ban_timeout_s": 1.0, "server_connect_timeout_ms": 1000}))
    channel = unique_name("failover")

    def connected() -> psycopg.Connection[Any] | None:
        try:
            conn = connect(failing)
            conn.execute(f"LISTEN {channel}")
            return conn
        except psycopg.Error:
            return None

    deadline = time.monotonic() + 10  # roles are known after the first probe
    while (listener := connected()) is None:
        assert time.monotonic() < deadline, "LISTEN never went through before the failover"
        time.sleep(POLL_INTERVAL_S)
    with listener:
        old.stop("immediate")
        new.promote()
        with psycopg.connect(new.dsn("postgres", dbname="postgres"), autocommit=True) as observer:
            def listening_on_new() -> bool:
                rows = observer.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s",
                                        (HUB_APPLICATION_NAME,)).fetchall()
                return rows == [(f'LISTEN "{channel}"',)]

            wait_until(listening_on_new, 20, "the hub to LISTEN on the promoted server")
        time.sleep(0.2)
        with psycopg.connect(new.dsn("app", dbname="app"), autocommit=True) as notifier:
            notifier.execute(f"NOTIFY {channel}, 'after-failover'")
        assert [(c, p) for c, p, _ in received(listener, 1)] == [(channel, "after-failover")]
    assert "Traceback" not in failing.stderr_text()


def test_listen_on_a_wildcard_database_as_an_auth_query_user(proxy: ProxyFactory, pg: Topology) -> None:
    # neither the database nor the user is in the config: the hub uses the session's cluster and login
    assert pg.primary is not None
    primary = pg.primary
    started = real_proxy(proxy(
        users=[{"name": "postgres", "password": "postgres", "auth": "scram-sha-256"}],
        databases=[{"name": "*", "host": primary.host, "port": primary.port}],
        general={"auth_user": "postgres"}))
    channel = unique_name("wild")
    dsn = started.dsn("app", "app", connect_timeout=CONNECT_TIMEOUT_S)
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as notifier:
        listener.execute(f"LISTEN {channel}")
        pid = notify_in_transaction(notifier, channel, "wildcard")
        assert received(listener, 1) == [(channel, "wildcard", pid)]
