"""The benchmark report's Shardgate/PgBouncer ratio: rounds are paired, failed runs left out."""

from __future__ import annotations

from bench.pgbench import Measurement, Scenario
from bench.report import Results, throughput_table

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
