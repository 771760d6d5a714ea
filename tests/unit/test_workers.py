"""The pure parts of worker processes: pool sizes divided among workers, cancel keys that name their owner,
the config checks of `workers`, and the merge of the workers' metrics into one scrape."""

from __future__ import annotations

import os
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.loader import ConfigError, parse
from config.model import Config, GeneralConfig, UserConfig
from proxy import gather
from proxy.runtime import Runtime
from proxy.worker_role import MAX_PROCESS_ID, WorkerRole, divide


def config(general: dict[str, Any], user: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"general": general, "users": [{"name": "app", "password": "secret", **(user or {})}],
            "databases": [{"name": "app"}]}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


# --- pool division ---------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 64, 101])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_the_parts_add_up_to_the_configured_size_and_differ_by_at_most_one(total: int, count: int) -> None:
    if total < count:
        pytest.skip("the loader refuses a pool smaller than the worker count")
    parts = [divide(total, count, index) for index in range(count)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1
    assert min(parts) >= 1
    assert parts == sorted(parts, reverse=True)  # the remainder goes to the low indexes


def test_ten_among_four_is_three_three_two_two() -> None:
    assert [divide(10, 4, index) for index in range(4)] == [3, 3, 2, 2]


def test_each_workers_runtime_sizes_its_pools_to_its_share() -> None:
    loaded = parse(config({"default_pool_size": 10, "min_pool_size": 3, "workers": 4,
                           "max_server_connects_in_flight": 2}, {"pool_size": 7}))
    user = loaded.users[0]
    settings = [Runtime(loaded, WorkerRole(index, 4)).pool_settings(user) for index in range(4)]
    assert [s.size for s in settings] == [2, 2, 2, 1]
    assert [s.min_size for s in settings] == [1, 1, 1, 0]
    # a connect limit still lets every worker connect (it is at least 1 each)
    assert [s.connects_in_flight for s in settings] == [1, 1, 1, 1]
    single = Runtime(parse(config({"default_pool_size": 10})), WorkerRole()).pool_settings(UserConfig(name="app"))
    assert single.size == 10 and single.connects_in_flight == 0


# --- cancel keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4, 7])
def test_a_cancel_key_names_the_worker_that_made_it(count: int) -> None:
    for index in range(count):
        role = WorkerRole(index, count)
        others = [WorkerRole(other, count) for other in range(count)]
        for _ in range(500):
            process_id, secret = role.new_cancel_key()
            assert 0 < process_id <= MAX_PROCESS_ID
            assert -(1 << 31) <= secret < (1 << 31)
            assert process_id % count == index
            assert all(other.owner_of(process_id) == index for other in others)


def test_cancel_keys_are_not_guessable_from_each_other() -> None:
    role = WorkerRole(1, 2)
    keys = {role.new_cancel_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert len({secret for _, secret in keys}) > 990


def test_a_single_process_owns_every_key() -> None:
    role = WorkerRole()
    assert role.single and role.owner_of(12345) == 0 and role.owner_of(12346) == 0


# --- config ------------------------------------------------------------------------------------------


def test_workers_default_to_one_and_zero_means_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(config({})).general.worker_count == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert parse(config({"workers": 0, "default_pool_size": 12})).general.worker_count == 6
    assert GeneralConfig(workers=3).worker_count == 3


def test_a_pool_smaller_than_the_worker_count_is_refused_with_its_key_path() -> None:
    problems = problems_of(config({"workers": 4, "default_pool_size": 3}))
    assert len(problems) == 1
    assert problems[0].startswith("general.default_pool_size: 3 is smaller than general.workers 4")
    problems = problems_of(config({"workers": 4, "default_pool_size": 8}, {"pool_size": 2}))
    assert len(problems) == 1 and problems[0].startswith("users[0].pool_size: 2 is smaller than general.workers 4")


def test_workers_zero_names_the_core_count_in_its_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    problems = problems_of(config({"workers": 0, "default_pool_size": 4}))
    assert problems == [problems[0]] and "general.workers 0 (8 cores here)" in problems[0]


def test_negative_workers_are_refused() -> None:
    problems = problems_of(config({"workers": -1}))
    assert len(problems) == 1 and problems[0].startswith("general.workers:")


def test_pid_file_is_read() -> None:
    loaded: Config = parse(config({"pid_file": "/run/shardgate.pid"}))
    assert loaded.general.pid_file == "/run/shardgate.pid"


# --- one scrape for the instance ---------------------------------------------------------------------

WORKER_0 = """# HELP shardgate_clients Client connections open
# TYPE shardgate_clients gauge
shardgate_clients 3.0
# HELP shardgate_pool_checkouts_total Server checkouts
# TYPE shardgate_pool_checkouts_total counter
shardgate_pool_checkouts_total{pool="app@app/127.0.0.1:5432"} 10.0
# HELP shardgate_pool_checkouts_created Server checkouts
# TYPE shardgate_pool_checkouts_created gauge
shardgate_pool_checkouts_created{pool="app@app/127.0.0.1:5432"} 1.7e9
# HELP shardgate_server_up 1 when the server passed its last probe and is not banned
# TYPE shardgate_server_up gauge
shardgate_server_up{database="app",role="primary",server="127.0.0.1:5432",shard="0"} 1.0
# HELP shardgate_2pc_commit_seconds Commit latency
# TYPE shardgate_2pc_commit_seconds histogram
shardgate_2pc_commit_seconds_bucket{le="0.01"} 1.0
shardgate_2pc_commit_seconds_bucket{le="+Inf"} 2.0
shardgate_2pc_commit_seconds_count 2.0
shardgate_2pc_commit_seconds_sum 0.5
"""

WORKER_1 = """# HELP shardgate_clients Client connections open
# TYPE shardgate_clients gauge
shardgate_clients 4.0
# HELP shardgate_pool_checkouts_total Server checkouts
# TYPE shardgate_pool_checkouts_total counter
shardgate_pool_checkouts_total{pool="app@app/127.0.0.1:5432"} 5.0
shardgate_pool_checkouts_total{pool="other@app/127.0.0.1:5432"} 2.0
# HELP shardgate_server_up 1 when the server passed its last probe and is not banned
# TYPE shardgate_server_up gauge
shardgate_server_up{database="app",role="primary",server="127.0.0.1:5432",shard="0"} 0.0
# HELP shardgate_2pc_commit_seconds Commit latency
# TYPE shardgate_2pc_commit_seconds histogram
shardgate_2pc_commit_seconds_bucket{le="0.01"} 0.0
shardgate_2pc_commit_seconds_bucket{le="+Inf"} 1.0
shardgate_2pc_commit_seconds_count 1.0
shardgate_2pc_commit_seconds_sum 0.25
"""


def scraped(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


def test_counts_add_up_and_a_server_is_up_only_if_every_worker_sees_it_up() -> None:
    merged = scraped(gather.render(gather.merge_metrics([WORKER_0, WORKER_1])))
    assert merged[("shardgate_clients", ())] == 7.0
    assert merged[("shardgate_pool_checkouts_total", (("pool", "app@app/127.0.0.1:5432"),))] == 15.0
    assert merged[("shardgate_pool_checkouts_total", (("pool", "other@app/127.0.0.1:5432"),))] == 2.0
    up_key = ("shardgate_server_up", (("database", "app"), ("role", "primary"), ("server", "127.0.0.1:5432"),
                                      ("shard", "0")))
    assert merged[up_key] == 0.0
    assert merged[("shardgate_2pc_commit_seconds_bucket", (("le", "0.01"),))] == 1.0
    assert merged[("shardgate_2pc_commit_seconds_bucket", (("le", "+Inf"),))] == 3.0
    assert merged[("shardgate_2pc_commit_seconds_count", ())] == 3.0
    assert merged[("shardgate_2pc_commit_seconds_sum", ())] == 0.75
    assert not any(name.endswith("_created") for name, _ in merged)


def test_one_workers_clients_are_read_from_its_text() -> None:
    assert gather.sample_value(WORKER_1, "shardgate_clients") == 4.0
    assert gather.sample_value(WORKER_1, "shardgate_missing") is None


def test_view_rows_get_the_worker_that_holds_them() -> None:
    rows = gather.tag_rows({1: [{"id": 7}], 0: [{"id": 3}, {"id": 4}]})
    assert rows == [{"worker": 0, "id": 3}, {"worker": 0, "id": 4}, {"worker": 1, "id": 7}]
    assert list(rows[0]) == ["worker", "id"]


def test_shard_statement_counts_are_summed_over_workers() -> None:
    report = {"databases": {"app": {"shards": [], "statements": {"single": 2, "all": 1}}}}
    other = {"databases": {"app": {"shards": [], "statements": {"single": 5}}}}
    assert gather.sum_statements([report, other])["databases"]["app"]["statements"] == {"single": 7, "all": 1}
