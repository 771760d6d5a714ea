"""The compatibility runner's reading of `go test -v` and pg_regress output, and its proxy-only failures."""

from __future__ import annotations

from tests.compat.run import REGRESS_LINE, SuiteResult, parse_go_test, regressions, report

GO_OUTPUT = """\
=== RUN   TestConnect
--- PASS: TestConnect (0.01s)
=== RUN   TestBatch
=== PAUSE TestBatch
=== RUN   TestCrateDBConnect
    conn_test.go:12: Skipping due to missing environment variable PGX_TEST_CRATEDB_CONN_STRING
--- SKIP: TestCrateDBConnect (0.00s)
=== CONT  TestBatch
=== RUN   TestBatch/SimpleProto
    --- FAIL: TestBatch/SimpleProto (0.00s)
--- FAIL: TestBatch (0.02s)
=== RUN   TestHangs
panic: test timed out after 5s
"""


def test_go_output_top_level_outcomes_and_unfinished_tests() -> None:
    result = parse_go_test(GO_OUTPUT)
    assert result.passed == {"TestConnect"}
    assert result.skipped == {"TestCrateDBConnect"}
    # A subtest's failure is its parent's; a test that never reported (the timeout's panic) failed.
    assert result.failed == {"TestBatch", "TestHangs"}
    assert result.counts() == "1/2/1"


def test_pg_regress_lines() -> None:
    lines = {
        "test test_setup                   ... ok          245 ms": ("test_setup", "ok"),
        "     boolean                      ... FAILED      682 ms": ("boolean", "FAILED"),
        "     random                       ... failed (ignored)  12 ms": ("random", "failed (ignored)"),
    }
    for line, expected in lines.items():
        match = REGRESS_LINE.match(line)
        assert match is not None and match.groups() == expected, line
    assert REGRESS_LINE.match("parallel group (20 tests):  oid name char") is None


def test_regressions_are_failures_through_the_proxy_that_pass_directly() -> None:
    direct = SuiteResult(passed={"A", "B"}, failed={"C"})
    through = SuiteResult(passed={"A"}, failed={"B", "C"})
    assert regressions(direct, through) == ["B"]
    text = report({"pgx": {"direct": direct, "session": through}}, ["direct", "session"])
    assert "pgx fails in session mode only: B" in text
    assert "2/1/0" in text and "1/2/0" in text
