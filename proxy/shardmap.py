"""The sharding config of one logical database, built into the routing layer's ShardRouter."""

from __future__ import annotations

from config.model import Config
from routing.shard import make_sharder
from routing.shard_key import ShardedColumn
from routing.sharding import Placement, ShardRouter


def build_shard_router(config: Config, database: str, shard_count: int) -> ShardRouter | None:
    """None for a database with no [[sharded_tables]] (or a single shard): only hints route it."""
    tables = config.sharded_tables_for(database)
    if not tables or shard_count < 2:
        return None
    columns: list[ShardedColumn] = []
    placements: dict[ShardedColumn, Placement] = {}
    for entry in tables:
        column = ShardedColumn(entry.column, entry.table, data_type=entry.data_type)
        values: dict[int, list[int | str]] = {}
        for listed in entry.values:
            values.setdefault(listed.shard, []).extend(listed.values)
        placements[column] = make_sharder(
            entry.table, entry.column, entry.data_type, entry.method, shard_count,
            ranges=[(r.shard, r.start, r.end) for r in entry.ranges], values=values)
        columns.append(column)
    jwt = config.jwt
    tenant_column = None
    if jwt is not None and getattr(jwt, "shard_by_tenant_claim", False):
        tenant_column = columns[0]
    return ShardRouter(database, shard_count, columns, placements,
                       frozenset(config.omnisharded_tables_for(database)),
                       config.general.allow_cross_shard_writes, tenant_column)
