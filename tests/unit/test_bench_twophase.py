"""bench/twophase.py's pure parts: the 2PC counters read from the proxy's real /metrics text, the p95 from
pgbench's per-transaction log, the per-run counter checks, the range config and the RESULTS.md section."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from bench import twophase
from bench.pgbench import Measurement
from bench.routing import MetricsError
from bench.twophase import Run, TwoPhaseCounters
from config.loader import load
from proxy.admin import _two_phase_metrics
from proxy.twophase.coordinator import TwoPhase


class _Families:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        yield from _two_phase_metrics(self.runtime)


def _metrics_text(coordinator: TwoPhase) -> str:
    registry = CollectorRegistry()
    registry.register(_Families(SimpleNamespace(twophase=coordinator)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_counters_are_read_from_the_proxys_own_metrics_text() -> None:
    coordinator = TwoPhase(SimpleNamespace(config=None))  # type: ignore[arg-type]
    coordinator.counts.update(prepared=12, committed=11, rolled_back=1, one_phase=5)
    for seconds in (0.004, 0.006):
        coordinator._observe(seconds)
    counters = twophase.parse_counters(_metrics_text(coordinator))
    assert (counters.prepared, counters.committed, counters.rolled_back, counters.one_phase) == (12, 11, 1, 5)
    assert counters.commit_seconds_count == 2
    assert counters.commit_mean_ms == pytest.approx(5.0)


def test_counters_missing_from_metrics_are_an_error() -> None:
    with pytest.raises(MetricsError, match="shardgate_2pc"):
        twophase.parse_counters('shardgate_2pc_transactions_total{outcome="prepared"} 3.0\n')


def test_a_runs_change_is_the_difference_and_its_mean_commit_time() -> None:
    before = TwoPhaseCounters(10, 10, 0, 2, 0.5, 100)
    after = TwoPhaseCounters(110, 109, 1, 2, 0.9, 200)
    change = after - before
    assert change == TwoPhaseCounters(100, 99, 1, 0, pytest.approx(0.4), 100)  # type: ignore[arg-type]
    assert change.commit_mean_ms == pytest.approx(4.0)
    assert TwoPhaseCounters().commit_mean_ms is None


def test_p95_comes_from_every_thread_log_without_failed_transactions(tmp_path: Path) -> None:
    prefix = tmp_path / "txlog-multi-2pc-0"
    # client_id transaction_no time(µs) script_no time_epoch time_us: 20 latencies of 1..20 ms over two files
    (tmp_path / "txlog-multi-2pc-0.4242").write_text(
        "".join(f"0 {n} {n * 1000} 0 1700000000 {n}\n" for n in range(1, 11)) + "0 11 failed 0 1700000000 0\n"
    )
    (tmp_path / "txlog-multi-2pc-0.4242.1").write_text(
        "".join(f"1 {n} {n * 1000} 0 1700000000 {n}\n" for n in range(11, 21))
    )
    (tmp_path / "txlog-multi-2pc-1.4243").write_text("0 1 999000 0 1700000000 0\n")  # another run's log
    latencies = twophase.per_transaction_latencies_ms(prefix)
    assert sorted(latencies) == [float(n) for n in range(1, 21)]
    assert twophase.percentile(latencies, 0.95) == 19.0
    assert twophase.percentile([], 0.95) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["txlog-multi-2pc-1.4243"]


def _run(transactions: int, counters: TwoPhaseCounters) -> Run:
    measurement = Measurement("two-updates", "x", tps=100.0, latency_ms=1.0, transactions=transactions)
    return Run("x", 0, measurement, counters=counters)


def test_counter_checks_catch_a_run_that_took_the_wrong_path() -> None:
    jobs = twophase.JOB_BY_KEY
    ok = _run(1000, TwoPhaseCounters(prepared=1003, committed=1003))
    twophase.check_counters(ok, jobs[twophase.MULTI_2PC])
    assert ok.problems == []
    # 2PC on, but the commits went through one phase
    wrong = _run(1000, TwoPhaseCounters(one_phase=1000))
    twophase.check_counters(wrong, jobs[twophase.MULTI_2PC])
    assert any("prepared for 1,000 transactions" in p for p in wrong.problems)
    rolled_back = _run(1000, TwoPhaseCounters(prepared=1000, committed=998, rolled_back=2))
    twophase.check_counters(rolled_back, jobs[twophase.MULTI_2PC])
    assert any("2 rolled back" in p for p in rolled_back.problems)
    off = _run(1000, TwoPhaseCounters(prepared=4, one_phase=1000))
    twophase.check_counters(off, jobs[twophase.MULTI_1PC])
    assert off.problems == ["4 prepared with two_phase_commit = false"]
    single = _run(1000, TwoPhaseCounters(one_phase=1000))
    twophase.check_counters(single, jobs[twophase.SINGLE_2PC])
    assert single.problems and "reached the coordinator" in single.problems[0]


BASE = """[general]
listen = "127.0.0.1:6432"
admin_listen = ""
pool_mode = "transaction"

[[users]]
name = "app"
password = "app"
auth = "scram-sha-256"
server_user = "app"
server_password = "app"

[[databases]]
name = "app"
host = "127.0.0.1"
port = 5000
database_name = "app"
role = "primary"
"""


@pytest.mark.parametrize("two_phase_commit", [True, False])
def test_range_config_loads_with_the_ranges_the_scripts_use(tmp_path: Path, two_phase_commit: bool) -> None:
    path = tmp_path / "shardgate.toml"
    path.write_text(twophase.range_config(BASE, 9999, [5000, 5001], "app", two_phase_commit))
    config = load(str(path))
    assert config.general.two_phase_commit is two_phase_commit
    assert config.general.admin_listen == "127.0.0.1:9999"
    assert sorted((d.shard, d.port) for d in config.databases) == [(0, 5000), (1, 5001)]
    (table,) = config.sharded_tables_for("app")
    assert (table.table, table.column, table.method) == ("accounts", "id", "range")
    n = twophase.ROWS_PER_SHARD
    assert twophase.shard_ids() == [(1, n), (n + 1, 2 * n)]
    assert f"random(1, {n})" in twophase.MULTI_SCRIPT and f"random({n + 1}, {2 * n})" in twophase.MULTI_SCRIPT
    assert f"random({n // 2 + 1}, {n})" in twophase.SINGLE_SCRIPT


def test_results_section_replaces_its_earlier_copy_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Run\n\nbody\n\n{twophase.RESULTS_HEADING}\n\nold numbers\n\n## Sharding (issue 13)\n\nshards\n")
    twophase.append_to_results(f"{twophase.RESULTS_HEADING}\n\nnew numbers\n", path)
    text = path.read_text()
    assert "old numbers" not in text
    assert text.count(twophase.RESULTS_HEADING) == 1
    assert text.index("## Sharding (issue 13)") < text.index(twophase.RESULTS_HEADING)
    assert text.endswith("new numbers\n")
