"""Databases and users not in the config, against real PostgreSQL: the wildcard database entry (a pool per
database asked for, closed once idle) and auth_user + auth_query (SCRAM passthrough, md5), with psycopg,
asyncpg and psql."""

from __future__ import annotations

import asyncio
import json
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

from localpg import PgServer, Topology, free_port
from tests.harness import ProxyFactory, ProxyProcess, create_topology, destroy_topology, direct_mode
from tests.tls_certs import CertificateAuthority

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(direct_mode(), reason="checks what the proxy does for names its config lacks"),
]

CONNECT_TIMEOUT_S = 10
# The auth_user: logs in with its config password to read pg_shadow (a superuser, as PgBouncer's docs use).
AUTH_USER = {"name": "postgres", "password": "postgres", "auth": "scram-sha-256"}
APP_USER = {"name": "app", "password": "app", "auth": "scram-sha-256"}


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    """A primary of this module's own whose pg_hba.conf lets any role in with its password from loopback
    (method md5: SCRAM for a SCRAM verifier, md5 for an md5 hash), so roles made by the tests can log in."""
    topology: Topology = create_topology(replicas=0)
    try:
        primary = topology.primary
        assert primary is not None
        with (primary.datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host    all          all          127.0.0.1/32  md5\n")
        primary.psql("SELECT pg_reload_conf()")
        yield primary
    finally:
        destroy_topology(topology)


@pytest.fixture
def start(server: PgServer, proxy: ProxyFactory) -> Callable[..., ProxyProcess]:
    """Start a proxy in front of `server` with the wildcard and auth_query on, unless told otherwise."""

    def starter(*, wildcard: bool = True, general: dict[str, Any] | None = None,
                users: list[dict[str, Any]] | None = None,
                databases: list[dict[str, Any]] | None = None, extra_toml: str = "") -> ProxyProcess:
        entries = databases if databases is not None else [
            {"name": "app", "host": server.host, "port": server.port, "database_name": "app"}]
        if wildcard:
            entries = [*entries, {"name": "*", "host": server.host, "port": server.port}]
        settings: dict[str, Any] = {"auth_user": "postgres", "auth_query_cache_s": 30.0}
        settings.update(general or {})
        started = proxy(pool_mode="transaction", users=users if users is not None else [APP_USER, AUTH_USER],
                        databases=entries, general=settings, extra_toml=extra_toml)
        assert isinstance(started, ProxyProcess)
        return started

    return starter


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def connect(shardgate: ProxyProcess, user: str, password: str, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(host=shardgate.host, port=shardgate.port, user=user, password=password, dbname=dbname,
                           autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, sslmode="disable")


def refusal(shardgate: ProxyProcess, user: str, password: str, dbname: str = "app") -> asyncpg.PostgresError:
    """The error a login is refused with (asyncpg reports its SQLSTATE; psycopg does not at connect)."""

    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user=user, password=password,
                                         database=dbname, ssl=False, timeout=CONNECT_TIMEOUT_S)
        except asyncpg.PostgresError as error:
            return error
        await conn.close()
        raise AssertionError(f"the proxy let {user} into {dbname}")

    return run_async(attempt())


def psycopg_refusal(shardgate: ProxyProcess, user: str, password: str, dbname: str = "app") -> str:
    try:
        conn = connect(shardgate, user, password, dbname)
    except psycopg.OperationalError as error:
        return str(error)
    conn.close()
    raise AssertionError(f"the proxy let {user} into {dbname}")


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def create_role(server: PgServer, name: str, password: str, encryption: str) -> None:
    server.psql(f"SET password_encryption = '{encryption}'; CREATE ROLE {name} LOGIN PASSWORD '{password}'")


def api(shardgate: ProxyProcess, view: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{shardgate.admin_url}/api/{view}", timeout=10) as response:
        records: list[dict[str, Any]] = json.loads(response.read())[view]
    return records


def metric(shardgate: ProxyProcess, name: str) -> float:
    with urllib.request.urlopen(shardgate.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def backends(server: PgServer, where: str) -> int:
    return int(server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}"))


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


# --- the wildcard database -------------------------------------------------------------------


def test_wildcard_serves_a_database_created_on_the_fly(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    shardgate = start()
    name = unique("testdb")
    with connect(shardgate, "app", "app", "app") as conn:  # CREATE DATABASE through the proxy
        conn.execute(f"CREATE DATABASE {name}")
    with connect(shardgate, "app", "app", name) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
    # psql, as a person would use it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = "app"
    out = subprocess.run([str(server.bin_dir / "psql"), "-X", "-At",
                          "-h", shardgate.host, "-p", str(shardgate.port), "-U", "app", "-d", name,
                          "-c", "SELECT current_database(), count(*) FROM t"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{name}|2"
    # the server saw the proxy's logins to the new database, not to the wildcard's name
    assert backends(server, f"datname = '{name}' AND usename = 'app'") >= 1
    assert backends(server, "datname = '*'") == 0
    pools = {(row["database"], row["user"]) for row in api(shardgate, "pools")}
    assert (name, "app") in pools


def test_an_explicit_entry_wins_over_the_wildcard(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    # "alias" is configured to be database app on the server; without the entry it would not exist
    shardgate = start(databases=[
        {"name": "app", "host": server.host, "port": server.port, "database_name": "app"},
        {"name": "alias", "host": server.host, "port": server.port, "database_name": "app"}])
    with connect(shardgate, "app", "app", "alias") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("app",)


def test_a_database_the_server_lacks_gets_postgresqls_3d000(start: Callable[..., ProxyProcess]) -> None:
    shardgate = start()
    started = time.monotonic()
    text = psycopg_refusal(shardgate, "app", "app", "no_such_db_here")
    assert time.monotonic() - started < 15
    assert 'FATAL:  database "no_such_db_here" does not exist' in text
    error = refusal(shardgate, "app", "app", "no_such_db_here")
    assert error.sqlstate == "3D000"
    with connect(shardgate, "app", "app", "app") as conn:  # others are served as before
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_without_the_wildcard_an_unknown_database_is_refused(start: Callable[..., ProxyProcess]) -> None:
    shardgate = start(wildcard=False)
    error = refusal(shardgate, "app", "app", "postgres")
    assert error.sqlstate == "3D000"


def test_an_idle_wildcard_pool_is_closed(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    name = unique("idledb")
    server.psql(f"CREATE DATABASE {name}")
    shardgate = start(general={"autodb_idle_timeout_s": 2.0})
    conn = connect(shardgate, "app", "app", name)
    conn.execute("SELECT 1")
    assert (name, "app") in {(row["database"], row["user"]) for row in api(shardgate, "pools")}
    assert metric(shardgate, "shardgate_autodb_databases") == 1
    time.sleep(3.5)  # a connected client keeps the pool however long it idles
    assert (name, "app") in {(row["database"], row["user"]) for row in api(shardgate, "pools")}
    conn.close()
    assert wait_until(lambda: all(row["database"] != name for row in api(shardgate, "pools")), 15)
    assert wait_until(lambda: backends(server, f"datname = '{name}'") == 0, 10)
    assert metric(shardgate, "shardgate_autodb_databases") == 0
    server.psql(f"DROP DATABASE {name}")  # nothing of the proxy's holds it
    # and a new client makes it again (here: for a database that is gone now)
    assert refusal(shardgate, "app", "app", name).sqlstate == "3D000"


# --- auth_query ------------------------------------------------------------------------------


@pytest.mark.parametrize("encryption", ["scram-sha-256", "md5"])
def test_a_role_only_postgresql_knows_logs_in(server: PgServer, start: Callable[..., ProxyProcess],
                                              encryption: str) -> None:
    role = unique("role")
    create_role(server, role, "s3cret-pw", encryption)
    stored = server.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
    assert stored.startswith("SCRAM-SHA-256$" if encryption == "scram-sha-256" else "md5")
    server.psql(f"GRANT ALL ON SCHEMA public TO {role}", db="app")
    shardgate = start(general={"default_pool_size": 2})
    with connect(shardgate, role, "s3cret-pw", "app") as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == (role, role)
        conn.execute(f"CREATE TABLE {role}_t (id int)")
        # transaction mode: each transaction on whichever of the pool's servers, all logged in as the role
        for value in range(5):
            with conn.transaction():
                conn.execute(f"INSERT INTO {role}_t VALUES (%s)", (value,))
        assert conn.execute(f"SELECT count(*) FROM {role}_t").fetchone() == (5,)

    async def with_asyncpg() -> tuple[int, str]:
        pool = await asyncpg.create_pool(host=shardgate.host, port=shardgate.port, user=role, password="s3cret-pw",
                                         database="app", ssl=False, min_size=3, max_size=3, timeout=CONNECT_TIMEOUT_S)
        try:
            counts = await asyncio.gather(*(pool.fetchval(f"SELECT count(*) FROM {role}_t") for _ in range(6)))
            who = await pool.fetchval("SELECT current_user")
            return int(sum(counts)), str(who)
        finally:
            await pool.close()

    assert run_async(with_asyncpg()) == (30, role)
    # the server logins were the role's own: SCRAM passthrough (or the md5 hash), no password in the config
    assert backends(server, f"usename = '{role}'") >= 1
    assert metric(shardgate, "shardgate_auth_query_lookups") >= 1
    assert metric(shardgate, "shardgate_auth_query_cache_hits") >= 1


def test_wrong_password_and_unknown_role_get_the_same_28p01(server: PgServer,
                                                            start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "right-pw", "scram-sha-256")
    md5_role = unique("md5role")
    create_role(server, md5_role, "right-pw", "md5")
    shardgate = start()
    wrong = refusal(shardgate, role, "wrong-pw")
    unknown = refusal(shardgate, "nobody_at_all", "whatever")
    wrong_md5 = refusal(shardgate, md5_role, "wrong-pw")
    assert wrong.sqlstate == unknown.sqlstate == wrong_md5.sqlstate == "28P01"
    # the answer does not tell a missing role from a wrong password
    assert str(wrong).replace(role, "X") == str(unknown).replace("nobody_at_all", "X")
    assert (psycopg_refusal(shardgate, role, "wrong-pw").replace(role, "X")
            == psycopg_refusal(shardgate, "nobody_at_all", "x").replace("nobody_at_all", "X"))
    with connect(shardgate, role, "right-pw", "app") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "auth_failed" in shardgate.stderr_text()


def test_a_dropped_role_is_refused_once_the_cache_expires(server: PgServer,
                                                         start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw-1", "scram-sha-256")
    shardgate = start(general={"auth_query_cache_s": 1.0})
    with connect(shardgate, role, "pw-1", "app") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    server.psql(f"DROP ROLE {role}")
    time.sleep(1.5)
    assert refusal(shardgate, role, "pw-1").sqlstate == "28P01"


@pytest.mark.parametrize("encryption", ["scram-sha-256", "md5"])
def test_a_new_password_is_taken_once_the_cache_expires(server: PgServer, start: Callable[..., ProxyProcess],
                                                       encryption: str) -> None:
    role = unique("role")
    create_role(server, role, "old-pw", encryption)
    shardgate = start(general={"auth_query_cache_s": 1.0})
    with connect(shardgate, role, "old-pw", "app") as conn:
        conn.execute("SELECT 1")
    server.psql(f"SET password_encryption = '{encryption}'; ALTER ROLE {role} PASSWORD 'new-pw'")
    server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    time.sleep(1.5)
    assert refusal(shardgate, role, "old-pw").sqlstate == "28P01"
    with connect(shardgate, role, "new-pw", "app") as conn:  # new servers log in with the new keys
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_pg_authid_query(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw", "scram-sha-256")
    shardgate = start(general={
        "auth_query": "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 AND rolcanlogin"})
    with connect(shardgate, role, "pw", "app") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_a_misconfigured_auth_user_is_refused_clearly(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw", "scram-sha-256")
    shardgate = start(users=[APP_USER, {**AUTH_USER, "server_password": "not-its-password"}])
    started = time.monotonic()
    error = refusal(shardgate, role, "pw")
    assert time.monotonic() - started < 15
    assert error.sqlstate == "28000"
    assert "auth_query" in str(error)
    assert wait_until(lambda: "event=auth_query_failed" in shardgate.stderr_text(), 5)
    assert "not-its-password" not in shardgate.stderr_text()
    with connect(shardgate, "app", "app", "app") as conn:  # configured users are not affected
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # a query that cannot run (no such table) is refused the same way
    other = start(general={"auth_query": "SELECT usename, passwd FROM no_such_table WHERE usename = $1"})
    assert refusal(other, role, "pw").sqlstate == "28000"
    assert metric(other, "shardgate_auth_query_failures") >= 1


# --- both ------------------------------------------------------------------------------------


def test_create_database_and_role_then_connect(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    """What test suites do: CREATE DATABASE x; CREATE ROLE y; then connect as y to x."""
    database, role = unique("suite_db"), unique("suite_role")
    shardgate = start()
    with connect(shardgate, "postgres", "postgres", "app") as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'suite-pw'")
        conn.execute(f"CREATE DATABASE {database} OWNER {role}")
    with connect(shardgate, role, "suite-pw", database) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == (database, role)
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
        with conn.transaction():
            conn.execute("INSERT INTO items SELECT generate_series(1, 10)")

    async def with_asyncpg() -> int:
        conn = await asyncpg.connect(host=shardgate.host, port=shardgate.port, user=role, password="suite-pw",
                                     database=database, ssl=False, timeout=CONNECT_TIMEOUT_S)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM items WHERE id > $1", 3))
        finally:
            await conn.close()

    assert run_async(with_asyncpg()) == 7
    assert backends(server, f"datname = '{database}' AND usename = '{role}'") >= 1


def test_auth_failure_cooloff_applies_to_users_of_auth_query(server: PgServer,
                                                            start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "right-pw", "scram-sha-256")
    shardgate = start(general={"auth_failure_limit": 3, "auth_failure_exempt": [], "auth_failure_cooloff_s": 60})
    for _ in range(3):
        assert refusal(shardgate, role, "wrong-pw").sqlstate == "28P01"
    cooled = refusal(shardgate, role, "right-pw")  # even the right password, during the cool-off
    assert cooled.sqlstate == "53300" and "too many authentication failures" in str(cooled)
    for _ in range(3):  # a name PostgreSQL does not know counts the same
        refusal(shardgate, "ghost_" + role, "x")
    assert refusal(shardgate, "ghost_" + role, "x").sqlstate == "53300"


def test_session_mode(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw", "scram-sha-256")
    shardgate = start(general={"pool_mode": "session"})
    with connect(shardgate, role, "pw", "app") as conn:
        conn.execute("SET application_name = 'kept'")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert conn.execute("SELECT pg_backend_pid(), current_setting('application_name'), current_user"
                            ).fetchone() == (pid[0] if pid else None, "kept", role)
        assert conn.info.backend_pid == (pid[0] if pid else None)  # session mode passes the real pid through


def test_a_reload_without_the_wildcard_refuses_its_databases(server: PgServer,
                                                            start: Callable[..., ProxyProcess]) -> None:
    name = unique("reloaddb")
    server.psql(f"CREATE DATABASE {name}")
    shardgate = start()
    with connect(shardgate, "app", "app", name) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
    shardgate.write_config(databases=[{"name": "app", "host": server.host, "port": server.port,
                                       "database_name": "app"}])
    shardgate.reload()
    assert wait_until(lambda: "autodb_dropped" in shardgate.stderr_text() or "autodb_closed" in
                      shardgate.stderr_text(), 10), shardgate.stderr_text()[-2000:]
    assert refusal(shardgate, "app", "app", name).sqlstate == "3D000"
    assert wait_until(lambda: backends(server, f"datname = '{name}'") == 0, 10)


def test_channel_binding_over_tls(server: PgServer, start: Callable[..., ProxyProcess],
                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """SCRAM-SHA-256-PLUS toward the client, the ClientKey passed through toward PostgreSQL all the same."""
    directory = tmp_path_factory.mktemp("pki")
    proxy_cert = CertificateAuthority.create(directory / "ca").issue(directory / "proxy", "localhost",
                                                                    dns=("localhost",), ips=("127.0.0.1",))
    role = unique("role")
    create_role(server, role, "bound-pw", "scram-sha-256")
    shardgate = start(extra_toml=f'[tls]\nmode = "require"\ncert_file = "{proxy_cert.cert}"\n'
                                 f'key_file = "{proxy_cert.key}"\n')
    with psycopg.connect(host=shardgate.host, port=shardgate.port, user=role, password="bound-pw", dbname="app",
                         sslmode="require", channel_binding="require", connect_timeout=CONNECT_TIMEOUT_S) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_an_unreachable_auth_database_gives_08006(server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw", "scram-sha-256")
    nothing_there = free_port()
    shardgate = start(general={"auth_dbname": "lookups", "server_connect_timeout_ms": 2000}, databases=[
        {"name": "app", "host": server.host, "port": server.port, "database_name": "app"},
        {"name": "lookups", "host": "127.0.0.1", "port": nothing_there, "database_name": "postgres"}])
    started = time.monotonic()
    error = refusal(shardgate, role, "pw")
    assert time.monotonic() - started < 15
    assert error.sqlstate == "08006"
    assert f'cannot look up user "{role}"' in str(error)
    assert "event=auth_query_failed" in shardgate.stderr_text()


def test_the_lookup_ignores_what_a_client_of_auth_user_left_on_its_server(
        server: PgServer, start: Callable[..., ProxyProcess]) -> None:
    role = unique("role")
    create_role(server, role, "pw", "scram-sha-256")
    # one server per pool: the lookup gets the very server the auth_user's client switched role on
    shardgate = start(general={"default_pool_size": 1})
    with connect(shardgate, "postgres", "postgres", "app") as conn:
        conn.execute("SET ROLE app")  # app may not read pg_shadow
        conn.execute("SET search_path = nowhere")
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    with connect(shardgate, role, "pw", "app") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    with connect(shardgate, "postgres", "postgres", "app") as conn:  # the auth_user's clients see their own state
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
