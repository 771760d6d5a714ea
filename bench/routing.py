"""Routing overhead: pgbench -S through Shardgate with read/write splitting off vs on, and the parse cache hit rate.

    python -m bench.routing [--quick] [--out FILE.md]      (from the repository root)

Starts a throwaway primary with one streaming replica, PgBouncer and two Shardgates on free loopback
ports, runs the -S scenarios against all of them and PostgreSQL directly, interleaved, reads
Shardgate's router cache counters from /metrics around each run, writes a Markdown report and tears
everything down.
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
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/routing.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pgbench
from bench.report import MISSING, Results, background_lines
from bench.run import (
    DATABASE,
    LOG_PROBLEM,
    PASSWORD,
    QUICK_ROUNDS,
    USER,
    _say_when_interrupted,
    _terminate,
    background_busy_pct,
    describe,
    init_pgbench,
    make_login,
    run_info,
    say,
    warm_up,
)
from bench.services import (
    LOCALHOST,
    REPO_ROOT,
    Login,
    PgBouncer,
    PoolSettings,
    ServiceError,
    Shardgate,
    clean_env,
    cpu_seconds,
    free_port,
    rss_kb,
)
from bench.worktree import Worktree
from localpg import Topology

FULL_DURATION_S = 10
QUICK_DURATION_S = 3
FULL_ROUNDS = 3
SCENARIO_KEYS = ("select-simple", "select-extended", "select-prepared")
HEALTHCHECK_INTERVAL_MS = 1000
READ_WRITE_SPLIT = "include_primary"

CACHE_HITS = "shardgate_router_cache_hits_total"
CACHE_MISSES = "shardgate_router_cache_misses_total"
METRICS_TIMEOUT_S = 5.0
METRICS_MAX_BYTES = 4 * 1024 * 1024

DIRECT, PGBOUNCER, SPLIT_OFF, SPLIT_ON = "direct", "pgbouncer", "split-off", "split-on"
LABELS = {DIRECT: "direct", PGBOUNCER: "PgBouncer", SPLIT_OFF: "split off", SPLIT_ON: "split on"}
# The same two Shardgates run from a worktree of another revision (`--baseline REV`).
SPLIT_OFF_BEFORE, SPLIT_ON_BEFORE = "split-off-baseline", "split-on-baseline"
SPLIT_ON_KEYS = (SPLIT_ON, SPLIT_ON_BEFORE)
# (split off, split on) of the current tree, then of the baseline.
SPLIT_PAIRS = ((SPLIT_OFF, SPLIT_ON), (SPLIT_OFF_BEFORE, SPLIT_ON_BEFORE))
PGBOUNCER_PROBLEM = re.compile(r"\b(WARNING|ERROR|FATAL|PANIC)\b")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "routing-latest.md"
COMMITTED_RESULTS = REPO_ROOT / "bench" / "ROUTING.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_DURATION_S} s per run instead of {FULL_DURATION_S} s"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per pgbench run (overrides --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None,
        help=f"repeat every scenario this many times, the median run is reported "
        f"(default {FULL_ROUNDS}, --quick {QUICK_ROUNDS})",
    )  # fmt: skip
    parser.add_argument("--pool-size", type=int, default=16, help="server connections per pool (default 16)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument(
        "--auth", choices=("scram-sha-256", "md5"), default="scram-sha-256",
        help="client authentication on every pooler (default scram-sha-256)",
    )  # fmt: skip
    parser.add_argument(
        "--only", default="",
        help=f"comma-separated scenario keys to run, of {', '.join(SCENARIO_KEYS)} (default: all); "
        "such a run never replaces bench/ROUTING.md",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="REV", default=None,
        help="also run split off and split on Shardgates of git revision REV (from a temporary worktree, "
        "same configs) in every round; never replaces bench/ROUTING.md",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if min(args.rounds, args.pool_size, args.clients, args.threads, args.scale) < 1:
        parser.error("--rounds, --pool-size, --clients, --threads and --scale must be >= 1")
    if args.duration is not None and args.duration < 1:
        parser.error("--duration must be >= 1")
    args.only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(args.only) - set(SCENARIO_KEYS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIO_KEYS)}")
    return args


# -- Shardgate with an admin listener and routing settings -----------------------------------------


class RoutingShardgate(Shardgate):
    """bench.services' Shardgate plus an admin listener (for /metrics), the split settings and replicas.

    Both instances get the same [general] settings; they differ only in the replica [[databases]]
    entries, and without replicas Shardgate does not route (nothing is parsed).
    """

    def __init__(
        self, label: str, work_dir: Path, port: int, admin_port: int, primary_port: int,
        replica_ports: list[int], login: Login, settings: PoolSettings, server_password: str,
        source_tree: Path | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            work_dir, port, primary_port, login, settings, server_password=server_password,
            source_tree=source_tree, label=label,
        )  # fmt: skip
        self.admin_port = admin_port
        self.config_path.write_text(
            routing_config(self.config_path.read_text(), admin_port, replica_ports, login.database)
        )

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}/metrics"


def routing_config(base: str, admin_port: int, replica_ports: list[int], database: str) -> str:
    """The generated config with the admin listener on, the split settings and one entry per replica."""
    anchor = 'admin_listen = ""\n'
    if base.count(anchor) != 1:
        raise RuntimeError(f"bench.services' Shardgate config changed: no single line {anchor.strip()!r}")
    general = (
        f"admin_listen = {json.dumps(f'{LOCALHOST}:{admin_port}')}\n"
        f"read_write_split = {json.dumps(READ_WRITE_SPLIT)}\n"
        f"healthcheck_interval_ms = {HEALTHCHECK_INTERVAL_MS}\n"
    )
    text = base.replace(anchor, general)
    for port in replica_ports:
        text += (
            "\n[[databases]]\n"
            f"name = {json.dumps(database)}\n"
            f"host = {json.dumps(LOCALHOST)}\n"
            f"port = {port}\n"
            f"database_name = {json.dumps(database)}\n"
            'role = "replica"\n'
        )
    return text


# -- the router cache counters from /metrics ---------------------------------------------------------


class MetricsError(RuntimeError):
    """/metrics could not be read or lacks the router cache counters."""


@dataclass(frozen=True, slots=True)
class CacheCounters:
    """The router's parse cache counters at one moment, or their change over one run."""

    hits: int
    misses: int

    def __sub__(self, earlier: CacheCounters) -> CacheCounters:
        return CacheCounters(self.hits - earlier.hits, self.misses - earlier.misses)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups > 0 else None


# Loopback only: never through an HTTP proxy from the environment.
_DIRECT_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_metrics(url: str) -> str:
    try:
        with _DIRECT_HTTP.open(url, timeout=METRICS_TIMEOUT_S) as response:
            return str(response.read(METRICS_MAX_BYTES).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        raise MetricsError(f"GET {url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MetricsError(f"GET {url}: {reason}") from exc


def read_cache_counters(url: str) -> CacheCounters:
    text = fetch_metrics(url)
    values = prometheus_values(text, (CACHE_HITS, CACHE_MISSES))
    missing = [name for name in (CACHE_HITS, CACHE_MISSES) if name not in values]
    if missing:
        raise MetricsError(f"GET {url}: no {' or '.join(missing)} in the response")
    return CacheCounters(round(values[CACHE_HITS]), round(values[CACHE_MISSES]))


def prometheus_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Values of the named samples in Prometheus text format, summed over label sets."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if match is None or match.group(1) not in names:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        found[match.group(1)] = found.get(match.group(1), 0.0) + value
    return found


# -- results ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class RoutingResults:
    """bench.report's Results (runs, notes, background load) plus the cache counters and log findings."""

    results: Results
    # Counter change over each split-on run, by the run's Measurement.
    cache_runs: list[tuple[pgbench.Measurement, CacheCounters]] = field(default_factory=list)
    split_off_lookups: int = 0  # router cache lookups in the split-off Shardgate: should stay 0
    metrics_problems: list[str] = field(default_factory=list)
    log_findings: dict[str, list[str]] = field(default_factory=dict)
    log_paths: dict[str, str] = field(default_factory=dict)
    # Target labels by key: LABELS, plus the baseline's two Shardgates when there are.
    labels: dict[str, str] = field(default_factory=lambda: dict(LABELS))
    baseline_label: str | None = None

    @property
    def split_pairs(self) -> tuple[tuple[str, str], ...]:
        return SPLIT_PAIRS if self.baseline_label else SPLIT_PAIRS[:1]

    def cache_of(self, measurement: pgbench.Measurement | None) -> CacheCounters | None:
        return next((delta for run, delta in self.cache_runs if run is measurement), None)

    def tps_ratio(self, scenario: str, numerator: str, denominator: str) -> float | None:
        top = self.results.representative(scenario, numerator)
        bottom = self.results.representative(scenario, denominator)
        if top is None or bottom is None or top.tps is None or not bottom.tps:
            return None
        return top.tps / bottom.tps

    def note_metrics_problem(self, problem: str) -> None:
        if problem not in self.metrics_problems:
            self.metrics_problems.append(problem)


# -- measurement -----------------------------------------------------------------------------------


def sample(state: RoutingResults, shardgate: RoutingShardgate) -> CacheCounters | None:
    try:
        return read_cache_counters(shardgate.metrics_url)
    except MetricsError as exc:
        state.note_metrics_problem(f"{shardgate.label}: {exc}")
        return None


def run_scenarios(
    state: RoutingResults, scenarios: list[pgbench.Scenario], targets: list[pgbench.Target],
    pgbouncer: PgBouncer, shardgates: dict[str, RoutingShardgate],
    args: argparse.Namespace, pgbench_path: str, duration_s: int, env: dict[str, str], work_dir: Path,
) -> None:  # fmt: skip
    results = state.results
    total = args.rounds * sum(
        1
        for scenario in scenarios
        for target in targets
        if (scenario.key, target.key) not in results.unsupported
    )
    done = 0
    for round_index in range(args.rounds):
        # Rotate who goes first each round so that no target always runs right after another.
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        for scenario in scenarios:
            results.background_busy_pct.append(background_busy_pct())
            for target in order:
                if (scenario.key, target.key) in results.unsupported:
                    continue
                for pooler in (pgbouncer, *shardgates.values()):
                    pooler.check_alive()
                shardgate = shardgates.get(target.key)
                before = sample(state, shardgate) if shardgate is not None else None
                measurement = pgbench.run(
                    pgbench_path, target, scenario, duration_s, args.threads,
                    USER, DATABASE, env, work_dir, cpu_seconds, rss_kb,
                )  # fmt: skip
                after = sample(state, shardgate) if shardgate is not None and before is not None else None
                results.add(measurement)
                done += 1
                cache = ""
                if before is not None and after is not None:
                    delta = after - before
                    if target.key in SPLIT_ON_KEYS:
                        state.cache_runs.append((measurement, delta))
                        cache = f", cache {_hit_rate(delta)}"
                    else:
                        state.split_off_lookups += delta.lookups
                        cache = f", cache lookups {delta.lookups}"
                say(
                    f"[{done:>2}/{total}] {scenario.title} via {target.label}: {describe(measurement)}{cache}"
                )


def save_metrics(state: RoutingResults, shardgates: list[RoutingShardgate], out: Path) -> None:
    """Each Shardgate's whole /metrics at the end, next to the report: pools, health, lag for a closer look."""
    for shardgate in shardgates:
        if shardgate.process is None or shardgate.process.poll() is not None:
            continue
        try:
            text = fetch_metrics(shardgate.metrics_url)
        except MetricsError as exc:
            state.note_metrics_problem(f"{shardgate.label}: {exc}")
            continue
        out.with_suffix(f".{_file_label(shardgate)}.metrics.txt").write_text(text)


def _file_label(service: PgBouncer | RoutingShardgate) -> str:
    if isinstance(service, PgBouncer):
        return "pgbouncer"
    return re.sub(r"[^a-z0-9]+", "-", service.label.lower()).strip("-")


def scan_logs(state: RoutingResults, services: list[PgBouncer | RoutingShardgate], out: Path) -> None:
    """Copy each proxy's stderr next to the report and pick out warnings, errors and tracebacks."""
    for service in services:
        if not service.log_path.exists():
            continue
        kept = out.with_suffix(f".{_file_label(service)}.log")
        shutil.copyfile(service.log_path, kept)
        state.log_paths[service.label] = (
            os.path.relpath(kept, REPO_ROOT) if kept.is_relative_to(REPO_ROOT) else str(kept)
        )
        pattern = PGBOUNCER_PROBLEM if isinstance(service, PgBouncer) else LOG_PROBLEM
        lines = service.log_path.read_text(errors="replace").splitlines()
        state.log_findings[service.label] = [line for line in lines if pattern.search(line)]


# -- report ----------------------------------------------------------------------------------------


def _tps(state: RoutingResults, scenario: str, target: str) -> str:
    picked = state.results.representative(scenario, target)
    failed = bool(state.results.failures(scenario, target))
    if picked is None or picked.tps is None:
        return "FAILED" if failed else MISSING
    return f"{picked.tps:,.0f}" + (" (some runs FAILED)" if failed else "")


def _ratio(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.1f}%"


def _hit_rate(delta: CacheCounters | None) -> str:
    if delta is None:
        return MISSING
    rate = delta.hit_rate
    if rate is None:
        return "no lookups"
    return f"{100.0 * rate:.1f}% ({delta.hits:,} / {delta.lookups:,})"


def _number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def throughput_table(state: RoutingResults, scenarios: list[pgbench.Scenario]) -> list[str]:
    keys = list(state.labels)
    header = [state.labels[key] for key in keys]
    for _, on in state.split_pairs:
        suffix = "" if on == SPLIT_ON else f" ({state.baseline_label})"
        header += [f"on/off ratio{suffix}", f"on/PgBouncer{suffix}", f"cache hit rate{suffix}"]
    if state.baseline_label:
        header += [f"after/before split off (vs {state.baseline_label})", "after/before split on"]
    lines = ["| scenario | " + " | ".join(header) + " |", "|---|" + "--:|" * len(header)]
    footnotes: dict[str, int] = {}
    for scenario in scenarios:
        if scenario.key not in state.results.runs:
            continue
        cells = [scenario.title]
        for key in keys:
            reason = state.results.unsupported.get((scenario.key, key))
            if reason is None:
                cells.append(_tps(state, scenario.key, key))
            else:
                cells.append(f"not run[^{footnotes.setdefault(reason, len(footnotes) + 1)}]")
        for off, on in state.split_pairs:
            cells.append(_ratio(state.tps_ratio(scenario.key, on, off)))
            cells.append(_ratio(state.tps_ratio(scenario.key, on, PGBOUNCER)))
            cells.append(_hit_rate(state.cache_of(state.results.representative(scenario.key, on))))
        if state.baseline_label:
            # Median of the per-round ratios, as bench.run's after/before.
            cells.append(_ratio(state.results.ratio(scenario.key, SPLIT_OFF, SPLIT_OFF_BEFORE)))
            cells.append(_ratio(state.results.ratio(scenario.key, SPLIT_ON, SPLIT_ON_BEFORE)))
        lines.append("| " + " | ".join(cells) + " |")
    if footnotes:
        lines.append("")
        lines.extend(f"[^{number}]: {reason}" for reason, number in footnotes.items())
    return lines


def latency_cpu_table(state: RoutingResults, scenarios: list[pgbench.Scenario]) -> list[str]:
    keys = list(state.labels)
    poolers = [key for key in keys if key != DIRECT]
    header = [f"latency ms: {state.labels[key]}" for key in keys]
    header += [f"pooler CPU: {state.labels[key]}" for key in poolers]
    lines = ["| scenario | " + " | ".join(header) + " |", "|---|" + "--:|" * len(header)]
    for scenario in scenarios:
        if scenario.key not in state.results.runs:
            continue
        picked = {key: state.results.representative(scenario.key, key) for key in keys}
        cells = [scenario.title]
        cells += [_number(m.latency_ms if m else None, 3) for m in picked.values()]
        cells += [
            MISSING if (m := picked[key]) is None or m.pooler_cpu_pct is None else f"{m.pooler_cpu_pct:.0f}%"
            for key in poolers
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cpu_per_transaction_table(state: RoutingResults, scenarios: list[pgbench.Scenario]) -> list[str]:
    """Pooler CPU µs per transaction: what routing costs the proxy itself, steadier than TPS."""
    poolers = [key for key in state.labels if key != DIRECT]
    header = [f"{state.labels[key]} µs/txn" for key in poolers]
    for _, on in state.split_pairs:
        suffix = "" if on == SPLIT_ON else f" ({state.baseline_label})"
        header += [f"on - off µs{suffix}", f"on/off{suffix}"]
    lines = ["| scenario | " + " | ".join(header) + " |", "|---|" + "--:|" * len(header)]
    for scenario in scenarios:
        if scenario.key not in state.results.runs:
            continue
        cost = {key: state.results.cpu_us_per_transaction(scenario.key, key) for key in poolers}
        cells = [scenario.title, *(_number(cost[key], 1) for key in poolers)]
        for off, on in state.split_pairs:
            on_us, off_us = cost[on], cost[off]
            if on_us is None or off_us is None or not off_us:
                cells += [MISSING, MISSING]
            else:
                cells += [f"{on_us - off_us:+.1f}", _ratio(on_us / off_us)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def problems_section(state: RoutingResults, scenarios: list[pgbench.Scenario]) -> list[str]:
    lines: list[str] = []
    for scenario in scenarios:
        for key, label in state.labels.items():
            for measurement in state.results.failures(scenario.key, key):
                detail = "; ".join(measurement.problems) or "no result"
                lines.append(f"- {scenario.title} via {label}: {detail}")
    lines.extend(f"- {note}" for note in state.results.notes)
    lines.extend(
        f"- router cache counters not available, so no hit rate: {problem}"
        for problem in state.metrics_problems
    )
    if state.split_off_lookups:
        lines.append(
            f"- the split-off Shardgate(s) made {state.split_off_lookups:,} router cache lookups: "
            "they should parse nothing"
        )
    for label, findings in state.log_findings.items():
        where = state.log_paths.get(label, "")
        if findings:
            lines.append(f"- {label} stderr ({where}) has {len(findings)} warning/error line(s); first ones:")
            lines.extend(f"    - `{line[:300]}`" for line in findings[:10])
        else:
            lines.append(f"- {label} stderr ({where}): no warnings, errors or tracebacks.")
    return ["## Problems", "", *(lines or ["- none"]), ""]


def render(state: RoutingResults, scenarios: list[pgbench.Scenario]) -> str:
    info = state.results.info
    title = "# Shardgate routing overhead: read/write splitting off vs on"
    baseline_note = ""
    if state.baseline_label:
        title += f", this tree vs {state.baseline_label}"
        baseline_note = (
            f" The ({state.baseline_label}) columns are the same two Shardgates run from a git worktree of "
            "that revision, interleaved in every round; after/before is this tree's TPS over the baseline's, "
            "the median of the per-round ratios."
        )
    return "\n".join([
        title,
        "",
        f"{info['mode']} run, {info['started']} · {info['machine']}",
        "",
        info["versions"],
        "",
        info["setup"],
        "",
        *background_lines(state.results),
        "## pgbench `-S` throughput (TPS)",
        "",
        *throughput_table(state, scenarios),
        "",
        "split off: Shardgate with the primary only (no routing, nothing parsed). split on: primary + "
        f"replica, `read_write_split = \"{READ_WRITE_SPLIT}\"`, so reads alternate between both servers. "
        "on/off ratio: split on TPS / split off TPS; on/PgBouncer: split on TPS / PgBouncer TPS. Cache hit "
        f"rate: `{CACHE_HITS}` / (hits + misses) over the split-on run shown, hits / lookups in brackets. "
        "With several rounds the median run by TPS is shown." + baseline_note,
        "",
        "## Pooler CPU per transaction",
        "",
        *cpu_per_transaction_table(state, scenarios),
        "",
        "User+system CPU time of the pooler process over a run divided by the transactions pgbench "
        "completed, the median over the rounds. on - off: what routing costs per transaction; on/off: "
        "split on µs / split off µs.",
        "",
        "## Latency and pooler CPU",
        "",
        *latency_cpu_table(state, scenarios),
        "",
        "Latency: pgbench's average per transaction. Pooler CPU: user+system time of the pooler process "
        "over the run, % of one core.",
        "",
        *problems_section(state, scenarios),
    ])  # fmt: skip


def write_outputs(state: RoutingResults, scenarios: list[pgbench.Scenario], out: Path, full_run: bool) -> str:
    text = render(state, scenarios)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "info": state.results.info,
        "runs": {scenario: {target: [dataclasses.asdict(m) for m in runs] for target, runs in by_target.items()}
                 for scenario, by_target in state.results.runs.items()},
        "cache": [{"scenario": m.scenario, "tps": m.tps, "hits": d.hits, "misses": d.misses}
                  for m, d in state.cache_runs],
        "split_off_cache_lookups": state.split_off_lookups,
        "metrics_problems": state.metrics_problems,
        "notes": state.results.notes,
        "background_busy_pct": state.results.background_busy_pct,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    if full_run:
        COMMITTED_RESULTS.write_text(text)
    return text


# -- main ------------------------------------------------------------------------------------------


def setup_text(args: argparse.Namespace, duration_s: int) -> str:
    return (
        f"Primary + 1 streaming replica, pgbench scale {args.scale}, {duration_s} s per run, -c {args.clients} "
        f"-j {args.threads}, {args.rounds} round(s), targets interleaved per scenario. PgBouncer and both "
        f"Shardgates: transaction mode, pool size {args.pool_size} per server, client auth {args.auth}. "
        f'Both Shardgates: `read_write_split = "{READ_WRITE_SPLIT}"`, '
        f"`healthcheck_interval_ms = {HEALTHCHECK_INTERVAL_MS}`, admin listener on (for /metrics); "
        "split off has the primary only, split on also the replica. sslmode=disable everywhere."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    wanted = args.only or SCENARIO_KEYS
    scenarios = [s for s in pgbench.standard_scenarios(args.clients) if s.key in wanted]
    baseline: Worktree | None = None
    if args.baseline:
        try:
            baseline = Worktree(args.baseline)
        except (ServiceError, OSError, subprocess.SubprocessError) as exc:
            say(f"--baseline {args.baseline}: {exc}")
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    settings = PoolSettings(pool_size=args.pool_size)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    state = RoutingResults(Results(info={}, scenarios=scenarios))
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-routing-"))
    scratch.chmod(0o755)  # the postgres OS user must reach the server and PgBouncer directories
    failed = False
    started = time.monotonic()
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.push(_say_when_interrupted)
        if baseline is not None:
            say(f"baseline: git worktree of {baseline.revision} ({baseline.commit}) ...")
            cleanup.enter_context(baseline)
            state.baseline_label = baseline.label
            state.labels[SPLIT_OFF_BEFORE] = f"split off {baseline.label}"
            state.labels[SPLIT_ON_BEFORE] = f"split on {baseline.label}"
        say(f"PostgreSQL: starting a primary and a streaming replica in {scratch} ...")
        topology = Topology.create(
            scratch / "pg", replicas=1, extra_conf={"max_connections": 300, "fsync": False}
        )
        cleanup.callback(topology.remove)
        primary = topology.primary
        assert primary is not None
        replica = topology.replicas[0]
        env = clean_env(
            PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"
        )
        say(
            f"PostgreSQL: primary port {primary.port}, replica port {replica.port}; pgbench -i -s {args.scale} ..."
        )
        init_pgbench(primary, args.scale, env)
        login = make_login(primary, args.auth)

        for name in ("pgbouncer", "pgbench"):
            (scratch / name).mkdir()
        pgbouncer = PgBouncer(scratch / "pgbouncer", free_port(), primary.port, login, settings)
        cleanup.callback(pgbouncer.stop)
        pgbouncer.start()
        say(f"PgBouncer on port {pgbouncer.port}")
        shardgates: dict[str, RoutingShardgate] = {}
        for off, on in state.split_pairs:
            tree = None if on == SPLIT_ON or baseline is None else baseline.path
            for key, replica_ports in ((off, []), (on, [replica.port])):
                (scratch / key).mkdir()
                shardgate = RoutingShardgate(
                    f"Shardgate {state.labels[key]}", scratch / key, free_port(), free_port(), primary.port,
                    replica_ports, login, settings, server_password=PASSWORD, source_tree=tree,
                )  # fmt: skip
                cleanup.callback(shardgate.stop)
                shardgate.start()
                shardgates[key] = shardgate
                say(f"{shardgate.label} on port {shardgate.port} (admin {shardgate.admin_port}, "
                    f"pid {shardgate.pid}) from {shardgate.source_tree}")  # fmt: skip
        state.results.info = run_info(args, duration_s, primary.bin_dir, pgbouncer, baseline)
        state.results.info["setup"] = setup_text(args, duration_s)
        if not pgbouncer.supports_prepared:
            for scenario in scenarios:
                if scenario.prepared_statements:
                    state.results.unsupported[(scenario.key, PGBOUNCER)] = (
                        f"{pgbouncer.version} keeps no prepared statements in transaction mode "
                        "(max_prepared_statements arrived in 1.21): not run"
                    )
        targets = [
            pgbench.Target(DIRECT, LABELS[DIRECT], primary.host, primary.port),
            pgbench.Target(PGBOUNCER, LABELS[PGBOUNCER], pgbouncer.host, pgbouncer.port, pgbouncer.pid),
            *(
                pgbench.Target(key, state.labels[key], shardgate.host, shardgate.port, shardgate.pid)
                for key, shardgate in shardgates.items()
            ),
        ]
        pgbench_path = str(primary.bin_dir / "pgbench")
        work_dir = scratch / "pgbench"
        try:
            warm_up(targets, primary, args, env, work_dir, state.results)
            run_scenarios(state, scenarios, targets, pgbouncer, shardgates, args, pgbench_path,
                          duration_s, env, work_dir)  # fmt: skip
        except (ServiceError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failed = True
            state.results.notes.append(f"run stopped early: {exc}")
            say(f"run stopped early: {exc}")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_metrics(state, list(shardgates.values()), out)
        for service in (*reversed(shardgates.values()), pgbouncer):
            service.stop()
        scan_logs(state, [pgbouncer, *shardgates.values()], out)

    full_run = not failed and not args.quick and args.duration is None and not args.only and baseline is None
    text = write_outputs(state, scenarios, out, full_run)
    print(text)
    say(f"report written to {out}" + (f" and {COMMITTED_RESULTS}" if full_run else "")
        + f" ({time.monotonic() - started:.0f} s)")  # fmt: skip
    clean = not failed and all(
        m.ok for by_target in state.results.runs.values() for runs in by_target.values() for m in runs
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
