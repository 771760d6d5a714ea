"""Memory is bounded per client when the client is faster than its server: a 50 MB COPY into a table whose
trigger sleeps on every row, and a client pipelining 100,000 Executes that never reads a result. The proxy
stops reading from the client instead of buffering, so its RSS (VmRSS of the proxy process the test
started) grows by less than MAX_RSS_GROWTH_BYTES. The other direction (a client slower than the server)
is tests/integration/test_large_results.py; bench/memory.py measures all three at larger sizes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bench.memory import copy_into_slow_table, pipeline_without_reading, slow_table_sql
from localpg import Topology
from tests.harness import DirectProxy, ProxyFactory, ProxyProcess, database_entries

pytestmark = pytest.mark.timeout(180)

# The README's bound: one read from the client (256 KiB), the write buffers' high-water marks and, while a
# server is checked out, what waits for it (1 MiB), plus a message being framed (these are 16 KiB); the
# rest is allocator noise. Without back-pressure the proxy would hold most of the 50 MB COPY, or the
# results of the pipeline (100 MB).
MAX_RSS_GROWTH_BYTES = 16 * 1024 * 1024
COPY_BYTES = 50 * 1024 * 1024
COPY_ROW_BYTES = 16 * 1024
SLEEP_PER_ROW_S = 0.001  # about 16 MB/s into the table: the client is much faster
COPY_TIMEOUT_S = 90.0
EXECUTES = 100_000
RESULT_ROW_BYTES = 1000
HOLD_S = 4.0


def real_proxy(started: ProxyProcess | DirectProxy) -> ProxyProcess:
    if isinstance(started, DirectProxy) or started.pid is None:
        pytest.skip("measures the proxy process (SHARDGATE_TEST_DIRECT=1 has none)")
    return started


@pytest.fixture
def shardgate(proxy: ProxyFactory, pg: Topology) -> ProxyProcess:
    assert pg.primary is not None
    return real_proxy(proxy(databases=database_entries(pg.primary)))


@pytest.fixture
def slow_table(pg: Topology) -> Iterator[str]:
    assert pg.primary is not None
    table = f"slow_{uuid.uuid4().hex[:12]}"
    pg.primary.psql(slow_table_sql(table, SLEEP_PER_ROW_S), user="app", db="app")
    try:
        yield table
    finally:
        pg.primary.psql(f"DROP TABLE IF EXISTS {table}; DROP FUNCTION IF EXISTS {table}_slow()", user="app",
                        db="app")


def test_copy_into_a_slow_table_keeps_the_proxy_memory_flat(shardgate: ProxyProcess, pg: Topology,
                                                            slow_table: str) -> None:
    assert shardgate.pid is not None and pg.primary is not None
    outcome = copy_into_slow_table(shardgate.host, shardgate.port, shardgate.pid, slow_table, COPY_BYTES,
                                   COPY_ROW_BYTES, COPY_TIMEOUT_S)
    print(f"{outcome.client_bytes / 2**20:.1f} MiB copied in {outcome.seconds:.1f}s ({outcome.detail});"
          f" {outcome.rss.report()}")
    assert outcome.client_bytes >= COPY_BYTES, outcome.detail
    rows = pg.primary.psql(f"SELECT count(*) FROM {slow_table}", user="app", db="app")
    assert outcome.detail == f"COPY {rows}" and int(rows) * (COPY_ROW_BYTES + 6) >= COPY_BYTES, outcome.detail
    assert outcome.rss.growth_bytes < MAX_RSS_GROWTH_BYTES, (
        f"the proxy buffered the COPY instead of holding the client back: {outcome.rss.report()}"
        f"\n{shardgate.stderr_text()[-3000:]}")
    assert shardgate.is_running()


def test_pipelined_executes_never_read_keep_the_proxy_memory_flat(shardgate: ProxyProcess) -> None:
    assert shardgate.pid is not None
    outcome = pipeline_without_reading(shardgate.host, shardgate.port, shardgate.pid, EXECUTES, RESULT_ROW_BYTES,
                                       HOLD_S)
    print(f"{outcome.detail}; {outcome.rss.report()}")
    assert outcome.rss.growth_bytes < MAX_RSS_GROWTH_BYTES, (
        f"the proxy buffered the pipeline or its results: {outcome.rss.report()}\n{shardgate.stderr_text()[-3000:]}")
    # the whole pipeline is 13 MB: once the results back up, the proxy reads no more of it
    assert not outcome.detail.startswith(f"{EXECUTES:,} of"), outcome.detail
    assert shardgate.is_running()
