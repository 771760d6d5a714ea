"""Worker processes: pgbench `-S` (simple and extended) at 16 and 64 clients against PostgreSQL directly,
PgBouncer, and Shardgate with workers = 1, 2 and 4, all in the same run, with CPU per transaction.

    python -m bench.workers [--duration 5] [--rounds 1] [--out bench/results/workers.md] [--update-results]

CPU is the pooler's whole process tree (the supervisor and every worker), from /proc, over the run.
`--update-results` puts the table into bench/RESULTS.md between its "workers" markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/workers.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import pgbench, services
from bench.run import PASSWORD, background_busy_pct, init_pgbench, make_login, start_postgres
from bench.services import REPO_ROOT, PgBouncer, PoolSettings, Shardgate, clean_env, cpu_seconds, free_port

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "workers.md"
RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- workers:begin -->", "<!-- workers:end -->"
WORKER_COUNTS = (1, 2, 4)
CLIENT_COUNTS = (16, 64)


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its living children (a supervisor's workers), seconds."""
    total = cpu_seconds(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_seconds(child.pid)
        except OSError:
            pass  # exited between the listing and the read
    return total


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    target: str
    tps: float | None
    latency_ms: float | None
    cpu_pct: float | None  # of one core
    transactions: int
    problems: tuple[str, ...]

    @property
    def cpu_us_per_transaction(self) -> float | None:
        if self.cpu_pct is None or not self.tps:
            return None
        return self.cpu_pct / 100 / self.tps * 1e6


def median_run(found: list[Row]) -> Row:
    """The median run by TPS (a failed run counts as 0), with every run's problems."""
    ranked = sorted(found, key=lambda row: row.tps or 0.0)
    middle = ranked[(len(ranked) - 1) // 2]
    problems = tuple(problem for row in found for problem in row.problems)
    return Row(middle.scenario, middle.target, middle.tps, middle.latency_ms, middle.cpu_pct, middle.transactions,
               problems)


def wait_until_ready(proxy: Shardgate, timeout_s: float = 120.0) -> None:
    """The port answers once one worker listens; the supervisor logs `event=listening` once all do."""
    deadline = time.monotonic() + timeout_s
    while "event=listening" not in proxy.log_path.read_text(errors="replace"):
        proxy.check_alive()
        if time.monotonic() > deadline:
            raise services.ServiceError(f"{proxy.label}: not every worker was ready after {timeout_s:.0f}s")
        time.sleep(0.2)


def scenarios() -> list[pgbench.Scenario]:
    found = []
    for clients in CLIENT_COUNTS:
        found.append(pgbench.Scenario(f"simple-{clients}", f"`-S` simple, {clients} clients", clients,
                                      ("-S", "-M", "simple")))
        found.append(pgbench.Scenario(f"extended-{clients}", f"`-S -M extended`, {clients} clients", clients,
                                      ("-S", "-M", "extended")))
    return found


def with_workers(shardgate: Shardgate, workers: int) -> None:
    """The bench's Shardgate config with `workers` set (the rest stays like for like with PgBouncer)."""
    text = shardgate.config_path.read_text()
    shardgate.config_path.write_text(text.replace("[general]\n", f"[general]\nworkers = {workers}\n", 1))


def render(rows: list[Row], info: dict[str, str], targets: list[tuple[str, str]]) -> str:
    by = {(row.scenario, row.target): row for row in rows}
    titles = {s.key: s.title for s in scenarios()}
    lines = [
        "## Worker processes (issue 16)", "",
        f"{info['when']} · {info['machine']} · {info['versions']}", "",
        f"`python -m bench.workers --duration {info['duration']} --rounds {info['rounds']}`: pgbench -j 2, "
        f"{info['duration']} s per run, the median of {info['rounds']} round(s), targets back to back per scenario "
        f"(their order rotating each round); both poolers in transaction mode, pool size "
        f"{info['pool_size']} (Shardgate divides it among its workers), client auth scram-sha-256. Pooler CPU is "
        f"its whole process tree (supervisor and workers) in % of one core; CPU per transaction is that CPU over "
        f"the transactions done. The machine has {os.cpu_count()} cores for pgbench, PostgreSQL and the pooler "
        f"together: a worker only adds throughput when a core sits idle for it; read the CPU per transaction "
        f"for what each process costs.", "",
        "| scenario | " + " | ".join(f"{label} TPS" for _, label in targets) + " | best Shardgate/PgBouncer |",
        "|---|" + "--:|" * (len(targets) + 1),
    ]
    for key, title in titles.items():
        cells = []
        for target, _ in targets:
            row = by.get((key, target))
            cells.append("failed" if row is None or row.tps is None else f"{row.tps:,.0f}")
        bouncer = by.get((key, "pgbouncer"))
        best = max((by[(key, t)].tps or 0.0 for t, _ in targets if t.startswith("shardgate") and (key, t) in by),
                   default=0.0)
        ratio = f"{best / bouncer.tps:.2f}x" if bouncer and bouncer.tps else "n/a"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Pooler CPU (% of one core) and CPU per transaction (µs):", "",
              "| scenario | " + " | ".join(f"{label}" for t, label in targets if t != "direct") + " |",
              "|---|" + "--:|" * (len(targets) - 1)]
    for key, title in titles.items():
        cells = []
        for target, _ in targets:
            if target == "direct":
                continue
            row = by.get((key, target))
            if row is None or row.cpu_pct is None or row.cpu_us_per_transaction is None:
                cells.append("n/a")
            else:
                cells.append(f"{row.cpu_pct:.0f}% · {row.cpu_us_per_transaction:.0f} µs")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    problems = [f"- {row.scenario} via {row.target}: {'; '.join(row.problems)}" for row in rows if row.problems]
    lines += ["", "Problems: " + ("none (every run exited 0 with no failed transaction)." if not problems else ""),
              *problems, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run, report the median by TPS; the "
                        "targets' order rotates each round (default 1)")
    parser.add_argument("--pool-size", type=int, default=16, help="server connections per pool (default 16)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--update-results", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args(argv)
    # four workers start four Python processes at once: on a loaded two-core machine that takes a while
    services.START_TIMEOUT_S = max(services.START_TIMEOUT_S, 120.0)
    settings = PoolSettings(pool_size=args.pool_size)
    rows: list[Row] = []
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-bench-workers-"))
    scratch.chmod(0o755)  # the postgres OS user must reach the server and PgBouncer directories
    busy: list[float] = []
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        topology = start_postgres(scratch / "pg")
        cleanup.callback(topology.remove)
        primary = topology.primary
        assert primary is not None
        env = clean_env(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10")
        init_pgbench(primary, args.scale, env)
        login = make_login(primary, "scram-sha-256")
        (scratch / "pgbouncer").mkdir()
        bouncer = PgBouncer(scratch / "pgbouncer", free_port(), primary.port, login, settings)
        cleanup.callback(bouncer.stop)
        bouncer.start()
        targets = [pgbench.Target("direct", "direct", primary.host, primary.port),
                   pgbench.Target("pgbouncer", "PgBouncer", bouncer.host, bouncer.port, bouncer.pid)]
        for workers in WORKER_COUNTS:
            work_dir = scratch / f"shardgate-{workers}"
            work_dir.mkdir()
            proxy = Shardgate(work_dir, free_port(), primary.port, login, settings, server_password=PASSWORD,
                              label=f"Shardgate w{workers}")
            with_workers(proxy, workers)
            cleanup.callback(proxy.stop)
            proxy.start()
            wait_until_ready(proxy)
            targets.append(pgbench.Target(f"shardgate-{workers}", f"Shardgate workers={workers}", proxy.host,
                                          proxy.port, proxy.pid))
        pgbench_dir = scratch / "pgbench"
        pgbench_dir.mkdir()
        binary = str(primary.bin_dir / "pgbench")
        warm = pgbench.Scenario("warm-up", "warm-up", 64, ("-S",))
        for target in targets:  # every pooler opens its servers and every worker warms up
            pgbench.run(binary, target, warm, 2, 2, "app", "app", env, pgbench_dir)
        runs: dict[tuple[str, str], list[Row]] = {}
        for round_index in range(args.rounds):
            order = targets[round_index % len(targets):] + targets[:round_index % len(targets)]
            for scenario in scenarios():
                busy.append(background_busy_pct())
                for target in order:
                    result = pgbench.run(binary, target, scenario, args.duration, 2, "app", "app", env,
                                         pgbench_dir, tree_cpu_seconds)
                    runs.setdefault((scenario.key, target.key), []).append(
                        Row(scenario.key, target.key, result.tps, result.latency_ms, result.pooler_cpu_pct,
                            result.transactions, tuple(result.problems)))
                    cpu = "" if result.pooler_cpu_pct is None else f", CPU {result.pooler_cpu_pct:.0f}%"
                    print(f"[{round_index + 1}/{args.rounds}] {scenario.title} via {target.label}: {result.tps} "
                          f"tps{cpu} {result.problems or ''}", file=sys.stderr, flush=True)
        rows = [median_run(found) for found in runs.values()]
        info = {
            "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, background load "
                       f"{statistics.mean(busy):.0f}% (max {max(busy):.0f}%) before the scenarios",
            "versions": f"{bouncer.version} · Python {platform.python_version()}",
            "duration": str(args.duration),
            "rounds": str(args.rounds),
            "pool_size": str(args.pool_size),
        }
        text = render(rows, info, [(t.key, t.label) for t in targets])
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    if args.update_results:
        current = RESULTS.read_text()
        section = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in current and END in current:
            head, _, rest = current.partition(BEGIN)
            current = head + section + rest.partition(END)[2]
        else:
            current = current.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.write_text(current)
    return 0 if all(not row.problems for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
