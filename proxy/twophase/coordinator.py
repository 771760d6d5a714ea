"""The commit of a transaction that holds servers on several shards: readers committed, writers prepared,
the decision logged, then COMMIT PREPARED everywhere (or a plain COMMIT when at most one shard wrote)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Sequence
from typing import NamedTuple, Protocol, TypeVar

from auth.scram import ScramKeys
from config.model import Config, DatabaseConfig, UserConfig
from proxy.cluster import Cluster
from proxy.errors import ProxyError, ServerError
from proxy.pool import Pool, PoolSettings
from proxy.protocol import codec, sqlstate
from proxy.server import ServerConnection
from proxy.tls import TlsContexts
from proxy.twophase import decisions
from proxy.twophase.gid import Gid, decision_key, new_instance_id

log = logging.getLogger("shardgate.twophase")

T = TypeVar("T")
CONTROL_POOL_SIZE = 4
# upper bounds of the 2PC commit latency histogram, in seconds
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_WRITES_SQL = ("SELECT pg_current_xact_id_if_assigned() IS NOT NULL, "
               "current_setting('max_prepared_transactions')::int")


def _failpoints() -> dict[str, str]:
    """Fault-test hooks from SHARDGATE_FAILPOINT ("after_prepare:kill,after_decision:sleep=2"): at that step
    of the commit round the process SIGKILLs itself, or sleeps. Empty in production."""
    points: dict[str, str] = {}
    for item in os.environ.get("SHARDGATE_FAILPOINT", "").split(","):
        point, _, action = item.strip().partition(":")
        if point:
            points[point] = action or "kill"
    return points


_FAILPOINTS = _failpoints()


async def _failpoint(point: str) -> None:
    action = _FAILPOINTS.get(point)
    if action is None:
        return
    if action.startswith("sleep="):
        await asyncio.sleep(float(action[6:]))
        return
    log.warning("event=failpoint point=%s action=kill", point)
    os.kill(os.getpid(), signal.SIGKILL)


class Topology(Protocol):
    """What the coordinator needs of the runtime: the config and the clusters of each shard."""

    config: Config
    tls: TlsContexts

    def cluster_for(self, database: str, shard: int = 0) -> Cluster | None: ...

    def shards_of(self, database: str) -> list[Cluster]: ...


class Participant(NamedTuple):
    shard: int
    server: ServerConnection


class CommitResult(NamedTuple):
    """What the client's COMMIT gets: a command tag, or an ErrorResponse (the transaction is over either way)."""

    tag: str | None
    error: bytes | None = None


def _error(code: str, message: str) -> CommitResult:
    return CommitResult(None, codec.error_response(code, message))


class _Unknown(Exception):
    """A server vanished (or did not answer in time) while it ran a commit step: its outcome is unknown."""


async def _step(server: ServerConnection, sql: str, timeout_s: float) -> bytes | None:
    """Run one commit step on a participant's own server: its ErrorResponse, None when it worked. Raises
    _Unknown when the server was lost or too slow (then it is closed)."""
    try:
        return await server.execute_internal(sql, timeout_s)
    except (ProxyError, TimeoutError, OSError) as exc:
        server.broken = True
        server.close()
        raise _Unknown(str(exc) or "timeout") from exc


async def _gather(steps: Sequence[Awaitable[T]]) -> list[T | BaseException]:
    return list(await asyncio.gather(*steps, return_exceptions=True))


class TwoPhase:
    """Two-phase commit for one proxy instance: the commit round of each session's multi-shard
    transaction, the control connections it uses (COMMIT PREPARED runs as the login that prepared),
    the counters, and what recovery must leave alone (`in_flight`)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.instance = new_instance_id()
        self.next_txid = 0
        self.in_flight: set[int] = set()  # txids in their prepare or commit round on this instance
        self.finished: list[tuple[str, str]] = []  # (log database, decision key) fully committed: to forget
        self.control: dict[tuple[str, int, str, str], Pool] = {}
        self.no_prepared_transactions: set[tuple[str, int]] = set()  # (database, shard) with the setting 0
        self.schema_ready: set[tuple[str, int, str]] = set()
        self.counts = {"prepared": 0, "committed": 0, "rolled_back": 0, "recovered_committed": 0,
                       "recovered_rolled_back": 0, "one_phase": 0}
        self.in_doubt = 0  # prepared parts recovery found and could not finish yet (last scan)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.latency_total = 0

    @property
    def enabled(self) -> bool:
        return self.topology.config.general.two_phase_commit

    # ------------------------------------------------------------ connections

    def control_pool(self, address: tuple[str, int], database: str, user: str, password: str | ScramKeys) -> Pool:
        """A small pool of the proxy's own connections to one server, logged in as `user` (never lent to
        clients, so no client's session state is on them)."""
        key = (address[0], address[1], database, user)
        pool = self.control.get(key)
        if pool is None or pool.closed:
            general = self.topology.config.general
            timeout_s = self.topology.config.two_phase_commit.commit_timeout_s
            pool = Pool(f"2pc:{user}@{address[0]}:{address[1]}/{database}", address, database, user, password,
                        PoolSettings(size=CONTROL_POOL_SIZE, min_size=0, checkout_timeout_ms=int(timeout_s * 1000),
                                     idle_timeout_s=60.0, server_lifetime_s=general.server_lifetime_s,
                                     healthcheck_idle_ms=general.healthcheck_idle_ms,
                                     connect_timeout_ms=general.server_connect_timeout_ms, reset_query=""),
                        tls=self.topology.tls)
            self.control[key] = pool
        return pool

    def log_user(self) -> UserConfig:
        config = self.topology.config
        named = config.two_phase_commit.log_user
        user = config.user(named) if named else None
        return user if user is not None else config.users[0]

    def log_server(self, database: str) -> DatabaseConfig:
        """The primary holding the decision log for `database`'s transactions."""
        name = self.topology.config.two_phase_commit.log_database or database
        cluster = self.topology.cluster_for(name, 0)
        if cluster is None:
            raise ProxyError(sqlstate.INTERNAL_ERROR, f'two_phase_commit.log_database "{name}" has no shard 0')
        return cluster.primary().config

    def log_pool(self, database: str) -> Pool:
        server = self.log_server(database)
        user = self.log_user()
        return self.control_pool((server.host, server.port), server.server_database, user.backend_user,
                                 user.backend_password)

    async def on_log(self, database: str) -> Pool:
        """The decision log's pool for `database`, its tables created the first time."""
        pool = self.log_pool(database)
        key = (pool.address[0], pool.address[1], pool.database)
        if key not in self.schema_ready:
            server = await pool.checkout()
            try:
                try:
                    await server.fetch_rows(decisions.SCHEMA_SQL, self.timeout_s)
                except ServerError as exc:
                    if exc.sqlstate not in ("23505", "42P07"):  # another instance created them meanwhile
                        raise
            finally:
                pool.checkin(server)
            self.schema_ready.add(key)
        return pool

    @property
    def timeout_s(self) -> float:
        return self.topology.config.two_phase_commit.commit_timeout_s

    # ------------------------------------------------------------ the commit round

    async def commit(self, database: str, participants: list[Participant]) -> CommitResult:
        """COMMIT of a client transaction that holds servers on several shards. Every participant's server
        is out of its transaction when this returns (or closed)."""
        timeout_s = self.timeout_s
        servers = [p.server for p in participants]
        if any(server.txn_status == b"E" for server in servers):
            await self._finish_plainly(servers, "ROLLBACK", timeout_s)
            return CommitResult("ROLLBACK")
        results = await _gather([server.fetch_rows(_WRITES_SQL, timeout_s) for server in servers])
        writers: list[Participant] = []
        readers: list[Participant] = []
        for participant, result in zip(participants, results, strict=True):
            if isinstance(result, BaseException):
                await self._finish_plainly([p.server for p in participants if p is not participant], "ROLLBACK",
                                           timeout_s)
                if not isinstance(result, ServerError) or result.sqlstate.startswith("08"):
                    participant.server.broken = True
                    return _error(sqlstate.CONNECTION_FAILURE,
                                  f"shard {participant.shard} of database \"{database}\" was lost before the commit: "
                                  "the transaction was rolled back on every shard")
                await self._finish_plainly([participant.server], "ROLLBACK", timeout_s)
                return _error(result.sqlstate, f"shard {participant.shard}: {result.message} "
                              "(the transaction was rolled back on every shard)")
            (wrote, max_prepared), = result
            (writers if wrote == "t" else readers).append(participant)
            if max_prepared == "0":
                self.no_prepared_transactions.add((database, participant.shard))
        if len(writers) <= 1:
            self.counts["one_phase"] += 1
            return await self._one_phase(database, readers + writers, timeout_s)
        if not self.enabled:
            self.counts["one_phase"] += 1
            return await self._one_phase(database, readers + writers, timeout_s)
        lacking = [p.shard for p in writers if (database, p.shard) in self.no_prepared_transactions]
        if lacking:
            await self._finish_plainly(servers, "ROLLBACK", timeout_s)
            return _error(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                          f"shard {lacking[0]} of database \"{database}\" has max_prepared_transactions = 0, so a "
                          "transaction that wrote on several shards cannot commit atomically: the transaction was "
                          "rolled back (set max_prepared_transactions on every shard, or general.two_phase_commit "
                          "= false)")
        await self._finish_plainly([p.server for p in readers], "COMMIT", timeout_s)
        started = time.monotonic()
        self.next_txid += 1
        txid = self.next_txid
        self.in_flight.add(txid)
        try:
            answer = await self._two_phase(database, txid, writers, timeout_s)
        finally:
            self.in_flight.discard(txid)
        if answer.tag == "COMMIT":
            self._observe(time.monotonic() - started)
        return answer

    async def _two_phase(self, database: str, txid: int, writers: list[Participant],
                         timeout_s: float) -> CommitResult:
        gids = [Gid(self.instance, txid, p.shard) for p in writers]
        self.counts["prepared"] += 1
        # the prepared transaction is owned by the login (not a role the client switched to), so the
        # proxy's own connections, logged in as the same user, can finish it
        outcomes = await _gather([_step(p.server, f"SET LOCAL ROLE NONE; PREPARE TRANSACTION '{g.text}'", timeout_s)
                                  for p, g in zip(writers, gids, strict=True)])
        failure: CommitResult | None = None
        prepared: list[tuple[Participant, Gid]] = []
        for participant, gid, outcome in zip(writers, gids, outcomes, strict=True):
            if outcome is None:
                prepared.append((participant, gid))
                continue
            if isinstance(outcome, bytes):
                failure = failure or CommitResult(None, outcome)
                if participant.server.txn_status != b"I":
                    await _gather([_step(participant.server, "ROLLBACK", timeout_s)])
            else:
                failure = failure or _error(sqlstate.CONNECTION_FAILURE,
                                            f"shard {participant.shard} of database \"{database}\" was lost during "
                                            "PREPARE TRANSACTION: the transaction was rolled back")
        if failure is not None:
            await self._rollback_prepared(prepared, timeout_s)
            self.counts["rolled_back"] += 1
            return failure
        if _FAILPOINTS:
            await _failpoint("after_prepare")
        key = decision_key(self.instance, txid)
        shards = tuple(gid.shard for gid in gids)
        try:
            pool = await self.on_log(database)
            server = await pool.checkout()
        except ProxyError as exc:
            await self._rollback_prepared(prepared, timeout_s)
            self.counts["rolled_back"] += 1
            return _error(exc.sqlstate, f"the commit decision could not be logged ({exc.message}): "
                          "the transaction was rolled back on every shard")
        try:
            outcome_logged = await decisions.record(server, key, self.instance, database, decisions.COMMIT, shards,
                                                    timeout_s)
        except ServerError as exc:
            pool.checkin(server)
            if exc.sqlstate.startswith("08"):
                return self._unknown(key, exc.message)
            await self._rollback_prepared(prepared, timeout_s)
            self.counts["rolled_back"] += 1
            return _error(exc.sqlstate, f"the commit decision could not be logged ({exc.message}): "
                          "the transaction was rolled back on every shard")
        except (TimeoutError, LookupError) as exc:
            server.broken = True
            pool.checkin(server)
            return self._unknown(key, str(exc) or "timeout")
        pool.checkin(server)
        if outcome_logged != decisions.COMMIT:
            # recovery took this transaction for abandoned and logged its abort first
            await self._rollback_prepared(prepared, timeout_s)
            self.counts["rolled_back"] += 1
            return _error(sqlstate.SERIALIZATION_FAILURE,
                          "the transaction was rolled back: recovery found it prepared for longer than "
                          "two_phase_commit.prepared_timeout_s before its commit was logged")
        self.counts["committed"] += 1
        if _FAILPOINTS:
            await _failpoint("after_decision")
        done = await self._commit_prepared(prepared, timeout_s)
        if done:
            self.finished.append((database, key))
        return CommitResult("COMMIT")

    def _unknown(self, key: str, why: str) -> CommitResult:
        log.error("event=2pc_decision_unknown txid=%s error=%r", key, why)
        return _error(sqlstate.TRANSACTION_RESOLUTION_UNKNOWN,
                      f"the decision log did not confirm the commit ({why}): the transaction is prepared on every "
                      "shard and recovery will commit it if its decision was logged, or roll it back")

    async def _one_phase(self, database: str, participants: list[Participant], timeout_s: float) -> CommitResult:
        """COMMIT shard by shard (read-only participants first). When a writer's COMMIT fails after another
        writer committed, the client is told which shards committed."""
        committed: list[int] = []
        for index, participant in enumerate(participants):
            try:
                error = await _step(participant.server, "COMMIT", timeout_s)
            except _Unknown as exc:
                error = codec.error_response(sqlstate.CONNECTION_FAILURE, f"server connection lost: {exc}")
            if error is None:
                committed.append(participant.shard)
                continue
            rest = participants[index + 1:]
            await self._finish_plainly([p.server for p in rest], "ROLLBACK", timeout_s)
            if not committed:
                return CommitResult(None, error)
            fields = codec.parse_error_fields(error[5:])
            return _error(fields.get("C", sqlstate.INTERNAL_ERROR),
                          f"COMMIT failed on shard {participant.shard} of database \"{database}\" after shards "
                          f"{', '.join(map(str, committed))} committed (two-phase commit is off): "
                          f"{fields.get('M', 'error')}")
        return CommitResult("COMMIT")

    async def _finish_plainly(self, servers: list[ServerConnection], sql: str, timeout_s: float) -> None:
        await _gather([_step(server, sql, timeout_s) for server in servers if server.txn_status != b"I"])

    async def _rollback_prepared(self, prepared: list[tuple[Participant, Gid]], timeout_s: float) -> None:
        """ROLLBACK PREPARED on each prepared part; one that fails is left to recovery."""
        results = await _gather([self._finish_prepared(p.server, g, "ROLLBACK PREPARED", timeout_s)
                                 for p, g in prepared])
        for (_, gid), result in zip(prepared, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("event=2pc_rollback_deferred gid=%s error=%r", gid.text, str(result))

    async def _commit_prepared(self, prepared: list[tuple[Participant, Gid]], timeout_s: float) -> bool:
        """COMMIT PREPARED on each part; one that fails is left to recovery (the decision is logged). True
        when all committed."""
        results = await _gather([self._finish_prepared(p.server, g, "COMMIT PREPARED", timeout_s)
                                 for p, g in prepared])
        done = True
        for (_, gid), result in zip(prepared, results, strict=True):
            if isinstance(result, BaseException):
                done = False
                log.warning("event=2pc_commit_deferred gid=%s error=%r", gid.text, str(result))
        return done

    async def _finish_prepared(self, participant: ServerConnection, gid: Gid, verb: str, timeout_s: float) -> None:
        pool = self.control_pool(participant.address, participant.database, participant.user, participant.password)
        server = await pool.checkout()
        try:
            await server.fetch_rows(f"{verb} '{gid.text}'", timeout_s)
        except TimeoutError:
            server.broken = True
            raise
        finally:
            pool.checkin(server)

    # ------------------------------------------------------------ metrics

    def _observe(self, seconds: float) -> None:
        index = 0
        while index < len(LATENCY_BUCKETS_S) and seconds > LATENCY_BUCKETS_S[index]:
            index += 1
        self.latency_counts[index] += 1
        self.latency_sum_s += seconds
        self.latency_total += 1

    def latency_buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as a Prometheus histogram has them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.latency_counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out

    def close(self) -> None:
        for pool in self.control.values():
            pool.close()
