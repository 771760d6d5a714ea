"""Admin HTTP listener: Prometheus metrics that move with real traffic, health and readiness."""

from __future__ import annotations

import urllib.error
import urllib.request

import psycopg
import pytest

from tests.harness import database_entries

pytestmark = pytest.mark.skipif(
    __import__("os").environ.get("SHARDGATE_TEST_DIRECT") == "1", reason="checks the proxy's own endpoint"
)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, *, required: bool = True) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found or not required, f"{name} not in /metrics"
    return total


def test_metrics_follow_traffic(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = proxy(databases=database_entries(pg.primary, pg.replicas),
                      general={"read_write_split": "exclude_primary", "healthcheck_interval_ms": 500})
    status, before = _get(shardgate.admin_url + "/metrics")
    assert status == 200
    with psycopg.connect(shardgate.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(20):
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        _, during = _get(shardgate.admin_url + "/metrics")
        assert _metric(during, "shardgate_clients") == 1
    _, after = _get(shardgate.admin_url + "/metrics")
    checkouts = _metric(after, "shardgate_pool_checkouts_total") - _metric(before, "shardgate_pool_checkouts_total", required=False)
    assert checkouts >= 20
    # the same text routed 20 times: analysed once, then served from the cache
    assert _metric(after, "shardgate_router_cache_misses_total") - _metric(before, "shardgate_router_cache_misses_total") <= 2
    assert _metric(after, "shardgate_router_cache_hits_total") - _metric(before, "shardgate_router_cache_hits_total") >= 18
    assert _metric(after, "shardgate_server_up") == 3  # primary + two replicas, all probed healthy


def test_health_ready_and_unknown_paths(pg, proxy) -> None:  # type: ignore[no-untyped-def]
    shardgate = proxy(databases=database_entries(pg.primary))
    assert _get(shardgate.admin_url + "/health") == (200, "ok\n")
    assert _get(shardgate.admin_url + "/ready") == (200, "ready\n")
    assert _get(shardgate.admin_url + "/nope")[0] == 404
