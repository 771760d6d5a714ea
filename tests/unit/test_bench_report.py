"""The benchmark report's Shardgate/PgBouncer ratio: rounds are paired, failed runs left out."""

from __future__ import annotations

from bench.pgbench import Measurement, Scenario
from bench.report import Results, cpu_section, throughput_table

SCENARIO = Scenario("select-simple", "`-S` simple, 16 clients", 16, ("-S",))


def results_with(shardgate: list[float | None], pgbouncer: list[float | None]) -> Results:
    results = Results(info={}, scenarios=[SCENARIO])
    for target, rounds in (("shardgate", shardgate), ("pgbouncer", pgbouncer)):
        for tps in rounds:
            problems = [] if tps is not None else ["pgbench exited with 2"]
            results.add(Measurement(SCENARIO.key, target, tps=tps, latency_ms=1.0, problems=problems))
    return results


def test_ratio_is_the_median_of_rounds_not_of_separate_medians() -> None:
    # Round by round Shardgate reaches 50%, 90% and 100% of PgBouncer. The medians taken separately
    # (200 and 200) would claim 100%.
    results = results_with([100.0, 270.0, 200.0], [200.0, 300.0, 200.0])
    assert [round(r, 2) for r in results.round_ratios(SCENARIO.key)] == [0.5, 0.9, 1.0]
    assert results.ratio(SCENARIO.key) == 0.9


def test_a_round_where_either_run_failed_is_left_out() -> None:
    results = results_with([100.0, None, 180.0, 150.0], [200.0, 300.0, 200.0, None])
    assert results.round_ratios(SCENARIO.key) == [0.5, 0.9]
    assert results.ratio(SCENARIO.key) == 0.5  # the lower middle of an even count


def test_no_clean_pair_gives_no_ratio() -> None:
    results = results_with([None], [200.0])
    assert results.ratio(SCENARIO.key) is None
    row = throughput_table(results)[2]
    assert "| n/a | n/a |" in row


def test_throughput_row_lists_each_round() -> None:
    row = throughput_table(results_with([100.0, 270.0, 200.0], [200.0, 300.0, 250.0]))[2]
    assert "| 80.0% | 50, 90, 80 |" in row


def test_pooler_cpu_per_transaction_is_the_median_over_rounds() -> None:
    results = Results(info={}, scenarios=[SCENARIO])
    # 40% of a core at 20,000 TPS is 20 µs per transaction; 30% at 30,000 is 10; 50% at 10,000 is 50.
    for cpu_pct, tps in ((40.0, 20_000.0), (30.0, 30_000.0), (50.0, 10_000.0)):
        results.add(Measurement(SCENARIO.key, "shardgate", tps=tps, latency_ms=1.0, pooler_cpu_pct=cpu_pct))
    results.add(Measurement(SCENARIO.key, "shardgate", tps=None, pooler_cpu_pct=90.0, problems=["failed"]))
    assert results.cpu_us_per_transaction(SCENARIO.key, "shardgate") == 20.0
    assert results.cpu_us_per_transaction(SCENARIO.key, "pgbouncer") is None
    row = next(line for line in cpu_section(results) if line.startswith(f"| {SCENARIO.title}"))
    assert "| n/a | 20.0 |" in row
