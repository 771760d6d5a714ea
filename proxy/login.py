"""What a login decides for a session: its pool mode, what the relay looks at, routing, shards, first pool."""

from __future__ import annotations

from dataclasses import dataclass

from config.model import UserConfig
from proxy.cluster import Cluster
from proxy.errors import ProxyError
from proxy.guard import Guard
from proxy.pool import Pool
from proxy.protocol import codec, sqlstate
from proxy.relay import KINDS_POOLED, KINDS_SESSION, KINDS_SESSION_JWT, MODES, SESSION, STATEMENT, TRANSACTION
from proxy.runtime import Runtime
from proxy.scatter import Scatter
from proxy.splitter import ReadWriteSplit


@dataclass(slots=True)
class SessionSetup:
    pool_mode: str  # one of relay's SESSION, TRANSACTION, STATEMENT constants (compared by identity)
    guard: Guard
    kinds: list[int | None]  # per message type: what the relay looks at
    cluster: Cluster  # the home shard's servers
    split: ReadWriteSplit | None  # routing, where there is a choice (replicas, or several shards)
    scatter: Scatter | None  # several shards: plans statements for other shards than the home one
    lane_ok: bool  # transaction mode with no routing: the steady-state lane may serve the client


def setup_session(runtime: Runtime, user: UserConfig, database: str, *, jwt: bool,
                  tenant: str | None = None) -> SessionSetup:
    """Raises ProxyError (3D000, fatal) for a database the config does not have (nor its wildcard)."""
    cluster = runtime.open_cluster(database)
    if cluster is None:
        raise ProxyError(sqlstate.INVALID_CATALOG_NAME, f'database "{database}" does not exist', fatal=True)
    pool_mode = MODES[user.pool_mode or runtime.config.general.pool_mode]
    guard = Guard(jwt=jwt, statement_mode=pool_mode is STATEMENT)
    kinds = KINDS_POOLED
    shard_count = len(runtime.shards_of(database))
    if pool_mode is SESSION:
        # with several shards every Query and Parse is looked at (for a shard hint) as for a JWT session
        kinds = KINDS_SESSION_JWT if jwt or shard_count > 1 else KINDS_SESSION
    split = scatter = None
    if pool_mode is not SESSION and (runtime.splits_reads(cluster) or shard_count > 1):
        split = ReadWriteSplit(runtime, cluster, user)
    if shard_count > 1:
        effects = runtime.effects
        scatter = Scatter(runtime.router, database, shard_count, pooled=pool_mode is not SESSION, guard=guard,
                          changes_state=lambda text: bool(effects.effects(text) or effects.parsed_effects(text)),
                          shards=runtime.shard_router(database), tenant=tenant)
    return SessionSetup(pool_mode, guard, kinds, cluster, split, scatter,
                        lane_ok=pool_mode is TRANSACTION and split is None)


def login_pool(runtime: Runtime, user: UserConfig, setup: SessionSetup) -> Pool:
    """The primary's pool; with no primary reachable, a readable server's (reads keep working)."""
    try:
        target = setup.cluster.primary()
    except ProxyError:
        if setup.pool_mode is SESSION:
            raise
        target = setup.cluster.pick_read()
    return runtime.pool_for_server(user, target.config)


def parameter_block(params: dict[str, str]) -> bytes:
    """The ParameterStatus messages a login ends with."""
    return b"".join(codec.parameter_status(name, value) for name, value in params.items())
