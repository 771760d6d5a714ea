"""Soak: a bounded run of mixed load on one proxy, sampling its memory, descriptors and server connections.

    python -m bench.soak [--minutes 30] [--quick] [--out FILE.md] [--plot FILE.png]   (from the repository root)

Starts a throwaway PostgreSQL server and Shardgate (transaction mode) on free loopback ports, then for the
whole run at once: pgbench (TPC-B, simple protocol) and pgbench -S with prepared statements, psycopg clients
that reconnect every few seconds, JWT logins with a fresh token each time, a psycopg client preparing its
statements (prepare_threshold 0), and a COPY of 20,000 rows every minute. Every `--sample-s` seconds it reads
the proxy's RSS and open descriptors (/proc) and the server connections the proxy holds (pg_stat_activity).

After the warm-up, RSS must grow less than 5% and the descriptors the proxy holds beyond its client and
server sockets must not grow. Writes a Markdown report with the curve as a table and, when matplotlib is
installed (`pip install matplotlib`), a PNG plot. `--quick` is a 5-minute look.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/soak.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt as pyjwt
import psycopg

from bench.run import DATABASE, PASSWORD, SUPERUSER, USER, init_pgbench, make_login, say
from bench.services import LOCALHOST, REPO_ROOT, PoolSettings, Shardgate, clean_env, free_port, rss_kb
from localpg.topology import Topology

FULL_MINUTES = 30.0
QUICK_MINUTES = 5.0
SAMPLE_S = 10.0
RSS_GROWTH_LIMIT_PCT = 5.0
JWT_SECRET = "soak-secret-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdef"
JWT_USER = "api"
COPY_EVERY_S = 60.0
COPY_ROWS = 20_000
RECONNECTING_CLIENTS = 4
RECONNECT_EVERY_S = 3.0
POOL_SIZE = 16
CONNECT_TIMEOUT_S = 10
QUIET_TRIES = 30  # seconds to wait for every client to be gone before a quiet sample
STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "soak-latest.md"
DEFAULT_PLOT = REPO_ROOT / "bench" / "results" / "soak-latest.png"
COMMITTED_PLOT = REPO_ROOT / "bench" / "soak.png"
COMMITTED_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
RESULTS_HEADING = "## Soak (issue 16)"


@dataclass(slots=True)
class Sample:
    at_s: float
    rss_kb: int
    fds: int
    sockets: int  # of `fds`: the sockets (clients, servers, listeners)
    server_connections: int  # backends of the proxy's server user, from pg_stat_activity
    clients: int  # client connections the proxy reports (shardgate_clients)
    transactions: int  # load transactions finished so far, all drivers


@dataclass(slots=True)
class Counters:
    """What each load driver did; drivers run in threads and only add to their own entries."""

    done: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, name: str, count: int = 1) -> None:
        with self.lock:
            self.done[name] = self.done.get(name, 0) + count

    def failed(self, name: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            self.last_error[name] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"

    def total(self) -> int:
        with self.lock:
            return sum(self.done.values())


class SoakShardgate(Shardgate):
    """bench.services' Shardgate plus an admin listener (for shardgate_clients) and a JWT user."""

    def __init__(self, work_dir: Path, port: int, admin_port: int, server_port: int, login: Any) -> None:
        super().__init__(work_dir, port, server_port, login, PoolSettings(pool_size=POOL_SIZE),
                         server_password=PASSWORD, label="Shardgate soak")
        self.admin_port = admin_port
        text = self.config_path.read_text()
        text = text.replace('admin_listen = ""\n', f"admin_listen = {json.dumps(f'{LOCALHOST}:{admin_port}')}\n")
        # the JWT user first: [jwt] is a table of its own and must come after the arrays of tables it follows
        text += (
            "\n[[users]]\n"
            f"name = {json.dumps(JWT_USER)}\n"
            'auth = "jwt"\n'
            f"server_user = {json.dumps(USER)}\n"
            f"server_password = {json.dumps(PASSWORD)}\n"
            "\n[jwt]\n"
            'algorithms = ["HS256"]\n'
            f"secret = {json.dumps(JWT_SECRET)}\n"
            'required_claims = ["exp", "sub"]\n'
            "cache_size = 1000\n"
        )
        self.config_path.write_text(text)

    def metric(self, name: str) -> int:
        """The sum of a metric's samples in the proxy's /metrics."""
        url = f"http://{LOCALHOST}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


# -- load drivers ----------------------------------------------------------------------------------


def token(subject: str) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iat": now, "exp": now + 300, "jti": f"{subject}-{time.monotonic_ns()}"}
    return pyjwt.encode(claims, JWT_SECRET, algorithm="HS256")


def connect(shardgate: SoakShardgate, user: str = USER, password: str = PASSWORD, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(host=shardgate.host, port=shardgate.port, user=user, password=password, dbname=DATABASE,
                           sslmode="disable", connect_timeout=CONNECT_TIMEOUT_S, autocommit=True, **kwargs)


def reconnecting(shardgate: SoakShardgate, stop: threading.Event, counters: Counters, index: int) -> None:
    """Connect, run short transactions for a few seconds, disconnect; again."""
    name = "reconnecting clients"
    while not stop.is_set():
        try:
            with connect(shardgate) as conn:
                until = time.monotonic() + RECONNECT_EVERY_S
                while time.monotonic() < until and not stop.is_set():
                    with conn.transaction():
                        conn.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s", (index * 1000 + 1,))
                        conn.execute("SELECT now()")
                    counters.ok(name)
                    stop.wait(0.05)
        except psycopg.Error as exc:
            counters.failed(name, exc)
            stop.wait(1.0)


def jwt_logins(shardgate: SoakShardgate, stop: threading.Event, counters: Counters) -> None:
    """A new token for every login (so every login validates one), its claims read back."""
    name = "JWT logins"
    serial = 0
    while not stop.is_set():
        serial += 1
        subject = f"user-{serial % 50}"
        try:
            with connect(shardgate, user=JWT_USER, password=token(subject)) as conn:
                row = conn.execute("SELECT current_setting('request.jwt.claim.sub', true)").fetchone()
                if row is None or row[0] != subject:
                    raise RuntimeError(f"claims not injected: {row!r} for {subject}")
            counters.ok(name)
        except (psycopg.Error, RuntimeError) as exc:
            counters.failed(name, exc)
        stop.wait(0.2)


def prepared(shardgate: SoakShardgate, stop: threading.Event, counters: Counters) -> None:
    """One client whose every statement is a named prepared statement (psycopg prepare_threshold 0)."""
    name = "prepared statements"
    while not stop.is_set():
        try:
            with connect(shardgate, prepare_threshold=0) as conn:
                aid = 0
                while not stop.is_set():
                    aid = aid % 100_000 + 1
                    conn.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s", (aid,))
                    conn.execute("SELECT bid, tbalance FROM pgbench_tellers WHERE tid = %s", (aid % 10 + 1,))
                    counters.ok(name)
                    stop.wait(0.01)
        except psycopg.Error as exc:
            counters.failed(name, exc)
            stop.wait(1.0)


def copies(shardgate: SoakShardgate, stop: threading.Event, counters: Counters) -> None:
    """COPY FROM STDIN of COPY_ROWS rows every minute, counted back, then emptied."""
    name = "COPY every minute"
    payload = "".join(f"{row}\tpayload {row} {'x' * 40}\n" for row in range(COPY_ROWS)).encode()
    while not stop.is_set():
        try:
            with connect(shardgate) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS soak_copy (id int, note text)")
                with conn.transaction():
                    with conn.cursor().copy("COPY soak_copy (id, note) FROM STDIN") as copy:
                        for start in range(0, len(payload), 65536):
                            copy.write(payload[start : start + 65536])
                    row = conn.execute("SELECT count(*) FROM soak_copy").fetchone()
                    if row is None or row[0] != COPY_ROWS:
                        raise RuntimeError(f"COPY left {row!r} rows, expected {COPY_ROWS}")
                    conn.execute("TRUNCATE soak_copy")
            counters.ok(name)
        except (psycopg.Error, RuntimeError) as exc:
            counters.failed(name, exc)
        stop.wait(COPY_EVERY_S)


def pgbench_run(primary: Any, shardgate: SoakShardgate, seconds: int, extra: list[str], log: Path,
                env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [str(primary.bin_dir / "pgbench"), "-n", "-h", shardgate.host, "-p", str(shardgate.port), "-U", USER,
            "-T", str(seconds), "-P", "60", *extra, DATABASE]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def pgbench_transactions(log: Path) -> tuple[int | None, int | None]:
    """Transactions processed and failed, from a finished pgbench's summary."""
    processed = failed = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("number of transactions actually processed:"):
            processed = int(line.split(":")[1].split("/")[0].strip())
        elif line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split("(")[0].strip())
    return processed, failed


# -- sampling --------------------------------------------------------------------------------------


def descriptors(pid: int) -> tuple[int, int]:
    """The process's open descriptors, and how many of them are sockets."""
    total = sockets = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed since the listing
            continue
        total += 1
        sockets += target.startswith("socket:")
    return total, sockets


def server_connections(primary: Any) -> int:
    with psycopg.connect(primary.dsn(user=SUPERUSER), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (USER,)).fetchone()
    return int(row[0]) if row else -1


def sample(shardgate: SoakShardgate, primary: Any, started: float, counters: Counters) -> Sample:
    fds, sockets = descriptors(shardgate.pid)
    return Sample(time.monotonic() - started, rss_kb(shardgate.pid), fds, sockets, server_connections(primary),
                  shardgate.metric("shardgate_clients"), counters.total())


def quiet_sample(shardgate: SoakShardgate, primary: Any, started: float, counters: Counters) -> Sample | None:
    """A sample once no client is connected (a few seconds for closing sockets to go), or None."""
    for _ in range(QUIET_TRIES):
        time.sleep(1.0)
        try:
            found = sample(shardgate, primary, started, counters)
        except (OSError, psycopg.Error):
            continue
        if found.clients == 0:
            time.sleep(1.0)
            return sample(shardgate, primary, started, counters)
    return None


# -- verdict and report ----------------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    rss_growth_pct: float
    before: Sample  # quiet: before any load
    after: Sample  # quiet: every client gone after the run
    passed: bool


def spare_sockets(item: Sample) -> int:
    """Sockets that are neither a client's nor a server connection: the listeners, when nothing leaks."""
    return item.sockets - item.clients - item.server_connections


def judge(samples: list[Sample], warmup_s: float, before: Sample | None, after: Sample | None) -> Verdict | None:
    """RSS growth from the first samples after the warm-up to the last ones (medians of three, so one busy
    moment does not decide); descriptors compared when the proxy is quiet, before the load and after it
    (no client connected, so the counts do not move under the sample): the same descriptors that are not
    sockets, and no socket beyond the listeners and the server connections."""
    settled = [item for item in samples if item.at_s >= warmup_s]
    if len(settled) < 4 or before is None or after is None:
        return None
    window = min(3, len(settled) // 2)
    first_rss = statistics.median(item.rss_kb for item in settled[:window])
    last_rss = statistics.median(item.rss_kb for item in settled[-window:])
    growth = 100.0 * (last_rss - first_rss) / first_rss
    fds_kept = (after.fds - after.sockets <= before.fds - before.sockets
                and spare_sockets(after) <= spare_sockets(before) and after.clients == 0)
    return Verdict(growth, before, after, growth < RSS_GROWTH_LIMIT_PCT and fds_kept)


def plot(samples: list[Sample], warmup_s: float, path: Path) -> str | None:
    """The curves as a PNG; None when matplotlib is missing (the table still says everything)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install matplotlib`): no plot"
    minutes = [item.at_s / 60 for item in samples]
    figure, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(minutes, [item.rss_kb / 1024 for item in samples], color="tab:blue")
    axes[0].set_ylabel("RSS (MB)")
    axes[1].plot(minutes, [item.fds for item in samples], label="all descriptors", color="tab:orange")
    axes[1].plot(minutes, [item.sockets for item in samples], label="sockets", color="tab:red")
    axes[1].set_ylabel("descriptors")
    axes[1].legend(loc="upper left", fontsize="small")
    axes[2].plot(minutes, [item.server_connections for item in samples], label="server connections", color="tab:green")
    axes[2].plot(minutes, [item.clients for item in samples], label="clients", color="tab:purple")
    axes[2].set_ylabel("connections")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left", fontsize="small")
    for axis in axes:
        axis.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    figure.suptitle("Shardgate soak: mixed load on one proxy")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return None


def report(samples: list[Sample], verdict: Verdict | None, counters: Counters, pgbench_counts: dict[str, tuple[int | None, int | None]],
           info: dict[str, str], warmup_s: float, plot_note: str | None, plot_name: str) -> str:
    lines = [RESULTS_HEADING, "", info["when"], "", info["versions"], "", info["load"], ""]
    if verdict is None:
        lines += ["**Not judged**: too few samples after the warm-up, or no quiet sample before or after.", ""]
    else:
        before, after = verdict.before, verdict.after
        kept = after.fds - after.sockets <= before.fds - before.sockets
        spare = spare_sockets(after) <= spare_sockets(before) and after.clients == 0
        lines += [
            "| check | target | measured | result |",
            "|---|---|--:|---|",
            f"| RSS growth after the {warmup_s:.0f} s warm-up | < {RSS_GROWTH_LIMIT_PCT:.0f}% | "
            f"{verdict.rss_growth_pct:+.1f}% | {'met' if verdict.rss_growth_pct < RSS_GROWTH_LIMIT_PCT else '**MISSED**'} |",
            f"| descriptors that are not sockets, quiet before -> quiet after | no growth | "
            f"{before.fds - before.sockets} -> {after.fds - after.sockets} | {'met' if kept else '**MISSED**'} |",
            f"| sockets beyond the server connections, quiet before -> after (clients after) | no growth, 0 clients | "
            f"{spare_sockets(before)} -> {spare_sockets(after)} ({after.clients}) | {'met' if spare else '**MISSED**'} |",
            f"| RSS quiet before -> quiet after | (for the record) | {before.rss_kb / 1024:.1f} -> "
            f"{after.rss_kb / 1024:.1f} MB | |",
            "",
        ]
    lines += ["| load | done | errors | last error |", "|---|--:|--:|---|"]
    for name in sorted(set(counters.done) | set(counters.errors)):
        lines.append(f"| {name} | {counters.done.get(name, 0):,} | {counters.errors.get(name, 0):,} | "
                     f"{counters.last_error.get(name, '').replace('|', '/')} |")
    for name, (processed, failed) in pgbench_counts.items():
        lines.append(f"| {name} | {processed if processed is not None else 'n/a':,} transactions | "
                     f"{failed if failed is not None else 0} failed | |")
    lines += ["", "| minute | RSS MB | descriptors | sockets | server connections | clients | "
                  "transactions so far |", "|--:|--:|--:|--:|--:|--:|--:|"]
    shown = [item for index, item in enumerate(samples) if index % max(1, round(60 / SAMPLE_S)) == 0]
    if samples and shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    for item in shown:
        lines.append(f"| {item.at_s / 60:.1f} | {item.rss_kb / 1024:.1f} | {item.fds} | {item.sockets} | "
                     f"{item.server_connections} | {item.clients} | {item.transactions:,} |")
    lines += [""]
    if plot_note:
        lines += [plot_note, ""]
    else:
        lines += [f"![RSS, descriptors and connections over the soak]({plot_name})", ""]
    lines += [
        "The table shows one sample a minute (the run samples every "
        f"{SAMPLE_S:.0f} s); the plot has them all. Descriptors move with the clients connected at the moment "
        "of a sample, so they are compared when the proxy is quiet: before the load starts and once every "
        "client has gone after it. "
        "Transactions so far: the Python drivers' own (pgbench's are in its line above).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help=f"length of the run (default {FULL_MINUTES:.0f})")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_MINUTES:.0f}-minute look")
    parser.add_argument("--warmup-s", type=float, default=None, help="seconds before the growth baseline "
                        "(default 120, --quick 60)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG plot")
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients per pgbench (default 8)")
    parser.add_argument("--rate", type=int, default=1000, help="each pgbench's target transactions per second "
                        "(pgbench -R; default 1000, 0: as fast as it goes)")
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = QUICK_MINUTES if args.quick else FULL_MINUTES
    if args.warmup_s is None:
        args.warmup_s = 60.0 if args.quick else 120.0
    if args.minutes <= 0 or args.minutes > 24 * 60 or args.clients < 1 or args.rate < 0:
        parser.error("--minutes must be in (0, 1440], --clients >= 1 and --rate >= 0")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    seconds = int(args.minutes * 60)
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-soak-"))
    scratch.chmod(0o755)
    counters = Counters()
    samples: list[Sample] = []
    pgbench_counts: dict[str, tuple[int | None, int | None]] = {}
    stop = threading.Event()
    threads: list[threading.Thread] = []
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        say(f"PostgreSQL: starting a server in {scratch} ...")
        topology = Topology.create(scratch / "pg", replicas=0, extra_conf={"max_connections": 200, "fsync": False})
        cleanup.callback(topology.remove)
        primary = topology.primary
        assert primary is not None
        env = clean_env(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S))
        init_pgbench(primary, 1, env)
        login = make_login(primary, "scram-sha-256")
        (scratch / "shardgate").mkdir()
        shardgate = SoakShardgate(scratch / "shardgate", free_port(), free_port(), primary.port, login)
        cleanup.callback(shardgate.stop)
        shardgate.start()
        say(f"Shardgate pid {shardgate.pid} on port {shardgate.port}; soaking for {args.minutes:g} minutes")
        started = time.monotonic()
        before = quiet_sample(shardgate, primary, started, counters)
        logs = {"pgbench TPC-B (simple)": scratch / "pgbench-tpcb.log",
                "pgbench -S (prepared)": scratch / "pgbench-select.log"}
        paced = ["-R", str(args.rate)] if args.rate else []
        benches = [
            pgbench_run(primary, shardgate, seconds, ["-c", str(args.clients), "-j", "2", "-M", "simple", *paced],
                        logs["pgbench TPC-B (simple)"], env),
            pgbench_run(primary, shardgate, seconds,
                        ["-c", str(args.clients), "-j", "2", "-S", "-M", "prepared", *paced],
                        logs["pgbench -S (prepared)"], env),
        ]
        drivers: list[tuple[Callable[..., None], tuple[object, ...]]] = [
            (reconnecting, (index,)) for index in range(RECONNECTING_CLIENTS)]
        drivers += [(jwt_logins, ()), (prepared, ()), (copies, ())]
        for target, extra in drivers:
            thread = threading.Thread(target=target, args=(shardgate, stop, counters, *extra), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = started + seconds
        interrupted = False
        try:
            while True:
                shardgate.check_alive()
                try:
                    samples.append(sample(shardgate, primary, started, counters))
                except (OSError, psycopg.Error) as exc:
                    say(f"sample skipped: {exc}")
                if samples and len(samples) % 6 == 1:
                    last = samples[-1]
                    say(f"{last.at_s / 60:5.1f} min: RSS {last.rss_kb / 1024:.1f} MB, {last.fds} fds, "
                        f"{last.server_connections} server connections, {last.clients} clients")
                if time.monotonic() + SAMPLE_S > deadline:
                    break
                time.sleep(SAMPLE_S)
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: writing what was sampled")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for bench in benches:
            if interrupted:
                bench.terminate()
            try:
                bench.wait(timeout=max(30.0, deadline - time.monotonic() + 30))
            except subprocess.TimeoutExpired:
                bench.kill()
        for name, path in logs.items():
            pgbench_counts[name] = pgbench_transactions(path)
        after = quiet_sample(shardgate, primary, started, counters)
        shardgate.stop()

    verdict = judge(samples, args.warmup_s, before, after)
    plot_path = args.plot if args.plot.is_absolute() else Path.cwd() / args.plot
    plot_note = plot(samples, args.warmup_s, plot_path)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = {
        "when": f"Run {now} · {args.minutes:g} minutes · {os.cpu_count()} CPUs · {platform.platform()}",
        "versions": f"Python {platform.python_version()} · psycopg {psycopg.__version__}",
        "load": (f"Load, all at once for the whole run: pgbench TPC-B `-M simple` and pgbench `-S -M prepared` "
                 f"({args.clients} clients each, {f'paced at {args.rate:,} tps each' if args.rate else 'unpaced'}), {RECONNECTING_CLIENTS} clients reconnecting every "
                 f"{RECONNECT_EVERY_S:g} s, a JWT login with a fresh token every 0.2 s, one client with every "
                 f"statement prepared, a {COPY_ROWS:,}-row COPY every {COPY_EVERY_S:.0f} s. Shardgate in "
                 f"transaction mode, pool size {POOL_SIZE}. Samples every {SAMPLE_S:.0f} s."),
    }
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    text = report(samples, verdict, counters, pgbench_counts, info, args.warmup_s, plot_note, plot_path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    say(f"report written to {out}" + ("" if plot_note else f", plot to {plot_path}"))
    failures = sum(counters.errors.values()) + sum(failed or 0 for _, failed in pgbench_counts.values())
    return 0 if verdict is not None and verdict.passed and failures == 0 and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
