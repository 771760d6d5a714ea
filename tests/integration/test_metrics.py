"""The traffic metrics move with real traffic: statements and transactions by route, their duration,
checkout waits, bytes, errors by SQLSTATE class and source, clients by state; and the Grafana dashboard
asks only for metrics the proxy serves."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness import database_entries, direct_mode

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(direct_mode(), reason="checks the proxy's own metrics")]

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "shardgate-dashboard.json"


def _scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics by its name and labels as written."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_statements_transactions_errors_and_bytes_by_route(pg: Any, proxy: Any) -> None:
    shardgate = proxy(databases=database_entries(pg.primary, pg.replicas), pool_mode="transaction",
                      general={"read_write_split": "exclude_primary", "healthcheck_interval_ms": 500})
    # prepare_threshold None: psycopg would otherwise prepare the 6th run in a batch of its own
    with psycopg.connect(shardgate.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS metrics_t (id int)")
        for replica in pg.replicas:  # the replicas replay the table before the reads count
            with psycopg.connect(replica.dsn(password="app"), autocommit=True) as direct:
                deadline = time.monotonic() + 10
                while direct.execute("SELECT to_regclass('metrics_t')").fetchone() == (None,):
                    assert time.monotonic() < deadline, "a replica never replayed CREATE TABLE"
                    time.sleep(0.05)
        before = _scrape(shardgate.admin_url)
        for _ in range(10):
            conn.execute("SELECT count(*) FROM metrics_t").fetchone()
        for value in range(5):
            conn.execute("INSERT INTO metrics_t VALUES (%s)", (value,))
        with conn.transaction():  # one transaction of three statements on the primary
            conn.execute("INSERT INTO metrics_t VALUES (100)")
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        after = _scrape(shardgate.admin_url)
    # the 10 reads, and SELECT 1 / 0: a read too
    assert _delta(before, after, 'shardgate_queries_total{route="replica"}') == 11
    assert _delta(before, after, 'shardgate_transactions_total{route="replica"}') == 11
    # 5 INSERTs, then INSERT + SELECT + COMMIT (the proxy holds the BEGIN back and sends it with the INSERT)
    assert _delta(before, after, 'shardgate_queries_total{route="primary"}') == 5 + 3
    assert _delta(before, after, 'shardgate_transactions_total{route="primary"}') == 5 + 1
    assert _delta(before, after, 'shardgate_errors_total{class="22",source="server"}') == 1
    counted = _delta(before, after, "shardgate_query_duration_seconds_count")
    assert counted == 11 + 8
    assert _delta(before, after, 'shardgate_query_duration_seconds_bucket{le="+Inf"}') == counted
    assert 0 < _delta(before, after, "shardgate_query_duration_seconds_sum") < counted * 5
    # every statement above is at least its Query or Bind; the answers carry at least their CommandComplete
    assert _delta(before, after, 'shardgate_bytes_total{direction="from_clients"}') > 15 * 20
    assert _delta(before, after, 'shardgate_bytes_total{direction="from_servers"}') > 15 * 20


def test_proxy_errors_waits_and_clients_by_state(pg: Any, proxy: Any) -> None:
    shardgate = proxy(databases=database_entries(pg.primary), pool_mode="transaction", pool_size=1,
                      general={"checkout_timeout_ms": 5000})
    before = _scrape(shardgate.admin_url)
    holder = psycopg.connect(shardgate.dsn(), autocommit=True)
    idle = psycopg.connect(shardgate.dsn(), autocommit=True)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server: idle in transaction
        waited: list[float] = []

        def wait_for_the_server() -> None:
            started = time.monotonic()
            with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
                conn.execute("SELECT 2")
            waited.append(time.monotonic() - started)

        waiter = threading.Thread(target=wait_for_the_server)
        waiter.start()
        deadline = time.monotonic() + 10
        states: dict[str, float] = {}
        while time.monotonic() < deadline:
            now = _scrape(shardgate.admin_url)
            states = {key: value for key, value in now.items() if key.startswith("shardgate_clients_by_state")}
            if states.get('shardgate_clients_by_state{state="waiting"}') == 1:
                break
            time.sleep(0.1)
        assert states.get('shardgate_clients_by_state{state="idle_in_transaction"}') == 1, states
        assert states.get('shardgate_clients_by_state{state="waiting"}') == 1, states
        assert states.get('shardgate_clients_by_state{state="idle"}') == 1, states  # `idle`, never used yet
        time.sleep(0.3)
        holder.execute("COMMIT")
        waiter.join(timeout=10)
        assert waited, "the waiting client never got the server"
        after = _scrape(shardgate.admin_url)
        assert _delta(before, after, "shardgate_checkout_wait_seconds_count") >= 1
        assert _delta(before, after, "shardgate_checkout_wait_seconds_sum") >= 0.3
        # an error of the proxy's own: a database it does not serve is refused at login with 3D000
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(shardgate.dsn(dbname="no_such_database"), autocommit=True).close()
        refused = _scrape(shardgate.admin_url)
        assert _delta(after, refused, 'shardgate_errors_total{class="3D",source="proxy"}') == 1
    finally:
        holder.close()
        idle.close()


def test_the_dashboard_asks_only_for_served_metrics(pg: Any, proxy: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {name for expr in expressions for name in re.findall(r"\b(shardgate_[a-z0-9_]+)", expr)}
    assert len(asked) >= 20
    shardgate = proxy(databases=database_entries(pg.primary, pg.replicas), general={"read_write_split": "include_primary"},
                      jwt={"algorithms": ["HS256"], "secret": "metrics-test-secret-0123456789abcdefghijklmnop"})
    with psycopg.connect(shardgate.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):  # errors by class appear once there is one
            conn.execute("SELECT 1 / 0")
    with urllib.request.urlopen(shardgate.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    served = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line and not line.startswith("#")}
    # a family with no sample yet (no auth failure, no sharded database here) is still declared
    suffixes = {"histogram": ("_bucket", "_sum", "_count")}  # a counter is declared with its _total
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        served.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    missing = sorted(name for name in asked if name not in served)
    assert not missing, f"the dashboard asks for metrics /metrics does not serve: {missing}"
