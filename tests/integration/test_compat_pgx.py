"""pgx v4's own test suites (pgx, pgxpool) through Shardgate in session mode: nothing fails that passes directly."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.run import SUITES, SuiteResult, build_suite, regressions, run_suite, targets

# Whole suites (about 15 s each on an idle machine); go test's own timeout bounds each run.
SUITE_TIMEOUT_S = 150

# A test that asserts a new connection gets a new backend pid cannot pass through any pooler that lends a
# server it already used: pgxpool's AfterRelease test drops every other connection and counts backend pids.
POOLER_DIFFERENCES: dict[str, dict[str, str]] = {
    "pgxpool": {"TestPoolAfterRelease": "counts distinct backend pids of new connections; pooled servers are reused"},
}


@pytest.fixture(scope="module")
def compat_dsns() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL 15 with pgx's fixtures, and a session-mode proxy in front of it."""
    with targets(("direct", "session")) as dsns:
        yield dsns


@pytest.fixture(scope="module")
def suite_binaries() -> dict[str, Path]:
    build_dir = Path(tempfile.gettempdir()) / f"shardgate-compat-bin-{os.getuid()}"
    build_dir.mkdir(exist_ok=True)
    try:
        return {suite: build_suite(package, build_dir) for suite, package in SUITES.items()}
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


def _explain(suite: str, direct: SuiteResult, proxied: SuiteResult, names: list[str]) -> str:
    parts = [f"{suite}: fail through Shardgate (session mode) but pass directly: {', '.join(names)}",
             f"counts passed/failed/skipped: direct {direct.counts()}, session {proxied.counts()}"]  # fmt: skip
    parts += [f"--- {name}\n{proxied.failure_text(name)}" for name in names]
    return "\n".join(parts)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_pgx_suite_session_mode_fails_nothing_that_passes_directly(
    suite: str, compat_dsns: dict[str, str], suite_binaries: dict[str, Path]
) -> None:
    direct = run_suite(suite_binaries[suite], compat_dsns["direct"], timeout_s=SUITE_TIMEOUT_S)
    # The suite must really have run against PostgreSQL: a binary that cannot connect fails everything. A
    # test that fails directly too (a timing-sensitive one, another server version) is not the proxy's.
    assert len(direct.passed) > 40, f"{suite} passed only {direct.counts()} directly:\n{direct.output[-4000:]}"
    proxied = run_suite(suite_binaries[suite], compat_dsns["session"], timeout_s=SUITE_TIMEOUT_S)
    allowed = POOLER_DIFFERENCES.get(suite, {})
    names = [name for name in regressions(direct, proxied) if name not in allowed]
    assert not names, _explain(suite, direct, proxied, names)
    # Every test that ran directly ran through the proxy too (none lost to a crash or a hang).
    assert direct.passed - allowed.keys() <= proxied.passed, _explain(
        suite, direct, proxied, sorted(direct.passed - proxied.passed - allowed.keys())
    )
