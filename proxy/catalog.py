"""What the proxy reads of each sharded database's catalog: its user-defined aggregates, which a merge across
shards must not take for plain functions. Read at start, then kept fresh by a maintenance task."""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import ProxyError
from proxy.runtime import Runtime

log = logging.getLogger("shardgate.catalog")

REFRESH_S = 60.0
RETRY_S = 2.0
_USER_AGGREGATES_SQL = (
    "SELECT DISTINCT lower(p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE p.prokind = 'a' AND n.nspname NOT IN ('pg_catalog', 'information_schema')")


async def read_user_aggregates(rt: Runtime, database: str) -> bool:
    """Read `database`'s user-defined aggregates from its shard 0 primary into its shard router; False when
    the server could not be asked (the router keeps what it knew)."""
    router = rt.shard_router(database)
    cluster = rt.cluster_for(database, 0)
    if router is None or cluster is None or not rt.config.users:
        return True
    try:
        pool = rt.pool_for_server(rt.config.users[0], cluster.primary().config)
        server = await pool.checkout()
    except ProxyError as exc:
        log.info("event=catalog_unavailable database=%s error=%r", database, exc.message)
        return False
    try:
        rows = await server.fetch_rows(_USER_AGGREGATES_SQL, rt.config.general.server_connect_timeout_ms / 1000)
    except (ProxyError, TimeoutError) as exc:
        log.info("event=catalog_unavailable database=%s error=%r", database, str(exc))
        return False
    finally:
        pool.checkin(server)
    router.set_user_aggregates(frozenset(row[0] for row in rows if row[0]))
    return True


def _sharded(rt: Runtime) -> list[str]:
    return sorted({entry.name for entry in rt.config.databases if rt.config.shard_count(entry.name) > 1})


async def read_all(rt: Runtime) -> None:
    await asyncio.gather(*(read_user_aggregates(rt, name) for name in _sharded(rt)), return_exceptions=True)


async def keep_known(rt: Runtime) -> None:
    """Maintenance: retry a database not read yet every RETRY_S, refresh every one every REFRESH_S (an
    aggregate created meanwhile is refused across shards only from the next refresh on: see README)."""
    loop = asyncio.get_running_loop()
    refreshed: dict[str, float] = {}
    while True:
        await asyncio.sleep(RETRY_S)
        now = loop.time()
        for name in _sharded(rt):
            router = rt.shard_router(name)
            if router is None:
                continue
            due = router.user_aggregates is None or now - refreshed.get(name, 0.0) >= REFRESH_S
            if due and await read_user_aggregates(rt, name):
                refreshed[name] = now
