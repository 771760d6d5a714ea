"""Admin console: SHOW views and commands from psql and psycopg, PAUSE under load, KILL, BAN, RECONNECT,
RELOAD, SHUTDOWN, refusal of non-admins, and the same views as JSON over HTTP behind the bearer token."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest

from tests.harness import database_entries, default_users

pytestmark = pytest.mark.skipif(os.environ.get("SHARDGATE_TEST_DIRECT") == "1",
                                reason="the console is the proxy's own")

ADMIN = {"name": "admin", "password": "admin-secret", "auth": "scram-sha-256",
         "server_user": "app", "server_password": "app"}
TOKEN = "a-long-admin-token-0123456789"
GENERAL = {"admin_users": ["admin"], "admin_token": TOKEN}
PSQL_TIMEOUT_S = 30


def _start(proxy: Any, general: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return proxy(users=[*default_users(), ADMIN], general={**GENERAL, **(general or {})}, **kwargs)


def _console(shardgate: Any, dbname: str = "shardgate", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(shardgate.dsn("admin", "admin-secret", dbname), autocommit=True, **kwargs)


def _show(shardgate: Any, view: str) -> list[dict[str, Any]]:
    with _console(shardgate) as conn:
        cursor = conn.execute(f"SHOW {view}")
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _psql(shardgate: Any, sql: str, dbname: str = "shardgate") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", "-X", "-A", "-F", "|", "-d", shardgate.dsn("admin", "admin-secret", dbname),
                           "-c", sql], capture_output=True, text=True, timeout=PSQL_TIMEOUT_S)


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# ---------------------------------------------------------------- views


def test_psql_prints_every_view_with_pgbouncer_columns(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    expected_headers = {
        "pools": "database|user|cl_active|cl_waiting|sv_active|sv_idle|sv_used|sv_tested|sv_login|",
        "clients": "type|user|database|state|addr|port|local_addr|local_port|connect_time|",
        "servers": "type|user|database|state|addr|port|local_addr|local_port|connect_time|request_time|",
        "stats": "database|total_server_assignment_count|total_wait_time|",
        "databases": "name|host|port|database|",
        "users": "name|auth|pool_size|pool_mode|",
        "config": "key|value|default",
        "shards": "database|shard|host|port|role|healthy",
        "replication": "database|shard|host|port|role|configured_role|healthy|banned|ban_reason|lag_ms|lag_bytes",
        "prepared_transactions": "database|shard|gid|prepared|owner|age_s|decision",
        "version": "version",
    }
    for view, header in expected_headers.items():
        # lower case, a trailing semicolon: psql sends it as typed
        result = _psql(shardgate, f"show {view};")
        assert result.returncode == 0, (view, result.stderr)
        assert result.stdout.splitlines()[0].startswith(header), (view, result.stdout)
    version = _psql(shardgate, "SHOW VERSION").stdout.splitlines()
    assert version[1].startswith("Shardgate ")
    config_rows = _psql(shardgate, "SHOW CONFIG").stdout
    assert "admin_token|********|" in config_rows and TOKEN not in config_rows
    # PgBouncer's tooling connects to database "pgbouncer"
    assert _psql(shardgate, "SHOW POOLS", dbname="pgbouncer").returncode == 0


def test_views_follow_a_real_client(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, databases=database_entries(pg.primary))
    with psycopg.connect(shardgate.dsn(application_name="watched"), autocommit=True) as app:
        backend_pid = app.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        clients = [row for row in _show(shardgate, "CLIENTS") if row["application_name"] == "watched"]
        assert len(clients) == 1
        client = clients[0]
        assert (client["user"], client["database"], client["state"]) == ("app", "app", "active")
        assert client["server_pid"] == backend_pid  # its server is parked with it between transactions
        servers = [row for row in _show(shardgate, "SERVERS") if row["remote_pid"] == backend_pid]
        assert len(servers) == 1 and servers[0]["link"] == client["id"]
        assert (servers[0]["addr"], servers[0]["port"]) == (pg.primary.host, pg.primary.port)
        pools = [row for row in _show(shardgate, "POOLS") if row["user"] == "app" and row["database"] == "app"]
        assert sum(row["cl_active"] for row in pools) == 1
        assert sum(row["sv_active"] + row["sv_idle"] + row["sv_used"] for row in pools) >= 1
        stats = {row["database"]: row for row in _show(shardgate, "STATS")}
        assert stats["app"]["total_server_assignment_count"] >= 1
        users = {row["name"]: row for row in _show(shardgate, "USERS")}
        assert users["app"]["current_client_connections"] == 1 and users["admin"]["admin"] == 1
        assert "password" not in json.dumps(users)
    databases = _show(shardgate, "DATABASES")
    assert [(row["name"], row["host"], row["port"], row["role"]) for row in databases] == [
        ("app", pg.primary.host, pg.primary.port, "primary")]


def test_simple_protocol_and_errors(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    with _console(shardgate, cursor_factory=psycopg.ClientCursor) as conn:
        assert conn.execute("show version").fetchone()[0].startswith("Shardgate")  # type: ignore[index]
        with pytest.raises(psycopg.errors.SyntaxError) as unknown:
            conn.execute("FROBNICATE everything")
        assert "unknown admin console command" in str(unknown.value)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SHOW TABLES")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("KILL somebody")
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            conn.execute("PAUSE nosuchdb")
        # the connection stays usable after each error
        assert conn.execute("SHOW USERS").fetchall()
    # the extended protocol (psycopg's default cursor): answered, parameters refused
    with _console(shardgate) as conn:
        assert conn.execute("SHOW SHARDS;").fetchall()
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SHOW POOLS %s", ["x"])
        assert conn.execute("SHOW VERSION").fetchone()
    psql = _psql(shardgate, "SHOW NONSENSE")
    assert psql.returncode != 0 and "not an admin console view" in psql.stderr


def test_asyncpg_reads_a_view(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import asyncpg

    shardgate = _start(proxy)

    async def main() -> list[Any]:
        conn = await asyncpg.connect(shardgate.dsn("admin", "admin-secret", "shardgate"), timeout=10)
        try:
            return list(await conn.fetch("SHOW POOLS"))
        finally:
            await conn.close()

    rows = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(row["cl_active"], int) for row in rows)


def test_non_admins_are_refused_without_telling_who_exists(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    messages = []
    for user, password in (("app", "app"), ("no-such-user", "x"), ("trustuser", None)):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(shardgate.dsn(user, password, "shardgate"), connect_timeout=10)
        text = str(refused.value)
        assert "access to the admin console denied" in text
        messages.append(text.replace(user, "<user>"))
    assert len(set(messages)) == 1
    with pytest.raises(psycopg.OperationalError) as wrong:
        psycopg.connect(shardgate.dsn("admin", "wrong", "shardgate"), connect_timeout=10)
    assert "password authentication failed" in str(wrong.value)
    # the admin logs in to ordinary databases as any user does
    with psycopg.connect(shardgate.dsn("admin", "admin-secret", "app")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- commands


def test_pause_waits_for_running_transactions_and_holds_new_ones(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, pool_size=2, databases=database_entries(pg.primary))
    done = [0] * 4
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(index: int) -> None:
        try:
            with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
                deadline = time.monotonic() + 40
                while not stop.is_set() and time.monotonic() < deadline and done[index] < 100_000:
                    with conn.transaction():
                        conn.execute("SELECT 1")
                    done[index] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    _wait(lambda: all(count > 5 for count in done))
    # a transaction that is still open holds PAUSE back
    holder = psycopg.connect(shardgate.dsn())
    holder.execute("SELECT 1")  # BEGIN is sent with it: the transaction is open on a server
    console = _console(shardgate)
    paused = threading.Event()
    pause_errors: list[BaseException] = []

    def pause() -> None:
        try:
            console.execute("PAUSE app")
            paused.set()
        except BaseException as exc:
            pause_errors.append(exc)

    pauser = threading.Thread(target=pause, daemon=True)
    pauser.start()
    time.sleep(1.0)
    assert not paused.is_set(), "PAUSE returned while a transaction was running"
    holder.commit()
    pauser.join(15)
    assert paused.is_set() and not pause_errors, pause_errors
    frozen = list(done)
    time.sleep(1.0)
    assert done == frozen, "transactions ran while paused"
    waiting = [row for row in _show(shardgate, "CLIENTS") if row["state"] == "waiting"]
    assert len(waiting) >= 4  # the workers, waiting for a server (not failed)
    assert all(row["paused"] == 1 for row in _show(shardgate, "DATABASES") if row["name"] == "app")
    console.execute("RESUME app")
    _wait(lambda: all(now > then + 5 for now, then in zip(done, frozen, strict=True)))
    stop.set()
    for thread in threads:
        thread.join(30)
    holder.close()
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        console.execute("RESUME app")
    console.close()
    assert errors == []


def test_pause_all_then_resume_from_psql(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    assert _psql(shardgate, "PAUSE").returncode == 0
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(
        psycopg.connect(shardgate.dsn(), autocommit=True).execute("SELECT 42").fetchone()), daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not result  # waits, not failed
    resumed = _psql(shardgate, "RESUME;")
    assert resumed.returncode == 0, resumed.stderr
    thread.join(15)
    assert result == [(42,)]


def test_kill_closes_one_client_with_fatal(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, databases=database_entries(pg.primary))
    with psycopg.connect(shardgate.dsn(application_name="victim"), autocommit=True) as victim, \
            psycopg.connect(shardgate.dsn(application_name="bystander"), autocommit=True) as bystander:
        victim.execute("SELECT 1")
        ids = {row["application_name"]: row["id"] for row in _show(shardgate, "CLIENTS")}
        with _console(shardgate) as console:
            console.execute(f"kill {ids['victim']};")
            with pytest.raises(psycopg.errors.UndefinedObject):
                console.execute("KILL 999999")
        with pytest.raises(psycopg.OperationalError) as killed:
            victim.execute("SELECT 1")
        assert "administrator command" in str(killed.value)
        assert bystander.execute("SELECT 2").fetchone() == (2,)
    assert "victim" not in {row["application_name"] for row in _show(shardgate, "CLIENTS")}


def test_ban_and_unban_a_replica(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, databases=database_entries(pg.primary, pg.replicas),
                       general={"read_write_split": "exclude_primary", "healthcheck_interval_ms": 300})
    banned = pg.replicas[0]

    def read_ports(count: int) -> set[int]:
        with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
            return {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(count)}  # type: ignore[index]

    assert banned.port in read_ports(20)  # round robin over both replicas
    assert _psql(shardgate, f"BAN {banned.host}:{banned.port}").returncode == 0
    time.sleep(0.7)  # a probe or two: they do not lift the ban
    assert banned.port not in read_ports(20)
    row = next(row for row in _show(shardgate, "REPLICATION") if row["port"] == banned.port)
    assert row["banned"] == 1 and "admin console" in row["ban_reason"]
    with _console(shardgate) as console:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            console.execute(f"BAN {pg.primary.host}:{pg.primary.port}")
        with pytest.raises(psycopg.errors.UndefinedObject):
            console.execute("BAN 127.0.0.1:1")
        console.execute(f"UNBAN {banned.host}:{banned.port}")
    assert banned.port in read_ports(20)


def test_reconnect_replaces_servers_once_idle(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, databases=database_entries(pg.primary))
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == first  # parked with it
        conn.execute("BEGIN")
        inside = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert _psql(shardgate, "RECONNECT app").returncode == 0
        # a running transaction keeps its server until it ends
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == inside
        conn.execute("COMMIT")
        assert conn.execute("SELECT pg_backend_pid()").fetchone() != inside
    _wait(lambda: pg.primary.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {inside[0]}") == "0")  # type: ignore[index]


def test_reload_good_and_bad_files(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    late = {"name": "late", "password": "late-pw", "auth": "plain", "server_user": "app", "server_password": "app"}
    shardgate.write_config(users=[*default_users(), ADMIN, late])
    with _console(shardgate) as console:
        console.execute("RELOAD")
        with psycopg.connect(shardgate.dsn("late", "late-pw")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        shardgate.write_config(general={"pool_mode": "sesion"})
        with pytest.raises(psycopg.Error) as refused:
            console.execute("RELOAD")
        assert refused.value.sqlstate == "F0000"
        assert "general.pool_mode" in (refused.value.diag.message_detail or "")
        assert console.execute("SHOW VERSION").fetchone()  # the console goes on, the old config too
    with psycopg.connect(shardgate.dsn("late", "late-pw")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_show_prepared_transactions_lists_shardgate_gids(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    gid = f"shardgate_test_{os.getpid()}"
    with psycopg.connect(pg.primary.dsn(user="app", password="app", dbname="app")) as direct:
        direct.execute("SELECT 1")
        direct.execute(f"PREPARE TRANSACTION '{gid}'")
    other = psycopg.connect(pg.primary.dsn(user="app", password="app", dbname="app"))
    other.execute("SELECT 1")
    other.execute(f"PREPARE TRANSACTION 'other_{os.getpid()}'")
    other.close()
    try:
        rows = _show(shardgate, "PREPARED_TRANSACTIONS")
        assert [(row["database"], row["shard"], row["gid"], row["owner"]) for row in rows] == [("app", 0, gid, "app")]
        assert rows[0]["age_s"] >= 0
    finally:
        pg.primary.psql(f"COMMIT PREPARED '{gid}'", db="app")
        pg.primary.psql(f"ROLLBACK PREPARED 'other_{os.getpid()}'", db="app")


def test_shutdown_stops_the_proxy_gracefully(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as app:
        app.execute("SELECT 1")
        with _console(shardgate) as console:
            console.execute("SHUTDOWN")
            shardgate.process.wait(20)
    assert shardgate.process.returncode == 0
    assert "event=shutdown_complete" in shardgate.stderr_text()


# ---------------------------------------------------------------- HTTP


def test_http_api_views_and_token(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = _start(proxy, databases=database_entries(pg.primary))
    base = shardgate.admin_url
    with psycopg.connect(shardgate.dsn(application_name="over-http"), autocommit=True) as app:
        pid = app.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        for path in ("/api/pools", "/api/clients", "/api/servers", "/metrics", "/api/shards"):
            assert _get(base + path)[0] == 401, path
            assert _get(base + path, "wrong-token-0123456789")[0] == 401, path
        status, body = _get(base + "/api/clients", TOKEN)
        assert status == 200
        clients = json.loads(body)["clients"]
        mine = [row for row in clients if row["application_name"] == "over-http"]
        assert len(mine) == 1 and mine[0]["server_pid"] == pid
        servers = json.loads(_get(base + "/api/servers", TOKEN)[1])["servers"]
        assert [row["link"] for row in servers if row["remote_pid"] == pid] == [mine[0]["id"]]
        pools = json.loads(_get(base + "/api/pools", TOKEN)[1])["pools"]
        assert sum(row["cl_active"] for row in pools if row["database"] == "app") == 1
        # the console's view of the same client, rendered the other way
        console_row = next(row for row in _show(shardgate, "CLIENTS") if row["application_name"] == "over-http")
        assert console_row["id"] == mine[0]["id"] and console_row["server_pid"] == pid
    assert _get(base + "/health") == (200, "ok\n")  # probes need no token
    assert _get(base + "/ready")[0] == 200


def test_http_api_without_token_is_open_on_loopback(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = proxy(users=[*default_users(), ADMIN], general={"admin_users": ["admin"]})
    status, body = _get(shardgate.admin_url + "/api/pools")
    assert status == 200 and json.loads(body) == {"pools": []}
    assert _get(shardgate.admin_url + "/api/nope")[0] == 404


def test_jwt_login_needs_an_admin_role(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    import jwt as pyjwt

    secret = "shardgate-console-test-secret-0123456789abcdef"

    def token(role: str) -> str:
        now = int(time.time())
        return pyjwt.encode({"sub": "ops", "role": role, "iat": now - 5, "exp": now + 600}, secret, algorithm="HS256")

    ops = {"name": "ops", "auth": "jwt", "server_user": "app", "server_password": "app"}
    shardgate = proxy(users=[*default_users(), ops], jwt={"secret": secret},
                      general={"admin_users": ["ops"], "admin_jwt_roles": ["shardgate_admin"]})
    with psycopg.connect(shardgate.dsn("ops", token("shardgate_admin"), "shardgate"), autocommit=True) as conn:
        assert conn.execute("SHOW VERSION").fetchone()[0].startswith("Shardgate")  # type: ignore[index]
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(shardgate.dsn("ops", token("reader"), "shardgate"), connect_timeout=10)
    assert "access to the admin console denied" in str(refused.value)
