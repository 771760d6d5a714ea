"""Client -> server: frames a logged-in client's messages and sends them to its server, renaming and checking
what the pool mode needs; the steady-state lane is the short form of the same walk."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.errors import ProxyError
from proxy.guard import PREPARE_TRANSACTION_POOLED, Guard, prepares_transaction, raising_query
from proxy.metrics import Traffic
from proxy.pool import Pool
from proxy.protocol import codec, sqlstate
from proxy.protocol.codec import ProtocolError
from proxy.server import ServerConnection
from proxy.session_state import (
    LISTEN_KINDS,
    Effect,
    ServerState,
    SessionState,
    listen_only_tags,
    listen_substitute,
)
from proxy.splitter import ReadWriteSplit
from proxy.statements import NamedBind, PreparedStatements

SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"
MODES = {SESSION: SESSION, TRANSACTION: TRANSACTION, STATEMENT: STATEMENT}

_Q, _P, _B, _D, _C, _S, _X, _F, _H, _EXECUTE = (ord(c) for c in "QPBDCSXFHE")  # message types
# What the relay does with each frontend message type, indexed by type byte. None: not a frontend message;
# 0: Terminate. The numbers order the relay's tests: answered with a ReadyForQuery first, then plain, then the
# messages that may name a prepared statement or portal.
_K_SYNC, _K_QUERY, _K_UNSYNCED, _K_PASS, _K_BIND, _K_DESCRIBE, _K_PARSE, _K_CLOSE = range(1, 9)


def _kinds_table(by_type: dict[bytes, int]) -> list[int | None]:
    table: list[int | None] = [None] * 256
    table[ord("X")] = 0
    for types, kind in by_type.items():
        for type_code in types:
            table[type_code] = kind
    return table


# Session mode: nothing is renamed and Query texts are not looked at; with a JWT session, Parse and Query are
# checked for claim forgery. Transaction and statement modes look at both, and at names.
KINDS_SESSION = _kinds_table({b"QSF": _K_SYNC, b"PBDCEH": _K_UNSYNCED, b"dcf": _K_PASS})
KINDS_SESSION_JWT = _kinds_table({b"SF": _K_SYNC, b"Q": _K_QUERY, b"BDCEH": _K_UNSYNCED, b"dcf": _K_PASS,
                                  b"P": _K_PARSE})
KINDS_POOLED = _kinds_table({b"SF": _K_SYNC, b"Q": _K_QUERY, b"EH": _K_UNSYNCED, b"dcf": _K_PASS,
                             b"B": _K_BIND, b"D": _K_DESCRIBE, b"P": _K_PARSE, b"C": _K_CLOSE})
_MALFORMED = 'invalid frontend message format: "%s" message body does not hold its names'
_HIGH_WATER_BYTES = 1 << 20
_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"
# first bytes of a Query the proxy may answer itself (LISTEN, UNLISTEN; the second byte tells UNLISTEN from
# UPDATE); others, with white space or comments before their LISTEN, go to the server as its substitute
_LISTEN_FIRST_BYTES = frozenset(b"lL")
_UNLISTEN_BYTES = (frozenset(b"uU"), frozenset(b"nN"))


class Relay(asyncio.Protocol):
    """The relay half of a client session (see proxy.client.ClientSession, which sets these fields up and
    decides where a transaction's server comes from in `_attach_now`)."""

    transport: asyncio.Transport | None
    inbuf: bytearray
    waiting: bytes  # what arrived while the session waits for a server (or a fan-out runs)
    acquiring: bool
    pool_mode: str
    pool: Pool | None
    server: ServerConnection | None  # the home server: every statement not fanned out goes to it
    parked: bool  # `server` stays linked between transactions (see Pool)
    lane: ServerConnection | None  # the client's server while in the steady state (see `_lane`)
    lane_ok: bool  # transaction mode with no routing (set at login)
    batch_at: float  # when the client's last bytes came (time.monotonic)
    traffic: Traffic  # the runtime's counters (proxy/metrics.py)
    lane_routed: bool  # transaction mode, read/write split or shards: the lane takes repeated reads
    # the last extended batch with one Bind taken by `_lane_batch`: the bytes before and after the Bind,
    # its Syncs, and for a Bind of a named statement how it is renamed
    lane_shape: tuple[bytes, bytes, int, NamedBind | None] | None
    lane_send: bytes  # a batch `_lane_batch` renamed, to send instead of the client's
    unsynced: bool
    pending_effects: list[Effect]
    unanswered: list[bytes | memoryview]
    retry_safe: bool
    pinned: bool
    kinds: list[int | None]
    max_message_bytes: int
    guard: Guard
    refusals: bool
    statements: PreparedStatements
    state: SessionState  # what the client expects of its session (its SQL prepared statements among it)
    split: ReadWriteSplit | None
    sharded: bool  # the database has several shards: every statement is looked at for its shards
    discarding: bool
    local_failed: bool
    effects_of: Callable[[bytes], tuple[Effect, ...]]  # the runtime's EffectScanner.effects
    parsed_effects_of: Callable[[bytes], tuple[Effect, ...]]  # and its parsed_effects
    _snapshot: ServerState | None
    listen_ok: bool  # pooled, one shard: LISTEN and UNLISTEN go through the notification hub (proxy/notify.py)
    # the client's prepared statements that LISTEN or UNLISTEN, by name ("" the unnamed one): noted at each Bind
    listen_statements: dict[str, tuple[Effect, ...]]

    # ------------------------------------------------------------ hooks the session provides

    def _attach_now(self) -> ServerConnection | None:
        raise NotImplementedError

    def _fan_out_from(self, data: bytes, pos: int, server: ServerConnection | None) -> bool:
        raise NotImplementedError

    def _wait_for_primary(self, exc: ProxyError) -> bool:
        """No server for the transaction now: True when the session waits for a primary instead of
        refusing it (it then relays `waiting` once it has a server)."""
        raise NotImplementedError

    def settings_key(self) -> bytes:
        raise NotImplementedError

    def _answer_listen(self, effects: tuple[Effect, ...], tags: tuple[str, ...], status: bytes,
                       rest: bytes) -> bool:
        """Answer a Query of LISTEN and UNLISTEN statements as the server would in transaction status
        `status`; False when the answer waits (for the hub's LISTEN): `rest` then waits with it."""
        raise NotImplementedError

    def _listen_hold(self, effects: tuple[Effect, ...]) -> bool:
        """True when a LISTEN must wait before it goes to a server: the hub is not listening on its channel
        yet. The session is then `acquiring`, and relays again from the held message once the hub is."""
        raise NotImplementedError

    def _listen_noted(self, effects: tuple[Effect, ...]) -> None:
        """LISTEN or UNLISTEN on its way to a server (as its substitute), taking hold at its commit."""
        raise NotImplementedError

    def _repeats_read(self, split: ReadWriteSplit, data: bytes, size: int) -> bool:
        """A new transaction's `data` repeats the session's last plain read (see ReadWriteSplit.repeats_read),
        and on a sharded database goes to a shard found without the parser; the transaction starts there."""
        raise NotImplementedError

    def _more_waiting(self) -> None:
        """More client data arrived while the session waits (a fan-out may be waiting for its Sync)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def _terminate(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ buffering

    def _ready_data(self, data: bytes) -> None:
        if self.inbuf:
            self.inbuf += data
            data = bytes(self.inbuf)
            self.inbuf.clear()
        if self.acquiring:
            self.waiting += data
            if len(self.waiting) > _HIGH_WATER_BYTES:
                self.pause_reading()
            self._more_waiting()
            return
        consumed = self._relay(data)
        if consumed < len(data):
            self._keep(data, consumed)

    def _keep(self, data: bytes, consumed: int) -> None:
        """What `_relay` did not take: an incomplete message, or what waits for a server."""
        rest = data[consumed:]
        if self.acquiring:
            self.waiting += rest
        else:
            self.inbuf += rest

    # ------------------------------------------------------------ the general walk

    def _relay(self, data: bytes) -> int:
        """Frame and forward complete messages; returns how many bytes were consumed."""
        size = len(data)
        pos = 0
        run = 0
        out: list[bytes | memoryview] | None = None
        limit = self.max_message_bytes
        server: ServerConnection = self.server  # type: ignore[assignment]  # None until `attached`
        header = codec.unpack_header
        kinds = self.kinds
        attached = server is not None and not self.parked
        sent_from = 0  # where this data starts going to the server (answered locally before that)
        # A whole message in a buffer no larger than the limit is within it; a larger buffer checks each one.
        wide = size > limit
        last = size - 5  # the last position where a whole header fits
        while pos <= last:
            type_code, length = header(data, pos)
            end = pos + 1 + length
            kind = kinds[type_code]
            # incomplete, malformed, too large or Terminate: off the usual path
            if end > size or length < 4 or not kind or (wide and length > limit):
                if kind is None or length < 4 or length > limit:
                    raise ProtocolError(_framing_problem(type_code, length, limit))
                if end > size:
                    break
                self._flush(server, data, run, pos, out, sent_from)
                self._terminate()
                return size
            if (self.sharded and (kind in (_K_QUERY, _K_PARSE, _K_BIND))
                    and self._fan_out_from(data, pos, server if attached else None)):
                # the statement goes to several shards: what came before it goes to the home server
                self._flush(server if attached else None, data, run, pos, out, sent_from)
                return size
            if not attached:
                if server is None and (self.discarding or self.local_failed):
                    self._answer_without_server(type_code, data, pos, end)
                    pos = run = end
                    continue
                if (kind == _K_QUERY and self.listen_ok and end - pos > 7
                        and (data[pos + 5] in _LISTEN_FIRST_BYTES
                             or (data[pos + 5] in _UNLISTEN_BYTES[0] and data[pos + 6] in _UNLISTEN_BYTES[1]))
                        and (self.split is None or not self.split.deferred_begin)):
                    listened = self._listen_query(data, pos, end)
                    if listened is not None:
                        if not listened:  # answered once the hub listens: the rest waits for it
                            return size
                        pos = run = end
                        continue
                split = self.split
                if split is not None:
                    answered = split.start(data, pos, size)
                    if answered is not None:  # answered by the proxy itself, up to where the reply ends
                        reply, pos = answered
                        self.write(reply)
                        run = pos
                        continue
                try:
                    linked = self._attach_now()
                except ProxyError as exc:
                    self.waiting += data[pos:]
                    if not self._wait_for_primary(exc):
                        self._reject_waiting(exc)
                    return size
                if linked is None:
                    self.waiting += data[pos:]
                    return size
                server = linked
                attached = True
                sent_from = pos
            if kind <= _K_QUERY:  # Sync, FunctionCall or Query: answered with a ReadyForQuery
                synced = not self.unsynced
                self.unsynced = False
                if kind == _K_QUERY:
                    sql = data[pos + 5 : end - 1]
                    refusal = self.guard.refusal(sql) if self.refusals else None
                    effects = self.effects_of(sql) if self.pool_mode is not SESSION else ()
                    if refusal is None and effects and prepares_transaction(effects):
                        refusal = PREPARE_TRANSACTION_POOLED
                    if refusal is not None:
                        # the server raises the error itself: it aborts an open transaction as PostgreSQL
                        # would, and its reply keeps its place among pipelined responses
                        server.outstanding += 1
                        if out is None:
                            out = []
                        if run < pos:
                            out.append(memoryview(data)[run:pos])
                        out.append(raising_query(refusal))
                        pos = run = end
                        continue
                    if effects:
                        substituted = False
                        if self.listen_ok and any(e.kind in LISTEN_KINDS for e in effects):
                            status = server.txn_status
                            tags = listen_only_tags(sql) if status != b"I" and synced and not server.outstanding else None
                            if tags is not None:  # inside a transaction, with everything answered
                                self._flush(server, data, run, pos, out, sent_from)
                                out = None
                                pos = run = sent_from = end
                                self._answer_listen(effects, tags, status, b"")
                                continue
                            if self._listen_hold(effects):
                                self.unsynced = not synced
                                self._flush(server, data, run, pos, out, sent_from)
                                self.waiting += data[pos:]
                                return size
                            sql = listen_substitute(sql)
                            substituted = True
                        self._note_effects(effects)
                        renamed = self._statements_in_sql(server, sql, effects, True)
                        if renamed is None and substituted:
                            renamed = (b"", sql)
                        if renamed is not None:  # sent after the Sync its preamble may have counted
                            if out is None:
                                out = []
                            if run < pos:
                                out.append(memoryview(data)[run:pos])
                            out += (renamed[0], codec.message(b"Q", renamed[1] + b"\x00"))
                            run = end
                server.outstanding += 1
            elif kind == _K_UNSYNCED:
                self.unsynced = True
            elif kind != _K_PASS:
                # Parse, Bind, Describe or Close (Parse alone in session mode): names are renamed when pooled.
                # Parse's name starts at +5, Bind's portal at +5 and its statement at +6 when the portal is
                # unnamed, Describe's name at +6; a Close is always looked at.
                self.unsynced = True
                if end - pos < 7:  # a body of under 2 bytes holds none of these messages
                    raise ProtocolError(_MALFORMED % chr(type_code))
                if kind == _K_BIND:
                    named = data[pos + 5] or data[pos + 6]
                    if self.listen_statements and self._bound_listen(data, pos, end):
                        self._flush(server, data, run, pos, out, sent_from)
                        self.waiting += data[pos:]
                        return size
                elif kind == _K_DESCRIBE:
                    named = data[pos + 6]
                elif kind == _K_PARSE:
                    named = data[pos + 5] and self.pool_mode is not SESSION
                    if not named:  # goes as it is, but its text is still read
                        try:
                            _, query, types = codec.split_parse(data[pos + 5 : end])
                        except ValueError:
                            raise ProtocolError(_MALFORMED % "P") from None
                        effects = self._parse_text(query)
                        sent = self._listen_parse("", query, effects) if effects or self.listen_statements else query
                        renamed = self._statements_in_sql(server, sent, effects, False) if effects else None
                        if renamed is None and sent is not query:
                            renamed = (b"", sent)
                        if renamed is not None:
                            if out is None:
                                out = []
                            if run < pos:
                                out.append(memoryview(data)[run:pos])
                            out += (renamed[0], codec.build_parse("", renamed[1], types))
                            run = end
                else:
                    named = True
                if named:
                    try:
                        replacement = self._pooled_extended(server, type_code, data, pos, end)
                    except ValueError:  # a name without its terminator, or not text
                        raise ProtocolError(_MALFORMED % chr(type_code)) from None
                    if replacement is not None:
                        if out is None:
                            out = []
                        if run < pos:
                            out.append(memoryview(data)[run:pos])
                        out.append(replacement)
                        run = end
            pos = end
        if out is None and run == 0 and pos == size and server is not None:
            # the usual case, whole messages passed as they came
            if not server.relayed:
                self.unanswered.append(data)
            server.transport.write(data)  # type: ignore[union-attr]  # a linked server is logged in
        else:
            self._flush(server, data, run, pos, out, sent_from)
        return pos

    def _flush(self, server: ServerConnection | None, view: bytes, run: int, pos: int,
               out: list[bytes | memoryview] | None, sent_from: int) -> None:
        if server is None:
            return
        if out is None:
            if run >= pos:
                return
            chunk: bytes | memoryview = view if run == 0 and pos == len(view) else memoryview(view)[run:pos]
        else:
            if run < pos:
                out.append(memoryview(view)[run:pos])
            if not out:
                return
            chunk = b"".join(out)
        if not server.relayed:
            # kept as the client sent it: a retry on another server renames and prepares it again there
            self.unanswered.append(chunk if out is None else memoryview(view)[sent_from:pos])
        server.send(chunk)

    def _pooled_extended(self, server: ServerConnection, type_code: int, data: bytes, pos: int,
                         end: int) -> bytes | None:
        """Rename named prepared statements to proxy-global names; None keeps the message as it is."""
        if type_code == _P:
            raw_name, query_text, param_types = codec.split_parse(data[pos + 5 : end])
            if not raw_name:
                return None  # unnamed: its ParseComplete needs no matching (they are all alike)
            name = raw_name.decode()
            taken = name in self.state.prepared or name in self.statements.known
            effects = () if taken else self._parse_text(query_text)
            if not taken and (effects or self.listen_statements):
                query_text = self._listen_parse(name, query_text, effects)
            before = b""
            if effects:
                renamed = self._statements_in_sql(server, query_text, effects, False)
                if renamed is not None:
                    before, query_text = renamed
            if self.split is not None:
                self.split.note_prepared(name, query_text)
            return before + self.statements.parse(server, name, query_text, param_types, self.settings_key(),
                                                  taken)
        return self.statements.rename(server, type_code, data, pos, end)

    def _parse_text(self, query: bytes) -> tuple[Effect, ...]:
        """A Parse's statement text: refused when a JWT session forges its claims; when pooled, a SET or
        set_config in it is tracked like a Query's (its effects are returned)."""
        if self.guard.forges_claims(query):
            raise ProxyError(sqlstate.INSUFFICIENT_PRIVILEGE, "a JWT session cannot change its claims or role")
        if self.pool_mode is not SESSION:
            effects = self.parsed_effects_of(query)
            if effects:
                if prepares_transaction(effects):
                    raise ProxyError(PREPARE_TRANSACTION_POOLED[0], PREPARE_TRANSACTION_POOLED[1],
                                     detail=PREPARE_TRANSACTION_POOLED[2])
                if self.listen_ok and any(e.kind in LISTEN_KINDS for e in effects):
                    # a LISTEN takes effect when its statement runs: noted at each Bind (see `_bound_listen`)
                    others = tuple(e for e in effects if e.kind not in LISTEN_KINDS)
                    if others:
                        self._note_effects(others)
                else:
                    self._note_effects(effects)
                return effects
        return ()

    def _listen_parse(self, name: str, query: bytes, effects: tuple[Effect, ...]) -> bytes:
        """A Parse: whether its statement LISTENs or UNLISTENs is kept for its Binds; the server prepares the
        substitute text (see listen_substitute), so that running it leaves the server listening to nothing."""
        listening = tuple(e for e in effects if e.kind in LISTEN_KINDS) if self.listen_ok else ()
        if listening:
            self.listen_statements[name] = listening
            return listen_substitute(query)
        if self.listen_statements:
            self.listen_statements.pop(name, None)
        return query

    def _bound_listen(self, data: bytes, pos: int, end: int) -> bool:
        """A Bind of one of the client's LISTEN or UNLISTEN statements: it runs in this transaction. True
        when it waits for the hub (see `_listen_hold`)."""
        try:
            portal_end = data.index(0, pos + 5, end)
            name = data[portal_end + 1 : data.index(0, portal_end + 1, end)].decode()
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(_MALFORMED % "B") from None
        effects = self.listen_statements.get(name)
        if not effects:
            return False
        if self._listen_hold(effects):
            return True
        self._note_effects(effects)
        return False

    def _listen_query(self, data: bytes, pos: int, end: int) -> bool | None:
        """A Query made only of LISTEN and UNLISTEN statements between transactions: answered by the proxy
        (True now, False once the hub listens); None for any other Query."""
        sql = data[pos + 5 : end - 1]
        effects = self.effects_of(sql)
        if not effects or not any(e.kind in LISTEN_KINDS for e in effects):
            return None
        tags = listen_only_tags(sql)
        if tags is None:
            return None
        return self._answer_listen(effects, tags, b"I", data[end:])

    def _note_effects(self, effects: tuple[Effect, ...]) -> None:
        if any(e.kind == "pin" for e in effects):
            self.pinned = True
        if any(e.kind in LISTEN_KINDS for e in effects):
            self._listen_noted(effects)
        self.pending_effects.extend(effects)
        server = self.server
        if server is not None:
            server.track_tags(True)
            status = server.txn_status  # DISCARD ALL fails in a transaction block, anything in a failed one
            if any((e.kind == "discard_all" and status == b"I") or (e.kind == "deallocate" and not e.name
                                                                    and status != b"E") for e in effects):
                # takes effect at once, also in a transaction that rolls back: every statement of the
                # client's is gone, and the server's may be
                Pool.mark_deallocated(server)
                self.statements.clear()
                if self.listen_statements:
                    unnamed = self.listen_statements.get("")
                    self.listen_statements = {"": unnamed} if unnamed else {}

    def _statements_in_sql(self, server: ServerConnection, sql: bytes, effects: tuple[Effect, ...],
                           query: bool) -> tuple[bytes, bytes] | None:
        """SQL naming the client's protocol-level statements: see PreparedStatements.in_sql."""
        return self.statements.in_sql(server, sql, effects, self.state.prepared, query)

    # ------------------------------------------------------------ answered without a server

    def _answer_without_server(self, type_code: int, data: bytes, pos: int, end: int) -> None:
        """After an error the proxy answered itself: skip to Sync, or end a transaction that never reached a
        server (COMMIT/ROLLBACK answered ROLLBACK, anything else 25P02), as PostgreSQL would."""
        if self.discarding:
            if type_code == _S:
                self.discarding = False
                self.write(codec.ready_for_query(b"E" if self.local_failed else b"I"))
            return
        if type_code == _Q:
            head = data[pos + 5 : pos + 25].lstrip()[:8].lower()
            if head.startswith((b"rollback", b"abort", b"commit", b"end")):
                self.local_failed = False
                self.write(codec.command_complete("ROLLBACK") + codec.ready_for_query(b"I"))
            else:
                self.write(codec.error_response("25P02", _ABORTED) + codec.ready_for_query(b"E"))
        elif type_code == _S:
            self.write(codec.ready_for_query(b"E"))
        else:
            self.discarding = True
            self.write(codec.error_response("25P02", _ABORTED))

    def _reject_waiting(self, exc: ProxyError) -> None:
        """No server for what the client sent: answer it as PostgreSQL answers an error, the session stays usable.

        Each Query gets the error and ReadyForQuery; an extended-protocol group gets the error once and its
        ReadyForQuery at its Sync (a group still missing its Sync is discarded up to it, as the server would).
        """
        data, self.waiting = self.waiting, b""
        self.traffic.error("proxy", exc.sqlstate)
        deferred = False
        if self.split is not None:
            self.split.routing.on_transaction_end()
            deferred = bool(self.split.deferred_begin)
            self.split.deferred_begin = b""
        status = b"E" if deferred else b"I"
        self.local_failed = deferred
        error = codec.error_response(exc.sqlstate, exc.message)
        replies: list[bytes] = []
        errored = self.discarding
        pos = 0
        while pos + 5 <= len(data):
            type_code = data[pos]
            if type_code in (_Q, _F):
                replies += [error, codec.ready_for_query(status)]
            elif type_code == _S:
                if not errored:
                    replies.append(error)
                replies.append(codec.ready_for_query(status))
                errored = False
            elif type_code != _X:
                if not errored:
                    replies.append(error)
                errored = True
            pos += 1 + codec.unpack_u32(data, pos + 1)[0]
        self.discarding = errored
        self.write(b"".join(replies))

    # ------------------------------------------------------------ the steady-state lane

    def _lane(self, server: ServerConnection, data: bytes) -> bool:
        """The steady state of a transaction pool: between transactions the client's server is parked with
        it and its session matches; inside one the server is linked and has answered everything. One whole
        Query, or a whole batch of unnamed extended messages ending in Sync, that changes no session state
        (and, in a JWT session, forges no claim) is relayed as `_relay` and `_attach_now` would, in fewer
        steps. False leaves anything else to them, the server as it was."""
        size = len(data)
        if data[0] == _Q:
            if size < 6 or size - 1 > self.max_message_bytes or codec.unpack_u32(data, 1)[0] != size - 1:
                return False
            sql = data[5:-1]
            if self.effects_of(sql) or (self.refusals and self.guard.refusal(sql) is not None):
                return False
            syncs = 1
        else:
            syncs = self._lane_batch(server, data, size)
            if not syncs:
                return False
        send = data
        if syncs < 0:  # renamed
            syncs = -syncs
            send = self.lane_send
        split = self.split
        if split is not None:
            # read/write split: a new transaction whose Query or unnamed batch repeats the last plain read,
            # routed again (maybe to another server) by `_attach_now` as `_relay` would
            if syncs != 1 or send is not data or not self._repeats_read(split, data, size):
                return False
            linked = self._attach_now()
            if linked is None:  # waiting for a server: the slow path sends it
                self.waiting += data
                return True
            if not linked.relayed:
                self.unanswered.append(data)
            linked.outstanding += 1
            self.unsynced = False
            linked.transport.write(data)  # type: ignore[union-attr]  # a linked server is logged in
            return True
        if self.parked:  # a new transaction
            self.parked = False
            if not server.pool.unpark(server):  # due for a health check or too old: checked in
                self.server = None
                return False
            server.relayed = server.saw_error = False
            self.unanswered = [data]
            self.retry_safe = True
        # else inside a transaction: the server has answered (its ReadyForQuery set the lane), so a loss from
        # here on is not retried and nothing is kept for it
        server.outstanding += syncs
        self.unsynced = False
        server.transport.write(send)  # type: ignore[union-attr]  # a linked server is logged in
        return True

    def _lane_batch(self, server: ServerConnection, data: bytes, size: int) -> int:
        """Syncs in `data` if it is whole Parse/Bind/Describe/Execute/Flush/Sync messages ending in Sync, all
        unnamed, none of them changing session state or forging a claim, within the size limit; else 0.
        One Bind may name a statement `server` has prepared: then the batch, renamed as `_pooled_extended`
        would, is left in `lane_send` and the Syncs are returned negated.

        Applications repeat their batches with new parameters: a batch with one Bind whose messages before
        and after it are the same bytes as in the last such batch only has its Bind looked at."""
        if size > self.max_message_bytes or self.listen_statements:
            return 0  # a Bind of a LISTEN statement is noted on the general path
        shape = self.lane_shape
        if shape is not None and data.startswith(shape[0]) and data.endswith(shape[1]):
            head, tail, shape_syncs, named = shape
            bind = len(head)
            bind_end = size - len(tail)
            if codec.whole_bind_at(data, bind, bind_end):
                if named is None:
                    if not data[bind + 5] and not data[bind + 6]:
                        return shape_syncs
                elif data.startswith(named.client_prefix, bind + 5) and named.usable(self.statements, server):
                    self.lane_send = named.renamed(data, bind, bind_end)
                    return -shape_syncs
        header = codec.unpack_header
        last = size - 5
        pos = syncs = type_code = 0
        bind = bind_end = -1
        named = None
        while pos <= last:
            type_code, length = header(data, pos)
            end = pos + 1 + length
            if end > size or length < 4:
                return 0
            if type_code == _S:
                syncs += 1
            elif type_code in (_EXECUTE, _H):
                pass
            elif end - pos < 7:  # a body of under 2 bytes: malformed, left to `_relay`
                return 0
            elif type_code == _B:
                if data[pos + 5]:
                    return 0
                if data[pos + 6]:  # a named statement: taken if it is the only Bind and `server` has it
                    if bind != -1:
                        return 0
                    named = NamedBind.of(self.statements, server, data, pos, end)
                    if named is None:
                        return 0
                elif named is not None:
                    return 0
                bind = pos if bind == -1 else -2
                bind_end = end
            elif type_code == _D:
                if data[pos + 6]:
                    return 0
            elif type_code == _P:
                if data[pos + 5]:
                    return 0
                try:
                    _, query, _ = codec.split_parse(data[pos + 5 : end])
                except ValueError:
                    return 0
                if self.parsed_effects_of(query) or self.guard.forges_claims(query):
                    return 0
            else:
                return 0
            pos = end
        if pos != size or type_code != _S:
            return 0
        if bind >= 0:
            self.lane_shape = (data[:bind], data[bind_end:], syncs, named)
        if named is not None:
            self.lane_send = named.renamed(data, bind, bind_end)
            return -syncs
        return syncs


def _framing_problem(type_code: int, length: int, limit: int) -> str:
    if KINDS_POOLED[type_code] is None:
        return f"invalid frontend message type {type_code}"
    if length < 4:
        return "invalid message length"
    return f"invalid message length: {length} bytes exceeds max_message_bytes ({limit})"
