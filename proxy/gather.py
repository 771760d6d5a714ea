"""The instance seen whole: the workers' Prometheus texts merged into one, their admin-view rows tagged with the
worker that holds them. Plain functions over what the control sockets answered (proxy/supervisor.py asks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges every worker measures of the same thing (each probes the servers itself): summing them would be
# wrong, so the instance shows the worst worker's value. Everything else is a count and adds up.
COMBINE: dict[str, Callable[[float, float], float]] = {
    "shardgate_server_up": min,
    "shardgate_server_lag_bytes": max,
    "shardgate_server_lag_seconds": max,
    "shardgate_2pc_in_doubt": max,
    "shardgate_listen_connection_up": min,  # each worker holds its own LISTEN connection
    "shardgate_autodb_databases": max,  # each worker opens the wildcard's databases it is asked for
}


def merge_metrics(texts: Sequence[str]) -> list[Metric]:
    """One family per name over every worker's text: samples with the same name and labels combined (summed,
    or as COMBINE says). Counters' `_created` samples are dropped: a sum of start times means nothing."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = COMBINE.get(family.name, _add)
            samples = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = samples.get(key)
                samples[key] = sample.value if seen is None else combine(seen, sample.value)
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def sample_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in one worker's text (its `shardgate_clients`, say)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def render(metrics: Iterable[Metric]) -> bytes:
    """Prometheus text format of already-built families (the same writer the workers use)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(metrics)))  # type: ignore[arg-type]
    return generate_latest(registry)


def tag_rows(answers: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Every worker's rows of one admin view, in worker order, each with a leading `worker` column."""
    rows: list[dict[str, Any]] = []
    for index in sorted(answers):
        rows.extend({"worker": index, **row} for row in answers[index])
    return rows


def sum_statements(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """/api/shards over workers: the first worker's layout (it is the config's), statement counts summed."""
    if not reports:
        return {"databases": {}}
    first: dict[str, Any] = {"databases": {name: dict(entry) for name, entry in reports[0]["databases"].items()}}
    for name, entry in first["databases"].items():
        totals: dict[str, int] = {}
        for report in reports:
            for kind, count in report["databases"].get(name, {}).get("statements", {}).items():
                totals[kind] = totals.get(kind, 0) + int(count)
        entry["statements"] = totals
    return first


def _add(left: float, right: float) -> float:
    return left + right


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
