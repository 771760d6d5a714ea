"""Recovery of prepared transactions: at start and every `recovery_interval_s`, each shard's
`pg_prepared_xacts` is compared with the decision log. A logged commit is finished; a transaction with no
decision whose instance is dead (its heartbeat older than `lease_s`) and that is older than
`prepared_timeout_s` gets an abort logged first, then is rolled back. Finished decisions are pruned."""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from config.model import DatabaseConfig
from proxy.errors import ProxyError, ServerError
from proxy.pool import Pool
from proxy.twophase import decisions
from proxy.twophase.coordinator import TwoPhase
from proxy.twophase.gid import Gid, parse

log = logging.getLogger("shardgate.twophase")

_ALREADY_GONE = ("42704", "55006")  # no such prepared transaction; another backend is finishing it


class InDoubt(NamedTuple):
    """A prepared part found on a shard, and what the log says of its transaction."""

    database: str
    shard: int
    gid: str
    prepared: str
    owner: str
    age_s: float
    decision: str | None  # "commit", "abort", or None (no decision logged)


def sharded_databases(tp: TwoPhase) -> list[str]:
    config = tp.topology.config
    return sorted({entry.name for entry in config.databases if config.shard_count(entry.name) > 1})


def _primary(tp: TwoPhase, database: str, shard: int) -> DatabaseConfig | None:
    cluster = tp.topology.cluster_for(database, shard)
    if cluster is None:
        return None
    try:
        return cluster.primary().config
    except ProxyError:
        return None


def _pool_for(tp: TwoPhase, server: DatabaseConfig, owner: str | None = None) -> Pool:
    """The proxy's own connections to `server`, as the login that owns a prepared transaction when a
    configured user logs in as it (only that login, or a superuser, may finish it), else the log user."""
    user = tp.log_user()
    if owner is not None and user.backend_user != owner:
        for candidate in tp.topology.config.users:
            if candidate.backend_user == owner:
                user = candidate
                break
    return tp.control_pool((server.host, server.port), server.server_database, user.backend_user,
                           user.backend_password)


async def _scan(tp: TwoPhase, server: DatabaseConfig) -> list[decisions.Prepared]:
    pool = _pool_for(tp, server)
    connection = await pool.checkout()
    try:
        return await decisions.prepared(connection, tp.timeout_s)
    finally:
        pool.checkin(connection)


async def finish(tp: TwoPhase, server: DatabaseConfig, gid: str, owner: str, outcome: str) -> bool:
    """COMMIT PREPARED or ROLLBACK PREPARED one part; False when it was already finished by someone else."""
    pool = _pool_for(tp, server, owner)
    connection = await pool.checkout()
    verb = "COMMIT PREPARED" if outcome == decisions.COMMIT else "ROLLBACK PREPARED"
    try:
        await connection.fetch_rows(f"{verb} {decisions.literal(gid)}", tp.timeout_s)
    except ServerError as exc:
        if exc.sqlstate in _ALREADY_GONE:
            return False
        raise
    finally:
        pool.checkin(connection)
    return True


async def recover_database(tp: TwoPhase, database: str) -> int:
    """One recovery pass over `database`'s shards; how many prepared parts are still in doubt."""
    settings = tp.topology.config.two_phase_commit
    timeout_s = tp.timeout_s
    pool = await tp.on_log(database)
    connection = await pool.checkout()
    try:
        # read before the shards are scanned: a decision logged later has parts the scan may not see
        logged = await decisions.decisions(connection, database, timeout_s)
        live = await decisions.live_instances(connection, settings.lease_s, timeout_s)
    finally:
        pool.checkin(connection)
    scanned: set[int] = set()
    found: dict[str, list[tuple[int, DatabaseConfig, decisions.Prepared, Gid]]] = {}
    for cluster in tp.topology.shards_of(database):
        server = _primary(tp, database, cluster.shard)
        if server is None:
            continue
        try:
            rows = await _scan(tp, server)
        except (ProxyError, TimeoutError, OSError) as exc:
            log.warning("event=2pc_recovery_shard_unreachable database=%s shard=%d error=%r", database,
                        cluster.shard, str(exc))
            continue
        scanned.add(cluster.shard)
        for row in rows:
            gid = parse(row.gid)
            if gid is not None:
                found.setdefault(gid.decision_key, []).append((cluster.shard, server, row, gid))
    in_doubt = 0
    for key, parts in found.items():
        decision = logged.get(key)
        first = parts[0][3]
        if first.instance == tp.instance and first.txid in tp.in_flight:
            continue  # this instance is committing it right now
        outcome = decision.outcome if decision is not None else None
        if outcome is None:
            oldest = max(part[2].age_s for part in parts)
            mine = first.instance == tp.instance
            if oldest < settings.prepared_timeout_s or (first.instance in live and not mine):
                in_doubt += len(parts)
                continue  # its instance may still be in its prepare round
            shards = tuple(sorted(part[0] for part in parts))
            try:
                outcome = await _decide_as(tp, database, first, shards, decisions.ABORT)
            except (ProxyError, TimeoutError, LookupError) as exc:
                log.warning("event=2pc_recovery_log_failed txid=%s error=%r", key, str(exc))
                in_doubt += len(parts)
                continue
        for shard, server, row, _ in parts:
            try:
                finished = await finish(tp, server, row.gid, row.owner, outcome)
            except (ProxyError, TimeoutError, OSError) as exc:
                log.warning("event=2pc_recovery_finish_failed gid=%s error=%r", row.gid, str(exc))
                in_doubt += 1
                continue
            if finished:
                tp.counts["recovered_committed" if outcome == decisions.COMMIT else "recovered_rolled_back"] += 1
                log.info("event=2pc_recovered gid=%s database=%s shard=%d outcome=%s", row.gid, database, shard,
                         outcome)
    # a decision none of whose parts is prepared any more (and whose shards were all scanned) is done
    done = [key for key, decision in logged.items()
            if key not in found and all(shard in scanned for shard in decision.shards)]
    if done:
        await _forget(tp, database, done)
    return in_doubt


async def _forget(tp: TwoPhase, database: str, keys: list[str]) -> None:
    pool = await tp.on_log(database)
    connection = await pool.checkout()
    try:
        await decisions.forget(connection, keys, tp.timeout_s)
    finally:
        pool.checkin(connection)


async def heartbeat(tp: TwoPhase) -> None:
    """This instance is alive: its heartbeat in every decision log it may write to."""
    seen: set[tuple[str, int, str]] = set()
    for database in sharded_databases(tp):
        pool = await tp.on_log(database)
        key = (pool.address[0], pool.address[1], pool.database)
        if key in seen:
            continue
        seen.add(key)
        connection = await pool.checkout()
        try:
            await decisions.heartbeat(connection, tp.instance, tp.timeout_s)
            await decisions.forget_dead_instances(connection, max(3600.0, 10 * tp.topology.config.two_phase_commit.lease_s),
                                                  tp.timeout_s)
        finally:
            pool.checkin(connection)


async def check_shards(tp: TwoPhase) -> list[str]:
    """Shards that cannot take part in 2PC (max_prepared_transactions = 0), found at start and logged."""
    problems = []
    for database in sharded_databases(tp):
        for cluster in tp.topology.shards_of(database):
            server = _primary(tp, database, cluster.shard)
            if server is None:
                continue
            pool = _pool_for(tp, server)
            try:
                connection = await pool.checkout()
            except ProxyError:
                continue  # down: checked again at the first commit
            try:
                rows = await connection.fetch_rows("SHOW max_prepared_transactions", tp.timeout_s)
            except (ProxyError, TimeoutError):
                continue
            finally:
                pool.checkin(connection)
            if rows and rows[0][0] == "0":
                tp.no_prepared_transactions.add((database, cluster.shard))
                problem = (f"shard {cluster.shard} of database \"{database}\" ({server.host}:{server.port}) has "
                           "max_prepared_transactions = 0: transactions that write on several shards will be "
                           "refused until it is raised (or set general.two_phase_commit = false)")
                problems.append(problem)
                log.error("event=2pc_unavailable database=%s shard=%d server=%s:%d", database, cluster.shard,
                          server.host, server.port)
            else:
                tp.no_prepared_transactions.discard((database, cluster.shard))
    return problems


async def recover_all(tp: TwoPhase) -> None:
    """One pass: heartbeat, every sharded database's shards, then the finished decisions forgotten."""
    await heartbeat(tp)
    in_doubt = 0
    for database in sharded_databases(tp):
        try:
            in_doubt += await recover_database(tp, database)
        except (ProxyError, TimeoutError, OSError, LookupError) as exc:
            log.warning("event=2pc_recovery_failed database=%s error=%r", database, str(exc))
    tp.in_doubt = in_doubt
    finished, tp.finished = tp.finished, []
    by_database: dict[str, list[str]] = {}
    for database, key in finished:
        by_database.setdefault(database, []).append(key)
    for database, keys in by_database.items():
        try:
            await _forget(tp, database, keys)
        except (ProxyError, TimeoutError, OSError) as exc:
            log.warning("event=2pc_prune_failed database=%s error=%r", database, str(exc))  # the next pass prunes them


async def run(tp: TwoPhase) -> None:
    """The recovery task: a first pass at start, then heartbeats every third of the lease and a pass every
    `recovery_interval_s`."""
    if not sharded_databases(tp):
        return
    await check_shards(tp)
    loop = asyncio.get_running_loop()
    next_pass = 0.0
    while True:
        settings = tp.topology.config.two_phase_commit
        try:
            if not tp.enabled:
                pass  # off: no log is written (turn it off only when `shardgate 2pc list` shows nothing)
            elif loop.time() >= next_pass:
                await recover_all(tp)
                next_pass = loop.time() + settings.recovery_interval_s
            else:
                await heartbeat(tp)
        except (ProxyError, TimeoutError, OSError, LookupError) as exc:
            log.warning("event=2pc_recovery_failed error=%r", str(exc))
        for pool in list(tp.control.values()):
            pool.maintain()
        await asyncio.sleep(min(settings.recovery_interval_s, settings.lease_s / 3))


async def list_in_doubt(tp: TwoPhase) -> list[InDoubt]:
    """Every prepared part whose gid starts like Shardgate's, on every shard of every database, with what
    the log says of its transaction (the admin views and the CLI). Raises when a shard cannot be read."""
    out: list[InDoubt] = []
    sharded = set(sharded_databases(tp))
    names = sorted({entry.name for entry in tp.topology.config.databases})
    for database in names:
        logged: dict[str, decisions.Decision] = {}
        if database in sharded and tp.enabled:
            pool = await tp.on_log(database)
            connection = await pool.checkout()
            try:
                logged = await decisions.decisions(connection, database, tp.timeout_s)
            finally:
                pool.checkin(connection)
        for cluster in tp.topology.shards_of(database):
            server = _primary(tp, database, cluster.shard)
            if server is None:
                raise LookupError(f"database {database} shard {cluster.shard} has no primary to read")
            for row in await _scan(tp, server):
                gid = parse(row.gid)
                decision = logged.get(gid.decision_key) if gid is not None else None
                out.append(InDoubt(database, cluster.shard, row.gid, row.prepared, row.owner, round(row.age_s, 3),
                                   decision.outcome if decision is not None else None))
    return out


async def resolve(tp: TwoPhase, gid_text: str, outcome: str) -> str:
    """Commit or roll back one transaction by hand, by the gid of any of its parts: the outcome is logged
    first (refused when the log already holds the other one), then every part found is finished."""
    gid = parse(gid_text)
    if gid is None:
        raise LookupError(f"{gid_text!r} is not a Shardgate global transaction id")
    parts = [part for part in await list_in_doubt(tp) if (parsed := parse(part.gid)) is not None
             and parsed.decision_key == gid.decision_key]
    if not parts:
        raise LookupError(f"no shard holds a prepared transaction {gid_text!r}")
    database = parts[0].database
    logged = await _decide_as(tp, database, gid, tuple(sorted(p.shard for p in parts)), outcome)
    if logged != outcome:
        raise LookupError(f"the decision log already says {logged} for this transaction: run 2pc {logged} instead")
    for part in parts:
        server = _primary(tp, database, part.shard)
        if server is not None:
            await finish(tp, server, part.gid, part.owner, outcome)
    return f"{outcome} {len(parts)} prepared part(s) of transaction {gid.decision_key}"


async def _decide_as(tp: TwoPhase, database: str, gid: Gid, shards: tuple[int, ...], outcome: str) -> str:
    """Log `outcome` for `gid`'s transaction unless a decision got there first; the outcome logged."""
    pool = await tp.on_log(database)
    connection = await pool.checkout()
    try:
        return await decisions.record(connection, gid.decision_key, gid.instance, database, outcome, shards,
                                      tp.timeout_s)
    finally:
        pool.checkin(connection)
