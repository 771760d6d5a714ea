"""pgbench scenarios, one timed run of a scenario against one target, and parsing of pgbench's summary."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import machine_ticks

# A run may overrun -T while clients finish and disconnect; beyond this it is killed.
RUN_GRACE_S = 60.0
PROBLEM_LINES = 5


@dataclass(frozen=True, slots=True)
class Scenario:
    """One pgbench workload, run identically against every target."""

    key: str
    title: str
    clients: int
    options: tuple[str, ...] = ()
    script: str | None = None  # custom script body, instead of a builtin
    writes: bool = False  # TPC-B: tables are reset (directly on PostgreSQL) before each run
    prepared_statements: bool = False  # needs named prepared statements across transactions
    measures: str = ""


def standard_scenarios(clients: int = 16, connect_clients: int = 8) -> list[Scenario]:
    return [
        Scenario(
            "select-simple",
            f"`-S` simple, {clients} clients",
            clients,
            ("-S", "-M", "simple"),
            measures="Relay throughput with the simple query protocol (one Query message per transaction).",
        ),
        Scenario(
            "select-extended",
            f"`-S -M extended`, {clients} clients",
            clients,
            ("-S", "-M", "extended"),
            measures="Parse/Bind/Describe/Execute/Sync with the unnamed statement every transaction.",
        ),
        Scenario(
            "select-prepared",
            f"`-S -M prepared`, {clients} clients",
            clients,
            ("-S", "-M", "prepared"),
            prepared_statements=True,
            measures="Named prepared statements reused across transactions: the pooler must keep them "
            "working when a client lands on another server connection.",
        ),
        Scenario(
            "select-1",
            f"`SELECT 1` script, {clients} clients",
            clients,
            script="SELECT 1;\n",
            measures="Pure per-message pooler overhead: the server does almost no work.",
        ),
        Scenario(
            "tpcb",
            f"TPC-B (default script), {clients} clients",
            clients,
            writes=True,
            measures="Multi-statement write transactions (BEGIN ... END): the server is held for the "
            "whole transaction.",
        ),
        Scenario(
            "connect",
            f"`-S -C` (new connection per transaction), {connect_clients} clients",
            connect_clients,
            ("-S", "-C"),
            measures="Connection set-up cost: startup packet, authentication, ParameterStatus replay.",
        ),
        Scenario(
            "latency",
            "`-S -c 1` (per-query latency)",
            1,
            ("-S",),
            measures="Latency one query adds when nothing else runs: the pooler's round-trip cost.",
        ),
    ]


@dataclass(frozen=True, slots=True)
class Target:
    """Where pgbench connects: PostgreSQL itself or one of the poolers."""

    key: str  # direct | pgbouncer | shardgate
    label: str
    host: str
    port: int
    pid: int | None = None  # pooler process, for CPU accounting


@dataclass(slots=True)
class Measurement:
    """pgbench's summary of one run; `problems` is empty when the run was clean."""

    scenario: str
    target: str
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int = 0
    failed_transactions: int | None = None
    exit_code: int = 0
    pooler_cpu_pct: float | None = None
    machine_busy_pct: float | None = None
    pooler_rss_after_kb: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.tps is not None


_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def parse_summary(measurement: Measurement, stdout: str) -> None:
    """Fill tps, latency and counts from pgbench's final report."""
    if match := _TPS.search(stdout):
        measurement.tps = float(match.group(1))
    if match := _LATENCY.search(stdout):
        measurement.latency_ms = float(match.group(1))
    if match := _PROCESSED.search(stdout):
        measurement.transactions = int(match.group(1))
    if match := _FAILED.search(stdout):
        measurement.failed_transactions = int(match.group(1))


def command(
    pgbench: str, target: Target, scenario: Scenario, duration_s: int, threads: int,
    user: str, database: str, script_path: Path | None,
) -> list[str]:  # fmt: skip
    args = [
        pgbench, "-h", target.host, "-p", str(target.port), "-U", user,
        "-n",  # no vacuum through the target: TPC-B tables are reset directly between runs
        "-T", str(duration_s), "-c", str(scenario.clients), "-j", str(min(threads, scenario.clients)),
        *scenario.options,
    ]  # fmt: skip
    if script_path is not None:
        args += ["-f", str(script_path)]
    args.append(database)
    return args


def run(
    pgbench: str, target: Target, scenario: Scenario, duration_s: int, threads: int,
    user: str, database: str, env: dict[str, str], work_dir: Path,
    cpu_seconds: Callable[[int], float] | None = None,
    rss_kb: Callable[[int], int] | None = None,
) -> Measurement:  # fmt: skip
    """Run `scenario` against `target` for `duration_s`; never raises for a failed run, records it."""
    script_path = None
    if scenario.script is not None:
        script_path = work_dir / f"{scenario.key}.sql"
        script_path.write_text(scenario.script)
    argv = command(pgbench, target, scenario, duration_s, threads, user, database, script_path)
    measurement = Measurement(scenario.key, target.key)
    cpu_before = cpu_seconds(target.pid) if cpu_seconds and target.pid else None
    busy_before, total_before = machine_ticks()
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=duration_s + RUN_GRACE_S
        )
    except subprocess.TimeoutExpired:
        measurement.problems.append(f"pgbench did not finish within {duration_s + RUN_GRACE_S:.0f}s")
        measurement.exit_code = -1
        return measurement
    busy_after, total_after = machine_ticks()
    if total_after > total_before:
        measurement.machine_busy_pct = 100.0 * (busy_after - busy_before) / (total_after - total_before)
    if cpu_before is not None and cpu_seconds is not None and target.pid is not None:
        try:
            measurement.pooler_cpu_pct = 100.0 * (cpu_seconds(target.pid) - cpu_before) / duration_s
            if rss_kb is not None:
                measurement.pooler_rss_after_kb = rss_kb(target.pid)
        except OSError:
            measurement.problems.append(f"{target.label} process is gone")
    measurement.exit_code = result.returncode
    parse_summary(measurement, result.stdout)
    # The same error usually repeats once per client: keep each distinct line once.
    error_lines = list(
        dict.fromkeys(
            line for line in result.stderr.splitlines() if "error" in line.lower() or "abort" in line.lower()
        )
    )
    if result.returncode != 0:
        measurement.problems.append(f"pgbench exited with code {result.returncode}")
    if measurement.failed_transactions:
        measurement.problems.append(f"{measurement.failed_transactions} failed transactions")
    if measurement.tps is None:
        measurement.problems.append("no tps in pgbench output")
    if measurement.problems or error_lines:
        measurement.problems.extend(error_lines[:PROBLEM_LINES])
        if len(error_lines) > PROBLEM_LINES:
            measurement.problems.append(f"... {len(error_lines) - PROBLEM_LINES} more error lines")
    return measurement
