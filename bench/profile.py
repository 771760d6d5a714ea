"""Profile of the proxy's CPU per transaction: pgbench -S through one Shardgate while py-spy samples it.

    python -m bench.profile [--mode simple|extended] [--split] [--tree DIR] [--duration S]

Starts a throwaway primary (and a streaming replica with --split), one Shardgate (transaction mode,
pool 16), runs pgbench -S for a bounded time while sampling the proxy process, and prints the top
functions by own and by cumulative time next to the proxy's CPU µs per transaction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/profile.py`: import from the repository root, and
    # not from bench/, where this file would hide the standard library's `profile` (cProfile imports it)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import pgbench
from bench.report import NOISY_BACKGROUND_PCT
from bench.routing import HEALTHCHECK_INTERVAL_MS, READ_WRITE_SPLIT, routing_config
from bench.run import (
    DATABASE,
    PASSWORD,
    USER,
    WARMUP_S,
    _say_when_interrupted,
    _terminate,
    background_busy_pct,
    init_pgbench,
    make_login,
    say,
)
from bench.services import (
    REPO_ROOT,
    Login,
    PoolSettings,
    ServiceError,
    Shardgate,
    clean_env,
    cpu_seconds,
    free_port,
    rss_kb,
)
from localpg import Topology

DEFAULT_DURATION_S = 10
MAX_DURATION_S = 60
DEFAULT_RATE_HZ = 250
DEFAULT_TOP = 25
ATTACH_WAIT_S = 0.5
SAMPLER_STOP_TIMEOUT_S = 30.0
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Run the proxy as `python -m proxy -c CONFIG` would, with a cProfile.Profile switched on by SIGUSR1
# and off (stats written to $SHARDGATE_CPROFILE_OUT) by SIGUSR2, so that only the pgbench run is
# profiled, not start-up and warm-up. The proxy handles SIGTERM, SIGINT and SIGHUP, not these.
CPROFILE_LAUNCHER = """\
import cProfile, os, runpy, signal, sys
profiler = cProfile.Profile()
def _start(signum, frame):
    profiler.enable()
def _stop(signum, frame):
    profiler.disable()
    profiler.dump_stats(os.environ["SHARDGATE_CPROFILE_OUT"])
signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
sys.argv = ["proxy", "-c", sys.argv[1]]
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=("simple", "extended"), default="simple", help="pgbench -M (default simple)"
    )
    parser.add_argument(
        "--split", action="store_true",
        help=f"add a streaming replica: reads are routed (read_write_split = {READ_WRITE_SPLIT!r})",
    )  # fmt: skip
    parser.add_argument(
        "--tree", type=Path, default=REPO_ROOT,
        help="run the Shardgate of this checkout (cwd and PYTHONPATH), e.g. a git worktree of HEAD "
        "(default: the current tree)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION_S,
        help=f"seconds of the profiled pgbench run (default {DEFAULT_DURATION_S}, at most {MAX_DURATION_S})",
    )  # fmt: skip
    parser.add_argument(
        "--sampler", choices=("auto", "py-spy", "cprofile", "none"), default="auto",
        help="py-spy (sampling, attached by pid), cprofile (the proxy runs under "
        "cProfile: deterministic, but its overhead inflates small functions), auto: py-spy if it can "
        "attach, else cprofile (default); none: no profiler, only the CPU per transaction, as a control",
    )  # fmt: skip
    parser.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE_HZ,
        help=f"py-spy samples per second (default {DEFAULT_RATE_HZ})",
    )
    parser.add_argument(
        "--native", action="store_true",
        help="py-spy --native: C frames too (uvloop, sqlglot's C parts); pauses the proxy at every sample, "
        "so the CPU per transaction is inflated",
    )  # fmt: skip
    parser.add_argument(
        "--nonblocking", action="store_true",
        help="py-spy --nonblocking: do not pause the proxy for each sample. Cheaper, but a stack read while it "
        "changes is lost, so short Python functions are under-counted (2-4x here) and syscalls over-weighted; "
        "by default py-spy pauses the proxy for each sample, which cost it no measurable CPU at 250 Hz",
    )  # fmt: skip
    parser.add_argument(
        "--lines", action="store_true",
        help="py-spy: aggregate by source line instead of by function (file:line is then the sampled line)",
    )  # fmt: skip
    parser.add_argument(
        "--pin", action="store_true",
        help="run the proxy alone on the last CPU and everything else (PostgreSQL, pgbench, py-spy) on the "
        "others: py-spy samples wall time, so a proxy waiting for a CPU shared with the rest is charged to "
        "where it was preempted (often right after a send that woke the peer); pinned, samples track CPU",
    )  # fmt: skip
    parser.add_argument(
        "--top", type=int, default=DEFAULT_TOP, help=f"functions listed per table (default {DEFAULT_TOP})"
    )
    parser.add_argument("--pool-size", type=int, default=16, help="server connections per pool (default 16)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="report file (default bench/results/profile-<tree>-<mode>[-split].txt); the raw samples and "
        "the numbers go next to it (.raw.txt or .prof, .json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be between 1 and {MAX_DURATION_S}")
    if min(args.rate, args.top, args.pool_size, args.clients, args.threads, args.scale) < 1:
        parser.error("--rate, --top, --pool-size, --clients, --threads and --scale must be >= 1")
    args.tree = args.tree.resolve()
    if not (args.tree / "proxy" / "__main__.py").is_file():
        parser.error(f"--tree {args.tree}: no proxy/__main__.py there")
    if (args.native or args.lines) and args.sampler == "cprofile":
        parser.error("--native and --lines are py-spy options")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 CPUs")
    return args


# -- the proxy under a profiler --------------------------------------------------------------------


class ProfiledShardgate(Shardgate):
    """bench.services' Shardgate from `source_tree`, optionally run under the cProfile launcher."""

    def __init__(
        self, work_dir: Path, port: int, server_port: int, login: Login, settings: PoolSettings,
        server_password: str, source_tree: Path, cprofile_out: Path | None,
    ) -> None:  # fmt: skip
        super().__init__(
            work_dir,
            port,
            server_port,
            login,
            settings,
            server_password=server_password,
            source_tree=source_tree,
        )
        self.cprofile_out = cprofile_out

    def command(self) -> list[str]:
        if self.cprofile_out is None:
            return super().command()
        return [sys.executable, "-c", CPROFILE_LAUNCHER, str(self.config_path)]

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        if self.cprofile_out is not None:
            env["SHARDGATE_CPROFILE_OUT"] = str(self.cprofile_out)
        return env


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time a process has used so far, seconds (utime and stime of proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def py_spy_binary() -> str | None:
    return shutil.which("py-spy")


def py_spy_can_attach(binary: str, pid: int) -> tuple[bool, str]:
    """One `py-spy dump` of the running proxy: fails when ptrace is not permitted here."""
    try:
        result = subprocess.run(
            [binary, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return result.returncode == 0, (result.stderr or result.stdout).strip()[-500:]


class PySpyRecorder:
    """`py-spy record --format raw` in the background, stopped with SIGINT (which makes it write)."""

    def __init__(
        self,
        binary: str,
        pid: int,
        raw_path: Path,
        rate_hz: int,
        native: bool,
        by_line: bool,
        nonblocking: bool,
        cap_s: int,
    ) -> None:
        self.raw_path = raw_path
        self.options = ["--rate", str(rate_hz)]
        if not by_line:
            self.options.append("--function")  # frames at the function's first line, not the sampled line
        if native:
            self.options.append("--native")  # has to pause the proxy to unwind its C stack
        elif nonblocking:
            self.options.append("--nonblocking")
        argv = [
            binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw_path),
            "--duration", str(cap_s), *self.options,
        ]  # fmt: skip
        self.log_path = raw_path.with_suffix(".py-spy.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.cpu_before_s = 0.0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(SAMPLER_STOP_TIMEOUT_S)

    def started(self) -> None:
        time.sleep(ATTACH_WAIT_S)
        if self.process.poll() is not None:
            raise ServiceError(
                f"py-spy exited with {self.process.returncode}: {self.log_path.read_text()[-1000:]}"
            )
        self.cpu_before_s = cpu_seconds(self.process.pid)

    def stop(self) -> float:
        """Stop sampling and wait for the output; returns py-spy's own CPU seconds while pgbench ran."""
        spent = 0.0
        if self.process.poll() is None:
            try:
                spent = cpu_seconds(self.process.pid) - self.cpu_before_s
            except OSError:
                pass
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(SAMPLER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(SAMPLER_STOP_TIMEOUT_S)
        if not self.raw_path.exists():
            raise ServiceError(f"py-spy wrote no {self.raw_path}: {self.log_path.read_text()[-1000:]}")
        return spent


# -- aggregation -----------------------------------------------------------------------------------


@dataclass(slots=True)
class FunctionCost:
    """Samples (or seconds) of one function: `own` with it on top of the stack, `cumulative` with it anywhere."""

    function: str
    location: str  # file:line of the function's first line
    own: float = 0
    cumulative: float = 0
    calls: int = 0  # cProfile only: exact


@dataclass(slots=True)
class Profile:
    """Samples (py-spy) or seconds (cProfile) per function, and the total they are shares of."""

    unit: str  # "samples" | "s"
    total: float
    functions: dict[tuple[str, str], FunctionCost] = field(default_factory=dict)
    by_file_own: Counter[str] = field(default_factory=Counter)

    def top(self, key: str, count: int) -> list[FunctionCost]:
        return sorted(self.functions.values(), key=lambda cost: getattr(cost, key), reverse=True)[:count]


# "name (file:line)" as py-spy writes a frame; native frames may lack the location.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<location>[^()]*)\)$")


def _split_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("name"), match.group("location")


def _file_of(location: str) -> str:
    return location.rsplit(":", 1)[0] if location else "(native)"


def read_py_spy(raw_path: Path) -> Profile:
    """py-spy's raw (collapsed stack) format: `root;...;leaf count`, one line per distinct stack."""
    profile = Profile("samples", 0)
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split_frame(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        profile.total += count
        leaf = frames[-1]
        for key in dict.fromkeys(frames):  # a recursive function counts once per sample
            cost = profile.functions.setdefault(key, FunctionCost(*key))
            cost.cumulative += count
        profile.functions[leaf].own += count
        profile.by_file_own[_file_of(leaf[1])] += count
    return profile


def read_cprofile(path: Path, tree: Path) -> Profile:
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    profile = Profile("s", float(stats.total_tt))  # type: ignore[attr-defined]
    roots = sorted({str(tree), *(str(p) for p in sys.path if p)}, key=len, reverse=True)
    for (filename, line, name), (_, calls, own_s, cumulative_s, _) in raw.items():
        location = f"{_short_path(filename, roots)}:{line}" if line else _short_path(filename, roots)
        key = (name, location)
        cost = profile.functions.setdefault(key, FunctionCost(name, location))
        cost.own += own_s
        cost.cumulative += cumulative_s
        cost.calls += calls
        profile.by_file_own[_file_of(location) if line else "(builtins)"] += own_s  # type: ignore[assignment]
    return profile


def _short_path(filename: str, roots: list[str]) -> str:
    for prefix in roots:
        if filename.startswith(prefix + os.sep):
            return filename[len(prefix) + 1 :]
    return filename


# -- report ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """What one profiled pgbench run measured."""

    title: str
    sampler: str
    measurement: pgbench.Measurement
    cpu_us_per_transaction: float | None
    profile: Profile
    sampler_cpu_pct: float | None = None
    notes: list[str] = field(default_factory=list)


def _share(value: float, total: float) -> float:
    return 100.0 * value / total if total else 0.0


def function_table(run: Run, key: str, count: int) -> list[str]:
    """Shares of the samples; µs per transaction are share x CPU per transaction for py-spy, and the
    profiled seconds / transactions for cProfile (which also gives exact calls per transaction)."""
    profile = run.profile
    transactions = run.measurement.transactions
    timed = profile.unit == "s" and transactions > 0
    lines = [
        "| # | function | file:line | own % | cumulative % | own µs/txn | cumulative µs/txn |"
        + (" calls/txn |" if timed else ""),
        "|--:|---|---|--:|--:|--:|--:|" + ("--:|" if timed else ""),
    ]
    for rank, cost in enumerate(profile.top(key, count), start=1):
        own, cumulative = _share(cost.own, profile.total), _share(cost.cumulative, profile.total)
        if timed:
            own_us, cumulative_us = (
                f"{1e6 * value / transactions:.2f}" for value in (cost.own, cost.cumulative)
            )
        elif run.cpu_us_per_transaction is None:
            own_us = cumulative_us = "n/a"
        else:
            own_us, cumulative_us = (
                f"{share * run.cpu_us_per_transaction / 100.0:.2f}" for share in (own, cumulative)
            )
        calls = f" {cost.calls / transactions:.2f} |" if timed else ""
        lines.append(
            f"| {rank} | `{cost.function}` | {cost.location} | {own:.1f} | {cumulative:.1f} | {own_us} "
            f"| {cumulative_us} |{calls}"
        )
    return lines


def file_table(run: Run, count: int) -> list[str]:
    profile = run.profile
    lines = ["| file | own % |", "|---|--:|"]
    for name, value in profile.by_file_own.most_common(count):
        lines.append(f"| {name} | {_share(value, profile.total):.1f} |")
    return lines


def render(run: Run, top: int) -> str:
    m = run.measurement
    per_transaction = "n/a" if run.cpu_us_per_transaction is None else f"{run.cpu_us_per_transaction:.1f}"
    cpu = "n/a" if m.pooler_cpu_pct is None else f"{m.pooler_cpu_pct:.0f}% of one core"
    sampler_cpu = (
        "" if run.sampler_cpu_pct is None else f"; py-spy itself used {run.sampler_cpu_pct:.0f}% of a core"
    )
    total = (
        f"{run.profile.total:,.0f} samples" if run.profile.unit == "samples" else f"{run.profile.total:.2f} s"
    )
    lines = [
        f"# {run.title}",
        "",
        f"- pgbench: {m.tps or 0:,.0f} tps, {m.latency_ms} ms average latency, {m.transactions:,} transactions",
        f"- proxy CPU: {cpu}, **{per_transaction} µs per transaction** (user+system time of the proxy process "
        f"over the run / transactions)",
        f"- sampler: {run.sampler}, {total} of the proxy's active time{sampler_cpu}",
        *(f"- {note}" for note in run.notes),
        *(f"- PROBLEM: {problem}" for problem in m.problems),
        "",
        f"## Top {top} by own time",
        "",
        *function_table(run, "own", top),
        "",
        f"## Top {top} by cumulative time",
        "",
        *function_table(run, "cumulative", top),
        "",
        "## Own time by file",
        "",
        *file_table(run, top),
        "",
        "py-spy: shares are of the samples in which the proxy was running or runnable (it leaves out idle "
        "samples, e.g. waiting in epoll); µs/txn = share x the proxy's CPU µs per transaction. A proxy "
        "waiting for a CPU is charged to where it was preempted, often right after a send. cProfile: shares "
        "of the profiled time, µs/txn = profiled seconds / transactions (its own overhead included), calls "
        "exact. Own time of a Python function includes the C code it calls (uvloop's transport.write and "
        "the send syscall, regex matching); without --native, uvloop's own work (epoll, recv, scheduling "
        "callbacks) shows as own time of the outermost Python frame (asyncio.run's).",
        "",
    ]
    return "\n".join(lines)


def raw_numbers(run: Run, top: int) -> dict[str, object]:
    profile = run.profile
    return {
        "title": run.title,
        "sampler": run.sampler,
        "tps": run.measurement.tps,
        "transactions": run.measurement.transactions,
        "proxy_cpu_pct": run.measurement.pooler_cpu_pct,
        "cpu_us_per_transaction": run.cpu_us_per_transaction,
        "sampler_cpu_pct": run.sampler_cpu_pct,
        "unit": profile.unit,
        "total": profile.total,
        "functions": [
            dataclasses.asdict(c)
            for c in sorted(profile.functions.values(), key=lambda cost: cost.cumulative, reverse=True)
            if c.cumulative >= profile.total * 0.001 or c in profile.top("own", top)
        ],
        "by_file_own": dict(profile.by_file_own.most_common()),
        "problems": run.measurement.problems,
        "notes": run.notes,
    }


# -- main ------------------------------------------------------------------------------------------


def _tree_name(tree: Path) -> str:
    return "current" if tree == REPO_ROOT.resolve() else re.sub(r"[^A-Za-z0-9]+", "-", tree.name).strip("-")


def _commit_of(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=False)  # fmt: skip
    commit = result.stdout.strip() or "unknown commit"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    return commit + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = (
        f"profile-{_tree_name(args.tree)}-{args.mode}"
        + ("-split" if args.split else "")
        + ("-pinned" if args.pin else "")
        + ("-lines" if args.lines else "")
        + ("-native" if args.native else "")
        + ("-nonblocking" if args.nonblocking else "")
        + ("-cprofile" if args.sampler == "cprofile" else "")
    )
    out = args.out if args.out is not None else RESULTS_DIR / f"{name}.txt"
    out = out if out.is_absolute() else Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    binary = py_spy_binary()
    sampler = args.sampler
    if sampler == "py-spy" and binary is None:
        say("py-spy not found: pip install py-spy")
        return 2
    if sampler == "auto":
        sampler = "py-spy" if binary is not None else "cprofile"
    signal.signal(signal.SIGTERM, _terminate)
    proxy_cpus: set[int] | None = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        proxy_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # inherited by PostgreSQL, pgbench and py-spy
    settings = PoolSettings(pool_size=args.pool_size)
    scenario = pgbench.Scenario(
        f"select-{args.mode}",
        f"`-S -M {args.mode}`, {args.clients} clients",
        args.clients,
        ("-S", "-M", args.mode),
    )
    title = (
        f"Shardgate profile: pgbench -S -M {args.mode}, {args.clients} clients, -j {args.threads}, "
        f"{args.duration} s, transaction mode, pool {args.pool_size}, "
        + (
            f"read/write split on (primary + replica, {READ_WRITE_SPLIT})"
            if args.split
            else "split off (primary only)"
        )
        + f"; tree {args.tree} ({_commit_of(args.tree)})"
    )
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-profile-"))
    scratch.chmod(0o755)  # the postgres OS user must reach the server directories
    notes: list[str] = []
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.push(_say_when_interrupted)
        say(
            f"PostgreSQL: starting {'a primary and a replica' if args.split else 'a primary'} in {scratch} ..."
        )
        topology = Topology.create(
            scratch / "pg",
            replicas=1 if args.split else 0,
            extra_conf={"max_connections": 300, "fsync": False},
        )
        cleanup.callback(topology.remove)
        primary = topology.primary
        assert primary is not None
        env = clean_env(
            PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"
        )
        say(f"PostgreSQL: port {primary.port}; pgbench -i -s {args.scale} ...")
        init_pgbench(primary, args.scale, env)
        login = make_login(primary, "scram-sha-256")
        replica_ports = [topology.replicas[0].port] if args.split else []

        def start_shardgate(cprofile_out: Path | None) -> ProfiledShardgate:
            work_dir = scratch / ("shardgate-cprofile" if cprofile_out else "shardgate")
            work_dir.mkdir()
            shardgate = ProfiledShardgate(
                work_dir, free_port(), primary.port, login, settings, server_password=PASSWORD,
                source_tree=args.tree, cprofile_out=cprofile_out,
            )  # fmt: skip
            # The same settings as bench.routing's Shardgates: admin listener, split setting,
            # health checks; without a replica nothing is routed.
            shardgate.config_path.write_text(
                routing_config(shardgate.config_path.read_text(), free_port(), replica_ports, DATABASE)
            )
            cleanup.callback(shardgate.stop)
            shardgate.start()
            if proxy_cpus is not None:
                os.sched_setaffinity(shardgate.pid, proxy_cpus)
            return shardgate

        cprofile_path = out.with_suffix(".prof")
        shardgate = start_shardgate(cprofile_path if sampler == "cprofile" else None)
        if sampler == "py-spy" and binary is not None:
            attached, detail = py_spy_can_attach(binary, shardgate.pid)
            if not attached:
                if args.sampler == "py-spy":
                    say(f"py-spy cannot attach to pid {shardgate.pid}: {detail}")
                    return 1
                notes.append(f"py-spy could not attach ({detail}); fell back to cProfile")
                say(notes[-1])
                shardgate.stop()
                sampler = "cprofile"
                shardgate = start_shardgate(cprofile_path)
        say(f"Shardgate on port {shardgate.port} (pid {shardgate.pid}) from {args.tree}; sampler {sampler}")
        target = pgbench.Target("shardgate", "Shardgate", shardgate.host, shardgate.port, shardgate.pid)
        pgbench_path = str(primary.bin_dir / "pgbench")
        work_dir = scratch / "pgbench"
        work_dir.mkdir()
        warm_up = pgbench.Scenario("warm-up", "warm-up", args.clients, scenario.options)
        warmed = pgbench.run(
            pgbench_path, target, warm_up, WARMUP_S, args.threads, USER, DATABASE, env, work_dir
        )
        if not warmed.ok:
            notes.append(f"warm-up failed: {'; '.join(warmed.problems[:3])}")
        say(f"warm-up: {warmed.tps or 0:,.0f} tps")

        background_pct = background_busy_pct()
        notes.append(
            f"background load (machine CPU busy with the proxy idle, 1 s before the run): {background_pct:.0f}%"
            + (
                " - other work was running: treat the numbers as noisy"
                if background_pct > NOISY_BACKGROUND_PCT
                else ""
            )
        )
        recorder = None
        sampler_cpu_pct = None
        raw_path = out.with_suffix(".raw.txt")
        if sampler == "py-spy" and binary is not None:
            recorder = PySpyRecorder(
                binary,
                shardgate.pid,
                raw_path,
                args.rate,
                args.native,
                args.lines,
                args.nonblocking,
                args.duration + 30,
            )
            cleanup.callback(recorder.kill)
            recorder.started()
        elif sampler == "cprofile":
            os.kill(shardgate.pid, signal.SIGUSR1)
        say(f"profiling: pgbench -S -M {args.mode} for {args.duration} s ...")
        user_before_s, system_before_s = user_system_seconds(shardgate.pid)
        measurement = pgbench.run(
            pgbench_path, target, scenario, args.duration, args.threads, USER, DATABASE, env, work_dir,
            cpu_seconds, rss_kb,
        )  # fmt: skip
        user_after_s, system_after_s = user_system_seconds(shardgate.pid)
        if measurement.transactions:
            notes.append(
                f"proxy CPU split: user {1e6 * (user_after_s - user_before_s) / measurement.transactions:.1f} µs "
                f"+ system (syscalls: send, recv, epoll) "
                f"{1e6 * (system_after_s - system_before_s) / measurement.transactions:.1f} µs per transaction"
            )
        if recorder is not None:
            sampler_cpu_pct = 100.0 * recorder.stop() / args.duration
            profile = read_py_spy(raw_path)
            label = "py-spy record " + " ".join(recorder.options)
            if measurement.pooler_cpu_pct is not None:
                notes.append(
                    f"py-spy saw the proxy running or runnable for {profile.total / args.rate:.1f} s of the "
                    f"{args.duration} s; its CPU time was {measurement.pooler_cpu_pct * args.duration / 100.0:.1f} s. "
                    "The difference is time spent waiting for a CPU (or idle time py-spy did not recognise), "
                    "charged to wherever the proxy was at the time"
                )
        elif sampler == "none":
            profile = Profile("samples", 0)
            label = "none (control run: nothing sampled)"
        else:
            os.kill(shardgate.pid, signal.SIGUSR2)
            deadline = time.monotonic() + SAMPLER_STOP_TIMEOUT_S
            while not cprofile_path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # dump_stats writes the file in one go, but give it a moment
            profile = read_cprofile(cprofile_path, args.tree)
            label = "cProfile (the proxy ran under it: its overhead is in the CPU per transaction)"
        shardgate.stop()
        log_problems = [
            line for line in shardgate.log_path.read_text(errors="replace").splitlines()
            if re.search(r"level=(WARNING|ERROR|CRITICAL)|Traceback", line)
        ]  # fmt: skip
        notes.extend(f"proxy log: {line[:200]}" for line in log_problems[:5])

    if measurement.machine_busy_pct is not None:
        notes.append(
            f"machine busy during the run (all CPUs, everything): {measurement.machine_busy_pct:.0f}%"
        )
    per_transaction = (
        measurement.pooler_cpu_pct * 10_000.0 / measurement.tps
        if measurement.pooler_cpu_pct is not None and measurement.tps
        else None
    )
    if proxy_cpus is not None:
        notes.append(
            f"pinned: the proxy alone on CPU {min(proxy_cpus)}, PostgreSQL, pgbench and py-spy on the others"
        )
    if args.split:
        notes.append(f"split on: health checks every {HEALTHCHECK_INTERVAL_MS} ms, as in bench.routing")
    run = Run(title, label, measurement, per_transaction, profile, sampler_cpu_pct, notes)
    text = render(run, args.top)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw_numbers(run, args.top), indent=2) + "\n")
    print(text)
    raw_file = raw_path if recorder is not None else cprofile_path if sampler == "cprofile" else None
    say(f"report written to {out}" + (f" (raw profile: {raw_file})" if raw_file else ""))
    return 0 if measurement.ok else 1


if __name__ == "__main__":
    sys.exit(main())
