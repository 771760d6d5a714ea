"""A client streaming to a slow server feels the server's back-pressure through the proxy as it would
directly: asyncpg's executemany whose second row violates a unique key stops early, after about as many
rows as it sends when connected to PostgreSQL itself, because the proxy reads from the client only as fast
as the server takes the bytes (small socket buffers toward the server, the client's reading paused while
the server's write buffer is full) and forwards the server's error while the client is still sending.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from localpg import Topology
from tests.harness import DirectProxy, ProxyFactory, database_entries, make_dsn

pytestmark = pytest.mark.timeout(240)

ROW_BYTES = 32 * 1024
# asyncpg's own test (test_executemany_server_failure_during_writes) sends 128 rows of 32 KB and only
# asserts it stopped before the last. Kernel socket buffers on loopback hold about 4 MB (128 rows) on
# their own, so this sends more and holds the server on its first row, long enough for every buffer
# between the client and the server to fill: what the client managed to send by then is what the path
# buffers.
ROWS = 640
SLOW_FIRST_ROW_S = 0.5
TRIALS = 3
# Through the proxy the client may send this many more rows than directly: the proxy's own buffers
# (client_to_server_buffer_bytes on each of its two sockets, and the server's write buffer), 1.5 MB.
EXTRA_ROWS_ALLOWED = 48
# The proxy's server connection is parked with its client for up to 1 s, then idle, and closed by the
# janitor (every second) once idle for idle_timeout_s.
SERVER_CLOSED_AFTER_S = 3.0


@pytest.fixture
def table(pg: Topology) -> Iterator[str]:
    assert pg.primary is not None
    name = f"exmany_{uuid.uuid4().hex[:12]}"
    pg.primary.psql(
        f"CREATE TABLE {name} (a text, b int PRIMARY KEY);"
        f"CREATE FUNCTION {name}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.a = 'slow' THEN PERFORM pg_sleep({SLOW_FIRST_ROW_S}); END IF; RETURN NEW; END $$;"
        f"CREATE TRIGGER slow BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {name}_slow()",
        user="app", db="app")
    try:
        yield name
    finally:
        pg.primary.psql(f"DROP TABLE IF EXISTS {name}; DROP FUNCTION IF EXISTS {name}_slow()", user="app",
                        db="app")


async def rows_sent(dsn: str, table: str) -> int:
    """How many rows executemany took from its input before the server's error stopped it (asyncpg
    encodes rows lazily, as it sends them)."""
    conn = await asyncpg.connect(dsn, ssl=False, timeout=10)
    taken = 0

    def rows() -> Iterator[tuple[str, int]]:
        nonlocal taken
        while taken < ROWS:
            taken += 1
            if taken == 1:
                yield "slow", 0
            elif taken == 2:
                yield "a", 0  # the unique key again
            else:
                yield "a" * ROW_BYTES, taken
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await asyncio.wait_for(conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows()), 60)
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0  # the implicit transaction rolled back
    finally:
        await conn.close()
    return taken


def test_executemany_stops_at_the_servers_error_as_early_as_directly(proxy: ProxyFactory, pg: Topology,
                                                                      table: str) -> None:
    assert pg.primary is not None
    # Each trial gets a new server connection, as each direct trial is a new connection: the kernel grows
    # a socket's receive buffer once its reader has been fast (the server skipping the rows after an
    # error), and PostgreSQL's side of a long-lived server connection is not the proxy's to size (see the
    # README, "Memory and back-pressure").
    shardgate = proxy(databases=database_entries(pg.primary), general={"idle_timeout_s": 0.1})
    if isinstance(shardgate, DirectProxy):
        pytest.skip("compares the proxy with a direct connection")
    direct_dsn = make_dsn(pg.primary.host, pg.primary.port)

    async def scenario() -> tuple[list[int], list[int]]:
        direct, proxied = [], []
        for _ in range(TRIALS):  # interleaved: a busy moment of the machine touches both alike
            direct.append(await rows_sent(direct_dsn, table))
            proxied.append(await rows_sent(shardgate.dsn(), table))
            await asyncio.sleep(SERVER_CLOSED_AFTER_S)
        return direct, proxied

    direct, proxied = asyncio.run(scenario())
    print(f"rows sent before the error stopped executemany (of {ROWS}): directly {direct}, through the "
          f"proxy {proxied}")
    assert max(direct) < ROWS, f"directly, executemany did not stop early: {direct}"
    assert max(proxied) < ROWS, f"through the proxy executemany sent every row: {proxied}"
    assert statistics.median(proxied) <= statistics.median(direct) + EXTRA_ROWS_ALLOWED, (
        f"through the proxy the client sent {proxied} rows before it saw the error, directly {direct}: the "
        "proxy buffers what the server has not taken")
