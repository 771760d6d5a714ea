"""Zero-loss restarts: `shardgate restart -c FILE` three times under load, in transaction mode, and no client
sees an error. pgbench connecting per transaction (-C) and with persistent connections, simple and prepared
protocol; psycopg clients that hold prepared statements (prepare_threshold=0); one run with two workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from localpg import Topology
from proxy.restart import alive, read_pid
from tests.harness import REPO_ROOT, ProxyFactory, ProxyProcess, wait_until

pytestmark = pytest.mark.timeout(150)

RESTARTS = 3
RUN_S = 20  # pgbench -T: three restarts of 2-5 s each (a new Python process) on a loaded machine
WORKERS_RUN_S = 36  # a restart of two workers starts three processes: 5-8 s each on a loaded machine
FIRST_RESTART_S = 2.0
RESTART_GAP_S = 0.5  # between one restart's end and the next one's start
PERSISTENT_RATE_TPS = 200


@pytest.fixture(scope="module")
def bench_db(pg: Topology) -> Iterator[str]:
    """A database with pgbench's tables (scale 1), only for this file's proxies."""
    assert pg.primary is not None
    primary = pg.primary
    name = f"restart_{uuid.uuid4().hex[:8]}"
    primary.psql(f"CREATE DATABASE {name} OWNER app")
    env = {**os.environ, "PGPASSWORD": "app"}
    subprocess.run([str(primary.bin_dir / "pgbench"), "-i", "-s", "1", "-q", "-h", primary.host,
                    "-p", str(primary.port), "-U", "app", name], check=True, capture_output=True, env=env, timeout=60)
    yield name
    primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Instance:
    """The proxy the factory started, then whichever instance `shardgate restart` left serving."""

    def __init__(self, first: ProxyProcess, pid_file: Path) -> None:
        self.first = first
        self.pid_file = pid_file
        self.log = first.work_dir / "restarts.log"
        self.pids: list[int] = []
        wait_until(lambda: read_pid(str(pid_file)) == first.pid, 30, "the first instance wrote its pid")
        assert first.pid is not None
        self.pids.append(first.pid)

    def restart(self) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run([sys.executable, "-m", "proxy", "restart", "-c", str(self.first.config_path),
                               "--no-wait", "--log", str(self.log)], capture_output=True, text=True, env=env,
                              cwd=REPO_ROOT, timeout=120)
        pid = read_pid(str(self.pid_file))
        assert done.returncode == 0 and pid is not None, f"{done.stdout}\n{done.stderr}\n{self.log_text()}"
        self.pids.append(pid)
        return done

    def restart_during(self) -> threading.Thread:
        """RESTARTS restarts one after the other from FIRST_RESTART_S on; `finished` says when each ended."""
        errors: list[str] = []
        finished: list[float] = []

        def run() -> None:
            time.sleep(FIRST_RESTART_S)
            for _ in range(RESTARTS):
                try:
                    self.restart()
                except AssertionError as error:
                    errors.append(str(error))
                finished.append(time.monotonic())
                time.sleep(RESTART_GAP_S)

        thread = threading.Thread(target=run)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.finished = finished  # type: ignore[attr-defined]
        thread.start()
        return thread

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop_all(self) -> None:
        """SIGTERM to whatever still runs; the first instance is the factory's to reap."""
        for pid in self.pids[1:]:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not any(alive(pid) for pid in self.pids[1:]), 30, "every instance exited")



@pytest.fixture
def instance(proxy: ProxyFactory, pg: Topology, bench_db: str, tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    assert pg.primary is not None
    primary = pg.primary
    made: list[Instance] = []

    def start(workers: int = 1) -> Instance:
        pid_file = tmp_path / "shardgate.pid"
        first = proxy(pool_size=8, databases=[{"name": bench_db, "host": primary.host, "port": primary.port}],
                      general={"pid_file": str(pid_file), "shutdown_timeout_s": 60, "workers": workers})
        if not isinstance(first, ProxyProcess):
            pytest.skip("restarts need the proxy")
        made.append(Instance(first, pid_file))
        return made[-1]

    yield start
    for each in made:
        each.stop_all()


def pgbench(pg: Topology, instance: Instance, database: str, protocol: str, connect: bool,
            run_s: int = RUN_S) -> str:
    assert pg.primary is not None
    argv = [str(pg.primary.bin_dir / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(run_s), "-M", protocol,
            "-h", "127.0.0.1", "-p", str(instance.first.port), "-U", "app", database]
    if connect:
        argv.insert(1, "-C")
    else:  # paced, so clients sit idle between transactions: a drain that closed idle clients would abort them
        argv[1:1] = ["-R", str(PERSISTENT_RATE_TPS)]
    restarts = instance.restart_during()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "app"},
                          timeout=run_s + 90)
    ended = time.monotonic()
    restarts.join(120)
    assert not restarts.errors, restarts.errors  # type: ignore[attr-defined]
    # every restart happened under load (a slow machine could push the last one past pgbench's end)
    assert len(restarts.finished) == RESTARTS and max(restarts.finished) < ended  # type: ignore[attr-defined]
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"pgbench exit {done.returncode}\n{output}\n{instance.log_text()[-4000:]}"
    return output


def processed(output: str) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)", output)
    assert match, output
    return int(match.group(1))


@pytest.mark.parametrize("protocol", ["simple", "prepared"])
@pytest.mark.parametrize("connect", [True, False], ids=["connect-per-transaction", "persistent"])
def test_three_restarts_under_pgbench_lose_no_transaction(
        instance: Callable[..., Instance], pg: Topology, bench_db: str, protocol: str, connect: bool) -> None:
    running = instance()
    output = pgbench(pg, running, bench_db, protocol, connect)
    assert "aborted" not in output and "error" not in output.lower(), output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is not None and int(failed.group(1)) == 0, output
    assert processed(output) > 100
    assert len(set(running.pids)) == RESTARTS + 1
    # the old instances drained and exited once their clients left (pgbench is done)
    wait_until(lambda: not any(alive(pid) for pid in running.pids[1:-1]), 30, "the old instances exited")
    assert alive(running.pids[-1])
    with psycopg.connect(running.first.dsn(dbname=bench_db, connect_timeout=10)) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone() == (1,)


def test_restarts_with_two_workers_lose_no_transaction(
        instance: Callable[..., Instance], pg: Topology, bench_db: str) -> None:
    running = instance(workers=2)
    output = pgbench(pg, running, bench_db, "prepared", connect=True, run_s=WORKERS_RUN_S)
    assert "aborted" not in output, output
    assert processed(output) > 100
    assert len(set(running.pids)) == RESTARTS + 1


def test_clients_holding_prepared_statements_see_no_error_across_restarts(
        instance: Callable[..., Instance], bench_db: str) -> None:
    running = instance()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: list[int] = []

    def client(reconnect_every: int, seed: int) -> None:
        done = 0
        try:
            while not stop.is_set():
                with psycopg.connect(running.first.dsn(dbname=bench_db, connect_timeout=10),
                                     prepare_threshold=0) as conn:
                    for _ in range(reconnect_every):
                        if stop.is_set():
                            break
                        aid = (seed * 7919 + done) % 100000 + 1
                        with conn.transaction():
                            conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s", (aid,))
                            row = conn.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s",
                                               (aid,)).fetchone()
                        assert row is not None
                        done += 1
        except BaseException as error:
            errors.append(error)
        counts.append(done)

    # two clients keep one connection all along, two reconnect every 25 transactions
    settings: list[Any] = [(10**9, 1), (10**9, 2), (25, 3), (25, 4)]
    threads = [threading.Thread(target=client, args=args) for args in settings]
    for thread in threads:
        thread.start()
    restarts = running.restart_during()
    restarts.join(120)
    time.sleep(1.0)  # reconnecting clients reach the last instance
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not restarts.errors, restarts.errors  # type: ignore[attr-defined]
    assert not errors, errors[:3]
    assert len(counts) == len(settings) and min(counts) > 20, counts
    assert len(set(running.pids)) == RESTARTS + 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_closing_the_listener_serves_the_connections_queued_on_it(loop: str) -> None:
    """The kernel resets what sits in a closing socket's accept queue; Listener.close takes it over first."""
    import asyncio
    import socket

    from proxy.listener import Listener

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"hello")  # type: ignore[attr-defined]
            transport.close()

    async def scenario() -> tuple[int, list[bytes]]:
        from localpg import free_port

        port = free_port()
        listener = Listener(Hello)
        await listener.start("127.0.0.1", port)
        # the loop does not run until close(): these handshakes complete in the kernel and wait in the queue
        queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        taken = listener.close()
        await asyncio.sleep(0.2)
        answers = []
        for sock in queued:
            try:
                answers.append(sock.recv(16))
            except ConnectionResetError:
                answers.append(b"reset")
            sock.close()
        return taken, answers

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        taken, answers = runner.run(asyncio.wait_for(scenario(), 20))
    assert taken == 5
    assert answers == [b"hello"] * 5


def test_restart_needs_a_pid_file(tmp_path: Path) -> None:
    config = tmp_path / "shardgate.toml"
    config.write_text('[general]\nlisten = "127.0.0.1:1"\n\n[[users]]\nname = "app"\npassword = "x"\n\n'
                      '[[databases]]\nname = "app"\n')
    done = subprocess.run([sys.executable, "-m", "proxy", "restart", "-c", str(config)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 1
    assert "general.pid_file: required by shardgate restart" in done.stderr


def test_a_new_instance_that_cannot_start_leaves_the_old_one_serving(
        instance: Callable[..., Instance], bench_db: str) -> None:
    import socket

    running = instance()
    first = running.first
    # a plain socket (no SO_REUSEPORT) on the port the new config names: the new instance cannot bind it
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        text = first.config_path.read_text()
        first.config_path.write_text(text.replace(f'listen = "127.0.0.1:{first.port}"', f'listen = "127.0.0.1:{taken}"'))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run([sys.executable, "-m", "proxy", "restart", "-c", str(first.config_path),
                               "--log", str(running.log)], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                              timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exited with code 1 before it was ready" in done.stderr
    assert read_pid(str(running.pid_file)) == first.pid
    with psycopg.connect(first.dsn(dbname=bench_db, connect_timeout=10)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sigusr2_serves_connected_clients_until_they_leave(proxy: ProxyFactory, pg: Topology) -> None:
    assert pg.primary is not None
    from tests.harness import database_entries

    started = proxy(pool_size=4, databases=database_entries(pg.primary), general={"shutdown_timeout_s": 60})
    if not isinstance(started, ProxyProcess):
        pytest.skip("signals the proxy")
    assert started.process is not None
    staying = psycopg.connect(started.dsn(connect_timeout=10), autocommit=True)
    leaving = psycopg.connect(started.dsn(connect_timeout=10), autocommit=True)
    try:
        started.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the listener closes at once
            try:
                psycopg.connect(started.dsn(connect_timeout=2)).close()
            except psycopg.OperationalError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("new connections still accepted 5 s after SIGUSR2")
        for round_index in range(5):  # idle between transactions, and not closed for it
            time.sleep(0.3)
            assert staying.execute("SELECT %s::int", (round_index,)).fetchone() == (round_index,)
            assert leaving.execute("SELECT 1").fetchone() == (1,)
        leaving.close()
        assert started.process.poll() is None  # one client is still connected
        staying.close()
        assert started.process.wait(timeout=15) == 0  # the last one left: the drain is over
    finally:
        staying.close()
        leaving.close()


def test_sigterm_during_a_sigusr2_drain_closes_the_idle_clients(proxy: ProxyFactory, pg: Topology) -> None:
    assert pg.primary is not None
    from tests.harness import database_entries

    started = proxy(pool_size=4, databases=database_entries(pg.primary), general={"shutdown_timeout_s": 60})
    if not isinstance(started, ProxyProcess):
        pytest.skip("signals the proxy")
    assert started.process is not None
    with psycopg.connect(started.dsn(connect_timeout=10), autocommit=True) as conn:
        started.process.send_signal(signal.SIGUSR2)
        time.sleep(1.0)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        started.process.send_signal(signal.SIGTERM)
        assert started.process.wait(timeout=15) == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_a_second_instance_with_the_same_pid_file_is_refused(instance: Callable[..., Instance]) -> None:
    running = instance()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "proxy", "-c", str(running.first.config_path)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 1
    assert f"instance pid {running.first.pid} is running with this file" in done.stderr
    assert "shardgate restart" in done.stderr
    assert read_pid(str(running.pid_file)) == running.first.pid
