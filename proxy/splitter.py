"""Read/write splitting for one session: where each transaction runs (primary or a replica), from its first statements."""

from __future__ import annotations

import re
import time

from config.model import UserConfig
from proxy.cluster import Cluster, ClusterServer
from proxy.errors import ProxyError, ServerError
from proxy.pool import Pool
from proxy.protocol import codec
from proxy.runtime import Runtime
from proxy.server import ServerConnection
from routing.errors import RoutingError
from routing.route import Role, Route
from routing.router import TransactionRouting, TransactionState

_Q, _P, _B, _D, _S, _H, _EXECUTE = (ord(c) for c in "QPBDSHE")
_NO_PARAMETERS = codec.message(b"t", b"\x00\x00")
# the router's integer literal (routing.router._NUMBER), over ASCII bytes; texts with quotes, comments,
# dollar quotes or backslashes are not remembered by their shape
_NUMBER = re.compile(rb"(?<![\w$.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_UNSHAPED = re.compile(rb"['\"$\\]|--|/\*")
# RowDescription field: no table, text (oid 25), variable length, no modifier, text format
_TEXT_COLUMN = b"\x00\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x19" + b"\xff\xff" + b"\xff\xff\xff\xff" + b"\x00\x00"


def integer_shape(data: bytes) -> tuple[bytes, bytes] | None:
    """A Query message with one integer literal (unsigned, all digits) and nothing quoted or commented: its
    bytes before and after the integer. The same statement with another integer starts and ends with them."""
    body = data[5:]
    if not body.isascii() or _UNSHAPED.search(body) is not None:
        return None
    numbers = _NUMBER.findall(body)
    if len(numbers) != 1 or not numbers[0].isdigit():
        return None
    match = _NUMBER.search(body)
    assert match is not None
    return data[: 5 + match.start()], body[match.end() :]


class ReadWriteSplit:
    """The session's routing state: the transaction's role, a held-back BEGIN, sticky replica, last write."""

    def __init__(self, runtime: Runtime, cluster: Cluster, user: UserConfig) -> None:
        self.rt = runtime
        self.cluster = cluster
        self.user = user
        self.routing = TransactionRouting(runtime.router, runtime.config.general.read_write_split)
        self.role = Role.PRIMARY
        self.wrote = False
        # a lone BEGIN answered by the proxy, sent with the statement that decides where it runs
        self.deferred_begin = b""
        self.sticky: ClusterServer | None = None
        self.last_write_at = 0.0
        # each named statement's route from the parser alone: the session role applies at each Bind
        self.statement_routes: dict[str, Route] = {}
        self._pools: dict[ClusterServer, Pool] = {}  # each server's pool for this session's user
        # the last plain read's Query text before and after its one integer (see `start`)
        self._read_shape: tuple[bytes, bytes] | None = None
        # the last plain read sent as one unnamed batch: its bytes before and after its one Bind
        self._read_batch: tuple[bytes, bytes] | None = None

    def start(self, data: bytes, pos: int, size: int) -> tuple[bytes, int] | None:
        """A transaction starts: route every statement of the batch. When the proxy answers the first
        message itself (a lone BEGIN, BEGIN; COMMIT, SHOW shardgate.role, a routing error) returns the reply
        and where the messages it answers end: the Query's end, or for an unnamed BEGIN sent by the extended
        protocol its Sync's (the end of `data`), so none of its messages reaches a server."""
        routing = self.routing
        if pos == 0 and self.repeats_read(data, size):
            return None
        routes: list[Route] = []
        started_at = pos
        first = True
        unpack = codec.unpack_u32
        while size - pos >= 5:
            type_code = data[pos]
            end = pos + 1 + unpack(data, pos + 1)[0]
            if end > size:
                break
            if type_code == _Q:
                try:
                    route = routing.on_statement(data[pos + 5 : end - 1].decode("utf-8", "replace"))
                except RoutingError as exc:
                    if not first:
                        raise ProxyError(exc.sqlstate, str(exc), fatal=True)
                    status = b"T" if self.deferred_begin else b"I"
                    return codec.error_response(exc.sqlstate, str(exc)) + codec.ready_for_query(status), end
                if first and self.deferred_begin and route.ends_transaction and end == size:
                    # BEGIN; COMMIT with nothing between: no server needed
                    self.deferred_begin = b""
                    routing.on_transaction_end()
                    head = data[pos + 5 : pos + 25].lstrip()[:8].lower()
                    tag = "ROLLBACK" if head.startswith((b"rollback", b"abort")) else "COMMIT"
                    return codec.command_complete(tag) + codec.ready_for_query(b"I"), end
                if first and route.local and data[pos + 5 : pos + 25].lstrip()[:4].lower() == b"show":
                    return _show_session_role(route), end
                if first and route.role_pending and end == size:
                    # a lone BEGIN: the next statement decides where the transaction runs
                    self.deferred_begin = data[pos + 5 : end - 1]
                    return codec.command_complete("BEGIN") + codec.ready_for_query(b"T"), end
                routes.append(route)
            elif type_code == _P:
                try:
                    name, query, _ = codec.split_parse(data[pos + 5 : end])
                except ValueError:  # not terminated: routed as nothing here; the relay refuses it
                    first = False
                    pos = end
                    continue
                try:
                    # SET/SHOW shardgate.role over the extended protocol reach PostgreSQL as a custom setting
                    text = query.decode("utf-8", "replace")
                    route = routing.on_statement(text)
                except RoutingError:
                    route = Route(Role.ANY, write=False, reason="invalid session role")
                if first and route.role_pending and not name:
                    reply = _extended_begin_reply(data, end, size)
                    if reply is not None:  # answers the Bind, Describe, Execute and Sync too
                        self.deferred_begin = query
                        return reply, size
                if name:
                    try:
                        parsed = self.rt.router.route_statement(text)
                    except RoutingError:
                        parsed = route
                    self.statement_routes[name.decode("utf-8", "replace")] = parsed
                routes.append(route)
            elif type_code == _B:
                try:
                    _, statement, _ = codec.split_bind(data[pos + 5 : end])
                except ValueError:  # not terminated: the relay refuses it
                    statement = b""
                if statement:
                    prepared = self.statement_routes.get(statement.decode("utf-8", "replace"))
                    known = Role.PRIMARY if prepared is None else routing.chosen_role(prepared)
                    routes.append(Route(known, write=known is Role.PRIMARY, reason="prepared statement"))
            first = False
            pos = end
        # a replica when no statement needs the primary and one reads; a held-back BEGIN runs on a
        # replica only if the transaction was declared read only
        primary = replica = wrote = False
        for route in routes:
            role = route.role
            if role is Role.PRIMARY:
                primary = True
            elif role is Role.REPLICA:
                replica = True
            if route.write or route.begins_transaction:
                wrote = True
        if self.deferred_begin:
            chosen = Role.REPLICA if routing.state is TransactionState.REPLICA else Role.PRIMARY
            wrote = True
        else:
            chosen = Role.REPLICA if replica and not primary else Role.PRIMARY
        self.role = chosen
        self.wrote = chosen is Role.PRIMARY and wrote
        if (chosen is Role.REPLICA and started_at == 0 and len(routes) == 1 and pos == size
                and routing.state is TransactionState.IDLE):
            if data[0] == _Q:
                self._learn_read_shape(data, routes[0])
            else:
                self._learn_read_batch(data, size, routes[0])
        return None

    def _learn_read_shape(self, data: bytes, route: Route) -> None:
        """A batch of one Query that reads, with one integer literal and nothing quoted or commented:
        remember the bytes around the integer (see `start`)."""
        if (data[0] != _Q or route.write or route.local or route.hint is not None or route.begins_transaction
                or route.ends_transaction or route.role_pending):
            return
        shape = integer_shape(data)
        if shape is not None:
            self._read_shape = (shape[0][5:], shape[1])

    def _learn_read_batch(self, data: bytes, size: int, route: Route) -> None:
        """A batch of unnamed Parse, Bind, Describe, Execute and one Sync that reads: remember the bytes
        around its Bind, so the same statement with other parameters is known as a read (see `start`)."""
        if route.write or route.local or route.hint is not None or route.begins_transaction or route.ends_transaction:
            return
        bind = bind_end = -1
        pos = 0
        while pos < size:
            type_code = data[pos]
            end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
            if type_code == _B:
                if bind != -1 or data[pos + 5] or data[pos + 6]:
                    return  # a second Bind, or a named portal or statement
                bind, bind_end = pos, end
            elif type_code == _P:
                if data[pos + 5]:
                    return
            elif type_code == _S:
                if end != size:
                    return
            elif type_code not in (_D, _EXECUTE):
                return
            pos = end
        if bind != -1 and pos == size:
            self._read_batch = (data[:bind], data[bind_end:])

    def repeats_read(self, data: bytes, size: int) -> bool:
        """`data` is the session's last plain read again: one Query with another integer in it, or one
        unnamed batch with another Bind. Routed as a read (as `start` would), nothing decoded or stepped."""
        if self.deferred_begin or len(data) != size:
            return False
        if data[0] == _Q:
            memo = self._read_shape
            if (memo is None or not data.startswith(memo[0], 5) or not data.endswith(memo[1])
                    or codec.unpack_u32(data, 1)[0] != size - 1
                    or not data[5 + len(memo[0]) : size - len(memo[1])].isdigit()):  # ASCII digits, for bytes
                return False
        else:
            memo = self._read_batch
            if (memo is None or not data.startswith(memo[0]) or not data.endswith(memo[1])
                    or not codec.whole_bind_at(data, len(memo[0]), size - len(memo[1]))
                    or data[len(memo[0]) + 5] or data[len(memo[0]) + 6]):
                return False
        routing = self.routing
        if routing.state is not TransactionState.IDLE or routing.session_role is not Role.ANY:
            return False
        self.role = Role.REPLICA
        self.wrote = False
        self.rt.router.count_reuse()
        return True

    def note_prepared(self, name: str, query_text: bytes) -> None:
        """A named Parse sent inside a transaction: remember where its statement reads or writes."""
        if name not in self.statement_routes:
            self.statement_routes[name] = self.rt.router.route_statement(query_text.decode("utf-8", "replace"))

    def use_shard(self, shard: int) -> None:
        """A transaction starts on `shard` of the database: its servers serve it."""
        cluster = self.cluster
        if cluster.shard != shard:
            found = self.rt.cluster_for(cluster.name, shard)
            if found is not None:
                self.cluster = found
                self.sticky = None

    def reconfigure(self, user: UserConfig) -> None:
        """A reload: the user's new settings and the cluster's new servers, from the next route on."""
        self.user = user
        self.cluster = self.rt.cluster_for(self.cluster.name, self.cluster.shard) or self.cluster
        self._pools.clear()  # a moved server has a new pool

    def pool_for_route(self) -> Pool:
        cluster, user = self.cluster, self.user
        if self.role is Role.REPLICA:
            min_caught_up = None
            ryw_ms = self.rt.config.general.read_your_writes_ms
            if ryw_ms and self.last_write_at and time.monotonic() - self.last_write_at < ryw_ms / 1000:
                min_caught_up = self.last_write_at
            target = cluster.pick_read(sticky=self.sticky, min_caught_up_at=min_caught_up,
                                       active_connections=self._active_on)
            if self.rt.config.general.replica_stickiness and target.role != "primary":
                self.sticky = target
        else:
            target = cluster.primary()
        pool = self._pools.get(target)
        if pool is None:
            pool = self._pools[target] = self.rt.pool_for_server(user, target.config)
        return pool

    def _active_on(self, target: ClusterServer) -> int:
        return self.rt.pool_for_server(self.user, target.config).busy

    async def checkout(self, pool: Pool) -> tuple[ServerConnection, Pool]:
        """Check out for the current route (from `pool`, or the pool of another replica when its server
        cannot be reached: that one is banned); returns the server and its pool."""
        for _ in range(len(self.cluster.servers)):
            try:
                return await pool.checkout(), pool
            except ServerError as exc:
                if self.role is not Role.REPLICA:
                    raise
                failed = self.cluster.server_at(pool.address)
                if failed is None or failed.role == "primary":
                    raise
                self.cluster.ban(failed, f"connect failed: {exc.message}")
                if self.sticky is failed:
                    self.sticky = None
                pool = self.pool_for_route()
        return await pool.checkout(), pool

    def transaction_ended(self) -> None:
        self.routing.on_transaction_end()
        if self.wrote:
            self.last_write_at = time.monotonic()
            self.wrote = False

    def take_deferred_begin(self) -> str:
        begin, self.deferred_begin = self.deferred_begin, b""
        return begin.decode("utf-8", "replace")


def _show_session_role(route: Route) -> bytes:
    """SHOW shardgate.role (simple protocol): the session routing hint lives in the proxy. SET and RESET
    of it also reach PostgreSQL, as a custom setting, so the extended protocol sees the same value."""
    value = "auto" if route.hint in (None, Role.ANY) else str(route.hint)
    row_description = codec.message(b"T", b"\x00\x01" + codec.cstr("shardgate.role") + _TEXT_COLUMN)
    data_row = codec.message(b"D", b"\x00\x01" + len(value).to_bytes(4, "big") + value.encode())
    return row_description + data_row + codec.command_complete("SHOW") + codec.ready_for_query(b"I")


def _extended_begin_reply(data: bytes, pos: int, size: int) -> bytes | None:
    """Replies for Bind/Describe/Execute/Sync of an unnamed BEGIN, or None if the batch holds more."""
    replies = [codec.PARSE_COMPLETE]
    while size - pos >= 5:
        type_code = data[pos]
        end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
        if end > size:
            return None
        if type_code == _B:
            if data[pos + 5] != 0 or data[pos + 6] != 0:  # named portal or statement
                return None
            replies.append(codec.BIND_COMPLETE)
        elif type_code == _D:
            replies.append(codec.NO_DATA if data[pos + 5] == ord("P") else _NO_PARAMETERS + codec.NO_DATA)
        elif type_code == _EXECUTE:
            replies.append(codec.command_complete("BEGIN"))
        elif type_code == _S:
            if end != size:
                return None
            replies.append(codec.ready_for_query(b"T"))
            return b"".join(replies)
        elif type_code != _H:
            return None
        pos = end
    return None
