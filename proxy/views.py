"""Admin views: one function per view (pools, clients, servers, ...) returning a table of plain rows, shown
by the console over the PostgreSQL protocol (proxy/console.py) and as JSON by the HTTP listener (proxy/admin.py)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from config.model import GeneralConfig
from proxy.cluster import Cluster
from proxy.errors import ProxyError
from proxy.pool import Pool
from proxy.protocol import sqlstate
from proxy.runtime import Runtime, SessionInfo
from proxy.server import ServerConnection
from proxy.twophase import recovery

Value = int | float | str | None

SECRET_KEYS = frozenset(("admin_token",))

def _version() -> str:
    try:
        return importlib.metadata.version("shardgate")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


VERSION = f"Shardgate {_version()}"


@dataclass(frozen=True, slots=True)
class Table:
    """A view: column names (PgBouncer's where the concept is the same) and rows of plain values."""

    columns: tuple[str, ...]
    rows: list[tuple[Value, ...]]

    def records(self) -> list[dict[str, Value]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


# Columns of each view, known before its rows (the console's Describe answers with them).
COLUMNS: dict[str, tuple[str, ...]] = {
    "pools": ("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
              "sv_login", "pool_mode", "host", "port", "shard", "paused", "pool_size"),
    "clients": ("type", "user", "database", "state", "addr", "port", "local_addr", "local_port", "connect_time",
                "tls", "application_name", "prepared_statements", "id", "pool_mode", "server", "server_pid"),
    "servers": ("type", "user", "database", "state", "addr", "port", "local_addr", "local_port", "connect_time",
                "request_time", "close_needed", "link", "remote_pid", "tls", "prepared_statements", "pool", "shard"),
    "stats": ("database", "total_server_assignment_count", "total_wait_time", "servers_created", "servers_failed",
              "statements_single_shard", "statements_multi_shard", "statements_all_shards"),
    "databases": ("name", "host", "port", "database", "shard", "role", "pool_size", "min_pool_size",
                  "server_lifetime", "pool_mode", "current_connections", "current_client_connections", "paused",
                  "disabled"),
    "users": ("name", "auth", "pool_size", "pool_mode", "current_connections", "current_client_connections",
              "admin"),
    "config": ("key", "value", "default"),
    "shards": ("database", "shard", "host", "port", "role", "healthy"),
    "replication": ("database", "shard", "host", "port", "role", "configured_role", "healthy", "banned",
                    "ban_reason", "lag_ms", "lag_bytes"),
    "prepared_transactions": ("database", "shard", "gid", "prepared", "owner", "age_s", "decision"),
    "version": ("version",),
}


def _timestamp(wall_s: float) -> str:
    """PgBouncer's time format: 2025-01-31 12:00:00 UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall_s))


def _wall(monotonic_s: float) -> float:
    return time.time() - (time.monotonic() - monotonic_s)


def _sockname(server: ServerConnection) -> tuple[str, int]:
    transport = server.transport
    name = transport.get_extra_info("sockname") if transport is not None else None
    return (str(name[0]), int(name[1])) if isinstance(name, tuple) else ("", 0)


def _infos(rt: Runtime) -> list[SessionInfo]:
    return sorted((client.info() for client in list(rt.clients)), key=lambda info: info.client_id)


def _pool_keys(rt: Runtime) -> list[tuple[tuple[str, str, int, str, str], Pool]]:
    return sorted(rt.pools.items(), key=lambda item: (item[0][0], item[0][4], item[0][1], item[0][2]))


def _shard_of(rt: Runtime, database: str, host: str, port: int) -> int:
    for entry in rt.config.databases:
        if entry.name == database and entry.host == host and entry.port == port:
            return entry.shard
    return 0


def _pool_mode(rt: Runtime, user_name: str) -> str:
    user = rt.config.user(user_name)
    return (user.pool_mode if user is not None else None) or rt.config.general.pool_mode


def pools(rt: Runtime) -> Table:
    """SHOW POOLS: one row per pool (user, logical database, server)."""
    clients: dict[int, list[int]] = {}  # id(pool) -> [active, waiting]
    for info in _infos(rt):
        if info.pool is not None and info.state in ("active", "waiting"):
            counts = clients.setdefault(id(info.pool), [0, 0])
            counts[info.state == "waiting"] += 1
    rows: list[tuple[Value, ...]] = []
    now = time.monotonic()
    for (database, host, port, _server_db, user), pool in _pool_keys(rt):
        active, waiting = clients.get(id(pool), [0, 0])
        used = sum(1 for server in pool.idle if now - server.last_used > pool.untested_reuse_s)
        tested = sum(1 for server in pool.active if server.state == "testing")
        rows.append((database, user, active, waiting, pool.busy - tested, len(pool.idle) + len(pool.parked) - used,
                     used, tested, pool.connecting, _pool_mode(rt, user), host, port,
                     _shard_of(rt, database, host, port), int(pool.paused), pool.settings.size))
    return Table(COLUMNS["pools"], rows)


def clients(rt: Runtime) -> Table:
    """SHOW CLIENTS: one row per client connection."""
    rows: list[tuple[Value, ...]] = []
    for info in _infos(rt):
        server = info.server
        rows.append(("C", info.user, info.database, info.state, info.addr, info.port, info.local_addr,
                     info.local_port, _timestamp(info.connect_time), "", info.application_name,
                     info.prepared_statements, info.client_id, info.pool_mode,
                     f"{server.address[0]}:{server.address[1]}" if server is not None else "",
                     server.process_id if server is not None else 0))
    return Table(COLUMNS["clients"], rows)


def servers(rt: Runtime) -> Table:
    """SHOW SERVERS: one row per server connection of every pool; `link` is the id of the client using it."""
    linked = {id(info.server): info.client_id for info in _infos(rt) if info.server is not None}
    rows: list[tuple[Value, ...]] = []
    now = time.monotonic()
    for (database, host, port, _server_db, _user), pool in _pool_keys(rt):
        shard = _shard_of(rt, database, host, port)
        members = [(server, "idle") for server in pool.idle] + [(server, "active") for server in pool.active]
        for server, where in members:
            if where == "idle":
                state = "used" if now - server.last_used > pool.untested_reuse_s else "idle"
            elif server.state == "testing":
                state = "tested"
            else:
                state = "idle" if server in pool.parked else "active"
            local_addr, local_port = _sockname(server)
            rows.append(("S", server.user, database, state, host, port, local_addr, local_port,
                         _timestamp(_wall(server.created_at)), _timestamp(_wall(server.last_used)),
                         int(now > server.retire_at), linked.get(id(server), 0), server.process_id, "",
                         len(server.prepared), pool.name, shard))
    return Table(COLUMNS["servers"], rows)


def stats(rt: Runtime) -> Table:
    """SHOW STATS: per logical database, what the pools and the shard router count (nothing per message)."""
    rows: list[tuple[Value, ...]] = []
    for database in sorted({name for name, _shard in rt.clusters}):
        members = rt.pools_of(database)
        decisions = rt.shard_routers.get(database)
        counts = decisions.decisions if decisions is not None else {}
        rows.append((database, sum(pool.checkouts for pool in members),
                     int(sum(pool.wait_time_total_s for pool in members) * 1_000_000),
                     sum(pool.servers_created for pool in members), sum(pool.servers_failed for pool in members),
                     counts.get("single", 0), counts.get("multi", 0), counts.get("all", 0)))
    return Table(COLUMNS["stats"], rows)


def databases(rt: Runtime) -> Table:
    """SHOW DATABASES: one row per configured server of every logical database."""
    general = rt.config.general
    client_counts: dict[str, int] = {}
    for info in _infos(rt):
        client_counts[info.database] = client_counts.get(info.database, 0) + 1
    rows: list[tuple[Value, ...]] = []
    for cluster in _clusters(rt):
        for server in cluster.servers:
            config = server.config
            open_servers = sum(pool.total for key, pool in rt.pools.items()
                               if key[0] == config.name and (key[1], key[2]) == server.address)
            rows.append((config.name, config.host, config.port, config.server_database, config.shard, server.role,
                         general.default_pool_size, general.min_pool_size, general.server_lifetime_s,
                         general.pool_mode, open_servers, client_counts.get(config.name, 0),
                         int(rt.is_paused(config.name)), 0))
    return Table(COLUMNS["databases"], rows)


def users(rt: Runtime) -> Table:
    """SHOW USERS: one row per [[users]] entry (never a password)."""
    general = rt.config.general
    client_counts: dict[str, int] = {}
    for info in _infos(rt):
        client_counts[info.user] = client_counts.get(info.user, 0) + 1
    rows: list[tuple[Value, ...]] = []
    for user in rt.config.users:
        open_servers = sum(pool.total for key, pool in rt.pools.items() if key[4] == user.name)
        rows.append((user.name, user.auth, user.pool_size or general.default_pool_size,
                     user.pool_mode or general.pool_mode, open_servers, client_counts.get(user.name, 0),
                     int(user.name in general.admin_users)))
    return Table(COLUMNS["users"], rows)


def config(rt: Runtime) -> Table:
    """SHOW CONFIG: every [general] key, its value and its default; secrets are masked."""
    general = rt.config.general
    defaults = GeneralConfig()
    rows: list[tuple[Value, ...]] = []
    for field in dataclasses.fields(GeneralConfig):
        value, default = getattr(general, field.name), getattr(defaults, field.name)
        if field.name in SECRET_KEYS:
            value = "********" if value else ""
        rows.append((field.name, _config_text(value), _config_text(default)))
    return Table(COLUMNS["config"], rows)


def _config_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def _clusters(rt: Runtime) -> list[Cluster]:
    return [rt.clusters[key] for key in sorted(rt.clusters)]


def shards(rt: Runtime) -> Table:
    """SHOW SHARDS: every server of every shard with its role and whether it takes routes."""
    rows: list[tuple[Value, ...]] = []
    for cluster in _clusters(rt):
        for row in cluster.stats():
            rows.append((cluster.name, cluster.shard, cast(str, row["host"]), cast(int, row["port"]),
                         cast(str, row["role"]), int(bool(row["healthy"]) and not row["banned"])))
    return Table(COLUMNS["shards"], rows)


def replication(rt: Runtime) -> Table:
    """SHOW REPLICATION: roles, health, bans and replica lag as the last probes saw them."""
    rows: list[tuple[Value, ...]] = []
    now = time.monotonic()
    for cluster in _clusters(rt):
        for server in cluster.servers:
            rows.append((cluster.name, cluster.shard, server.address[0], server.address[1], server.role,
                         server.configured_role, int(server.healthy), int(server.banned(now)),
                         server.ban_reason if server.banned(now) else "", round(server.lag_ms, 3), server.lag_bytes))
    return Table(COLUMNS["replication"], rows)


def version(rt: Runtime) -> Table:
    del rt
    return Table(COLUMNS["version"], [(VERSION,)])


VIEWS: dict[str, Callable[[Runtime], Table]] = {
    "pools": pools, "clients": clients, "servers": servers, "stats": stats, "databases": databases,
    "users": users, "config": config, "shards": shards, "replication": replication, "version": version,
}


async def prepared_transactions(rt: Runtime) -> Table:
    """SHOW PREPARED_TRANSACTIONS: what pg_prepared_xacts holds on each shard primary for global ids starting
    with shardgate_, asked live, with the decision the two-phase commit log holds for each."""
    try:
        parts = await recovery.list_in_doubt(rt.twophase)
    except (OSError, TimeoutError, LookupError) as exc:
        raise ProxyError(sqlstate.CONNECTION_FAILURE, f"pg_prepared_xacts could not be read: {exc}") from exc
    return Table(COLUMNS["prepared_transactions"], [tuple(part) for part in parts])
