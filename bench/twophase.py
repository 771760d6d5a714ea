"""Two-phase commit: write transactions over two shards through Shardgate with 2PC on and off, single-shard
write transactions, and the same two-UPDATE transaction directly and through PgBouncer on one server.

    python -m bench.twophase [--quick] [--rounds N] [--duration S] [--out FILE.md]   (from the repository root)

Starts three throwaway PostgreSQL servers (shard 0, shard 1 and a reference server holding every row),
range-shards `accounts` by id (shard 0 ids 1..N, shard 1 ids N+1..2N), starts PgBouncer (on the reference
server) and two Shardgates (on both shards, one with `general.two_phase_commit = false`) on free loopback
ports, checks where rows land, measures with pgbench, checks that the shards agree afterwards, writes a
Markdown report and tears everything down.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/twophase.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench import pgbench
from bench.report import MISSING, Results, background_lines
from bench.routing import MetricsError, fetch_metrics
from bench.run import (
    DATABASE,
    LOG_PROBLEM,
    PASSWORD,
    QUICK_ROUNDS,
    USER,
    _command_output,
    _cpu_model,
    _load_average,
    _package_version,
    _say_when_interrupted,
    _terminate,
    background_busy_pct,
    describe,
    make_login,
    say,
)
from bench.services import (
    LOCALHOST,
    REPO_ROOT,
    Login,
    PgBouncer,
    PoolSettings,
    Service,
    ServiceError,
    Shardgate,
    clean_env,
    cpu_seconds,
    free_port,
    rss_kb,
)
from bench.sharding import _replace_once
from localpg import PgServer, Topology, TopologyError

# -- sizes, timings --------------------------------------------------------------------------------

ROWS_PER_SHARD = 50_000  # shard 0: ids 1..N, shard 1: ids N+1..2N
START_BALANCE = 1_000
TOTAL_BALANCE = 2 * ROWS_PER_SHARD * START_BALANCE
MAX_AMOUNT = 100

FULL_DURATION_S = 10
QUICK_DURATION_S = 3
FULL_ROUNDS = 3
WARMUP_S = 2
SETTLE_S = 1.0
CONNECT_TIMEOUT_S = 10
LOAD_TIMEOUT_S = 300.0
# After the runs, how long pg_prepared_xacts may take to empty (recovery runs every 10 s by default).
PREPARED_DRAIN_S = 25.0
PREPARED_POLL_S = 0.5
P95 = 0.95

SHARED_BUFFERS = "128MB"
PGBOUNCER_PROBLEM = re.compile(r"\b(WARNING|ERROR|FATAL|PANIC)\b")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "twophase-latest.md"
COMMITTED_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
RESULTS_HEADING = "## Two-phase commit (issue 14)"
SCENARIO = "two-updates"

_N = ROWS_PER_SHARD
# Money moves from a row of the first key range to a row of the second: the sum never changes, and every
# transaction locks its rows in the same order (first range, then second), so no two can deadlock.
_TRANSFER = (
    f"\\set d random(1, {MAX_AMOUNT})\n"
    "BEGIN;\n"
    "UPDATE accounts SET balance = balance - :d WHERE id = :a;\n"
    "UPDATE accounts SET balance = balance + :d WHERE id = :b;\n"
    "END;\n"
)
MULTI_SCRIPT = f"\\set a random(1, {_N})\n\\set b random({_N + 1}, {2 * _N})\n" + _TRANSFER
SINGLE_SCRIPT = f"\\set a random(1, {_N // 2})\n\\set b random({_N // 2 + 1}, {_N})\n" + _TRANSFER

# Shardgate's 2PC counters a run must move, by what the run is.
EXPECT_PREPARED, EXPECT_ONE_PHASE, EXPECT_NONE = "prepared", "one_phase", "none"


@dataclass(frozen=True, slots=True)
class Job:
    """One workload on one target: what one pgbench run of a round measures."""

    key: str
    label: str
    script: str
    service: str  # direct | pgbouncer | sg-2pc | sg-1pc
    expects: str | None  # Shardgate runs: which 2PC counter the transactions must move


DIRECT, PGBOUNCER = "direct", "pgbouncer"
MULTI_2PC, MULTI_1PC, SINGLE_2PC, SINGLE_1PC = "multi-2pc", "multi-no2pc", "single-2pc", "single-no2pc"
SG_2PC, SG_1PC = "sg-2pc", "sg-1pc"
JOBS = (
    Job(DIRECT, "direct (one server)", MULTI_SCRIPT, DIRECT, None),
    Job(PGBOUNCER, "PgBouncer (one server)", MULTI_SCRIPT, PGBOUNCER, None),
    Job(MULTI_2PC, "Shardgate 2PC on, 2 shards", MULTI_SCRIPT, SG_2PC, EXPECT_PREPARED),
    Job(MULTI_1PC, "Shardgate 2PC off, 2 shards", MULTI_SCRIPT, SG_1PC, EXPECT_ONE_PHASE),
    Job(SINGLE_2PC, "Shardgate 2PC on, shard 0 only", SINGLE_SCRIPT, SG_2PC, EXPECT_NONE),
    Job(SINGLE_1PC, "Shardgate 2PC off, shard 0 only", SINGLE_SCRIPT, SG_1PC, EXPECT_NONE),
)
JOB_BY_KEY = {job.key: job for job in JOBS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.twophase", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK_DURATION_S} s per pgbench run, {QUICK_ROUNDS} round (default {FULL_DURATION_S} s, "
        f"{FULL_ROUNDS} rounds)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per pgbench run (overrides --quick; at most 60)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None,
        help=f"pgbench rounds, targets rotating (default {FULL_ROUNDS}, --quick {QUICK_ROUNDS}; at most 10)",
    )  # fmt: skip
    parser.add_argument("--pool-size", type=int, default=16, help="server connections per pool (default 16)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--mode", choices=("simple", "extended"), default="simple",
        help="pgbench -M (default simple: each UPDATE's text has its own literals)",
    )  # fmt: skip
    parser.add_argument(
        "--auth", choices=("scram-sha-256", "md5"), default="scram-sha-256",
        help="client authentication on both poolers (default scram-sha-256)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if min(args.rounds, args.pool_size, args.clients, args.threads) < 1:
        parser.error("--rounds, --pool-size, --clients and --threads must be >= 1")
    if args.rounds > 10:
        parser.error("--rounds must be <= 10")
    if args.duration is not None and not 1 <= args.duration <= 60:
        parser.error("--duration must be between 1 and 60")
    # localpg gives every shard max_prepared_transactions = 50: one prepared part per committing client.
    if args.clients > 40:
        parser.error("--clients must be <= 40 (the shards allow 50 prepared transactions)")
    return args


# -- Shardgate over two range shards ---------------------------------------------------------------


class RangeShardgate(Shardgate):
    """bench.services' Shardgate with one [[databases]] entry per shard, `accounts` range-sharded by id, an
    admin listener (for the 2PC metrics) and two-phase commit on or off; every other setting is bench.run's."""

    def __init__(
        self, work_dir: Path, port: int, admin_port: int, shard_ports: Sequence[int], login: Login,
        settings: PoolSettings, server_password: str, two_phase_commit: bool, label: str,
    ) -> None:  # fmt: skip
        super().__init__(
            work_dir, port, shard_ports[0], login, settings, server_password=server_password, label=label
        )
        self.admin_port = admin_port
        self.config_path.write_text(
            range_config(self.config_path.read_text(), admin_port, shard_ports, login.database, two_phase_commit)
        )

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}/metrics"


def range_config(
    base: str, admin_port: int, shard_ports: Sequence[int], database: str, two_phase_commit: bool
) -> str:
    """The generated one-server config turned into shard 0 of two, `accounts` sharded by id ranges."""
    text = _replace_once(
        base, 'admin_listen = ""\n', f"admin_listen = {json.dumps(f'{LOCALHOST}:{admin_port}')}\n"
    )
    text = _replace_once(
        text, 'pool_mode = "transaction"\n',
        f'pool_mode = "transaction"\ntwo_phase_commit = {"true" if two_phase_commit else "false"}\n',
    )  # fmt: skip
    text = _replace_once(text, 'role = "primary"\n', 'role = "primary"\nshard = 0\n')
    for shard, port in enumerate(shard_ports[1:], start=1):
        text += (
            "\n[[databases]]\n"
            f"name = {json.dumps(database)}\n"
            f"host = {json.dumps(LOCALHOST)}\n"
            f"port = {port}\n"
            f"database_name = {json.dumps(database)}\n"
            'role = "primary"\n'
            f"shard = {shard}\n"
        )
    ranges = ", ".join(
        f"{{ shard = {shard}, start = {first}, end = {last + 1} }}"
        for shard, (first, last) in enumerate(shard_ids(len(shard_ports)))
    )
    text += (
        "\n[[sharded_tables]]\n"
        f"database = {json.dumps(database)}\n"
        'table = "accounts"\n'
        'column = "id"\n'
        'data_type = "bigint"\n'
        'method = "range"\n'
        f"ranges = [{ranges}]\n"
    )
    return text


def shard_ids(shards: int = 2) -> list[tuple[int, int]]:
    """(first id, last id) of each shard, both inclusive."""
    return [(shard * ROWS_PER_SHARD + 1, (shard + 1) * ROWS_PER_SHARD) for shard in range(shards)]


@dataclass(frozen=True, slots=True)
class TwoPhaseCounters:
    """Shardgate's 2PC metrics at one moment, or their change over one run."""

    prepared: int = 0
    committed: int = 0
    rolled_back: int = 0
    one_phase: int = 0
    commit_seconds_sum: float = 0.0
    commit_seconds_count: int = 0

    def __sub__(self, earlier: TwoPhaseCounters) -> TwoPhaseCounters:
        return TwoPhaseCounters(
            self.prepared - earlier.prepared, self.committed - earlier.committed,
            self.rolled_back - earlier.rolled_back, self.one_phase - earlier.one_phase,
            self.commit_seconds_sum - earlier.commit_seconds_sum,
            self.commit_seconds_count - earlier.commit_seconds_count,
        )  # fmt: skip

    @property
    def commit_mean_ms(self) -> float | None:
        return 1000.0 * self.commit_seconds_sum / self.commit_seconds_count if self.commit_seconds_count else None


_OUTCOME = re.compile(r'^shardgate_2pc_transactions_total\{outcome="([a-z_]+)"\}\s+(\S+)', re.MULTILINE)
_COMMIT_SUM = re.compile(r"^shardgate_2pc_commit_seconds_sum\s+(\S+)", re.MULTILINE)
_COMMIT_COUNT = re.compile(r"^shardgate_2pc_commit_seconds_count\s+(\S+)", re.MULTILINE)


def parse_counters(text: str) -> TwoPhaseCounters:
    """The 2PC counters of one /metrics page; MetricsError when they are missing."""
    outcomes = {name: round(float(value)) for name, value in _OUTCOME.findall(text)}
    total, count = _COMMIT_SUM.search(text), _COMMIT_COUNT.search(text)
    missing = [name for name in ("prepared", "committed", "rolled_back", "one_phase") if name not in outcomes]
    if missing or total is None or count is None:
        raise MetricsError(
            "/metrics lacks shardgate_2pc_transactions_total{outcome=" + ",".join(missing or ["..."])
            + "} or shardgate_2pc_commit_seconds"
        )  # fmt: skip
    return TwoPhaseCounters(
        outcomes["prepared"], outcomes["committed"], outcomes["rolled_back"], outcomes["one_phase"],
        float(total.group(1)), round(float(count.group(1))),
    )  # fmt: skip


def read_counters(shardgate: RangeShardgate) -> TwoPhaseCounters:
    return parse_counters(fetch_metrics(shardgate.metrics_url))


# -- data ------------------------------------------------------------------------------------------


def connect(server: PgServer | Service, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=server.host, port=server.port, user=USER, password=PASSWORD, dbname=DATABASE, sslmode="disable",
        gssencmode="disable", connect_timeout=CONNECT_TIMEOUT_S, autocommit=autocommit,
    )  # fmt: skip


def load_server(server: PgServer, first: int, last: int) -> int:
    """Create `accounts` with ids first..last, START_BALANCE each; returns the row count."""
    with connect(server) as conn:
        conn.execute(f"SET statement_timeout = {int(LOAD_TIMEOUT_S * 1000)}")
        conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute(
            "INSERT INTO accounts SELECT g, %s FROM generate_series(%s::bigint, %s::bigint) g",
            (START_BALANCE, first, last),
        )
        conn.execute("VACUUM (ANALYZE) accounts")
        row = conn.execute("SELECT count(*) FROM accounts").fetchone()
    server.psql("CHECKPOINT")
    return int(row[0]) if row else -1


@dataclass(frozen=True, slots=True)
class ServerState:
    """What one server holds after (or before) the runs."""

    rows: int
    balance_sum: int
    prepared: list[str]


def server_state(server: PgServer) -> ServerState:
    with connect(server) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(balance), 0) FROM accounts").fetchone()
        prepared = [str(gid) for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts ORDER BY gid")]
    return ServerState(int(row[0]) if row else -1, int(row[1]) if row else -1, prepared)


def balances(server: PgServer, ids: Sequence[int]) -> dict[int, int]:
    with connect(server) as conn:
        rows = conn.execute("SELECT id, balance FROM accounts WHERE id = ANY(%s)", (list(ids),)).fetchall()
    return {int(key): int(value) for key, value in rows}


# -- results ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One pgbench run of one job, with what pgbench's per-transaction log and Shardgate's metrics add."""

    job: str
    round: int
    measurement: pgbench.Measurement
    p95_ms: float | None = None
    logged_transactions: int = 0
    counters: TwoPhaseCounters | None = None  # Shardgate runs: the change over the run
    problems: list[str] = field(default_factory=list)  # the counters do not match the job


@dataclass(slots=True)
class Consistency:
    """The shards (and the reference server) after the runs."""

    shards: list[ServerState] = field(default_factory=list)
    reference: ServerState | None = None
    prepared_left_at_end: int | None = None  # right after the last run
    prepared_drained_s: float | None = None  # how long until none was left (None: some still are)
    decision_rows: int | None = None  # rows left in shardgate_2pc_decisions on shard 0

    @property
    def shard_sum(self) -> int | None:
        return sum(state.balance_sum for state in self.shards) if self.shards else None

    @property
    def ok(self) -> bool:
        return (
            len(self.shards) == 2
            and self.shard_sum == TOTAL_BALANCE
            and [state.rows for state in self.shards] == [ROWS_PER_SHARD, ROWS_PER_SHARD]
            and not any(state.prepared for state in self.shards)
            and self.reference is not None
            and self.reference.balance_sum == TOTAL_BALANCE
        )


@dataclass(slots=True)
class TwoPhaseResults:
    info: dict[str, str]
    results: Results
    runs: list[Run] = field(default_factory=list)
    loaded: dict[str, int] = field(default_factory=dict)
    placement_check: str = ""
    consistency: Consistency | None = None
    notes: list[str] = field(default_factory=list)
    log_findings: dict[str, list[str]] = field(default_factory=dict)
    log_paths: dict[str, str] = field(default_factory=dict)

    def runs_of(self, job: str) -> list[Run]:
        return [run for run in self.runs if run.job == job]

    def run_of(self, measurement: pgbench.Measurement | None) -> Run | None:
        return next((run for run in self.runs if run.measurement is measurement), None)

    def representative(self, job: str) -> Run | None:
        return self.run_of(self.results.representative(SCENARIO, job))

    def ratio(self, numerator: str, denominator: str) -> float | None:
        return self.results.ratio(SCENARIO, numerator, denominator)

    def round_ratios(self, numerator: str, denominator: str) -> list[float]:
        return self.results.round_ratios(SCENARIO, numerator, denominator)

    def cpu_us(self, job: str) -> float | None:
        return self.results.cpu_us_per_transaction(SCENARIO, job)

    def round_differences(self, numerator: str, denominator: str, p95: bool = False) -> list[float]:
        """Numerator latency minus denominator latency (ms) in each round where both ran clean."""
        by_round = {run.round: run for run in self.runs_of(denominator)}
        differences = []
        for run in self.runs_of(numerator):
            other = by_round.get(run.round)
            if other is None or not run.measurement.ok or not other.measurement.ok:
                continue
            mine = run.p95_ms if p95 else run.measurement.latency_ms
            theirs = other.p95_ms if p95 else other.measurement.latency_ms
            if mine is not None and theirs is not None:
                differences.append(mine - theirs)
        return differences

    def commit_histogram(self, job: str = MULTI_2PC) -> TwoPhaseCounters:
        """The 2PC counters summed over every run of `job`."""
        total = TwoPhaseCounters()
        for run in self.runs_of(job):
            if run.counters is not None:
                total = TwoPhaseCounters(
                    total.prepared + run.counters.prepared, total.committed + run.counters.committed,
                    total.rolled_back + run.counters.rolled_back, total.one_phase + run.counters.one_phase,
                    total.commit_seconds_sum + run.counters.commit_seconds_sum,
                    total.commit_seconds_count + run.counters.commit_seconds_count,
                )  # fmt: skip
        return total

    @property
    def clean(self) -> bool:
        runs_ok = all(run.measurement.ok and not run.problems for run in self.runs)
        return runs_ok and self.consistency is not None and self.consistency.ok and not self.notes


def _lower_median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


# -- checks ----------------------------------------------------------------------------------------


def _transfer(shardgate: Service, source: int, target: int, amount: int) -> None:
    """Move `amount` from `source` to `target` in one transaction through `shardgate`; each UPDATE must
    find its row (a row routed to the wrong shard is not there: the range shards hold disjoint ids)."""
    with connect(shardgate, autocommit=False) as conn:
        for key, change in ((source, -amount), (target, amount)):
            cursor = conn.execute(
                "UPDATE accounts SET balance = balance + %s WHERE id = %s", (change, key)
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"UPDATE of id {key} through {shardgate.label} changed {cursor.rowcount} rows")
        conn.commit()


def check_placement(
    shards: Sequence[PgServer], two_phase: RangeShardgate, one_phase: RangeShardgate
) -> str:
    """Before measuring: transfers through each Shardgate between the edge ids of the key ranges the
    scripts use, each change looked up on the shard that should hold it; 2PC must run exactly for the
    multi-shard transfers of the 2PC Shardgate. Every transfer is undone, so the balances are as loaded."""
    (first0, last0), (first1, last1) = shard_ids()
    middle = ROWS_PER_SHARD // 2
    multi = [(first0, first1), (last0, last1)]
    single = [(first0, middle), (middle + 1, last0)]
    amount = 7
    for shardgate, runs_2pc in ((two_phase, True), (one_phase, False)):
        before = read_counters(shardgate)
        for source, target in [*multi, *single]:
            _transfer(shardgate, source, target, amount)
        on_shard0 = balances(shards[0], [first0, last0, middle, middle + 1])
        on_shard1 = balances(shards[1], [first1, last1])
        want0 = {
            first0: START_BALANCE - 2 * amount, last0: START_BALANCE,
            middle: START_BALANCE + amount, middle + 1: START_BALANCE - amount,
        }  # fmt: skip
        want1 = {first1: START_BALANCE + amount, last1: START_BALANCE + amount}
        if on_shard0 != want0 or on_shard1 != want1:
            raise RuntimeError(
                f"after transfers through {shardgate.label}: shard 0 holds {on_shard0} (expected {want0}), "
                f"shard 1 holds {on_shard1} (expected {want1})"
            )
        for source, target in [*multi, *single]:
            _transfer(shardgate, target, source, amount)
        change = read_counters(shardgate) - before
        # 2 multi-shard transfers and their 2 reversals; the single-shard ones never reach the coordinator.
        want = TwoPhaseCounters(4, 4, 0, 0) if runs_2pc else TwoPhaseCounters(0, 0, 0, 4)
        got = dataclasses.replace(change, commit_seconds_sum=0.0, commit_seconds_count=0)
        if got != want:
            raise RuntimeError(f"2PC counters of {shardgate.label} moved by {change}, expected {want}")
    restored = balances(shards[0], [first0, last0, middle, middle + 1]) | balances(shards[1], [first1, last1])
    if set(restored.values()) != {START_BALANCE}:
        raise RuntimeError(f"balances not restored after the placement check: {restored}")
    return (
        f"Placement checked before measuring: through each Shardgate, transfers between ids {first0}/{first1} and "
        f"{last0}/{last1} (two shards) and {first0}/{middle}, {middle + 1}/{last0} (shard 0), each change found "
        "on the shard that holds the id (read directly); the 2PC Shardgate prepared exactly the 4 multi-shard "
        "transactions, the other committed them in one phase, neither ran 2PC for the single-shard ones"
    )


def check_counters(run: Run, job: Job) -> None:
    """A Shardgate run's 2PC counters must say its transactions took the path the job is about."""
    counters, done = run.counters, run.measurement.transactions
    if counters is None or job.expects is None or not run.measurement.ok:
        return
    # pgbench counts the transactions it finished; up to one per client may be in its COMMIT at -T's end.
    slack = run.measurement.transactions // 1000 + 64
    if job.expects == EXPECT_PREPARED:
        if counters.prepared < done or counters.prepared > done + slack:
            run.problems.append(f"{counters.prepared:,} prepared for {done:,} transactions")
        if counters.committed != counters.prepared or counters.rolled_back:
            run.problems.append(
                f"{counters.committed:,} committed, {counters.rolled_back:,} rolled back of "
                f"{counters.prepared:,} prepared"
            )
        if counters.one_phase:
            run.problems.append(f"{counters.one_phase:,} committed in one phase")
    elif job.expects == EXPECT_ONE_PHASE:
        if counters.one_phase < done or counters.one_phase > done + slack:
            run.problems.append(f"{counters.one_phase:,} one-phase commits for {done:,} transactions")
        if counters.prepared:
            run.problems.append(f"{counters.prepared:,} prepared with two_phase_commit = false")
    elif counters.prepared or counters.one_phase:
        run.problems.append(
            f"single-shard transactions reached the coordinator: {counters.prepared:,} prepared, "
            f"{counters.one_phase:,} one-phase"
        )


def check_consistency(shards: Sequence[PgServer], reference: PgServer) -> Consistency:
    """After the runs: every row still there, the total unchanged, no prepared transaction left."""
    result = Consistency()
    first = [server_state(shard) for shard in shards]
    result.prepared_left_at_end = sum(len(state.prepared) for state in first)
    started = time.monotonic()
    states = first
    while any(state.prepared for state in states) and time.monotonic() - started < PREPARED_DRAIN_S:
        time.sleep(PREPARED_POLL_S)
        states = [server_state(shard) for shard in shards]
    if not any(state.prepared for state in states):
        result.prepared_drained_s = time.monotonic() - started
    result.shards = states
    result.reference = server_state(reference)
    with connect(shards[0]) as conn:
        exists = conn.execute("SELECT to_regclass('shardgate_2pc_decisions') IS NOT NULL").fetchone()
        if exists and exists[0]:
            row = conn.execute("SELECT count(*) FROM shardgate_2pc_decisions").fetchone()
            result.decision_rows = int(row[0]) if row else None
    return result


# -- measurement -----------------------------------------------------------------------------------


def per_transaction_latencies_ms(prefix: Path) -> list[float]:
    """Latencies from pgbench's per-transaction logs (`prefix.<pid>[.<thread>]`), removed once read.
    Each line: client_id transaction_no time(µs) script_no time_epoch time_us ..."""
    latencies: list[float] = []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        with path.open() as lines:
            for line in lines:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():  # "failed" / "skipped" carry no latency
                    latencies.append(int(fields[2]) / 1000.0)
        path.unlink()
    return latencies


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least `fraction` of the values at or below."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def run_job(
    job: Job, round_index: int, target: pgbench.Target, args: argparse.Namespace, duration_s: int,
    pgbench_path: str, env: dict[str, str], work_dir: Path, shardgate: RangeShardgate | None,
) -> Run:  # fmt: skip
    prefix = work_dir / f"txlog-{job.key}-{round_index}"
    options = ("-M", args.mode, "-l", f"--log-prefix={prefix}")
    scenario = pgbench.Scenario(job.key, job.label, args.clients, options, script=job.script)
    before = read_counters(shardgate) if shardgate is not None else None
    measurement = pgbench.run(pgbench_path, target, scenario, duration_s, args.threads, USER, DATABASE, env,
                              work_dir, cpu_seconds, rss_kb)  # fmt: skip
    measurement.scenario = SCENARIO  # one scenario, a target per job: Results pairs the jobs round by round
    run = Run(job.key, round_index, measurement)
    latencies = per_transaction_latencies_ms(prefix)
    run.logged_transactions = len(latencies)
    run.p95_ms = percentile(latencies, P95)
    if shardgate is not None and before is not None:
        run.counters = read_counters(shardgate) - before
        check_counters(run, job)
    return run


def run_rounds(
    state: TwoPhaseResults, targets: dict[str, pgbench.Target], shardgates: dict[str, RangeShardgate],
    poolers: Sequence[Service], args: argparse.Namespace, pgbench_path: str, duration_s: int,
    env: dict[str, str], work_dir: Path,
) -> None:  # fmt: skip
    for job in JOBS:
        warm = run_job(job, -1, targets[job.key], args, WARMUP_S, pgbench_path, env, work_dir,
                       shardgates.get(job.service))  # fmt: skip
        if not warm.measurement.ok or warm.problems:
            state.notes.append(
                f"warm-up of {job.label} failed: {'; '.join((warm.measurement.problems + warm.problems)[:3])}"
            )
        say(f"warm-up {job.label}: {describe(warm.measurement)}")
    total = args.rounds * len(JOBS)
    done = 0
    for round_index in range(args.rounds):
        shift = round_index % len(JOBS)  # who goes first rotates
        order = JOBS[shift:] + JOBS[:shift]
        state.results.background_busy_pct.append(background_busy_pct())
        for job in order:
            for pooler in poolers:
                pooler.check_alive()
            run = run_job(job, round_index, targets[job.key], args, duration_s, pgbench_path, env, work_dir,
                          shardgates.get(job.service))  # fmt: skip
            state.runs.append(run)
            state.results.add(run.measurement)
            done += 1
            extra = f", p95 {_number(run.p95_ms, 3)} ms"
            if run.counters is not None:
                extra += (f", 2PC prepared {run.counters.prepared:,} committed {run.counters.committed:,} "
                          f"one-phase {run.counters.one_phase:,}")  # fmt: skip
            if run.problems:
                extra += f"; PROBLEM: {'; '.join(run.problems)}"
            say(f"[{done:>2}/{total}] {job.label}: {describe(run.measurement)}{extra}")


# -- report ----------------------------------------------------------------------------------------


def _number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def _signed(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:+,.{digits}f}"


def _count(value: int | None) -> str:
    return MISSING if value is None else f"{value:,}"


def runs_table(state: TwoPhaseResults) -> list[str]:
    lines = [
        "| transaction | target | TPS | latency avg ms | latency p95 ms | proxy µs/txn | proxy CPU "
        "| 2PC prepared / committed / one-phase (run shown) |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for job in JOBS:
        run = state.representative(job.key)
        failed = bool(state.results.failures(SCENARIO, job.key)) or any(r.problems for r in state.runs_of(job.key))
        m = run.measurement if run else None
        tps = "FAILED" if m is None and failed else _number(m.tps if m else None, 0)
        if failed and m is not None:
            tps += " (some runs FAILED)"
        what = "two UPDATEs, ids in 1..N and N+1..2N" if job.script == MULTI_SCRIPT else "two UPDATEs, both on shard 0"
        if job.service in (DIRECT, PGBOUNCER):
            what = "two UPDATEs, all rows on one server"
        counters = run.counters if run else None
        cells = [
            what, job.label, tps, _number(m.latency_ms if m else None, 3), _number(run.p95_ms if run else None, 3),
            MISSING if job.service == DIRECT else _number(state.cpu_us(job.key), 1),
            MISSING if m is None or m.pooler_cpu_pct is None else f"{m.pooler_cpu_pct:.0f}%",
            MISSING if counters is None
            else f"{counters.prepared:,} / {counters.committed:,} / {counters.one_phase:,} ({m.transactions if m else 0:,} txns)",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


RATIOS = (
    ("multi-shard: 2PC on / 2PC off", MULTI_2PC, MULTI_1PC),
    ("2PC on: multi-shard / single-shard", MULTI_2PC, SINGLE_2PC),
    ("single-shard: Shardgate (2PC on) / PgBouncer", SINGLE_2PC, PGBOUNCER),
    ("single-shard: 2PC on / 2PC off", SINGLE_2PC, SINGLE_1PC),
    ("multi-shard 2PC on / PgBouncer", MULTI_2PC, PGBOUNCER),
    ("PgBouncer / direct", PGBOUNCER, DIRECT),
)


def ratios_table(state: TwoPhaseResults) -> list[str]:
    lines = [
        "| ratio | TPS (median of rounds) | each round | proxy µs/txn ratio | proxy µs/txn difference |",
        "|---|--:|--:|--:|--:|",
    ]
    for title, numerator, denominator in RATIOS:
        rounds = state.round_ratios(numerator, denominator)
        mine, theirs = state.cpu_us(numerator), state.cpu_us(denominator)
        cpu_ratio = None if mine is None or not theirs else mine / theirs
        cpu_diff = None if mine is None or theirs is None else mine - theirs
        lines.append(
            f"| {title} | {_number(state.ratio(numerator, denominator), 3)} "
            f"| {', '.join(f'{r:.2f}' for r in rounds) or MISSING} | {_number(cpu_ratio, 2)} "
            f"| {_signed(cpu_diff, 1)} |"
        )
    return lines


def commit_latency_lines(state: TwoPhaseResults) -> list[str]:
    average = state.round_differences(MULTI_2PC, MULTI_1PC)
    p95 = state.round_differences(MULTI_2PC, MULTI_1PC, p95=True)
    versus_single = state.round_differences(MULTI_2PC, SINGLE_2PC)
    histogram = state.commit_histogram()
    shown = state.representative(MULTI_2PC)
    shown_mean = shown.counters.commit_mean_ms if shown and shown.counters else None
    return [
        "| measure | ms | each round |",
        "|---|--:|--:|",
        f"| latency avg, multi-shard: 2PC on - 2PC off | {_signed(_lower_median(average), 3)} "
        f"| {', '.join(f'{d:+.3f}' for d in average) or MISSING} |",
        f"| latency p95, multi-shard: 2PC on - 2PC off | {_signed(_lower_median(p95), 3)} "
        f"| {', '.join(f'{d:+.3f}' for d in p95) or MISSING} |",
        f"| latency avg, 2PC on: multi-shard - single-shard | {_signed(_lower_median(versus_single), 3)} "
        f"| {', '.join(f'{d:+.3f}' for d in versus_single) or MISSING} |",
        f"| proxy's `shardgate_2pc_commit_seconds` mean (sum/count), all 2PC runs "
        f"({histogram.commit_seconds_count:,} commits) | {_number(histogram.commit_mean_ms, 3)} | |",
        f"| the same, run shown above | {_number(shown_mean, 3)} | |",
    ]


def consistency_lines(state: TwoPhaseResults) -> list[str]:
    result = state.consistency
    if result is None:
        return ["Not checked (the run stopped before)."]
    shard_rows = " + ".join(_count(s.rows) for s in result.shards)
    shard_sums = " + ".join(_count(s.balance_sum) for s in result.shards)
    drained = (
        "none was left" if result.prepared_left_at_end == 0
        else f"{result.prepared_left_at_end} right after the last run, none after {result.prepared_drained_s:.1f} s"
        if result.prepared_drained_s is not None
        else f"**{sum(len(s.prepared) for s in result.shards)} still left after {PREPARED_DRAIN_S:.0f} s**: "
        + ", ".join(gid for s in result.shards for gid in s.prepared[:5])
    )  # fmt: skip
    reference = result.reference
    verdict = "**the shards agree**" if result.ok else "**NOT CONSISTENT**"
    return [
        f"After the runs ({verdict}): rows on shard 0 + shard 1 {shard_rows} (loaded {ROWS_PER_SHARD:,} each); "
        f"balances {shard_sums} = {_count(result.shard_sum)} (loaded {TOTAL_BALANCE:,}: every transaction moves "
        f"money between two rows, so the total never changes); reference server {_count(reference.rows if reference else None)} "
        f"rows, balances {_count(reference.balance_sum if reference else None)}. "
        f"Prepared transactions on the shards (`pg_prepared_xacts`): {drained}. "
        f"Rows left in the decision log (`shardgate_2pc_decisions` on shard 0): {_count(result.decision_rows)} "
        "(committed decisions are pruned once every part is committed).",
    ]


def problems_lines(state: TwoPhaseResults) -> list[str]:
    lines: list[str] = []
    for job in JOBS:
        for measurement in state.results.failures(SCENARIO, job.key):
            lines.append(f"- {job.label}: {'; '.join(measurement.problems) or 'no result'}")
        for run in state.runs_of(job.key):
            lines.extend(f"- {job.label}, round {run.round + 1}: {problem}" for problem in run.problems)
    lines.extend(f"- {note}" for note in state.notes)
    if state.consistency is not None and not state.consistency.ok:
        lines.append("- the shards do not agree after the run (see Consistency)")
    for label, findings in state.log_findings.items():
        where = state.log_paths.get(label, "")
        if findings:
            lines.append(f"- {label} stderr ({where}) has {len(findings)} warning/error line(s); first ones:")
            lines.extend(f"    - `{line[:300]}`" for line in findings[:10])
        else:
            lines.append(f"- {label} stderr ({where}): no warnings, errors or tracebacks.")
    return lines or ["- none"]


def body(state: TwoPhaseResults, level: int) -> list[str]:
    """The report below its title; `level` is the heading level of its sections."""
    h = "#" * level
    info = state.info
    (first0, last0), (first1, last1) = shard_ids()
    return [
        f"{info.get('mode', MISSING)} run, {info.get('started', MISSING)} · {info.get('machine', MISSING)}",
        "",
        info.get("versions", MISSING),
        "",
        info.get("setup", MISSING),
        "",
        f"`accounts (id bigint primary key, balance bigint)`: shard 0 ids {first0:,}..{last0:,}, shard 1 ids "
        f"{first1:,}..{last1:,} (`method = \"range\"`), {START_BALANCE:,} each; the reference server holds all "
        f"{2 * ROWS_PER_SHARD:,}. Loaded: {', '.join(f'{k} {v:,}' for k, v in state.loaded.items()) or MISSING}.",
        "",
        *background_lines(state.results),
        f"{h} Throughput, latency, proxy CPU",
        "",
        *runs_table(state),
        "",
        "Each transaction is `BEGIN; UPDATE accounts SET balance = balance - :d WHERE id = :a; UPDATE accounts "
        f"SET balance = balance + :d WHERE id = :b; END;` (pgbench `-M {info.get('mode_flag', MISSING)}`). "
        "Multi-shard: a in 1..N, b in "
        "N+1..2N (one UPDATE on each shard); single-shard: a in 1..N/2, b in N/2+1..N (both on shard 0); direct "
        "and PgBouncer run the multi-shard script against the reference server, where every row is on one "
        "server. TPS and latency avg: the median run by TPS (pgbench's summary); p95: the same run's "
        "per-transaction log (`-l`). Proxy µs/txn: user+system CPU of the pooler process over the run per "
        "transaction, the median over the rounds. 2PC counters: `shardgate_2pc_transactions_total` over the run "
        "shown (every Shardgate run is checked: each multi-shard transaction prepared and committed with 2PC "
        "on, committed in one phase with it off, single-shard ones never reaching the coordinator).",
        "",
        f"{h} Ratios",
        "",
        *ratios_table(state),
        "",
        "TPS ratios: the median of the per-round ratios (the jobs of a round run back to back, the first one "
        "rotating each round).",
        "",
        f"{h} Commit latency added by 2PC",
        "",
        *commit_latency_lines(state),
        "",
        "The latency differences are the median of the per-round differences of pgbench's latency (a whole "
        "transaction: BEGIN, two UPDATEs, END). The proxy's histogram covers its commit round only, from the "
        "first PREPARE TRANSACTION to the last COMMIT PREPARED: the decision log insert on shard 0 in between. "
        "fsync is off on these servers, so the WAL flushes 2PC adds (PREPARE on each shard, the decision, "
        "COMMIT PREPARED) cost nothing here that a real disk would charge.",
        "",
        f"{h} Checks",
        "",
        state.placement_check + "." if state.placement_check else "Placement: not checked (see Problems).",
        "",
        *consistency_lines(state),
        "",
        f"{h} Problems",
        "",
        *problems_lines(state),
        "",
    ]


def render(state: TwoPhaseResults) -> str:
    return "\n".join(["# Shardgate two-phase commit benchmark (issue 14)", "", *body(state, 2)])


def results_section(state: TwoPhaseResults) -> str:
    return "\n".join([RESULTS_HEADING, "", *body(state, 3)])


def append_to_results(section: str, path: Path = COMMITTED_RESULTS, heading: str = RESULTS_HEADING) -> None:
    """Put `section` at the end of RESULTS.md, replacing an earlier copy of it (up to the next `## `)."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    text = text.rstrip("\n") + "\n\n" if text.strip() else ""
    path.write_text(text + section.rstrip("\n") + "\n")


def write_outputs(state: TwoPhaseResults, out: Path, full_run: bool) -> str:
    text = render(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "info": state.info,
        "loaded": state.loaded,
        "runs": [dataclasses.asdict(run) for run in state.runs],
        "placement_check": state.placement_check,
        "consistency": dataclasses.asdict(state.consistency) if state.consistency else None,
        "notes": state.notes,
        "background_busy_pct": state.results.background_busy_pct,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    if full_run:
        append_to_results(results_section(state))
    return text


def scan_logs(state: TwoPhaseResults, services: Sequence[Service], out: Path) -> None:
    """Copy each pooler's stderr next to the report and pick out warnings, errors and tracebacks."""
    for service in services:
        if not service.log_path.exists():
            continue
        kept = out.with_suffix(f".{service.log_path.stem}.log")
        shutil.copyfile(service.log_path, kept)
        state.log_paths[service.label] = (
            os.path.relpath(kept, REPO_ROOT) if kept.is_relative_to(REPO_ROOT) else str(kept)
        )
        pattern = PGBOUNCER_PROBLEM if isinstance(service, PgBouncer) else LOG_PROBLEM
        lines = service.log_path.read_text(errors="replace").splitlines()
        state.log_findings[service.label] = [line for line in lines if pattern.search(line)]


# -- main ------------------------------------------------------------------------------------------


def run_info(
    args: argparse.Namespace, duration_s: int, bin_dir: Path, pgbouncer: PgBouncer
) -> dict[str, str]:
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _command_output(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " + uncommitted changes"
    postgres = _command_output([str(bin_dir / "postgres"), "--version"]).replace("postgres (PostgreSQL) ", "")
    return {
        "mode": "Quick" if args.quick and args.duration is None else "Full",
        "mode_flag": args.mode,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
            f"load average {_load_average()} at start"
        ),
        "versions": (
            f"PostgreSQL {postgres or 'unknown'} · {pgbouncer.version} · Python {platform.python_version()} "
            f"· uvloop {_package_version('uvloop')} · psycopg {_package_version('psycopg')} "
            f"· Shardgate commit {commit}"
        ),
        "setup": (
            f"pgbench -M {args.mode}. Three PostgreSQL servers on this machine (shard 0, shard 1, reference; fsync off, synchronous_commit "
            f"off except for the decision log's own insert, max_prepared_transactions 50, shared_buffers "
            f"{SHARED_BUFFERS}). pgbench {duration_s} s per run, -c {args.clients} -j {args.threads}, "
            f"{args.rounds} round(s) of {len(JOBS)} runs, the first one rotating. PgBouncer and both Shardgates: "
            f"transaction mode, pool size {args.pool_size} per server (Shardgate: per shard), client auth "
            f"{args.auth}. The two Shardgates differ only in `general.two_phase_commit` (true / false); the "
            "`[two_phase_commit]` keys are the defaults (the decision log on shard 0). sslmode=disable, TCP on "
            "127.0.0.1."
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    signal.signal(signal.SIGTERM, _terminate)
    settings = PoolSettings(pool_size=args.pool_size)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    state = TwoPhaseResults(info={}, results=Results(info={}, scenarios=[]))
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-twophase-"))
    scratch.chmod(0o755)  # the postgres OS user must reach the server and PgBouncer directories
    stopped_early = False
    started = time.monotonic()
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.push(_say_when_interrupted)
        say(f"PostgreSQL: starting shard 0, shard 1 and a reference server in {scratch} ...")
        topology = Topology.create(
            scratch / "pg", replicas=0,
            extra_conf={"max_connections": 300, "fsync": False, "shared_buffers": SHARED_BUFFERS},
        )  # fmt: skip
        cleanup.callback(topology.remove)
        assert topology.primary is not None
        shards = [topology.primary, topology.add_server("shard1")]
        reference = topology.add_server("reference")
        for server in (*shards, reference):
            setting = server.psql("SHOW max_prepared_transactions")
            if int(setting or 0) < args.clients:
                raise RuntimeError(f"{server}: max_prepared_transactions is {setting}, need >= {args.clients}")
        (range0, range1) = shard_ids()
        state.loaded = {
            "shard 0": load_server(shards[0], *range0),
            "shard 1": load_server(shards[1], *range1),
            "reference": load_server(reference, range0[0], range1[1]),
        }
        say(f"PostgreSQL: shards on ports {[s.port for s in shards]}, reference on {reference.port}; "
            f"loaded {state.loaded}")  # fmt: skip
        login = make_login(reference, args.auth)
        env = clean_env(
            PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"
        )
        for name in ("pgbouncer", "shardgate-2pc", "shardgate-no2pc", "work"):
            (scratch / name).mkdir()
        pgbouncer = PgBouncer(scratch / "pgbouncer", free_port(), reference.port, login, settings)
        cleanup.callback(pgbouncer.stop)
        pgbouncer.start()
        shardgates: dict[str, RangeShardgate] = {}
        for key, on, directory, label in ((SG_2PC, True, "shardgate-2pc", "Shardgate 2PC on"),
                                          (SG_1PC, False, "shardgate-no2pc", "Shardgate 2PC off")):  # fmt: skip
            shardgate = RangeShardgate(
                scratch / directory, free_port(), free_port(), [s.port for s in shards], login, settings,
                server_password=PASSWORD, two_phase_commit=on, label=label,
            )  # fmt: skip
            cleanup.callback(shardgate.stop)
            shardgate.start()
            shardgates[key] = shardgate
        time.sleep(SETTLE_S)
        say(f"PgBouncer on port {pgbouncer.port} -> reference; "
            + "; ".join(f"{sg.label} on port {sg.port} (pid {sg.pid}, admin {sg.admin_port})"
                        for sg in shardgates.values()) + " -> shards")  # fmt: skip
        state.info = run_info(args, duration_s, reference.bin_dir, pgbouncer)
        targets = {
            DIRECT: pgbench.Target(DIRECT, "direct", reference.host, reference.port),
            PGBOUNCER: pgbench.Target(PGBOUNCER, "PgBouncer", pgbouncer.host, pgbouncer.port, pgbouncer.pid),
            **{key: pgbench.Target(key, sg.label, sg.host, sg.port, sg.pid) for key, sg in shardgates.items()},
        }
        # pgbench.Target.key is the job's key in each run: Results pairs runs by it.
        job_targets = {job.key: dataclasses.replace(targets[job.service], key=job.key) for job in JOBS}
        poolers: list[Service] = [pgbouncer, *shardgates.values()]
        work_dir = scratch / "work"
        sections: list[tuple[str, Callable[[], None]]] = [
            ("placement check", lambda: setattr(state, "placement_check", check_placement(
                shards, shardgates[SG_2PC], shardgates[SG_1PC]))),
            ("pgbench runs", lambda: run_rounds(
                state, job_targets, shardgates, poolers, args,
                str(reference.bin_dir / "pgbench"), duration_s, env, work_dir)),
            ("consistency check", lambda: setattr(state, "consistency", check_consistency(shards, reference))),
        ]  # fmt: skip
        for name, section in sections:
            try:
                section()
            except (ServiceError, RuntimeError, MetricsError, OSError, subprocess.SubprocessError, psycopg.Error,
                    TopologyError) as exc:  # fmt: skip
                stopped_early = True
                state.notes.append(f"{name} stopped early: {type(exc).__name__}: {exc}")
                say(f"{name} stopped early: {exc}")
                if name == "placement check":
                    break  # measuring rows that may be on the wrong shard says nothing
        if state.placement_check:
            say(state.placement_check)
        out.parent.mkdir(parents=True, exist_ok=True)
        for service in poolers:
            service.stop()
        scan_logs(state, poolers, out)

    full_run = not args.quick and not stopped_early
    text = write_outputs(state, out, full_run)
    print(text)
    say(f"report written to {out}" + (f" and appended to {COMMITTED_RESULTS}" if full_run else "")
        + f" ({time.monotonic() - started:.0f} s)")  # fmt: skip
    return 0 if state.clean and not stopped_early else 1


if __name__ == "__main__":
    sys.exit(main())
