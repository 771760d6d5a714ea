"""Sharding: point reads by key over 2 shards vs PgBouncer on one server, cross-shard queries over 1M rows
vs one server holding them all, and the proxy's memory while it streams a 5-million-row fan-out.

    python -m bench.sharding [--quick] [--rounds N] [--duration S] [--out FILE.md]   (from the repository root)

Starts three throwaway PostgreSQL servers (shard 0, shard 1 and a reference server holding every row),
loads each shard with the rows PostgreSQL's own hash partitioning gives it, starts PgBouncer (on the
reference server) and Shardgate (on both shards) on free loopback ports, measures, writes a Markdown
report and tears everything down.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/sharding.py`: make the repository root importable
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
from localpg import PgServer, Topology, TopologyError

# -- sizes, timings, goals -------------------------------------------------------------------------

SHARDS = 2
TENANTS = 100_000
BIG_ROWS = 1_000_000
BIG_GROUPS = 100
BIG5_ROWS = 5_000_000

FULL_DURATION_S = 10
QUICK_DURATION_S = 3
FULL_ROUNDS = 3
FULL_QUERY_RUNS = 7
QUICK_QUERY_RUNS = 3
WARMUP_S = 2

LOAD_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 10
QUERY_TIMEOUT_S = 120.0
FANOUT_TIMEOUT_S = 300.0
RSS_SAMPLE_S = 0.1
SETTLE_S = 1.0
# Point-read check before the pgbench runs: every CHECK_STRIDE-th tenant, literal and parameter.
CHECK_STRIDE = 397
SHARED_BUFFERS = "256MB"

GOAL_POINT_RATIO = 0.85  # Shardgate TPS / PgBouncer TPS, at least
GOAL_CROSS_RATIO = 1.2  # Shardgate time / direct time on the reference, at most
GOAL_PEAK_RSS_MB = 100.0  # Shardgate peak RSS during a 5M-row fan-out, below

DIRECT, PGBOUNCER, SHARDGATE, ONE_SERVER = "direct", "pgbouncer", "shardgate", "shardgate-one-server"
LABELS = {
    DIRECT: "direct (reference)",
    PGBOUNCER: "PgBouncer (reference)",
    ONE_SERVER: "Shardgate (reference, no shards)",
    SHARDGATE: "Shardgate (2 shards)",
}
POINT_KEYS = (DIRECT, PGBOUNCER, ONE_SERVER, SHARDGATE)
KINDS = ("single", "multi", "all")
STATEMENTS_METRIC = "shardgate_shard_statements_total"
PGBOUNCER_PROBLEM = re.compile(r"\b(WARNING|ERROR|FATAL|PANIC)\b")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "sharding-latest.md"
COMMITTED_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
RESULTS_HEADING = "## Sharding (issue 13)"

POINT_SCRIPT = f"\\set t random(1, {TENANTS})\nSELECT balance FROM accounts WHERE tenant_id = :t;\n"

SHARDED_TABLES = {"accounts": "tenant_id", "big": "id", "big5": "id"}


def expected_balance(tenant: int) -> int:
    """accounts.balance as loaded (see `load_sql`)."""
    return (tenant * 37) % 10_007


@dataclass(frozen=True, slots=True)
class CrossQuery:
    key: str
    sql: str
    ordered: bool  # compare the rows in order (ORDER BY) or as a multiset


CROSS_QUERIES = (
    CrossQuery("count", "SELECT count(*) FROM big", ordered=True),
    CrossQuery("group-by", "SELECT g, sum(v) FROM big GROUP BY g", ordered=False),
    CrossQuery("order-limit", "SELECT id, v FROM big ORDER BY v DESC, id LIMIT 100", ordered=True),
)


@dataclass(frozen=True, slots=True)
class FanoutQuery:
    key: str
    sql: str
    check_order: bool  # keep psql's output and check that the ids come back 1, 2, 3, ...


FANOUT_QUERIES = (
    FanoutQuery("plain", "SELECT * FROM big5", check_order=False),
    FanoutQuery("ordered-star", "SELECT * FROM big5 ORDER BY id", check_order=True),
    # The same rows with the columns named: the k-way merge even when the proxy refuses `*` with ORDER BY.
    FanoutQuery("ordered", "SELECT id, a, b, c FROM big5 ORDER BY id", check_order=True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sharding", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK_DURATION_S} s per pgbench run, {QUICK_ROUNDS} round, {QUICK_QUERY_RUNS} timed runs per "
        f"query (default {FULL_DURATION_S} s, {FULL_ROUNDS} rounds, {FULL_QUERY_RUNS} runs); same data sizes",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per pgbench run (overrides --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None,
        help=f"pgbench rounds, targets interleaved (default {FULL_ROUNDS}, --quick {QUICK_ROUNDS})",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=None,
        help=f"timed runs per cross-shard query and target, after one warm-up (default {FULL_QUERY_RUNS}, "
        f"--quick {QUICK_QUERY_RUNS})",
    )  # fmt: skip
    parser.add_argument(
        "--point-only", action="store_true",
        help="point reads only: load the accounts table alone, skip the cross-shard queries and the fan-out "
        "memory run (a quick look at the single-shard path; never appended to RESULTS.md)",
    )  # fmt: skip
    parser.add_argument("--pool-size", type=int, default=16, help="server connections per pool (default 16)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--auth", choices=("scram-sha-256", "md5"), default="scram-sha-256",
        help="client authentication on both poolers (default scram-sha-256)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if args.runs is None:
        args.runs = QUICK_QUERY_RUNS if args.quick else FULL_QUERY_RUNS
    if min(args.rounds, args.runs, args.pool_size, args.clients, args.threads) < 1:
        parser.error("--rounds, --runs, --pool-size, --clients and --threads must be >= 1")
    if args.duration is not None and args.duration < 1:
        parser.error("--duration must be >= 1")
    return args


# -- Shardgate over two shards ---------------------------------------------------------------------


class ShardedShardgate(Shardgate):
    """bench.services' Shardgate with one [[databases]] entry per shard, the sharded tables and an admin
    listener (for `shardgate_shard_statements_total`); every other setting is the one bench.run uses."""

    def __init__(
        self, work_dir: Path, port: int, admin_port: int, shard_ports: Sequence[int], login: Login,
        settings: PoolSettings, server_password: str,
    ) -> None:  # fmt: skip
        super().__init__(work_dir, port, shard_ports[0], login, settings, server_password=server_password)
        self.admin_port = admin_port
        self.config_path.write_text(
            sharded_config(self.config_path.read_text(), admin_port, shard_ports, login.database)
        )

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}/metrics"


def _replace_once(text: str, anchor: str, replacement: str) -> str:
    if text.count(anchor) != 1:
        raise RuntimeError(f"bench.services' Shardgate config changed: no single line {anchor.strip()!r}")
    return text.replace(anchor, replacement)


def sharded_config(base: str, admin_port: int, shard_ports: Sequence[int], database: str) -> str:
    """The generated one-server config turned into shard 0 of `len(shard_ports)`, plus the sharded tables."""
    text = _replace_once(
        base, 'admin_listen = ""\n', f"admin_listen = {json.dumps(f'{LOCALHOST}:{admin_port}')}\n"
    )
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
    for table, column in SHARDED_TABLES.items():
        text += (
            "\n[[sharded_tables]]\n"
            f"database = {json.dumps(database)}\n"
            f"table = {json.dumps(table)}\n"
            f"column = {json.dumps(column)}\n"
            'data_type = "bigint"\n'
            'method = "hash"\n'
        )
    return text


def read_statement_counts(url: str) -> dict[str, int]:
    """`shardgate_shard_statements_total` by kind (single, multi, all) for every database, summed."""
    counts = dict.fromkeys(KINDS, 0)
    for line in fetch_metrics(url).splitlines():
        match = re.match(rf"{STATEMENTS_METRIC}\{{([^}}]*)\}}\s+(\S+)", line)
        if match is None:
            continue
        kind = re.search(r'kind="([^"]*)"', match.group(1))
        if kind is not None and kind.group(1) in counts:
            counts[kind.group(1)] += round(float(match.group(2)))
    return counts


# -- data ------------------------------------------------------------------------------------------


def _where(shard: int | None, column: str) -> str:
    """The rows of `shard` as PostgreSQL's hash partitioning (MODULUS SHARDS) places them; all without one."""
    if shard is None:
        return ""
    return f" WHERE satisfies_hash_partition('probe'::regclass, {SHARDS}, {shard}, {column}::bigint)"


def load_sql(shard: int | None, point_only: bool = False) -> list[str]:
    """Statements that create and fill one server: shard `shard`, or the reference server (all rows, no big5);
    `point_only`: the accounts table alone."""
    statements = [
        "CREATE TABLE probe (k bigint) PARTITION BY HASH (k)",
        "CREATE TABLE accounts (tenant_id bigint NOT NULL, id int NOT NULL, balance int NOT NULL)",
        f"INSERT INTO accounts SELECT g, 1, (g * 37) % 10007 FROM generate_series(1, {TENANTS}) g"
        + _where(shard, "g"),
        "ALTER TABLE accounts ADD PRIMARY KEY (tenant_id, id)",
    ]
    if point_only:
        return [*statements, "VACUUM (ANALYZE) accounts"]
    statements += [
        "CREATE TABLE big (id bigint NOT NULL, g int NOT NULL, v int NOT NULL)",
        f"INSERT INTO big SELECT s, s % {BIG_GROUPS}, (s::bigint * 7919) % 1000003 FROM generate_series(1, {BIG_ROWS}) s"
        + _where(shard, "s"),
        "ALTER TABLE big ADD PRIMARY KEY (id)",
    ]
    tables = "accounts, big"
    if shard is not None:
        statements += [
            "CREATE TABLE big5 (id bigint NOT NULL, a int NOT NULL, b int NOT NULL, c text NOT NULL)",
            f"INSERT INTO big5 SELECT s, s % 1000, (s * 31) % 100003, 'row ' || s "
            f"FROM generate_series(1, {BIG5_ROWS}) s" + _where(shard, "s"),
            "ALTER TABLE big5 ADD PRIMARY KEY (id)",
        ]
        tables += ", big5"
    statements.append(f"VACUUM (ANALYZE) {tables}")
    return statements


def connect(host: str, port: int, connect_timeout: int = CONNECT_TIMEOUT_S) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=host, port=port, user=USER, password=PASSWORD, dbname=DATABASE, sslmode="disable",
        gssencmode="disable", connect_timeout=connect_timeout, autocommit=True,
    )  # fmt: skip


def load_server(server: PgServer, shard: int | None, point_only: bool = False) -> dict[str, int]:
    """Create and fill one server; returns its row count per table."""
    with connect(server.host, server.port) as conn:
        conn.execute(f"SET statement_timeout = {int(LOAD_TIMEOUT_S * 1000)}")
        for sql in load_sql(shard, point_only):
            conn.execute(sql)  # type: ignore[arg-type]  # our own constant SQL
        tables = ["accounts"]
        if not point_only:
            tables += ["big"] + (["big5"] if shard is not None else [])
        counts = {}
        for table in tables:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[arg-type]
            counts[table] = int(row[0]) if row else -1
    # Write the loaded pages out now, not during the measurements.
    server.psql("CHECKPOINT")
    return counts


def load_all(
    shards: Sequence[PgServer], reference: PgServer, point_only: bool = False
) -> dict[str, dict[str, int]]:
    """Fill the three servers at once (one connection each) and check that the shards add up."""
    jobs: list[tuple[str, PgServer, int | None]] = [
        *((f"shard {index}", server, index) for index, server in enumerate(shards)),
        ("reference", reference, None),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(load_server, server, shard, point_only) for name, server, shard in jobs}
        counts = {name: future.result(timeout=LOAD_TIMEOUT_S) for name, future in futures.items()}
    expected = {"accounts": TENANTS} if point_only else {"accounts": TENANTS, "big": BIG_ROWS, "big5": BIG5_ROWS}
    for table, total in expected.items():
        on_shards = [counts[f"shard {index}"][table] for index in range(len(shards))]
        if sum(on_shards) != total or min(on_shards) == 0:
            raise RuntimeError(
                f"{table}: the shards hold {on_shards} rows, expected {total:,} in all, on each shard"
            )
        if table in counts["reference"] and counts["reference"][table] != total:
            raise RuntimeError(
                f"{table}: the reference holds {counts['reference'][table]:,} rows, not {total:,}"
            )
    return counts


# -- results ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class QueryTiming:
    """One cross-shard query timed on each target (seconds per run), and whether the answers agreed."""

    key: str
    sql: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    matches: bool | None = None
    problems: list[str] = field(default_factory=list)

    def median_ms(self, target: str) -> float | None:
        values = self.seconds.get(target, [])
        return 1000.0 * statistics.median(values) if values else None

    @property
    def ratio(self) -> float | None:
        through, direct = self.median_ms(SHARDGATE), self.median_ms(DIRECT)
        return None if through is None or not direct else through / direct


@dataclass(slots=True)
class FanoutResult:
    """Shardgate's RSS while psql read one 5M-row fan-out through it."""

    key: str
    sql: str
    rows: int | None = None
    seconds: float | None = None
    rss_before_kb: int | None = None
    rss_peak_kb: int | None = None
    rss_after_kb: int | None = None
    samples: int = 0
    proxy_cpu_s: float | None = None
    order_ok: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.rows == BIG5_ROWS and self.order_ok is not False


@dataclass(slots=True)
class ShardingResults:
    info: dict[str, str]
    point: Results
    loaded: dict[str, dict[str, int]] = field(default_factory=dict)
    # Shard routing of each Shardgate pgbench run, by the run's Measurement.
    decisions: list[tuple[pgbench.Measurement, dict[str, int]]] = field(default_factory=list)
    point_check: str = ""
    cross: list[QueryTiming] = field(default_factory=list)
    fanout: list[FanoutResult] = field(default_factory=list)
    rss_at_start_kb: int | None = None  # Shardgate (2 shards) right after it started
    rss_at_rest_kb: int | None = None  # and before the first fan-out (after the pgbench runs)
    notes: list[str] = field(default_factory=list)
    log_findings: dict[str, list[str]] = field(default_factory=dict)
    log_paths: dict[str, str] = field(default_factory=dict)

    def decisions_of(self, measurement: pgbench.Measurement | None) -> dict[str, int] | None:
        return next((counts for run, counts in self.decisions if run is measurement), None)

    @property
    def clean(self) -> bool:
        pgbench_ok = all(
            m.ok for by_target in self.point.runs.values() for runs in by_target.values() for m in runs
        )
        cross_ok = all(not q.problems and q.matches for q in self.cross)
        return pgbench_ok and cross_ok and all(f.ok for f in self.fanout) and not self.notes


# -- 1. point reads --------------------------------------------------------------------------------


def point_scenarios(clients: int) -> list[pgbench.Scenario]:
    return [
        pgbench.Scenario(
            f"point-{mode}",
            f"point read by key, `-M {mode}`, {clients} clients",
            clients,
            ("-M", mode),
            script=POINT_SCRIPT,
            measures="One SELECT by tenant_id per transaction.",
        )
        for mode in ("simple", "extended")
    ]


def check_point_reads(shardgate: Service) -> str:
    """Ask Shardgate for a sample of tenants (literal and parameter) and compare with the loaded balances."""
    tenants = list(range(1, TENANTS + 1, CHECK_STRIDE))
    wrong: list[str] = []
    with connect(shardgate.host, shardgate.port) as conn:
        for tenant in tenants:
            literal = conn.execute(f"SELECT balance FROM accounts WHERE tenant_id = {tenant}").fetchall()  # type: ignore[arg-type]
            bound = conn.execute("SELECT balance FROM accounts WHERE tenant_id = %s", (tenant,)).fetchall()
            want = [(expected_balance(tenant),)]
            if literal != want or bound != want:
                wrong.append(f"tenant {tenant}: literal {literal}, parameter {bound}, expected {want}")
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} of {len(tenants)} point reads through Shardgate were wrong: {wrong[:3]}"
        )
    return f"{len(tenants)} tenants read through Shardgate (literal and parameter): all balances right"


def run_point_reads(
    state: ShardingResults, targets: list[pgbench.Target], poolers: Sequence[Service],
    shardgate: ShardedShardgate, args: argparse.Namespace, pgbench_path: str, duration_s: int,
    env: dict[str, str], work_dir: Path,
) -> None:  # fmt: skip
    results = state.point
    warm = pgbench.Scenario("warm-up", "warm-up", args.clients, ("-M", "simple"), script=POINT_SCRIPT)
    for target in targets:
        measurement = pgbench.run(pgbench_path, target, warm, WARMUP_S, args.threads, USER, DATABASE, env,
                                  work_dir, cpu_seconds, rss_kb)  # fmt: skip
        if not measurement.ok:
            results.notes.append(f"warm-up via {target.label} failed: {'; '.join(measurement.problems[:3])}")
        say(f"warm-up via {target.label}: {describe(measurement)}")
    total = args.rounds * len(results.scenarios) * len(targets)
    done = 0
    for round_index in range(args.rounds):
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        for scenario in results.scenarios:
            results.background_busy_pct.append(background_busy_pct())
            for target in order:
                for pooler in poolers:
                    pooler.check_alive()
                before = _counts(state, shardgate) if target.key == SHARDGATE else None
                measurement = pgbench.run(pgbench_path, target, scenario, duration_s, args.threads, USER,
                                          DATABASE, env, work_dir, cpu_seconds, rss_kb)  # fmt: skip
                results.add(measurement)
                done += 1
                routed = ""
                if before is not None and (after := _counts(state, shardgate)) is not None:
                    delta = {kind: after[kind] - before[kind] for kind in KINDS}
                    state.decisions.append((measurement, delta))
                    routed = ", routed " + ", ".join(f"{kind} {count:,}" for kind, count in delta.items())
                say(
                    f"[{done:>2}/{total}] {scenario.title} via {target.label}: {describe(measurement)}{routed}"
                )


def _counts(state: ShardingResults, shardgate: ShardedShardgate) -> dict[str, int] | None:
    try:
        return read_statement_counts(shardgate.metrics_url)
    except MetricsError as exc:
        note = f"shard routing counters not available: {exc}"
        if note not in state.notes:
            state.notes.append(note)
        return None


# -- 2. cross-shard queries ------------------------------------------------------------------------


def _timed(conn: psycopg.Connection[Any], sql: str) -> tuple[float, list[tuple[Any, ...]]]:
    """Run `sql` and fetch every row; cancelled after QUERY_TIMEOUT_S."""
    watchdog = threading.Timer(QUERY_TIMEOUT_S, conn.cancel_safe)
    watchdog.start()
    try:
        started = time.perf_counter()
        rows = conn.execute(sql).fetchall()  # type: ignore[arg-type]  # our own constant SQL
        return time.perf_counter() - started, rows
    finally:
        watchdog.cancel()


def _canonical(rows: list[tuple[Any, ...]], ordered: bool) -> list[tuple[Any, ...]]:
    return rows if ordered else sorted(rows)


def run_cross_queries(state: ShardingResults, endpoints: dict[str, tuple[str, int]], runs: int) -> None:
    """Each query: one warm-up per target (its answer compared), then `runs` timed runs interleaved."""
    conns: dict[str, psycopg.Connection[Any]] = {}
    try:
        for key, (host, port) in endpoints.items():
            conns[key] = connect(host, port)
        for query in CROSS_QUERIES:
            timing = QueryTiming(query.key, query.sql)
            state.cross.append(timing)
            answers: dict[str, list[tuple[Any, ...]]] = {}
            for key, conn in conns.items():
                try:
                    _, rows = _timed(conn, query.sql)
                except psycopg.Error as exc:
                    timing.problems.append(f"{endpoints_label(key)}: {_pg_error(exc)}")
                    continue
                answers[key] = _canonical(rows, query.ordered)
                timing.rows[key] = len(rows)
            if DIRECT in answers and SHARDGATE in answers:
                timing.matches = answers[DIRECT] == answers[SHARDGATE]
                if not timing.matches:
                    timing.problems.append(
                        f"Shardgate's answer differs from the reference's: {_first_difference(answers)}"
                    )
            order = list(conns)
            for index in range(runs):
                shift = index % len(order)  # who goes first rotates
                for key in order[shift:] + order[:shift]:
                    if key not in answers:
                        continue
                    try:
                        seconds, _ = _timed(conns[key], query.sql)
                    except psycopg.Error as exc:
                        timing.problems.append(f"{endpoints_label(key)} run {index + 1}: {_pg_error(exc)}")
                        continue
                    timing.seconds.setdefault(key, []).append(seconds)
            say(
                f"{query.sql}: "
                + ", ".join(f"{endpoints_label(key)} {_number(timing.median_ms(key), 1)} ms" for key in conns)
                + f", ratio {_number(timing.ratio, 2)}"
                + (f"; {timing.problems[0]}" if timing.problems else "")
            )
    finally:
        for conn in conns.values():
            conn.close()


SHARD0_DIRECT = "shard0"


def endpoints_label(key: str) -> str:
    return {SHARD0_DIRECT: "shard 0 direct", DIRECT: "reference direct", SHARDGATE: "Shardgate"}.get(key, key)


def _pg_error(exc: psycopg.Error) -> str:
    sqlstate = getattr(exc, "sqlstate", None) or "no SQLSTATE"
    return f"{type(exc).__name__} {sqlstate}: {str(exc).strip()[:300]}"


def _first_difference(answers: dict[str, list[tuple[Any, ...]]]) -> str:
    direct, through = answers[DIRECT], answers[SHARDGATE]
    if len(direct) != len(through):
        return f"{len(through)} rows instead of {len(direct)}"
    for index, (want, got) in enumerate(zip(direct, through, strict=True)):
        if want != got:
            return f"row {index + 1}: {got!r} instead of {want!r}"
    return "no difference found"


# -- 3. memory during a 5M-row fan-out -------------------------------------------------------------


def run_fanout(
    state: ShardingResults, shardgate: Service, psql_path: str, env: dict[str, str], work_dir: Path
) -> None:
    time.sleep(SETTLE_S)
    state.rss_at_rest_kb = rss_kb(shardgate.pid)
    for query in FANOUT_QUERIES:
        shardgate.check_alive()
        result = FanoutResult(query.key, query.sql)
        state.fanout.append(result)
        output = work_dir / f"fanout-{query.key}.txt" if query.check_order else Path(os.devnull)
        try:
            measure_fanout(result, shardgate.pid, psql_path, shardgate.host, shardgate.port, env, output)
            if query.check_order and result.rows is not None:
                result.order_ok = check_ids_in_order(output, result)
        finally:
            if output != Path(os.devnull):
                output.unlink(missing_ok=True)
        say(
            f"{query.sql}: {_count(result.rows)} rows in {_number(result.seconds, 1)} s, Shardgate RSS "
            f"{_mb(result.rss_before_kb)} -> peak {_mb(result.rss_peak_kb)} MB"
            + (f"; {'; '.join(result.problems[:2])}" if result.problems else "")
        )


def measure_fanout(
    result: FanoutResult, pid: int, psql_path: str, host: str, port: int, env: dict[str, str], output: Path
) -> None:
    """psql reads the whole result (into psql's memory, rows written to `output`) while we sample the
    proxy's VmRSS every RSS_SAMPLE_S; psql prints the row count it got."""
    argv = [
        psql_path, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",  # errors with SQLSTATE
        "-h", host, "-p", str(port), "-U", USER, "-d", DATABASE,
        "-o", str(output), "-c", result.sql, "-c", r"\echo rows=:ROW_COUNT",
    ]  # fmt: skip
    result.rss_before_kb = rss_kb(pid)
    peak = result.rss_before_kb
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    deadline = started + FANOUT_TIMEOUT_S
    with open(os.devnull, "rb") as stdin:
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        while process.poll() is None and time.monotonic() < deadline:
            peak = max(peak, rss_kb(pid))
            result.samples += 1
            time.sleep(RSS_SAMPLE_S)
        if process.poll() is None:
            process.kill()
            result.problems.append(f"psql did not finish within {FANOUT_TIMEOUT_S:.0f} s: killed")
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    result.seconds = time.monotonic() - started
    result.rss_peak_kb = max(peak, rss_kb(pid))
    result.proxy_cpu_s = cpu_seconds(pid) - cpu_before
    time.sleep(SETTLE_S)
    result.rss_after_kb = rss_kb(pid)
    text = stdout.decode(errors="replace")
    if match := re.search(r"^rows=(\d+)$", text, re.MULTILINE):
        result.rows = int(match.group(1))
    errors = stderr.decode(errors="replace").strip()
    if process.returncode != 0 or errors:
        result.problems.append(f"psql exit {process.returncode}: {errors[:500] or 'no message'}")
    if result.rows is not None and result.rows != BIG5_ROWS:
        result.problems.append(f"{result.rows:,} rows instead of {BIG5_ROWS:,}")


def check_ids_in_order(path: Path, result: FanoutResult) -> bool:
    """The ordered fan-out's output: its first column must be 1, 2, ..., BIG5_ROWS (every id once, in order)."""
    expected = 1
    with path.open("rb") as lines:
        for line in lines:
            if expected > BIG5_ROWS:
                break
            head = line.split(b"|", 1)[0]
            if head != str(expected).encode():
                result.problems.append(
                    f"ORDER BY id: line {expected} starts with {head[:40]!r}, not {expected}"
                )
                return False
            expected += 1
    if expected != BIG5_ROWS + 1:
        result.problems.append(f"ORDER BY id: {expected - 1:,} lines instead of {BIG5_ROWS:,}")
        return False
    return True


# -- report ----------------------------------------------------------------------------------------


def _number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def _count(value: int | None) -> str:
    return MISSING if value is None else f"{value:,}"


def _mb(kb: int | None) -> str:
    return MISSING if kb is None else f"{kb / 1024:.1f}"


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("met" if passed else "**MISSED**")


def goals_rows(state: ShardingResults) -> list[str]:
    rows = []
    for scenario in state.point.scenarios:
        ratio = state.point.ratio(scenario.key, SHARDGATE, PGBOUNCER)
        passed = None if ratio is None else ratio >= GOAL_POINT_RATIO
        rows.append(f"| {scenario.title}: Shardgate/PgBouncer TPS | >= {GOAL_POINT_RATIO:.2f} "
                    f"| {_number(ratio, 3)} | {_verdict(passed)} |")  # fmt: skip
    for timing in state.cross:
        ratio = timing.ratio if timing.matches else None
        passed = None if ratio is None else ratio <= GOAL_CROSS_RATIO
        verdict = _verdict(passed)
        if ratio is None and (timing.problems or timing.matches is False):
            verdict = "not measured: wrong answer or error (see Problems)"
        rows.append(f"| `{timing.sql}`: Shardgate time / reference time | <= {GOAL_CROSS_RATIO:.1f}x "
                    f"| {_number(ratio, 2)}x | {verdict} |")  # fmt: skip
    for fanout in state.fanout:
        peak = fanout.rss_peak_kb / 1024 if fanout.rss_peak_kb is not None and fanout.rows else None
        passed = None if peak is None else peak < GOAL_PEAK_RSS_MB
        verdict = _verdict(passed)
        if peak is None and fanout.problems:
            verdict = "not measured: the query failed (see Problems)"
        elif passed and fanout.problems:
            verdict += " (but see Problems)"
        rows.append(f"| `{fanout.sql}`: Shardgate peak RSS | < {GOAL_PEAK_RSS_MB:.0f} MB "
                    f"| {_number(peak, 1)} MB | {verdict} |")  # fmt: skip
    return ["| goal | target | measured | result |", "|---|---|--:|---|", *rows]


def point_table(state: ShardingResults) -> list[str]:
    results = state.point
    keys = POINT_KEYS
    header = [f"{LABELS[key]} TPS" for key in keys]
    header += ["Shardgate/PgBouncer", "each round", "2 shards / no shards", "each round"]
    header += [f"{LABELS[key]} latency ms" for key in keys]
    lines = ["| scenario | " + " | ".join(header) + " |", "|---|" + "--:|" * len(header)]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        picked = {key: results.representative(scenario.key, key) for key in keys}
        cells = [scenario.title]
        for key in keys:
            failed = bool(results.failures(scenario.key, key))
            m = picked[key]
            cells.append("FAILED" if m is None and failed else _number(m.tps if m else None, 0)
                         + (" (some runs FAILED)" if failed and m is not None else ""))  # fmt: skip
        for denominator in (PGBOUNCER, ONE_SERVER):
            cells.append(_number(results.ratio(scenario.key, SHARDGATE, denominator), 3))
            rounds = results.round_ratios(scenario.key, SHARDGATE, denominator)
            cells.append(", ".join(f"{r:.2f}" for r in rounds) or MISSING)
        cells += [_number(m.latency_ms if m else None, 3) for m in picked.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def point_cpu_table(state: ShardingResults) -> list[str]:
    results = state.point
    poolers = (PGBOUNCER, ONE_SERVER, SHARDGATE)
    header = [f"{LABELS[key]} µs/txn" for key in poolers]
    header += ["2 shards / PgBouncer µs", "2 shards - no shards µs"]
    header += [f"{LABELS[key]} CPU" for key in poolers]
    header += ["2 shards: statements to one shard / several / all"]
    lines = ["| scenario | " + " | ".join(header) + " |", "|---|" + "--:|" * len(header)]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        cost = {key: results.cpu_us_per_transaction(scenario.key, key) for key in poolers}
        pgb, one, sg = cost[PGBOUNCER], cost[ONE_SERVER], cost[SHARDGATE]
        picked = {key: results.representative(scenario.key, key) for key in poolers}
        counts = state.decisions_of(picked[SHARDGATE])
        routed = MISSING if counts is None else " / ".join(f"{counts[kind]:,}" for kind in KINDS)
        chosen = picked[SHARDGATE]
        transactions = chosen.transactions if chosen is not None else None
        if counts is not None and transactions:
            routed += f" ({transactions:,} transactions)"
        cells = [
            scenario.title, *(_number(cost[key], 1) for key in poolers),
            MISSING if pgb is None or sg is None or not pgb else f"{sg / pgb:.2f}",
            MISSING if one is None or sg is None else f"{sg - one:+.1f}",
            *(MISSING if (m := picked[key]) is None or m.pooler_cpu_pct is None else f"{m.pooler_cpu_pct:.0f}%"
              for key in poolers),
            routed,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cross_table(state: ShardingResults) -> list[str]:
    lines = [
        "| query | reference direct ms | Shardgate ms | Shardgate / reference | shard 0 direct ms (half the rows) "
        "| rows | same answer |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for timing in state.cross:
        same = MISSING if timing.matches is None else ("yes" if timing.matches else "**NO**")
        lines.append(
            f"| `{timing.sql}` | {_number(timing.median_ms(DIRECT), 1)} | {_number(timing.median_ms(SHARDGATE), 1)} "
            f"| {_number(timing.ratio, 2)}x | {_number(timing.median_ms(SHARD0_DIRECT), 1)} "
            f"| {_count(timing.rows.get(SHARDGATE))} | {same} |"
        )
    return lines


def fanout_table(state: ShardingResults) -> list[str]:
    lines = [
        "| query | rows | seconds | rows/s | Shardgate RSS before MB | peak MB | after MB | RSS samples "
        "| Shardgate CPU s | check |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for fanout in state.fanout:
        rate = fanout.rows / fanout.seconds if fanout.rows and fanout.seconds else None
        if fanout.problems:
            check = "**" + "; ".join(fanout.problems)[:200] + "**"
        elif fanout.order_ok:
            check = "ids 1..5,000,000 in order"
        else:
            check = "row count right" if fanout.rows == BIG5_ROWS else MISSING
        lines.append(
            f"| `{fanout.sql}` | {_count(fanout.rows)} | {_number(fanout.seconds, 1)} | {_number(rate, 0)} "
            f"| {_mb(fanout.rss_before_kb)} | {_mb(fanout.rss_peak_kb)} | {_mb(fanout.rss_after_kb)} "
            f"| {fanout.samples} | {_number(fanout.proxy_cpu_s, 1)} | {check} |"
        )
    return lines


def problems_lines(state: ShardingResults) -> list[str]:
    lines: list[str] = []
    for scenario in state.point.scenarios:
        for key in POINT_KEYS:
            for measurement in state.point.failures(scenario.key, key):
                lines.append(
                    f"- {scenario.title} via {LABELS[key]}: {'; '.join(measurement.problems) or 'no result'}"
                )
    lines.extend(f"- {note}" for note in (*state.point.notes, *state.notes))
    for timing in state.cross:
        lines.extend(f"- `{timing.sql}`: {problem}" for problem in timing.problems)
    for fanout in state.fanout:
        lines.extend(f"- `{fanout.sql}`: {problem}" for problem in fanout.problems)
    for label, findings in state.log_findings.items():
        where = state.log_paths.get(label, "")
        if findings:
            lines.append(f"- {label} stderr ({where}) has {len(findings)} warning/error line(s); first ones:")
            lines.extend(f"    - `{line[:300]}`" for line in findings[:10])
        else:
            lines.append(f"- {label} stderr ({where}): no warnings, errors or tracebacks.")
    return lines or ["- none"]


def body(state: ShardingResults, level: int) -> list[str]:
    """The report below its title; `level` is the heading level of its sections."""
    h = "#" * level
    info = state.info
    loaded = state.loaded
    split = ", ".join(
        f"{table} {' + '.join(_count(loaded.get(f'shard {i}', {}).get(table)) for i in range(SHARDS))}"
        for table in ("accounts", "big", "big5")
    )
    return [
        f"{info.get('mode', MISSING)} run, {info.get('started', MISSING)} · {info.get('machine', MISSING)}",
        "",
        info.get("versions", MISSING),
        "",
        info.get("setup", MISSING),
        "",
        f"Rows on shard 0 + shard 1 (placed as `PARTITION BY HASH` with modulus {SHARDS} places them): {split}. "
        f"The reference server holds accounts {TENANTS:,} and big {BIG_ROWS:,} rows.",
        "",
        *background_lines(state.point),
        f"{h} Goals",
        "",
        *goals_rows(state),
        "",
        f"{h} 1. Point reads by key (`SELECT balance FROM accounts WHERE tenant_id = :t`, t random in 1..{TENANTS:,})",
        "",
        *point_table(state),
        "",
        *point_cpu_table(state),
        "",
        "direct, PgBouncer and Shardgate (reference, no shards) go to the reference server, which holds all "
        "the tenants in one `accounts` table; Shardgate (2 shards) sends each read to the shard of its key. The "
        "no-shards Shardgate is the same proxy with the reference server as its only `[[databases]]` entry and "
        "no `[[sharded_tables]]`: 2 shards / no shards is what the sharded path costs. TPS and latency: the median run by TPS; "
        "Shardgate/PgBouncer: the median of the per-round ratios (the targets run back to back in each round, "
        "the first one rotating). µs/txn: user+system CPU of the pooler process per transaction, the median "
        "over the rounds. Statements by shard count: `shardgate_shard_statements_total` over the run shown. "
        + (state.point_check + "." if state.point_check else ""),
        "",
        f"{h} 2. Cross-shard queries over {BIG_ROWS:,} rows ({BIG_ROWS // SHARDS:,} per shard)",
        "",
        *cross_table(state),
        "",
        f"Median of {info.get('query_runs', MISSING)} runs per target after one warm-up run (whose answers are "
        "compared: rows in order for ORDER BY and count, as a multiset for GROUP BY), psycopg (extended "
        "protocol, text results), the targets alternating. Time: execute + fetchall on the client. The "
        "reference server has all the rows in one table; each shard scans its half, both at once, so on "
        "this machine the shards share the same CPUs as the reference's parallel workers do.",
        "",
        f"{h} 3. Shardgate memory during a {BIG5_ROWS:,}-row fan-out ({BIG5_ROWS // SHARDS:,} per shard)",
        "",
        *fanout_table(state),
        "",
        f"Read with `psql -X -At -o FILE -c '<query>'` through Shardgate (psql holds the whole result, the "
        f"proxy should not); VmRSS of the Shardgate process sampled every {RSS_SAMPLE_S * 1000:.0f} ms while "
        f"psql ran. Shardgate RSS right after it started: {_mb(state.rss_at_start_kb)} MB; at rest before the "
        f"first fan-out (after the pgbench runs and the cross-shard queries): {_mb(state.rss_at_rest_kb)} MB. The "
        "ORDER BY output is checked line by line (ids 1, 2, 3, ...); the plain one by psql's row count.",
        "",
        f"{h} Problems",
        "",
        *problems_lines(state),
        "",
    ]


def render(state: ShardingResults) -> str:
    return "\n".join(["# Shardgate sharding benchmark (issue 13)", "", *body(state, 2)])


def results_section(state: ShardingResults) -> str:
    return "\n".join([RESULTS_HEADING, "", *body(state, 3)])


def append_to_results(section: str, path: Path = COMMITTED_RESULTS) -> None:
    """Put `section` at the end of RESULTS.md, replacing an earlier copy of it (up to the next `## `)."""
    text = path.read_text() if path.exists() else ""
    start = text.find(RESULTS_HEADING + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(RESULTS_HEADING))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    text = text.rstrip("\n") + "\n\n" if text.strip() else ""
    path.write_text(text + section.rstrip("\n") + "\n")


def write_outputs(state: ShardingResults, out: Path, full_run: bool) -> str:
    text = render(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "info": state.info,
        "loaded": state.loaded,
        "point_runs": {scenario: {target: [dataclasses.asdict(m) for m in runs] for target, runs in by_target.items()}
                       for scenario, by_target in state.point.runs.items()},
        "point_routing": [{"scenario": m.scenario, "tps": m.tps, **counts} for m, counts in state.decisions],
        "cross": [dataclasses.asdict(timing) for timing in state.cross],
        "fanout": [dataclasses.asdict(fanout) for fanout in state.fanout],
        "rss_at_start_kb": state.rss_at_start_kb,
        "rss_at_rest_kb": state.rss_at_rest_kb,
        "notes": [*state.point.notes, *state.notes],
        "background_busy_pct": state.point.background_busy_pct,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    if full_run:
        append_to_results(results_section(state))
    return text


def scan_logs(state: ShardingResults, services: Sequence[Service], out: Path) -> None:
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
        "mode": "Quick" if args.quick else "Full",
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
            f"Three PostgreSQL servers on this machine (shard 0, shard 1, reference; fsync off, shared_buffers "
            f"{SHARED_BUFFERS}). pgbench {duration_s} s per run, -c {args.clients} -j {args.threads}, "
            f"{args.rounds} round(s), targets interleaved. PgBouncer and Shardgate: transaction mode, pool size "
            f"{args.pool_size} per server (Shardgate: per shard), client auth {args.auth}; Shardgate's "
            "`[[sharded_tables]]`: accounts by tenant_id, big and big5 by id, all `bigint` / `hash`. "
            "sslmode=disable, TCP on 127.0.0.1."
        ),
        "query_runs": str(args.runs),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    signal.signal(signal.SIGTERM, _terminate)
    settings = PoolSettings(pool_size=args.pool_size)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    state = ShardingResults(info={}, point=Results(info={}, scenarios=point_scenarios(args.clients)))
    scratch = Path(tempfile.mkdtemp(prefix="shardgate-sharding-"))
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
        say(f"PostgreSQL: shards on ports {[s.port for s in shards]}, reference on {reference.port}; loading "
            f"{TENANTS:,} tenants, {BIG_ROWS:,} + {BIG5_ROWS:,} rows ...")  # fmt: skip
        loading = time.monotonic()
        state.loaded = load_all(shards, reference, args.point_only)
        say(f"loaded in {time.monotonic() - loading:.0f} s: {state.loaded}")
        login = make_login(reference, args.auth)
        env = clean_env(
            PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"
        )
        for name in ("pgbouncer", "shardgate", "work"):
            (scratch / name).mkdir()
        pgbouncer = PgBouncer(scratch / "pgbouncer", free_port(), reference.port, login, settings)
        cleanup.callback(pgbouncer.stop)
        pgbouncer.start()
        shardgate = ShardedShardgate(
            scratch / "shardgate", free_port(), free_port(), [s.port for s in shards], login, settings,
            server_password=PASSWORD,
        )  # fmt: skip
        cleanup.callback(shardgate.stop)
        shardgate.start()
        # The same proxy with the reference server only: what the sharded path adds to a point read.
        (scratch / "shardgate-one-server").mkdir()
        one_server = Shardgate(
            scratch / "shardgate-one-server", free_port(), reference.port, login, settings,
            server_password=PASSWORD, label="Shardgate one server",
        )  # fmt: skip
        cleanup.callback(one_server.stop)
        one_server.start()
        time.sleep(SETTLE_S)
        state.rss_at_start_kb = rss_kb(shardgate.pid)
        say(f"PgBouncer on port {pgbouncer.port} (pid {pgbouncer.pid}) -> reference; Shardgate on port "
            f"{shardgate.port} (pid {shardgate.pid}, admin {shardgate.admin_port}) -> shards; Shardgate on port "
            f"{one_server.port} (pid {one_server.pid}) -> reference")  # fmt: skip
        state.info = run_info(args, duration_s, reference.bin_dir, pgbouncer)
        targets = [
            pgbench.Target(DIRECT, LABELS[DIRECT], reference.host, reference.port),
            pgbench.Target(PGBOUNCER, LABELS[PGBOUNCER], pgbouncer.host, pgbouncer.port, pgbouncer.pid),
            pgbench.Target(ONE_SERVER, LABELS[ONE_SERVER], one_server.host, one_server.port, one_server.pid),
            pgbench.Target(SHARDGATE, LABELS[SHARDGATE], shardgate.host, shardgate.port, shardgate.pid),
        ]
        work_dir = scratch / "work"
        sections: list[tuple[str, Callable[[], None]]] = [
            ("point reads", lambda: run_point_reads(
                state, targets, [pgbouncer, one_server, shardgate], shardgate, args,
                str(reference.bin_dir / "pgbench"), duration_s, env, work_dir)),
            # Only the sharded Shardgate from here on: one proxy process fewer on the CPUs.
            ("stopping the one-server Shardgate", one_server.stop),
            ("cross-shard queries", lambda: run_cross_queries(state, {
                DIRECT: (reference.host, reference.port), SHARDGATE: (shardgate.host, shardgate.port),
                SHARD0_DIRECT: (shards[0].host, shards[0].port)}, args.runs)),
            ("fan-out memory", lambda: run_fanout(state, shardgate, str(reference.bin_dir / "psql"), env, work_dir)),
        ]  # fmt: skip
        if args.point_only:
            sections = sections[:1]
        try:
            state.point_check = check_point_reads(shardgate)
            say(state.point_check)
        except (RuntimeError, psycopg.Error) as exc:
            state.notes.append(f"point-read check: {exc}")
            say(f"point-read check: {exc}")
        for name, section in sections:
            try:
                section()
            except (ServiceError, RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error,
                    TopologyError) as exc:  # fmt: skip
                stopped_early = True
                state.notes.append(f"{name} stopped early: {type(exc).__name__}: {exc}")
                say(f"{name} stopped early: {exc}")
        out.parent.mkdir(parents=True, exist_ok=True)
        for service in (shardgate, one_server, pgbouncer):
            service.stop()
        scan_logs(state, [pgbouncer, one_server, shardgate], out)

    full_run = not args.quick and not args.point_only and not stopped_early
    text = write_outputs(state, out, full_run)
    print(text)
    say(f"report written to {out}" + (f" and appended to {COMMITTED_RESULTS}" if full_run else "")
        + f" ({time.monotonic() - started:.0f} s)")  # fmt: skip
    return 0 if state.clean and not stopped_early else 1


if __name__ == "__main__":
    sys.exit(main())
