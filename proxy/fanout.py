"""The session's link set over shards: a statement for other shards than the home one runs through the
fan-out executor, and the servers it used inside a transaction stay with it until the transaction ends."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine

from config.model import UserConfig
from proxy.errors import ProxyError, ServerLostError
from proxy.executor import FanoutExecutor, FanoutLeg, Target
from proxy.pool import Pool
from proxy.protocol import codec
from proxy.relay import SESSION, Relay
from proxy.runtime import Runtime
from proxy.scatter import FanoutPlan, Scatter, next_part, split_bind_parameters, unnamed_parse
from proxy.server import ServerConnection
from proxy.session_state import Effect, ServerState, SessionState
from proxy.splitter import ReadWriteSplit
from proxy.twophase.coordinator import Participant
from routing.copy_split import BinaryCopySplitter, CopySplitter
from routing.errors import RoutingError
from routing.sharding import ShardDecision

_Q, _P, _B, _D, _C, _E, _S = (ord(c) for c in "QPBDCES")
_STATEMENT, _PORTAL = ord("S"), ord("P")
_NO_PARAMETERS = codec.message(b"t", b"\x00\x00")
_CLOSE_COMPLETE = codec.message(b"3")
_SYNC = codec.message(b"S")
_UNSYNCED = b"\x00unsynced"
_COPY_DATA, _COPY_DONE, _COPY_FAIL = (ord(c) for c in "dcf")
_COPY_ABORTED = codec.message(b"f", codec.cstr("the client left during COPY"))  # marks a fan-out part that ends in Flush (never a message: no type 0)


def _reordered_types(types: bytes, order: tuple[int, ...]) -> bytes:
    """A Parse's parameter type OIDs (count, then one u32 each) for parameters renumbered by `order`."""
    count = int.from_bytes(types[0:2], "big")
    if count == 0:
        return types
    oids = [types[2 + 4 * i : 6 + 4 * i] for i in range(count)]
    return len(order).to_bytes(2, "big") + b"".join(oids[n - 1] if n <= count else b"\x00\x00\x00\x00" for n in order)


def _reordered_bind(message: bytes, order: tuple[int, ...]) -> bytes:
    """A Bind carrying only the parameters `order` names (1-based), in that order."""
    portal, statement, rest = codec.split_bind(message[5:])
    parameters, results = split_bind_parameters(rest)
    formats = [parameters[n - 1][0] for n in order]
    body = [len(order).to_bytes(2, "big"), *(f.to_bytes(2, "big") for f in formats), len(order).to_bytes(2, "big")]
    for n in order:
        value = parameters[n - 1][1]
        body.append(b"\xff\xff\xff\xff" if value is None else len(value).to_bytes(4, "big") + value)
    return codec.build_bind(portal, statement, b"".join(body) + results)


def _text_row(value: str) -> bytes:
    encoded = value.encode()
    return codec.message(b"D", b"\x00\x01" + len(encoded).to_bytes(4, "big") + encoded)


def _explain_rows(plan: FanoutPlan, targets: list[Target], text: bool) -> tuple[list[bytes], list[bytes]]:
    """EXPLAIN through the proxy: a header row before each shard's plan, then rows saying where the
    statement went and what decided it (text format only: other formats are each shard's document)."""
    if not text:
        return [], []
    headers, servers = [], []
    for target in targets:
        server = target.server
        pool = target.pool
        address = server.address if server is not None else pool.address if pool is not None else ("?", 0)
        headers.append(_text_row(f"Shard {target.shard} ({address[0]}:{address[1]}):"))
        servers.append(f"{target.shard}")
    decision = plan.decision
    reason = decision.reason if decision is not None else "shard hint"
    trailer = [_text_row(f"Shardgate: shards {', '.join(servers)}{' (a replica where readable)' if plan.reads else ''}"),
               _text_row(f"Shardgate: decided by {reason}")]
    return headers, trailer


def _answers(batch: bytes, extended: bool, tag: str | None, error: bytes | None) -> bytes:
    """What the server would have answered the client's COMMIT batch: its tag (or the error), as a Query's
    reply or as the extended protocol's (ParseComplete, BindComplete, NoData ... up to ReadyForQuery)."""
    done = codec.command_complete(tag) if tag is not None else error or b""
    if not extended:
        return done + codec.ready_for_query(b"I")
    out: list[bytes] = []
    pos, size = 0, len(batch)
    failed = False
    while size - pos >= 5:
        type_code = batch[pos]
        end = pos + 1 + codec.unpack_u32(batch, pos + 1)[0]
        if type_code == _S:
            out.append(codec.ready_for_query(b"I"))
            failed = False
        elif failed:
            pass  # after an error the server skips to the Sync
        elif type_code == _P:
            out.append(codec.PARSE_COMPLETE)
        elif type_code == _B:
            out.append(codec.BIND_COMPLETE)
        elif type_code == _D:
            out.append((_NO_PARAMETERS if batch[pos + 5] == _STATEMENT else b"") + codec.NO_DATA)
        elif type_code == _C:
            out.append(_CLOSE_COMPLETE)
        elif type_code == _E:
            out.append(done)
            failed = tag is None
        pos = end
    return b"".join(out)


def _describe_portals(batch: bytes) -> tuple[bytes, int]:
    """`batch` with a Describe of the portal before each Execute whose portal was not described since its
    Bind, and how many were added."""
    out: list[bytes] = []
    described: set[bytes] = set()
    added = 0
    pos, size = 0, len(batch)
    while size - pos >= 5:
        type_code = batch[pos]
        end = pos + 1 + codec.unpack_u32(batch, pos + 1)[0]
        if end > size:
            break  # not a message (the marker of a part that ends in Flush)
        message = batch[pos:end]
        if type_code == _B:
            described.discard(message[5 : message.index(b"\x00", 5)])
        elif type_code == _D and message[5] == _PORTAL:
            described.add(message[6:-1])
        elif type_code == _E:
            portal = message[5 : message.index(b"\x00", 5)]
            if portal not in described:
                out.append(codec.message(b"D", b"P" + portal + b"\x00"))
                described.add(portal)
                added += 1
        out.append(message)
        pos = end
    out.append(batch[pos:])
    return b"".join(out), added


def _binds_unnamed(data: bytes, pos: int) -> bool:
    """The Bind at `pos` names the unnamed statement (whatever its portal)."""
    name_end = data.find(b"\x00", pos + 5)
    return name_end != -1 and data[name_end + 1 : name_end + 2] == b"\x00"


class FanoutRelay(Relay):
    """The fan-out half of a client session (see proxy.client.ClientSession, which sets these fields up).
    `server` is the home shard's server (shard 0); `links` the other shards' in this transaction."""

    rt: Runtime
    database: str
    user: UserConfig | None
    scatter: Scatter | None
    links: dict[int, ServerConnection]
    fanout: FanoutExecutor | None  # while a fan-out statement runs
    unnamed_fanout: tuple[FanoutPlan, bytes] | None  # the unnamed statement was prepared on several shards
    _home_waiter: asyncio.Future[None] | None  # a fan-out waits for the home server's answers
    _more_waiter: asyncio.Future[None] | None  # a fan-out waits for the rest of its batch
    txn_effects: list[Effect]
    state: SessionState
    pinned: bool
    _snapshot: ServerState | None
    committing: bool  # a COMMIT over several shards is in its commit round

    # ------------------------------------------------------------ hooks the session provides

    def snapshot(self) -> ServerState:
        raise NotImplementedError

    def fatal(self, code: str, text: str) -> None:
        raise NotImplementedError

    def _start_task(self, coroutine: Coroutine[object, object, None]) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        raise NotImplementedError

    def on_server_lost(self, server: ServerConnection) -> None:
        raise NotImplementedError

    def on_server_taken(self, server: ServerConnection) -> None:
        raise NotImplementedError

    def _link(self, server: ServerConnection) -> None:
        raise NotImplementedError

    def _unlink_and_release(self, *, closing: bool = False) -> None:
        raise NotImplementedError

    def _phase_closed(self) -> bool:
        raise NotImplementedError

    def settings_key(self) -> bytes:
        raise NotImplementedError

    def _repeats_read(self, split: ReadWriteSplit, data: bytes, size: int) -> bool:
        scatter = self.scatter
        if scatter is None:
            return split.repeats_read(data, size)
        shard = scatter.repeats_point(data, size)
        if shard is None or not split.repeats_read(data, size):
            return False
        scatter.start_point(shard)
        split.use_shard(shard)
        self.unnamed_fanout = None  # a Query or unnamed Parse on the home shard replaces it
        return True

    # ------------------------------------------------------------ statements for several shards


    def _fan_out_from(self, data: bytes, pos: int, server: ServerConnection | None) -> bool:
        """The Query, Parse or Bind at `pos` of a sharded database: if it goes to other shards than the
        home one, hand it (and what follows) to a fan-out executor and return True."""
        scatter = self.scatter
        assert scatter is not None
        type_code = data[pos]
        prefix = b""
        unnamed = self.unnamed_fanout if type_code == _B else None
        if unnamed is not None and _binds_unnamed(data, pos):
            # the unnamed statement was prepared on several shards: the Bind goes there, the Parse again first
            plan, prefix = unnamed
        else:
            held = set(self.links)
            attached = self.server is not None and not self.parked
            if attached:
                held.add(scatter.home)
            found = scatter.plan(data, pos, frozenset(held), bool(self.links), attached, self.statements.text_of)
            if found is None:
                if type_code != _B:
                    self.unnamed_fanout = None  # a Query or unnamed Parse on the home shard replaces it
                if not attached and self.split is not None:
                    self.split.use_shard(scatter.home)
                return False
            plan = found
            prefix = found.prefix
        self.waiting = data[pos:] + self.waiting
        self.acquiring = True
        self._start_task(self._run_fan_out(plan, prefix))
        return True

    def _more_waiting(self) -> None:
        waiter = self._more_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_part(self, extended: bool) -> bytes | None:
        """The next part of a fan-out's batch from what the client sent (waiting for it to arrive); None
        when the client left."""
        while (found := next_part(self.waiting, extended)) is None:
            if self._phase_closed():
                return None
            self._more_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._more_waiter
            finally:
                self._more_waiter = None
        end, synced = found
        part, self.waiting = self.waiting[:end], self.waiting[end:]
        return part if synced else part + _UNSYNCED

    async def _run_fan_out(self, plan: FanoutPlan, prefix: bytes) -> None:
        """Run one statement on the shards of `plan`, then go on with what the client sent meanwhile."""
        home = self.server
        if home is not None and not self.parked and home.outstanding:
            # answers keep the order of the statements: the home server's come first
            self._home_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._home_waiter
            finally:
                self._home_waiter = None
        first = await self._next_part(plan.extended)
        if first is None:
            return
        status = self._client_status()
        if plan.refusal is not None:
            self._answer_refused(plan, first, status)
        elif plan.commit:
            await self._commit_across(plan, first)
        else:
            await self._fan_out(plan, prefix, first, status)
        if plan.refusal is None:
            traffic = self.rt.traffic
            route = "multi_shard" if len(plan.shards) > 1 else "shard"
            traffic.query_duration.observe(time.monotonic() - self.batch_at)
            traffic.queries[route] += 1
            if self._client_status() == b"I":
                traffic.transactions[route] += 1
        if self._phase_closed():
            return
        self.acquiring = False
        data, self.waiting = self.waiting, b""
        if data:
            self._ready_data(data)

    async def _commit_across(self, plan: FanoutPlan, part: bytes | None) -> None:
        """The client's COMMIT of a transaction over several shards: the coordinator commits it (with
        two-phase commit when two or more shards wrote), the client gets its answer, every server goes back."""
        assert self.scatter is not None
        batch = b""
        while part is not None:  # an extended COMMIT sent in parts: all of it, up to its Sync
            synced = not part.endswith(_UNSYNCED)
            batch += part if synced else part[: -len(_UNSYNCED)]
            part = None if synced else await self._next_part(plan.extended)
        home = self.scatter.home
        participants = []
        for shard in plan.shards:
            server = self.server if shard == home and not self.parked else self.links.get(shard)
            if server is not None:
                participants.append(Participant(shard, server))
        for participant in participants:
            participant.server.sink = None  # a server lost now is the commit round's business, not the client's
        self.committing = True  # a client that leaves now does not stop the round (see ClientSession.connection_lost)
        try:
            result = await self.rt.twophase.commit(self.database, participants)
        finally:
            self.committing = False
            home_server = self.server
            if home_server is not None and not self.parked:
                if home_server.broken:
                    self.server = None
                    home_server.pool.checkin(home_server)
                else:
                    home_server.sink = self
        if result.tag is not None and self.txn_effects and self.server is not None and not self.parked:
            effects, self.txn_effects = self.txn_effects, []  # SETs made in the transaction now hold
            if self.state.apply(effects):
                self.pinned = True
            self._snapshot = None
            Pool.settle(self.server, effects)
        else:
            self.txn_effects = []
        if self._phase_closed():
            self._release_links(closing=True)
            self._unlink_and_release(closing=True)
            return
        self.write(_answers(batch, plan.extended, result.tag, result.error))
        self._fan_out_transaction_ended()

    def _answer_refused(self, plan: FanoutPlan, part: bytes, status: bytes) -> None:
        """A statement the proxy does not send: its error, then ReadyForQuery (for an extended batch at
        its Sync: the messages up to it are skipped as the server would after an error)."""
        assert plan.refusal is not None
        self.rt.traffic.error("proxy", plan.refusal[0])
        error = codec.error_response(*plan.refusal)
        if part.endswith(_UNSYNCED):
            self.write(error)
            self.discarding = True  # up to the Sync (see Relay._answer_without_server)
            self.local_failed = False
            return
        self.write(error + codec.ready_for_query(status))

    async def _fan_out(self, plan: FanoutPlan, prefix: bytes, first: bytes, status: bytes) -> None:
        then = ""
        if status != b"I":
            begin = self.split.take_deferred_begin() if self.split is not None else ""
            then = begin or "BEGIN"  # the new servers join the transaction the client is in
        if self.parked and self.server is not None:
            self._unlink_and_release()  # between transactions: its pool may lend it again below
        user = self.user
        assert user is not None and self.scatter is not None
        home = self.scatter.home
        targets = []
        for shard in plan.shards:
            server = self.server if shard == home else self.links.get(shard)
            if server is not None:
                targets.append(Target(shard, server, None))
            else:
                cluster = self.rt.cluster_for(self.database, shard)
                assert cluster is not None
                # a read outside a transaction may go to the shard's replicas, as the split would send it
                reads = status == b"I" and plan.reads and self.rt.splits_reads(cluster)
                target = cluster.pick_read() if reads else cluster.primary()
                targets.append(Target(shard, None, self.rt.pool_for_server(user, target.config)))
        decision = plan.decision
        merge = decision.merge if decision is not None and plan.explain is None else None
        collation = "C"
        if merge is not None and not merge.concatenates:
            collation = await self._collation()
        plan_decision = decision
        executor = self.fanout = FanoutExecutor(self, targets, self.snapshot(), then, 1 if prefix else 0,
                                                merge, collation, copy=decision is not None and decision.copy is not None)
        if plan.explain is not None:
            executor.explain(_explain_rows(plan, targets, plan.explain == "text"))
            decision = None  # sent as the client wrote it
        for_leg = None
        if self.pool_mode is not SESSION or (decision is not None and (decision.shard_sql or decision.inserts)):
            for_leg = functools.partial(self._leg_messages, decision)
        merger = executor.merger
        if plan.extended and merge is not None and (not merge.concatenates or merge.visible_columns is not None):
            # an Execute whose portal was not described (asyncpg's prepared statements): its rows need their
            # columns to be merged, so each shard is asked for them and the client does not see the answer
            first, added = _describe_portals(first)
            merger.hide_row_descriptions(added)
        part: bytes | None = first
        sent = b""
        try:
            await executor.start()
            while part is not None:
                synced = not part.endswith(_UNSYNCED)
                if not synced:
                    part = part[: -len(_UNSYNCED)]
                sent += part
                executor.send(prefix + part, part.count(_SYNC) if plan.extended else 1, for_leg)
                prefix = b""
                part = None if synced else await self._next_part(plan.extended)
            if plan_decision is not None and plan_decision.copy is not None and plan_decision.copy.incoming:
                await self._copy_in(executor, plan_decision)
            final = await executor.finish()
        except ServerLostError as exc:  # after the batch was sent: the client cannot know what ran
            self._file_legs(executor, keep=False)
            self.fatal(exc.sqlstate, exc.message)
            return
        except ProxyError as exc:  # before: nothing ran
            self._file_legs(executor, keep=False)
            self.write(codec.error_response(exc.sqlstate, exc.message) + codec.ready_for_query(status))
            return
        except asyncio.CancelledError:
            executor.release_checked_out()
            raise
        finally:
            self.fanout = None
        if plan.extended:
            parse = unnamed_parse(sent)
            if parse is not None:
                self.unnamed_fanout = (plan, parse)
        else:
            self.unnamed_fanout = None  # a simple Query drops the unnamed statement
        self._file_legs(executor, keep=final != b"I")
        if final == b"I" and self.pool_mode is not SESSION:
            self._fan_out_transaction_ended()

    async def _copy_in(self, executor: FanoutExecutor, decision: ShardDecision) -> None:
        """COPY FROM STDIN on several shards: the client's CopyData cut into rows, each row to its key's
        shard (every shard for an omnisharded table), then CopyDone (or the client's CopyFail) to all. A row
        with no shard makes the proxy send CopyFail to every shard: nothing is copied anywhere."""
        assert decision.copy is not None and self.scatter is not None and self.scatter.shards is not None
        shard_router = self.scatter.shards
        table = decision.copy.table or ""
        placement = shard_router.placement_of(table)
        legs = {leg.shard: leg for leg in executor.legs}
        column = table and ", ".join(c.column for c in shard_router.columns if c.table in (table, None))
        splitter: CopySplitter | BinaryCopySplitter
        if decision.copy.format == "binary":
            splitter = BinaryCopySplitter(decision.copy_key, tuple(legs), placement.shard_of_binary, column)
        else:
            splitter = CopySplitter(decision.copy, decision.copy_key, tuple(legs), placement.shard_of_text, column)
        while True:
            message = await self._next_message()
            if message is None:
                for leg in legs.values():
                    leg.server.send(_COPY_ABORTED)
                return
            kind = message[0]
            try:
                if kind == _COPY_DATA:
                    rows = splitter.feed(message[5:])
                elif kind == _COPY_DONE:
                    rows = splitter.finish()
                elif kind == _COPY_FAIL:
                    for leg in legs.values():
                        leg.server.send(message)
                    return
                else:
                    continue  # Flush and Sync mean nothing in COPY mode
            except RoutingError as exc:
                failure = codec.message(b"f", codec.cstr(f"{exc} (SQLSTATE {exc.sqlstate})"))
                for leg in legs.values():
                    leg.server.send(failure)
                return  # what the client still sends of the COPY reaches a server outside COPY: ignored there
            for shard, chunk in rows.items():
                legs[shard].server.send(codec.message(b"d", b"".join(chunk)))
            if kind == _COPY_DONE:
                for leg in legs.values():
                    leg.server.send(message)
                return

    async def _next_message(self) -> bytes | None:
        """The next whole message the client sent during a fan-out (waiting for it); None if it left."""
        while True:
            data = self.waiting
            if len(data) >= 5:
                end = 1 + codec.unpack_u32(data, 1)[0]
                if len(data) >= end:
                    self.waiting = data[end:]
                    return data[:end]
            if self._phase_closed():
                return None
            self._more_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._more_waiter
            finally:
                self._more_waiter = None

    def _leg_messages(self, plan_decision: ShardDecision | None, messages: bytes, leg: FanoutLeg) -> bytes:
        """One server's version of a fan-out's messages: the SQL its shard runs (a merge's rewrite, its
        rows of a split INSERT, parameters renumbered) and the client's statements under the names that
        server has them by (prepared there first when it lacks them)."""
        shard_sql: str | None = None
        order: tuple[int, ...] | None = None
        if plan_decision is not None:
            if plan_decision.inserts:
                part = next(p for p in plan_decision.inserts if p.shard == leg.shard)
                shard_sql, order = part.sql, part.parameters
            else:
                shard_sql = plan_decision.shard_sql
        server = leg.server
        pooled = self.pool_mode is not SESSION
        out: list[bytes] = []
        pos, size = 0, len(messages)
        while size - pos >= 5:
            end = pos + 1 + codec.unpack_u32(messages, pos + 1)[0]
            type_code = messages[pos]
            message = messages[pos:end]
            if type_code == _Q and shard_sql is not None:
                message = codec.query(shard_sql)
            elif type_code == _P:
                name, text, types = codec.split_parse(messages[pos + 5 : end])
                client_text = text
                if shard_sql is not None:
                    text = shard_sql.encode()
                    if order is not None:
                        types = _reordered_types(types, order)
                    message = codec.build_parse(name.decode(), text, types)
                if name and pooled:
                    message = self.statements.parse(server, name.decode(), text, types, self.settings_key())
                    if text is not client_text:  # later Binds are routed by what the client wrote
                        self.statements.client_texts[name.decode()] = client_text
            elif type_code == _B:
                if order is not None:
                    message = _reordered_bind(message, order)
                if pooled and shard_sql is not None:
                    # a Bind of a named statement whose shards run the merge's SQL: prepared as that
                    _, statement, _ = codec.split_bind(message[5:])
                    if statement:
                        out.append(self.statements.prepare_as(server, statement.decode(), shard_sql.encode(),
                                                              self.settings_key()))
                if pooled:
                    renamed = self.statements.rename(server, type_code, message, 0, len(message))
                    if renamed is not None:
                        message = renamed
            elif type_code in (_D, _C) and pooled:
                renamed = self.statements.rename(server, type_code, messages, pos, end)
                if renamed is not None:
                    message = renamed
            out.append(message)
            pos = end
        return b"".join(out)

    async def _collation(self) -> str:
        """The database's collation, as the merger compares text ("icu" when it cannot): asked once."""
        known = self.rt.collations.get(self.database)
        if known is not None:
            return known
        cluster = self.rt.cluster_for(self.database, 0)
        assert cluster is not None and self.user is not None
        pool = self.rt.pool_for_server(self.user, cluster.primary().config)
        server = await pool.checkout()
        try:
            rows = await server.fetch_rows(
                "SELECT datcollate, datlocprovider FROM pg_database WHERE datname = current_database()", 10.0)
        finally:
            pool.checkin(server)
        collation = "C"
        if rows and rows[0][0] is not None:
            collation = rows[0][0] if rows[0][1] in (None, "c") else "icu"
        self.rt.collations[self.database] = collation
        return collation

    def _client_status(self) -> bytes:
        """The transaction status the client last saw."""
        home = self.server
        if home is not None and not self.parked and home.txn_status != b"I":
            return home.txn_status
        if self.links or (self.split is not None and self.split.deferred_begin):
            return b"T"
        return b"I"

    def _file_legs(self, executor: FanoutExecutor, *, keep: bool) -> None:
        """After a fan-out: the session's own servers report to it again; the ones checked out for it join
        the link set (`keep`: the transaction goes on) or go back to their pools."""
        assert self.scatter is not None
        home = self.scatter.home
        for leg in executor.legs:
            server = leg.server
            if not leg.borrowed and (not keep or server.broken):
                server.pool.checkin(server)
                continue
            server.sink = self
            server.out = self.transport
            if leg.borrowed:
                continue
            if leg.shard == home:
                self.pool = leg.pool
                self._link(server)
            else:
                self.links[leg.shard] = server
        executor.legs = []

    def _fan_out_transaction_ended(self) -> None:
        """The fan-out ended the transaction (or ran outside one): every server goes back."""
        if self.split is not None:
            self.split.transaction_ended()
        self._release_links()
        server = self.server
        if server is None or self.parked or self.pinned or server.outstanding or server.txn_status != b"I":
            return
        if server.pool.park(server, self):
            self.parked = True
            return
        self.server = None
        server.pool.checkin(server)

    def _release_links(self, *, closing: bool = False) -> None:
        """The transaction over several shards ended (or the client left): every other shard's server goes back."""
        links, self.links = self.links, {}
        for server in links.values():
            server.pool.checkin(server, reset=self.pool_mode == SESSION or (closing and self.pinned))
