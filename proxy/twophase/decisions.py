"""The decision log: two tables in the coordinator database, shared by every Shardgate instance. A commit
decision is a row written (with synchronous commit) before any COMMIT PREPARED; recovery writes an abort
row before it rolls back, and the primary key settles a race between the two: whichever row is there first
is the outcome. Instances write heartbeats so recovery can tell a dead instance from a slow one."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from proxy.twophase.gid import LIKE_PATTERN

COMMIT, ABORT = "commit", "abort"

SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS shardgate_2pc_decisions ("
    "txid text PRIMARY KEY, instance text NOT NULL, database text NOT NULL, "
    "outcome text NOT NULL CHECK (outcome IN ('commit', 'abort')), shards int[] NOT NULL, "
    "decided_at timestamptz NOT NULL DEFAULT now()); "
    "CREATE TABLE IF NOT EXISTS shardgate_2pc_instances ("
    "instance text PRIMARY KEY, heartbeat_at timestamptz NOT NULL DEFAULT now(), "
    "started_at timestamptz NOT NULL DEFAULT now())"
)


class Rows(Protocol):
    """A server that runs one simple query and returns its rows as text (ServerConnection.fetch_rows)."""

    async def fetch_rows(self, sql: str, timeout_s: float) -> list[list[str | None]]: ...


class Decision(NamedTuple):
    key: str
    outcome: str
    shards: tuple[int, ...]
    instance: str


class Prepared(NamedTuple):
    """A row of pg_prepared_xacts that Shardgate may own."""

    gid: str
    owner: str
    age_s: float
    prepared: str  # when, as PostgreSQL prints a timestamptz


def literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported PostgreSQL)."""
    return "'" + value.replace("'", "''") + "'"


async def record(server: Rows, key: str, instance: str, database: str, outcome: str,
                 shards: tuple[int, ...], timeout_s: float) -> str:
    """Write `outcome` for transaction `key` unless one is there already; the outcome the log holds now.
    Durable when it returns (synchronous commit, whatever the server's default)."""
    shard_array = "{" + ",".join(str(s) for s in shards) + "}"
    rows = await server.fetch_rows(
        "BEGIN; SET LOCAL synchronous_commit = on; "
        "INSERT INTO shardgate_2pc_decisions (txid, instance, database, outcome, shards) VALUES "
        f"({literal(key)}, {literal(instance)}, {literal(database)}, {literal(outcome)}, {literal(shard_array)}) "
        "ON CONFLICT (txid) DO NOTHING; "
        f"SELECT outcome FROM shardgate_2pc_decisions WHERE txid = {literal(key)}; COMMIT", timeout_s)
    if not rows or rows[0][0] is None:
        raise LookupError(f"the decision log lost transaction {key}")
    return rows[0][0]


async def decisions(server: Rows, database: str | None, timeout_s: float) -> dict[str, Decision]:
    """Every decision logged (for one database, or all)."""
    where = f" WHERE database = {literal(database)}" if database is not None else ""
    rows = await server.fetch_rows(
        f"SELECT txid, outcome, shards::text, instance FROM shardgate_2pc_decisions{where}", timeout_s)
    found: dict[str, Decision] = {}
    for key, outcome, shards, instance in rows:
        if key is None or outcome is None:
            continue
        numbers = tuple(int(s) for s in (shards or "{}").strip("{}").split(",") if s)
        found[key] = Decision(key, outcome, numbers, instance or "")
    return found


async def heartbeat(server: Rows, instance: str, timeout_s: float) -> None:
    await server.fetch_rows(
        "INSERT INTO shardgate_2pc_instances (instance) VALUES "
        f"({literal(instance)}) ON CONFLICT (instance) DO UPDATE SET heartbeat_at = now()", timeout_s)


async def live_instances(server: Rows, lease_s: float, timeout_s: float) -> set[str]:
    rows = await server.fetch_rows(
        "SELECT instance FROM shardgate_2pc_instances "
        f"WHERE heartbeat_at > now() - make_interval(secs => {float(lease_s)!r})", timeout_s)
    return {row[0] for row in rows if row[0] is not None}


async def forget(server: Rows, keys: list[str], timeout_s: float) -> None:
    """Delete finished transactions' decisions (no shard holds their prepared parts any more)."""
    if keys:
        listed = ", ".join(literal(key) for key in keys)
        await server.fetch_rows(f"DELETE FROM shardgate_2pc_decisions WHERE txid IN ({listed})", timeout_s)


async def forget_dead_instances(server: Rows, older_than_s: float, timeout_s: float) -> None:
    await server.fetch_rows(
        "DELETE FROM shardgate_2pc_instances "
        f"WHERE heartbeat_at < now() - make_interval(secs => {float(older_than_s)!r})", timeout_s)


async def prepared(server: Rows, timeout_s: float) -> list[Prepared]:
    """The prepared transactions of this server's database whose gid looks like Shardgate's."""
    rows = await server.fetch_rows(
        "SELECT gid, owner, extract(epoch FROM now() - prepared)::float8, prepared::text FROM pg_prepared_xacts "
        f"WHERE database = current_database() AND gid LIKE {literal(LIKE_PATTERN)} ORDER BY prepared", timeout_s)
    return [Prepared(gid or "", owner or "", float(age or 0), when or "") for gid, owner, age, when in rows]
