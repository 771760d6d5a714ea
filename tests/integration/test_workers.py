"""`workers = N`: N processes on one SO_REUSEPORT port behind a supervisor. Connections land on every worker,
the pool size is a global limit toward PostgreSQL, a cancel reaches its client whichever worker receives it,
one scrape answers for the instance, SIGHUP and SIGTERM reach every worker, and a killed worker comes back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localpg import Topology
from tests.harness import ProxyFactory, ProxyProcess, database_entries, default_users, wait_until

pytestmark = pytest.mark.timeout(180)

WORKERS = 2


def http_get(proxy: ProxyProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(proxy.admin_url + path, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except urllib.error.URLError:  # not listening (yet, or any more)
        return 0, b""


def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(proxy, "/metrics")
    assert status == 200, body
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def owner(conn: psycopg.Connection[Any]) -> int:
    """The worker serving a client: its BackendKeyData process id names it (pid mod workers)."""
    return conn.info.backend_pid % WORKERS


def connect_to_each_worker(proxy: ProxyProcess, **kwargs: Any) -> dict[int, psycopg.Connection[Any]]:
    """One open connection per worker (new connections until each worker has had one); the rest closed."""
    found: dict[int, psycopg.Connection[Any]] = {}
    for _ in range(200):
        conn = psycopg.connect(proxy.dsn(connect_timeout=10), **kwargs)
        if owner(conn) in found:
            conn.close()
        else:
            found[owner(conn)] = conn
        if len(found) == WORKERS:
            return found
    raise AssertionError(f"200 connections landed on workers {sorted(found)} only")


def worker_pids(proxy: ProxyProcess) -> list[int]:
    assert proxy.pid is not None
    return sorted(child.pid for child in psutil.Process(proxy.pid).children())



@pytest.fixture
def start(proxy: ProxyFactory, pg: Topology) -> Callable[..., ProxyProcess]:
    assert pg.primary is not None
    primary = pg.primary

    def start_proxy(pool_size: int = 4, databases: list[dict[str, Any]] | None = None,
                    users: list[dict[str, Any]] | None = None, **general: Any) -> ProxyProcess:
        started = proxy(pool_size=pool_size, databases=databases or database_entries(primary), users=users,
                        general={"workers": WORKERS, **general})
        if not isinstance(started, ProxyProcess):
            pytest.skip("worker processes need the proxy")
        wait_until(lambda: http_get(started, "/ready")[0] == 200, 30, "the instance is ready")
        return started

    return start_proxy


@pytest.fixture
def own_database(pg: Topology) -> Iterator[str]:
    """A database only the test's proxy connects to, so pg_stat_activity counts its servers alone."""
    assert pg.primary is not None
    name = f"workers_{uuid.uuid4().hex[:8]}"
    pg.primary.psql(f"CREATE DATABASE {name} OWNER app")
    yield name
    pg.primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_connections_land_on_every_worker_and_each_is_served(start: Callable[..., ProxyProcess]) -> None:
    proxy = start()
    assert len(worker_pids(proxy)) == WORKERS
    conns = connect_to_each_worker(proxy, autocommit=True)
    try:
        for index, conn in conns.items():
            assert conn.execute("SELECT %s::int + 1", (index,)).fetchone() == (index + 1,)
    finally:
        for conn in conns.values():
            conn.close()


def test_workers_together_never_open_more_server_connections_than_the_pool_size(
        start: Callable[..., ProxyProcess], pg: Topology, own_database: str) -> None:
    assert pg.primary is not None
    pool_size = 5  # 3 + 2: the remainder goes to worker 0
    proxy = start(pool_size=pool_size, healthcheck_interval_ms=0, checkout_timeout_ms=30000,
                  databases=[{"name": own_database, "host": pg.primary.host, "port": pg.primary.port,
                              "database_name": own_database}])
    stop = threading.Event()
    errors: list[BaseException] = []
    owners: set[int] = set()

    def client() -> None:
        try:
            with psycopg.connect(proxy.dsn(dbname=own_database, connect_timeout=10), autocommit=True) as conn:
                owners.add(owner(conn))
                while not stop.is_set():
                    conn.execute("SELECT pg_sleep(0.02)")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for thread in threads:
        thread.start()
    samples: list[int] = []
    try:
        with psycopg.connect(pg.primary.dsn(user="postgres", dbname="postgres"), autocommit=True) as monitor:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                row = monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                      (own_database,)).fetchone()
                assert row is not None
                samples.append(int(row[0]))
                time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors[:3]
    assert owners == set(range(WORKERS)), owners
    assert max(samples) <= pool_size, samples
    assert max(samples) == pool_size, f"24 busy clients should have used every server: {samples}"
    counted = metrics(proxy)
    opened = sum(value for (name, _), value in counted.items() if name == "shardgate_pool_servers"
                 and own_database in dict(_)["pool"])
    assert opened == pool_size


def test_a_cancel_reaches_its_client_whichever_worker_receives_it(start: Callable[..., ProxyProcess]) -> None:
    proxy = start()
    attempts = 14  # each CancelRequest is a new connection: it lands on a worker at random
    for _ in range(attempts):
        with psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            timer.join()
            assert time.monotonic() - started < 5
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on after the cancel
    forwarded = metrics(proxy)[("shardgate_cancels_forwarded_total", ())]
    # 14 coin flips: all on the owner has odds 1 in 16384
    assert 0 < forwarded < attempts


def test_one_scrape_and_the_api_answer_for_every_worker(start: Callable[..., ProxyProcess]) -> None:
    proxy = start()
    conns = connect_to_each_worker(proxy, autocommit=True)
    extra = [psycopg.connect(proxy.dsn(connect_timeout=10), autocommit=True) for _ in range(4)]
    try:
        for conn in [*conns.values(), *extra]:
            conn.execute("SELECT 1")
        held = len(conns) + len(extra)
        counted = metrics(proxy)
        assert counted[("shardgate_clients", ())] == held
        assert counted[("shardgate_workers", ())] == WORKERS
        assert counted[("shardgate_worker_restarts_total", ())] == 0
        per_worker = [counted[("shardgate_worker_clients", (("worker", str(i)),))] for i in range(WORKERS)]
        assert sum(per_worker) == held and all(value >= 1 for value in per_worker)
        assert all(counted[("shardgate_worker_up", (("worker", str(i)),))] == 1 for i in range(WORKERS))
        checkouts = sum(v for (name, _), v in counted.items() if name == "shardgate_pool_checkouts_total")
        assert checkouts >= held

        status, body = http_get(proxy, "/api/clients")
        assert status == 200
        rows = json.loads(body)["clients"]
        assert len(rows) == held
        assert {row["worker"] for row in rows} == set(range(WORKERS))
        status, body = http_get(proxy, "/api/pools")
        assert status == 200 and {row["worker"] for row in json.loads(body)["pools"]} == set(range(WORKERS))
        assert http_get(proxy, "/health") == (200, b"ok\n")
        assert http_get(proxy, "/ready") == (200, b"ready\n")
    finally:
        for conn in [*conns.values(), *extra]:
            conn.close()


def test_sighup_reloads_every_worker(start: Callable[..., ProxyProcess]) -> None:
    proxy = start(pool_size=4)

    def pool_sizes() -> list[tuple[int, str]]:
        status, body = http_get(proxy, "/api/config")
        assert status == 200, body
        return sorted((row["worker"], str(row["value"])) for row in json.loads(body)["config"]
                      if row["key"] == "default_pool_size")

    assert pool_sizes() == [(i, "4") for i in range(WORKERS)]
    proxy.write_config(general={"default_pool_size": 6})
    proxy.reload()
    wait_until(lambda: pool_sizes() == [(i, "6") for i in range(WORKERS)], 15, "both workers reloaded")
    stderr = proxy.stderr_text()
    assert all(f"worker={i} " in line for i in range(WORKERS)
               for line in [next(x for x in stderr.splitlines() if f"worker={i} " in x and "event=reloaded" in x)])


def test_sigterm_drains_every_worker(start: Callable[..., ProxyProcess], pg: Topology) -> None:
    assert pg.primary is not None
    table = f"drain_{uuid.uuid4().hex[:8]}"
    pg.primary.psql(f"CREATE TABLE {table} (id int PRIMARY KEY); GRANT ALL ON {table} TO PUBLIC", db="app")
    proxy = start(shutdown_timeout_s=10)
    in_transaction = connect_to_each_worker(proxy, autocommit=True)
    idle = connect_to_each_worker(proxy, autocommit=True)
    try:
        for index, conn in in_transaction.items():
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (index,))
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert http_get(proxy, "/ready")[0] == 503
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(connect_timeout=3)).close()
        for index, conn in in_transaction.items():  # transactions open at SIGTERM finish, on both workers
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (index + 10,))
            conn.execute("COMMIT")
        for conn in idle.values():  # idle clients are closed with 57P01 once nothing runs
            with pytest.raises(psycopg.OperationalError) as info:
                time.sleep(0.5)
                conn.execute("SELECT 1")
            assert "terminating connection due to administrator command" in str(info.value) or \
                   "server closed the connection" in str(info.value) or "consuming input failed" in str(info.value)
        assert proxy.process.wait(timeout=20) == 0
    finally:
        for conn in [*in_transaction.values(), *idle.values()]:
            conn.close()
        committed = pg.primary.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}", db="app")
        pg.primary.psql(f"DROP TABLE {table}", db="app")
    assert committed.strip() == ",".join(str(i) for i in [*range(WORKERS), *(10 + i for i in range(WORKERS))])
    assert "event=shutdown_complete" in proxy.stderr_text()


def test_a_killed_worker_is_restarted(start: Callable[..., ProxyProcess]) -> None:
    proxy = start()
    before = worker_pids(proxy)
    survivors = connect_to_each_worker(proxy, autocommit=True)
    try:
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: metrics(proxy)[("shardgate_worker_restarts_total", ())] == 1, 30, "one restart counted")
        wait_until(lambda: http_get(proxy, "/ready")[0] == 200, 30, "ready again")
        after = worker_pids(proxy)
        assert len(after) == WORKERS and victim not in after and before[1] in after
        # the clients of the worker that lived go on; new connections land on both workers again
        alive = [conn for conn in survivors.values() if not conn.closed]
        served = 0
        for conn in alive:
            try:
                conn.execute("SELECT 1")
                served += 1
            except psycopg.OperationalError:
                pass  # the killed worker's client
        assert served == WORKERS - 1
        fresh = connect_to_each_worker(proxy, autocommit=True)
        for conn in fresh.values():
            assert conn.execute("SELECT 2").fetchone() == (2,)
            conn.close()
    finally:
        for conn in survivors.values():
            conn.close()
    assert "event=worker_died" in proxy.stderr_text()


def test_workers_start_in_the_supervisor_process_group_and_exit_with_it(start: Callable[..., ProxyProcess]) -> None:
    proxy = start()
    pids = worker_pids(proxy)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.wait(timeout=20)
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in pids), 10, "every worker exited")


def test_a_pool_smaller_than_the_worker_count_does_not_start(proxy: ProxyFactory, pg: Topology) -> None:
    with pytest.raises(RuntimeError) as info:
        proxy(pool_size=1, general={"workers": WORKERS})
    assert "general.default_pool_size: 1 is smaller than general.workers 2" in str(info.value)


def test_one_worker_is_the_single_process_of_before(proxy: ProxyFactory, pg: Topology) -> None:
    assert pg.primary is not None
    started = proxy(pool_size=4, databases=database_entries(pg.primary), general={"workers": 1})
    if not isinstance(started, ProxyProcess):
        pytest.skip("needs the proxy")
    assert started.pid is not None
    assert psutil.Process(started.pid).children() == []  # no supervisor, no worker process
    with psycopg.connect(started.dsn(connect_timeout=10), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert ("shardgate_workers", ()) not in metrics(started)  # the single process's own /metrics


def test_the_consoles_reload_and_shutdown_act_for_the_whole_instance(start: Callable[..., ProxyProcess]) -> None:
    admin = {"name": "admin", "password": "admin-secret", "auth": "scram-sha-256", "server_user": "app",
             "server_password": "app"}
    proxy = start(pool_size=4, admin_users=["admin"], users=[*default_users(), admin])

    def sizes() -> list[str]:
        status, body = http_get(proxy, "/api/config")
        assert status == 200
        return [str(row["value"]) for row in json.loads(body)["config"] if row["key"] == "default_pool_size"]

    def console() -> psycopg.Connection[Any]:
        return psycopg.connect(proxy.dsn("admin", "admin-secret", "shardgate", connect_timeout=10), autocommit=True)

    proxy.write_config(general={"default_pool_size": 6})
    with console() as conn:  # lands on one worker; the reload reaches both
        conn.execute("RELOAD")
    wait_until(lambda: sizes() == ["6"] * WORKERS, 15, "every worker reloaded")
    with console() as conn:
        conn.execute("SHUTDOWN")
    assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
    assert "signal=SIGTERM" in proxy.stderr_text()
