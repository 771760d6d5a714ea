"""Shared fixtures: a PostgreSQL primary with two streaming replicas, the proxy factory, compiled clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from localpg import Topology
from tests.harness import ProxyFactory, build_pgx_client, create_topology, destroy_topology


@pytest.fixture(scope="session")
def pg() -> Iterator[Topology]:
    """A primary and two streaming replicas with the default users and database `app`."""
    topology = create_topology(replicas=2)
    try:
        yield topology
    finally:
        destroy_topology(topology)


@pytest.fixture
def throwaway_topology() -> Iterator[Topology]:
    """A primary and one streaming replica of the test's own: it may stop, kill and promote them."""
    topology = create_topology(replicas=1)
    try:
        yield topology
    finally:
        destroy_topology(topology)


@pytest.fixture(scope="session")
def proxy_work_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="shardgate-proxy-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def proxy(pg: Topology, proxy_work_root: Path) -> Iterator[ProxyFactory]:
    """Factory: proxy(pool_mode=..., pool_size=..., users=..., databases=..., general=..., jwt=...,
    extra_toml=...) starts Shardgate as a subprocess and returns a ProxyProcess; all stop at teardown."""
    factory = ProxyFactory(pg, proxy_work_root)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def pgx_client() -> Iterator[Path]:
    """Path of the compiled tests/clients/pgx program (built once per session)."""
    out_dir = Path(tempfile.mkdtemp(prefix="shardgate-clients-"))
    try:
        binary = build_pgx_client(out_dir)
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    yield binary
    shutil.rmtree(out_dir, ignore_errors=True)
