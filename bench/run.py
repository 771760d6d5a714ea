"""Benchmark run: PostgreSQL directly vs PgBouncer vs Shardgate with pgbench, plus memory per idle client.

    python -m bench.run [--quick] [--out FILE.md]      (from the repository root)

Starts a throwaway PostgreSQL, PgBouncer and Shardgate on free loopback ports, runs every scenario
against the three targets back to back, writes a Markdown report and tears everything down.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as `python bench/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import idle_clients, pgbench
from bench.report import BASELINE, TARGET_LABELS, Results, render
from bench.services import (
    REPO_ROOT,
    Login,
    PgBouncer,
    PoolSettings,
    ServiceError,
    Shardgate,
    clean_env,
    cpu_seconds,
    free_port,
    machine_ticks,
    rss_kb,
)
from bench.worktree import Worktree
from localpg import PgServer, Topology

USER = "app"
PASSWORD = "app"
DATABASE = "app"
SUPERUSER = "postgres"

FULL_DURATION_S = 10
QUICK_DURATION_S = 3
WARMUP_S = 2
BACKGROUND_SAMPLE_S = 1.0
FULL_ROUNDS = 3
QUICK_ROUNDS = 1
PGBENCH_INIT_TIMEOUT_S = 600.0
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "latest.md"
COMMITTED_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
LOG_PROBLEM = re.compile(r"level=(WARNING|ERROR|CRITICAL)|Traceback|\"level\": \"(warning|error|critical)\"")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_DURATION_S} s per run instead of {FULL_DURATION_S} s"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per pgbench run (overrides --quick)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"repeat every scenario this many times, the median run is reported "
        f"(default {FULL_ROUNDS}, --quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--pool-size", type=int, default=16, help="server connections per pool, both poolers (default 16)"
    )
    parser.add_argument(
        "--clients", type=int, default=16, help="pgbench clients for the throughput scenarios (default 16)"
    )
    parser.add_argument("--connect-clients", type=int, default=8, help="pgbench clients for -C (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument(
        "--auth",
        choices=("scram-sha-256", "md5"),
        default="scram-sha-256",
        help="client authentication on both poolers (default scram-sha-256)",
    )
    parser.add_argument(
        "--idle-clients", type=int, default=1000, help="idle clients for the memory measurement (0 skips it)"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario keys to run (default: all)")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also run the Shardgate of git revision REV (from a temporary worktree, same config) as one "
        "more target in every round, and report the after/before ratio; never replaces bench/RESULTS.md",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if args.rounds < 1 or args.pool_size < 1 or args.clients < 1 or args.threads < 1 or args.idle_clients < 0:
        parser.error("--rounds, --pool-size, --clients and --threads must be >= 1, --idle-clients >= 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so that every child is torn down by the ExitStack.
    raise SystemExit(128 + signum)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _say_when_interrupted(exc_type: type[BaseException] | None, *_: object) -> bool:
    # Pushed right after the scratch-directory cleanup, so it runs after every child was stopped.
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt | SystemExit):
        say("interrupted: Shardgate, PgBouncer and PostgreSQL stopped; scratch directory removed")
    return False


def _command_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_info(
    args: argparse.Namespace, duration_s: int, bin_dir: Path, pgbouncer: PgBouncer,
    baseline: Worktree | None = None,
) -> dict[str, str]:  # fmt: skip
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _command_output(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " + uncommitted changes"
    if baseline is not None:
        commit += f" · baseline Shardgate {baseline.label} (commit {baseline.commit})"
    postgres = _command_output([str(bin_dir / "postgres"), "--version"]).replace("postgres (PostgreSQL) ", "")
    mode = "Quick" if args.quick and args.duration is None else "Full"
    return {
        "mode": mode,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
            f"load average {_load_average()} at start"
        ),
        "versions": (
            f"PostgreSQL {postgres or 'unknown'} · {pgbouncer.version} · Python {platform.python_version()} "
            f"· uvloop {_package_version('uvloop')} · Shardgate commit {commit}"
        ),
        "setup": (
            f"pgbench scale {args.scale}, {duration_s} s per run, -j {args.threads}, {args.rounds} round(s), "
            f"targets interleaved per scenario. Both poolers: transaction mode, pool size {args.pool_size}, "
            f"client auth {args.auth}, idle-server check after 30 s, no per-connection logging; "
            "sslmode=disable everywhere."
            + (
                f" Shardgate {baseline.label}: the same config, run from a git worktree of that revision."
                if baseline is not None
                else ""
            )
        ),
    }


# -- set-up ----------------------------------------------------------------------------------------


def start_postgres(base_dir: Path) -> Topology:
    # max_connections 300 and fsync off come from localpg's settings for throwaway servers.
    return Topology.create(base_dir, replicas=0, extra_conf={"max_connections": 300, "fsync": False})


def init_pgbench(primary: PgServer, scale: int, env: dict[str, str]) -> None:
    argv = [str(primary.bin_dir / "pgbench"), "-i", "-s", str(scale), "-q",
            "-h", primary.host, "-p", str(primary.port), "-U", USER, DATABASE]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=PGBENCH_INIT_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def reset_tpcb_tables(primary: PgServer) -> None:
    """What pgbench does before a TPC-B run without -n, done directly so no target pays for it."""
    for sql in ("VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history"):
        primary.psql(sql, user=USER, db=DATABASE, password=PASSWORD)
    primary.psql("CHECKPOINT", user=SUPERUSER)


def make_login(primary: PgServer, auth: str) -> Login:
    if auth == "scram-sha-256":
        # Both poolers store the server's own SCRAM verifier (PgBouncer can then log in to the
        # server with the client's proof), so neither derives a key from a password per login.
        verifier = primary.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'", user=SUPERUSER)
        if not verifier.startswith("SCRAM-SHA-256$"):
            raise RuntimeError(f"role {USER} has no SCRAM verifier on the server")
        return Login(USER, PASSWORD, DATABASE, auth, verifier)
    return Login(USER, PASSWORD, DATABASE, auth, PASSWORD)


# -- measurement -----------------------------------------------------------------------------------


def describe(measurement: pgbench.Measurement) -> str:
    if measurement.ok:
        cpu = "" if measurement.pooler_cpu_pct is None else f", pooler CPU {measurement.pooler_cpu_pct:.0f}%"
        return f"{measurement.tps:,.0f} tps, {measurement.latency_ms} ms{cpu}"
    return "FAILED: " + "; ".join(measurement.problems[:3])


def run_scenarios(
    results: Results, scenarios: list[pgbench.Scenario], targets: list[pgbench.Target],
    primary: PgServer, poolers: list[PgBouncer | Shardgate], args: argparse.Namespace,
    duration_s: int, env: dict[str, str], work_dir: Path,
) -> None:  # fmt: skip
    total = args.rounds * len(scenarios) * len(targets)
    done = 0
    for round_index in range(args.rounds):
        # Rotate who goes first each round so that no target always runs right after another.
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        for scenario in scenarios:
            results.background_busy_pct.append(background_busy_pct())
            for target in order:
                if (scenario.key, target.key) in results.unsupported:
                    done += 1
                    continue
                for pooler in poolers:
                    pooler.check_alive()
                if scenario.writes:
                    reset_tpcb_tables(primary)
                measurement = pgbench.run(
                    str(primary.bin_dir / "pgbench"), target, scenario, duration_s, args.threads,
                    USER, DATABASE, env, work_dir, cpu_seconds, rss_kb,
                )  # fmt: skip
                results.add(measurement)
                done += 1
                say(f"[{done:>2}/{total}] {scenario.title} via {target.label}: {describe(measurement)}")


def background_busy_pct() -> float:
    """How busy the machine is while nothing of ours runs: other people's load skews every number."""
    busy_before, total_before = machine_ticks()
    time.sleep(BACKGROUND_SAMPLE_S)
    busy_after, total_after = machine_ticks()
    return 100.0 * (busy_after - busy_before) / max(1, total_after - total_before)


def warm_up(targets: list[pgbench.Target], primary: PgServer, args: argparse.Namespace,
            env: dict[str, str], work_dir: Path, results: Results) -> None:  # fmt: skip
    """A short -S run per target: poolers open their server connections, caches fill."""
    scenario = pgbench.Scenario("warm-up", "warm-up", args.clients, ("-S",))
    for target in targets:
        measurement = pgbench.run(str(primary.bin_dir / "pgbench"), target, scenario, WARMUP_S,
                                  args.threads, USER, DATABASE, env, work_dir, cpu_seconds, rss_kb)  # fmt: skip
        if measurement.pooler_rss_after_kb is not None:
            results.rss_after_warmup_kb[target.key] = measurement.pooler_rss_after_kb
        if not measurement.ok:
            results.notes.append(f"warm-up via {target.label} failed: {'; '.join(measurement.problems[:3])}")
        say(f"warm-up via {target.label}: {describe(measurement)}")


def measure_memory(results: Results, poolers: list[PgBouncer | Shardgate], count: int) -> None:
    for pooler in reversed(poolers):  # Shardgate first
        pooler.check_alive()
        say(f"memory: {count} idle clients on {pooler.label} ...")
        result = idle_clients.measure(
            pooler.label, pooler.pid, rss_kb, pooler.host, pooler.port, USER, PASSWORD, DATABASE, count
        )
        results.memory.append(result)
        per_client = "n/a" if result.per_client_kb is None else f"{result.per_client_kb:.1f} KB/client"
        say(f"memory: {pooler.label} rest {result.rss_rest_kb} KB, {result.opened} clients "
            f"{result.rss_loaded_kb} KB, {per_client}, after {result.rss_after_kb} KB")  # fmt: skip


def scan_shardgate_log(results: Results, shardgate: Shardgate, kept: Path, baseline: bool = False) -> None:
    """Copy Shardgate's stderr next to the report and pick out warnings, errors and tracebacks."""
    if not shardgate.log_path.exists():
        return
    shutil.copyfile(shardgate.log_path, kept)
    where = os.path.relpath(kept, REPO_ROOT) if kept.is_relative_to(REPO_ROOT) else str(kept)
    lines = shardgate.log_path.read_text(errors="replace").splitlines()
    findings = [line for line in lines if LOG_PROBLEM.search(line)]
    if baseline:
        results.baseline_log_path, results.baseline_log_findings = where, findings
    else:
        results.shardgate_log_path, results.shardgate_log_findings = where, findings


def write_outputs(results: Results, out: Path, full_run: bool) -> str:
    text = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "info": results.info,
        "runs": {scenario: {target: [dataclasses.asdict(m) for m in runs] for target, runs in by_target.items()}
                 for scenario, by_target in results.runs.items()},
        "memory": [dataclasses.asdict(m) for m in results.memory],
        "notes": results.notes,
        "background_busy_pct": results.background_busy_pct,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    if full_run:
        COMMITTED_RESULTS.write_text(text)
    return text


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    scenarios = pgbench.standard_scenarios(args.clients, args.connect_clients)
    if args.only:
        wanted = {key.strip() for key in args.only.split(",") if key.strip()}
        unknown = wanted - {scenario.key for scenario in scenarios}
        if unknown:
            say(f"unknown scenario(s) {sorted(unknown)}; known: {[scenario.key for scenario in scenarios]}")
            return 2
        scenarios = [scenario for scenario in scenarios if scenario.key in wanted]
    baseline: Worktree | None = None
    if args.baseline:
        try:
            baseline = Worktree(args.baseline)
        except (ServiceError, OSError, subprocess.SubprocessError) as exc:
            say(f"--baseline {args.baseline}: {exc}")
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    settings = PoolSettings(pool_size=args.pool_size)
    # Children inherit the limit: PgBouncer needs a descriptor per client and server, as do we.
    idle_clients.raise_open_file_limit(
        2 * settings.max_client_conn + args.idle_clients + idle_clients.SPARE_FDS
    )

    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    results = Results({}, scenarios)
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-bench-"))
    scratch.chmod(0o755)  # the postgres OS user must reach the server and PgBouncer directories
    failed = False
    started = time.monotonic()
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.push(_say_when_interrupted)
        if baseline is not None:
            say(f"baseline: git worktree of {baseline.revision} ({baseline.commit}) ...")
            cleanup.enter_context(baseline)
        say(f"PostgreSQL: starting in {scratch} ...")
        topology = start_postgres(scratch / "pg")
        cleanup.callback(topology.remove)
        primary = topology.primary
        assert primary is not None
        env = clean_env(
            PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"
        )
        say(f"PostgreSQL: port {primary.port}; pgbench -i -s {args.scale} ...")
        init_pgbench(primary, args.scale, env)
        login = make_login(primary, args.auth)

        pgbouncer_dir = scratch / "pgbouncer"
        shardgate_dir = scratch / "shardgate"
        pgbouncer_dir.mkdir()
        shardgate_dir.mkdir()
        pgbouncer = PgBouncer(pgbouncer_dir, free_port(), primary.port, login, settings)
        cleanup.callback(pgbouncer.stop)
        pgbouncer.start()
        shardgate = Shardgate(
            shardgate_dir, free_port(), primary.port, login, settings, server_password=PASSWORD
        )
        cleanup.callback(shardgate.stop)
        shardgate.start()
        say(f"PgBouncer on port {pgbouncer.port} (pid {pgbouncer.pid}), Shardgate on port {shardgate.port} "
            f"(pid {shardgate.pid})")  # fmt: skip
        before: Shardgate | None = None
        if baseline is not None:
            (scratch / "shardgate-baseline").mkdir()
            before = Shardgate(
                scratch / "shardgate-baseline", free_port(), primary.port, login, settings,
                server_password=PASSWORD, source_tree=baseline.path, label=f"Shardgate {baseline.label}",
            )  # fmt: skip
            cleanup.callback(before.stop)
            before.start()
            results.baseline_label = before.label
            say(f"{before.label} on port {before.port} (pid {before.pid}), from {baseline.path}")
        results.info = run_info(args, duration_s, primary.bin_dir, pgbouncer, baseline)
        if not pgbouncer.supports_prepared:
            for scenario in scenarios:
                if scenario.prepared_statements:
                    results.unsupported[(scenario.key, "pgbouncer")] = (
                        f"{pgbouncer.version} keeps no prepared statements in transaction mode "
                        "(max_prepared_statements arrived in 1.21): not run"
                    )
        poolers: list[PgBouncer | Shardgate] = [pgbouncer, shardgate]
        targets = [
            pgbench.Target("direct", TARGET_LABELS["direct"], primary.host, primary.port),
            pgbench.Target(
                "pgbouncer", TARGET_LABELS["pgbouncer"], pgbouncer.host, pgbouncer.port, pgbouncer.pid
            ),
            pgbench.Target(
                "shardgate", TARGET_LABELS["shardgate"], shardgate.host, shardgate.port, shardgate.pid
            ),
        ]
        if before is not None:
            poolers.append(before)
            targets.append(pgbench.Target(BASELINE, before.label, before.host, before.port, before.pid))
        work_dir = scratch / "pgbench"
        work_dir.mkdir()
        try:
            warm_up(targets, primary, args, env, work_dir, results)
            run_scenarios(results, scenarios, targets, primary, poolers, args, duration_s, env, work_dir)
            if args.idle_clients:
                measure_memory(results, poolers, args.idle_clients)
        except (ServiceError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failed = True
            results.notes.append(f"run stopped early: {exc}")
            say(f"run stopped early: {exc}")
        shardgate.stop()
        out.parent.mkdir(parents=True, exist_ok=True)
        scan_shardgate_log(results, shardgate, out.with_suffix(".shardgate.log"))
        if before is not None:
            before.stop()
            scan_shardgate_log(results, before, out.with_suffix(".shardgate-baseline.log"), baseline=True)
        shutil.copyfile(pgbouncer.log_path, out.with_suffix(".pgbouncer.log"))

    full_run = not failed and not args.quick and args.duration is None and not args.only and not baseline
    text = write_outputs(results, out, full_run)
    print(text)
    say(f"report written to {out}" + (f" and {COMMITTED_RESULTS}" if full_run else "")
        + f" ({time.monotonic() - started:.0f} s)")  # fmt: skip
    clean = not failed and all(
        measurement.ok
        for by_target in results.runs.values()
        for runs in by_target.values()
        for measurement in runs
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
