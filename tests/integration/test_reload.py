"""Hot reload under load: pgbench (simple and extended protocol, transaction mode) runs through the proxy
while the config file changes and the proxy rereads it (SIGHUP, or watch_config); no transaction may fail.
Each test then checks, with new and with already connected clients, that the change took effect: pool
sizes, pool mode, users and passwords, JWT keys, a database moved to another server, a replica added and
removed, the shard count; a file with errors is rejected, and a new listen address is reported as needing a
restart."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import psycopg
import pytest

from localpg import PgServer, Topology, free_port
from tests.harness import (
    ProxyFactory,
    ProxyProcess,
    database_entries,
    default_users,
    direct_mode,
    render_config,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(direct_mode(), reason="reloads the proxy's config"),
]

PGBENCH_SECONDS = 3
CHANGE_AFTER_S = 1.0
RELOAD_TIMEOUT_S = 10.0
SECRET_OLD = "reload-test-secret-old-0123456789abcdef"
SECRET_NEW = "reload-test-secret-new-0123456789abcdef"
AUDIENCE = "shardgate-reload"
# Point reads and writes by sharding key, for a sharded database (pgbench's own tables are not sharded).
SHARD_SCRIPT = """\\set tid random(1, 100000)
SELECT note FROM orders WHERE tenant_id = :tid;
UPDATE orders SET amount = amount + 1 WHERE tenant_id = :tid;
"""
ORDERS = "CREATE TABLE orders (tenant_id bigint NOT NULL, note text, amount int NOT NULL DEFAULT 0)"
SHARDED = """
[[sharded_tables]]
database = "app"
table = "orders"
column = "tenant_id"
data_type = "bigint"
method = "hash"
"""


# -- fixtures -------------------------------------------------------------------------------------


def _env(password: str = "app") -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    return env


def _pgbench_init(server: PgServer) -> None:
    result = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", server.host, "-p", str(server.port),
                             "-U", "app", "app"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def servers(pg: Topology) -> Iterator[dict[str, PgServer]]:
    """The shared primary and a replica, plus two primaries of this module's own; pgbench's tables on
    both the primary and `other` (where a database moves), `orders` on the three primaries (shards)."""
    assert pg.primary is not None
    extra = {name: pg.add_server(f"reload_{name}") for name in ("other", "third")}
    found = {"primary": pg.primary, "replica": pg.replicas[0], **extra}
    try:
        for name in ("primary", "other"):
            _pgbench_init(found[name])
        for name in ("primary", "other", "third"):
            with psycopg.connect(found[name].dsn(password="app"), autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS orders")
                conn.execute(ORDERS)
        yield found
    finally:
        with psycopg.connect(pg.primary.dsn(password="app"), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS orders, pgbench_accounts, pgbench_branches, pgbench_tellers,"
                         " pgbench_history")
        for server in extra.values():
            server.stop()


# -- helpers --------------------------------------------------------------------------------------


def _pgbench(proxy: ProxyProcess, protocol: str, script: Path | None, clients: int,
             select_only: bool) -> subprocess.Popen[str]:
    command = ["pgbench", "-n", "-T", str(PGBENCH_SECONDS), "-c", str(clients), "-M", protocol]
    if script is not None:
        command += ["-f", str(script)]
    if select_only:
        command.append("-S")
    command += ["-h", proxy.host, "-p", str(proxy.port), "-U", "app", "app"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def under_load(proxy: ProxyProcess, change: Callable[[], None], *, script: Path | None = None,
               clients: int = 2, select_only: bool = False) -> None:
    """pgbench (TPC-B unless told otherwise) with the simple and the extended protocol at once, `change`
    made a second into the run; both must end with status 0, transactions processed and none failed."""
    runs = {protocol: _pgbench(proxy, protocol, script, clients, select_only) for protocol in ("simple", "extended")}
    try:
        time.sleep(CHANGE_AFTER_S)
        change()
    finally:
        outputs = {protocol: run.communicate(timeout=PGBENCH_SECONDS + 30) for protocol, run in runs.items()}
    for protocol, (stdout, stderr) in outputs.items():
        run = runs[protocol]
        assert run.returncode == 0, f"-M {protocol}: {stdout}\n{stderr}\n{proxy.stderr_text()[-4000:]}"
        assert "number of failed transactions: 0 " in stdout, f"-M {protocol}: {stdout}"
        processed = re.search(r"number of transactions actually processed: (\d+)", stdout)
        assert processed is not None and int(processed.group(1)) > 0, f"-M {protocol}: {stdout}"


def _count(proxy: ProxyProcess, marker: str) -> int:
    return proxy.stderr_text().count(marker)


def reload(proxy: ProxyProcess, *, expect: str = "event=reloaded", **parts: Any) -> None:
    """Rewrite the config (parts as ProxyProcess.write_config takes them), SIGHUP, and wait for `expect`."""
    before = _count(proxy, expect)
    if parts:
        proxy.write_config(**parts)
    proxy.reload()
    _wait_for(lambda: _count(proxy, expect) > before, f"{expect} in the proxy's log", proxy)


def _wait_for(condition: Callable[[], bool], what: str, proxy: ProxyProcess,
              timeout_s: float = RELOAD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s\n{proxy.stderr_text()[-4000:]}"
        time.sleep(0.05)


def _port(dsn: str, sql: str = "SELECT inet_server_port()") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def _pool_servers(proxy: ProxyProcess, prefix: str) -> float:
    """Server connections (idle, active, connecting) of the pools whose name starts with `prefix`."""
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(r'shardgate_pool_servers\{pool="([^"]+)",state="[a-z]+"\} ([0-9.e+]+)$', line)
        if match and match.group(1).startswith(prefix):
            total += float(match.group(2))
    return total


def _backends(server: PgServer) -> int:
    """Sessions of the role `app` on `server`: the proxy's pooled server connections in these tests (its
    health probe's connection, application_name shardgate-monitor, not counted)."""
    return int(server.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
                           " AND application_name IS DISTINCT FROM 'shardgate-monitor'"))


def _refused(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10).close()
    return str(info.value)


def _token(secret: str) -> str:
    now = int(time.time())
    return pyjwt.encode({"sub": "reloader", "aud": AUDIENCE, "iat": now - 5, "exp": now + 600}, secret,
                        algorithm="HS256")


def _shard_of(server: PgServer, tenant: int, modulus: int) -> int:
    """The remainder PostgreSQL's own hash partitioning gives `tenant` for `modulus` partitions."""
    with psycopg.connect(server.dsn(password="app"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS reload_probe_{modulus} (k bigint) PARTITION BY HASH (k)")
        for remainder in range(modulus):
            row = conn.execute(f"SELECT satisfies_hash_partition('reload_probe_{modulus}'::regclass, %s, %s,"
                               " %s::bigint)", (modulus, remainder, tenant)).fetchone()
            if row is not None and row[0]:
                return remainder
    raise AssertionError(f"no remainder for {tenant}")


def _holders(shards: list[PgServer], tenant: int) -> list[int]:
    """The shards whose `orders` has a row of `tenant`."""
    found = []
    for index, server in enumerate(shards):
        with psycopg.connect(server.dsn(password="app"), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM orders WHERE tenant_id = %s", (tenant,)).fetchone()
            if row is not None and row[0]:
                found.append(index)
    return found


def _start(proxy: ProxyFactory, **kwargs: Any) -> ProxyProcess:
    started = proxy(**kwargs)
    assert isinstance(started, ProxyProcess)
    return started


# -- pools ----------------------------------------------------------------------------------------


def test_pool_size_up_then_down(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    primary = servers["primary"]
    shardgate = _start(proxy, pool_size=2, databases=database_entries(primary))
    seen: list[float] = []

    def grow_then_shrink() -> None:
        reload(shardgate, general={"default_pool_size": 6})
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:  # six clients waiting on two servers: the pool grows at once
            seen.append(_pool_servers(shardgate, "app@app/"))
            time.sleep(0.05)
        reload(shardgate, general={"default_pool_size": 1})

    under_load(shardgate, grow_then_shrink, clients=3)
    assert max(seen) > 2, seen
    # the surplus is closed: idle ones at the reload, busy ones when they came back
    _wait_for(lambda: _pool_servers(shardgate, "app@app/") <= 1, "pool of at most one server", shardgate)
    _wait_for(lambda: _backends(primary) <= 1, "one server connection left on the primary", shardgate)
    assert _port(shardgate.dsn()) == primary.port


def test_pool_mode_applies_to_new_clients(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]))
    # pgbench's clients logged in in transaction mode and keep it: their BEGIN ... END never fail
    under_load(shardgate, lambda: reload(shardgate, general={"pool_mode": "statement"}))
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        assert "statement pool mode" in str(info.value)
    reload(shardgate, general={"pool_mode": "transaction"})
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        conn.execute("BEGIN")
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        conn.execute("COMMIT")


# -- users and keys -------------------------------------------------------------------------------


def test_users_added_removed_and_password_changed(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]))
    users = default_users()
    held = psycopg.connect(shardgate.dsn("md5user", "md5pw"), autocommit=True)
    try:
        changed = [dict(users[0], password="app-new"), *users[2:],
                   {"name": "newbie", "password": "newbie-pw", "auth": "scram-sha-256", "server_user": "app",
                    "server_password": "app"}]
        under_load(shardgate, lambda: reload(shardgate, users=changed))
        assert "password authentication failed" in _refused(shardgate.dsn("app", "app"))
        assert _port(shardgate.dsn("app", "app-new")) == servers["primary"].port
        assert _port(shardgate.dsn("newbie", "newbie-pw")) == servers["primary"].port
        assert "md5user" in _refused(shardgate.dsn("md5user", "md5pw"))
        # a removed user's connected client is not dropped
        assert held.execute("SELECT current_user").fetchone() == ("md5user",)
    finally:
        held.close()


def test_jwt_key_rotated(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    jwt_user = {"name": "jwtuser", "auth": "jwt", "server_user": "app", "server_password": "app"}
    # audience as one string, as PostgREST's jwt-aud
    settings = {"algorithms": ["HS256"], "secret": SECRET_OLD, "audience": AUDIENCE}
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]),
                       users=[*default_users(), jwt_user], jwt=settings)
    held = psycopg.connect(shardgate.dsn("jwtuser", _token(SECRET_OLD)), autocommit=True)
    try:
        under_load(shardgate, lambda: reload(shardgate, jwt=dict(settings, secret=SECRET_NEW)))
        message = _refused(shardgate.dsn("jwtuser", _token(SECRET_OLD)))
        assert "signature" in message.lower(), message
        assert _port(shardgate.dsn("jwtuser", _token(SECRET_NEW))) == servers["primary"].port
        # a client logged in with a token the old key signed keeps its session
        assert held.execute("SELECT 1").fetchone() == (1,)
    finally:
        held.close()


# -- servers --------------------------------------------------------------------------------------


def test_database_moved_to_another_server(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    primary, other = servers["primary"], servers["other"]
    shardgate = _start(proxy, pool_size=4, databases=database_entries(primary))
    held = psycopg.connect(shardgate.dsn())  # not autocommit: its transaction spans the reload
    try:
        assert held.execute("SELECT inet_server_port()").fetchone() == (primary.port,)

        def move() -> None:
            reload(shardgate, databases=database_entries(other))
            # the transaction in flight finishes on the server it started on
            assert held.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
            held.commit()

        under_load(shardgate, move)
        assert held.execute("SELECT inet_server_port()").fetchone() == (other.port,)
        held.commit()
        assert _port(shardgate.dsn()) == other.port
        # every server connection to the old server was closed once idle
        _wait_for(lambda: _backends(primary) == 0, "no proxy connection left on the old server", shardgate)
        assert _backends(other) > 0
    finally:
        held.close()


def test_replica_added_then_removed(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    primary, replica = servers["primary"], servers["replica"]
    shardgate = _start(proxy, pool_size=4, databases=database_entries(primary),
                       general={"read_write_split": "exclude_primary"})
    assert _port(shardgate.dsn()) == primary.port
    before = psycopg.connect(shardgate.dsn(), autocommit=True)  # logged in while there is no replica
    in_transaction = psycopg.connect(shardgate.dsn())
    assert before.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
    assert in_transaction.execute("SELECT inet_server_port()").fetchone() == (primary.port,)  # BEGIN ... open
    under_load(shardgate, lambda: reload(shardgate, databases=database_entries(primary, [replica])))
    reader = psycopg.connect(shardgate.dsn(), autocommit=True)
    try:
        assert reader.execute("SELECT inet_server_port()").fetchone() == (replica.port,)
        # the open transaction finishes where it started; then both older sessions split their reads too
        assert in_transaction.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
        in_transaction.commit()
        in_transaction.autocommit = True  # a plain read outside a transaction block, as a split routes it
        assert in_transaction.execute("SELECT inet_server_port()").fetchone() == (replica.port,)
        assert before.execute("SELECT inet_server_port()").fetchone() == (replica.port,)
        before.close()
        in_transaction.close()
        # pgbench's clients now read from the replica; it goes away under them
        under_load(shardgate, lambda: reload(shardgate, databases=database_entries(primary)), select_only=True)
        # the connected reader's next read goes where the new config says
        assert reader.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
        assert _port(shardgate.dsn()) == primary.port
    finally:
        reader.close()


def test_shard_count_changed(proxy: ProxyFactory, servers: dict[str, PgServer], tmp_path: Path) -> None:
    shards = [servers["primary"], servers["other"], servers["third"]]
    for server in shards:
        with psycopg.connect(server.dsn(password="app"), autocommit=True) as conn:
            conn.execute("TRUNCATE orders")
    # a tenant that lands on the new shard 2 once there are three
    tenant = next(t for t in range(1, 200) if _shard_of(shards[0], t, 3) == 2)

    def layout(count: int) -> list[dict[str, Any]]:
        return [entry for index in range(count) for entry in database_entries(shards[index], shard=index)]

    shardgate = _start(proxy, pool_size=4, databases=layout(2), extra_toml=SHARDED)
    script = tmp_path / "orders.sql"
    script.write_text(SHARD_SCRIPT)
    held = psycopg.connect(shardgate.dsn(), autocommit=True)
    try:
        held.execute("INSERT INTO orders (tenant_id, note) VALUES (%s, 'before')", (tenant,))
        assert _holders(shards, tenant) == [_shard_of(shards[0], tenant, 2)]
        for _ in range(3):  # the same read again and again: the session routes the repeats by the key alone
            assert held.execute(f"SELECT note FROM orders WHERE tenant_id = {tenant}").fetchall() == [("before",)]
        under_load(shardgate, lambda: reload(shardgate, databases=layout(3)), script=script)
        # a client connected before the reload, and a new one, place the key by three shards now
        held.execute("INSERT INTO orders (tenant_id, note) VALUES (%s, 'after')", (tenant + 100_000,))
        with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO orders (tenant_id, note) VALUES (%s, 'after')", (tenant,))
        # the read it repeated before the reload follows the new shard map (shard 2 of three) too
        assert held.execute(f"SELECT note FROM orders WHERE tenant_id = {tenant}").fetchall() == [("after",)]
        assert _holders(shards, tenant + 100_000) == [_shard_of(shards[0], tenant + 100_000, 3)]
        assert sorted(_holders(shards, tenant)) == sorted({_shard_of(shards[0], tenant, 2), 2})
        row = held.execute("SELECT count(*) FROM orders WHERE tenant_id = %s", (tenant,)).fetchone()
        assert row == (1,)  # read from shard 2 of three: the row written there after the reload

    finally:
        held.close()


# -- rejected files, watching, restart-only settings ----------------------------------------------


def test_bad_file_is_rejected_and_traffic_goes_on(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]))
    good = shardgate.config_path.read_text()
    bad = good.replace("default_pool_size = 4", "default_pool_size = 0").replace(
        'auth = "md5"', 'auth = "md55"').replace(f"port = {servers['primary'].port}", "port = 70000")
    assert bad.count("= 0\n") >= 1 and "md55" in bad and "70000" in bad

    def break_it() -> None:
        shardgate.config_path.write_text(bad + "\npool_sise = 3\n")
        reload(shardgate, expect="event=reload_failed")

    under_load(shardgate, break_it)
    log = shardgate.stderr_text()
    for key_path in ("general.default_pool_size", "users[1].auth", "databases[0].port", "pool_sise"):
        assert re.search(rf"event=reload_problem .*{re.escape(key_path)}", log), (key_path, log[-3000:])
    # the running config stays: same server, same users
    assert _port(shardgate.dsn("md5user", "md5pw")) == servers["primary"].port
    shardgate.config_path.write_text(good)
    reload(shardgate)


def test_watch_config_picks_up_a_change(proxy: ProxyFactory, servers: dict[str, PgServer]) -> None:
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]),
                       general={"watch_config": True})
    newbie = {"name": "newbie", "password": "newbie-pw", "auth": "scram-sha-256", "server_user": "app",
              "server_password": "app"}
    assert "newbie" in _refused(shardgate.dsn("newbie", "newbie-pw"))
    before = _count(shardgate, "event=reloaded")
    shardgate.write_config(users=[*default_users(), newbie])  # no signal: the watch sees the new file
    _wait_for(lambda: _count(shardgate, "event=reloaded") > before, "reload from watch_config", shardgate)
    assert _port(shardgate.dsn("newbie", "newbie-pw")) == servers["primary"].port


def test_listen_change_needs_a_restart_and_the_rest_applies(proxy: ProxyFactory,
                                                            servers: dict[str, PgServer]) -> None:
    shardgate = _start(proxy, pool_size=4, databases=database_entries(servers["primary"]))
    new_listen = f"127.0.0.1:{free_port()}"
    newbie = {"name": "newbie", "password": "newbie-pw", "auth": "scram-sha-256", "server_user": "app",
              "server_password": "app"}
    general = dict(shardgate.general, listen=new_listen)
    shardgate.config_path.write_text(render_config(general, [*default_users(), newbie], shardgate.databases))
    under_load(shardgate, lambda: reload(shardgate))
    log = shardgate.stderr_text()
    assert re.search(rf'event=reload_needs_restart .*general\.listen: "{new_listen}" needs a restart', log), log[-3000:]
    # still on the old address, and the new user (the rest of the file) applied
    assert _port(shardgate.dsn("newbie", "newbie-pw")) == servers["primary"].port
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://app:app@{new_listen}/app", connect_timeout=3).close()
