"""One client connection: startup, authentication, then relay of its messages to a pooled server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING

from auth.claims import is_forgery_attempt
from auth.errors import AuthError
from auth.identity import Identity
from auth.scram import ScramServer
from config.model import UserConfig
from proxy.cluster import Cluster, ClusterServer
from proxy.errors import ProxyError, ServerError, ServerLostError
from proxy.protocol import codec, sqlstate
from proxy.protocol.codec import ProtocolError
from proxy.server import (
    EXPECT_CLOSE,
    EXPECT_CLOSE_AS_PARSE,
    EXPECT_PARSE,
    EXPECT_PARSE_DROP,
    NOOP_CLOSE,
    ServerConnection,
)
from proxy.session_state import (
    Effect,
    ServerState,
    SessionState,
    quote_literal,
    server_state_after,
    sync_sql,
)
from routing.errors import RoutingError
from routing.route import Role, Route
from routing.router import TransactionRouting, TransactionState

if TYPE_CHECKING:
    from proxy.app import Runtime
    from proxy.pool import Pool

log = logging.getLogger("shardgate.client")

STARTUP, AUTH, LOGIN, READY, CLOSED = "startup", "auth", "login", "ready", "closed"
_SESSION, _TRANSACTION, _STATEMENT = "session", "transaction", "statement"
_MODES = {_SESSION: _SESSION, _TRANSACTION: _TRANSACTION, _STATEMENT: _STATEMENT}

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
_KINDS_SESSION = _kinds_table({b"QSF": _K_SYNC, b"PBDCEH": _K_UNSYNCED, b"dcf": _K_PASS})
_KINDS_SESSION_JWT = _kinds_table({b"SF": _K_SYNC, b"Q": _K_QUERY, b"BDCEH": _K_UNSYNCED, b"dcf": _K_PASS,
                                   b"P": _K_PARSE})
_KINDS_POOLED = _kinds_table({b"SF": _K_SYNC, b"Q": _K_QUERY, b"EH": _K_UNSYNCED, b"dcf": _K_PASS,
                              b"B": _K_BIND, b"D": _K_DESCRIBE, b"P": _K_PARSE, b"C": _K_CLOSE})
_MALFORMED = 'invalid frontend message format: "%s" message body does not hold its names'
_HIGH_WATER_BYTES = 1 << 20
_STARTUP_ONLY = frozenset(("user", "database", "options", "replication"))


def statement_global_name(query_text: bytes, param_types: bytes, settings_key: bytes) -> str:
    """Proxy-wide name of a prepared statement: the same text, parsed under the same settings (DateStyle,
    search_path... change what a text means), prepares once per server."""
    digest = hashlib.blake2b(query_text + b"\x00" + param_types + b"\x00" + settings_key, digest_size=10)
    return "sg_" + digest.hexdigest()


class ClientSession(asyncio.Protocol):
    """Startup -> auth -> ready; in `ready` each message is relayed to the server the pool lent us."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.transport: asyncio.Transport | None = None
        self.phase = STARTUP
        self.inbuf = bytearray()
        self.peer = ""
        self.user: UserConfig | None = None
        self.identity: Identity | None = None
        self.database = ""
        self.pool: Pool | None = None
        self.pool_mode = _TRANSACTION
        self.server: ServerConnection | None = None
        self.state = SessionState({}, {}, {})
        self._snapshot: ServerState | None = None
        self._settings_key = b""
        self.statements: dict[str, tuple[str, bytes]] = {}
        self.waiting = b""
        self.acquiring = False
        self.pinned = False
        self.parked = False  # `server` stays linked between transactions (see Pool)
        # the client's server while the client is in the steady state (see `_lane`); else None
        self.lane: ServerConnection | None = None
        self.lane_ok = False  # transaction mode with no read/write routing (set at login)
        # the last extended batch with one Bind taken by `_lane_batch`: the bytes before and after the Bind,
        # its Syncs, and for a Bind of a named statement how it is renamed (see `_NamedBind`)
        self.lane_shape: tuple[bytes, bytes, int, _NamedBind | None] | None = None
        self.lane_send = b""  # a batch `_lane_batch` renamed, to send instead of the client's
        self.unsynced = False
        self.pending_effects: list[Effect] = []
        self.unanswered: list[bytes | memoryview] = []
        self.retry_safe = False
        self.txn_effects: list[Effect] = []
        self.cancel_key: tuple[int, int] | None = None
        self.reading_paused = False
        self.jwt_guard = False
        self.refusals = False  # some Query texts are answered with an error (statement mode, JWT sessions)
        self.kinds = _KINDS_POOLED  # per message type: what the relay looks at (set with the pool mode)
        self.cluster: Cluster | None = None
        self.routing: TransactionRouting | None = None
        self.route_role = Role.PRIMARY
        self.route_wrote = False
        self.deferred_begin = b""
        self.discarding = False
        self.local_failed = False
        self.sticky: ClusterServer | None = None
        self.last_write_at = 0.0
        self.statement_roles: dict[str, Role] = {}
        self.max_message_bytes = runtime.config.general.max_message_bytes
        self.effects_of = runtime.effects.effects
        self.parsed_effects_of = runtime.effects.parsed_effects
        self._auth_method = ""
        self._scram: ScramServer | None = None
        self._md5_salt = b""
        self._scram_started = False
        self._preamble_done: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.rt.clients.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            lane = self.lane
            if lane is not None:
                self.lane = None
                if self._lane(lane, data):
                    return
            if self.phase is READY:
                if self.inbuf or self.acquiring:
                    self._ready_data(data)
                else:
                    consumed = self._relay(data)
                    if consumed < len(data):
                        self._keep(data, consumed)
            elif self.phase is not CLOSED:
                self.inbuf += data
                self._startup_data()
        except Exception as exc:
            self._fault(exc)

    def _fault(self, exc: Exception) -> None:
        """What the client sent could not be handled: FATAL with the error's SQLSTATE, this client only."""
        if isinstance(exc, ProtocolError | AuthError | ProxyError):
            self.fatal(exc.sqlstate, exc.message)
            return
        log.error("event=client_internal_error peer=%s", self.peer, exc_info=exc)
        self.fatal(sqlstate.INTERNAL_ERROR, "internal error in proxy")

    def _start_task(self, coroutine: Coroutine[object, object, None]) -> None:
        """Run a slow path (a login needing a server, a checkout) as this client's task; an error escaping
        it (a malformed message among those that waited for it, say) closes the client as in
        `data_received` instead of being lost with the task and leaving the client hanging."""
        task = self._task = asyncio.get_running_loop().create_task(coroutine)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            exc = task.exception()
            if isinstance(exc, Exception):
                self._fault(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.lane = None
        self.rt.clients.discard(self)
        if self.cancel_key is not None:
            self.rt.cancel_keys.pop(self.cancel_key, None)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._release(closing=True)

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def fatal(self, code: str, text: str) -> None:
        """Send a FATAL error and close this client only."""
        if self.phase is CLOSED or self.transport is None:
            return
        self.write(codec.error_response(code, text, "FATAL"))
        self.phase = CLOSED
        self.lane = None
        self.transport.close()

    # ------------------------------------------------------------ startup and authentication

    def _startup_data(self) -> None:
        if self.phase is STARTUP:
            packet = codec.read_startup_packet(self.inbuf)
            while packet is not None and self.phase is STARTUP:
                self._startup_packet(packet)
                packet = codec.read_startup_packet(self.inbuf) if self.phase is STARTUP else None
        if self.phase is AUTH:
            self._auth_data()

    def _startup_packet(self, packet: codec.StartupPacket) -> None:
        assert self.transport is not None
        if isinstance(packet, codec.SSLRequest | codec.GSSENCRequest):
            if self.inbuf:
                raise ProtocolError("unexpected data after SSL/GSS encryption request")
            self.transport.write(codec.SSL_REFUSED)
            return
        if isinstance(packet, codec.CancelRequest):
            self.phase = CLOSED
            self.rt.forward_cancel(packet.process_id, packet.secret_key)
            self.transport.close()
            return
        params = packet.parameters
        # Protocol 3.x with x > 0, or `_pq_.` protocol options: answered as PostgreSQL 15 does, with the
        # version served (3.0) and the options it does not know, then on with 3.0.
        protocol_options = [name for name in params if name.startswith("_pq_.")]
        if packet.protocol & 0xFFFF or protocol_options:
            self.transport.write(codec.negotiate_protocol_version(0, protocol_options))
            params = {name: value for name, value in params.items() if not name.startswith("_pq_.")}
        user_name = params.get("user", "")
        if not user_name:
            raise ProtocolError("no PostgreSQL user name specified in startup packet", sqlstate.INVALID_AUTHORIZATION)
        if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
            raise ProtocolError("replication connections are not supported by shardgate", sqlstate.FEATURE_NOT_SUPPORTED)
        if len(self.rt.clients) > self.rt.config.general.max_client_connections:
            raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        if self.rt.shutting_down:
            raise ProxyError(sqlstate.CANNOT_CONNECT_NOW, "the proxy is shutting down")
        self.database = params.get("database") or user_name
        settings = {k.lower(): v for k, v in params.items() if k.lower() not in _STARTUP_ONLY}
        settings.update(codec.parse_options(params.get("options", "")))
        self.state = SessionState.from_startup(settings)
        user = self.rt.config.user(user_name)
        if user is None:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, f'role "{user_name}" does not exist')
        self.user = user
        self.phase = AUTH
        self._begin_auth(user)

    def _begin_auth(self, user: UserConfig) -> None:
        method = user.auth
        self._auth_method = method
        if method == "trust":
            self._authenticated(Identity(user.name, self.database))
        elif method in ("plain", "jwt"):
            self.write(codec.AUTH_CLEARTEXT)
        elif method == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self.write(codec.auth_md5(self._md5_salt))
        else:
            self._scram = ScramServer(self.rt.verifier_for(user))
            self.write(codec.auth_sasl(["SCRAM-SHA-256"]))

    def _auth_data(self) -> None:
        buffer = self.inbuf
        while self.phase is AUTH and len(buffer) >= 5:
            type_code = buffer[0]
            length = codec.unpack_u32(buffer, 1)[0]
            if type_code != ord("p") or length < 4 or length > 65536:
                raise ProtocolError("expected password response")
            if len(buffer) < length + 1:
                return
            body = bytes(buffer[5 : length + 1])
            del buffer[: length + 1]
            self._auth_message(body)

    def _auth_message(self, body: bytes) -> None:
        user = self.user
        assert user is not None
        method = self._auth_method
        failed = AuthError(sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user.name}"')
        if method == "md5":
            given = body.rstrip(b"\x00").decode("utf-8", "replace")
            if not self.rt.check_md5(user, given, self._md5_salt):
                raise failed
            self._authenticated(Identity(user.name, self.database))
        elif method == "plain":
            given = body.rstrip(b"\x00").decode("utf-8", "replace")
            if not self.rt.check_plain(user, given):
                raise failed
            self._authenticated(Identity(user.name, self.database))
        elif method == "jwt":
            token = body.rstrip(b"\x00").decode("utf-8", "replace")
            self._authenticated(self.rt.authenticate_jwt(user, self.database, token))
        else:
            scram = self._scram
            assert scram is not None
            if not self._scram_started:
                mechanism, offset = codec.read_cstring(body, 0)
                if len(body) < offset + 4:
                    raise ProtocolError("malformed SASL initial response")
                data_length = codec.unpack_i32(body, offset)[0]
                if data_length > len(body) - offset - 4:
                    raise ProtocolError("malformed SASL initial response: data longer than the message")
                data = body[offset + 4 : offset + 4 + data_length] if data_length >= 0 else b""
                self.write(codec.auth_sasl_continue(scram.handle_first(mechanism, data)))
                self._scram_started = True
            else:
                final = scram.handle_final(body)
                self.write(codec.auth_sasl_final(final))
                self._authenticated(Identity(user.name, self.database))

    def _authenticated(self, identity: Identity) -> None:
        self.identity = identity
        if identity.is_jwt:
            self.state.claims = self.rt.claims_sql(identity)
            self.jwt_guard = True
        self.phase = LOGIN
        try:
            pool = self._choose_login_pool()
        except ProxyError as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        if self.pool_mode is not _SESSION:
            params = self.rt.login_params.get(self._login_params_key(pool))
            if params is not None:  # the usual case: no server needed to log in
                self._finish_login(params, (secrets.randbits(31), secrets.randbits(31) - (1 << 30)))
                return
        self._start_task(self._login(pool))

    def _choose_login_pool(self) -> Pool:
        user = self.user
        assert user is not None
        cluster = self.rt.cluster_for(self.database)
        if cluster is None:
            raise ProxyError(sqlstate.INVALID_CATALOG_NAME, f'database "{self.database}" does not exist', fatal=True)
        self.cluster = cluster
        # the constants themselves, so the hot path can compare by identity
        self.pool_mode = _MODES[user.pool_mode or self.rt.config.general.pool_mode]
        self.refusals = self.pool_mode is _STATEMENT or self.jwt_guard
        if self.pool_mode is not _SESSION:
            self.kinds = _KINDS_POOLED
        else:
            self.kinds = _KINDS_SESSION_JWT if self.jwt_guard else _KINDS_SESSION
        if self.pool_mode is not _SESSION and self.rt.splits_reads(cluster):
            self.routing = TransactionRouting(self.rt.router, self.rt.config.general.read_write_split)
        self.lane_ok = self.pool_mode is _TRANSACTION and self.routing is None
        pool = self.pool = self._login_pool()
        return pool

    async def _login(self, pool: Pool) -> None:
        """Slow path of a login: a server is needed (session mode, or startup settings not seen before). A
        server lost while the client's startup settings are set on it is replaced once."""
        for attempt in range(2):
            try:
                if self.pool_mode is _SESSION:
                    server = await pool.checkout()
                    self._link(server)
                    await self._sync_state(server)
                    params = _parameter_block(server.params)
                    cancel_key = (server.process_id, server.secret_key)
                else:
                    params = await self._canonical_params(pool)
                    cancel_key = (secrets.randbits(31), secrets.randbits(31) - (1 << 30))
            except ServerLostError as exc:
                if attempt == 0 and self.phase is not CLOSED:
                    log.info("event=server_lost_at_login_retry peer=%s", self.peer)
                    continue
                self.fatal(exc.sqlstate, exc.message)
                return
            except ProxyError as exc:
                self.fatal(exc.sqlstate, exc.message)
                return
            except asyncio.CancelledError:
                return
            self._finish_login(params, cancel_key)
            return

    def _finish_login(self, params: bytes, cancel_key: tuple[int, int]) -> None:
        """AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery in one write."""
        self.cancel_key = cancel_key
        self.rt.cancel_keys[cancel_key] = self
        self.write(codec.AUTH_OK + params + codec.backend_key_data(*cancel_key) + codec.ready_for_query(b"I"))
        self.phase = READY
        self._snapshot = None
        if self.inbuf:
            pending = bytes(self.inbuf)
            self.inbuf.clear()
            self._ready_data(pending)

    def _login_pool(self) -> Pool:
        """The primary's pool; with no primary reachable, a readable server's (reads keep working)."""
        assert self.cluster is not None and self.user is not None
        try:
            target = self.cluster.primary()
        except ProxyError:
            if self.pool_mode is _SESSION:
                raise
            target = self.cluster.pick_read()
        return self.rt.pool_for_server(self.user, target.config)

    def _login_params_key(self, pool: Pool) -> tuple[str, tuple[tuple[str, str], ...]]:
        return pool.name, tuple(sorted(self.state.settings.items()))

    async def _canonical_params(self, pool: Pool) -> bytes:
        """ParameterStatus messages as the server reports them for this client's startup settings
        (called when the login cache has none for them)."""
        server = await pool.checkout()
        self._link(server)
        try:
            await self._sync_state(server)
            params = _parameter_block(server.params)
        finally:
            self._unlink_and_release()
        if len(self.rt.login_params) < 10_000:
            self.rt.login_params[self._login_params_key(pool)] = params
        return params

    # ------------------------------------------------------------ server attachment

    def snapshot(self) -> ServerState:
        snap = self._snapshot
        if snap is None:
            snap = self._snapshot = self.state.snapshot()
            self._settings_key = repr(snap[0]).encode()
        return snap

    def settings_key(self) -> bytes:
        self.snapshot()
        return self._settings_key

    def _link(self, server: ServerConnection) -> None:
        server.client = self
        server.relayed = False
        server.saw_error = False  # an error it sent while idle (say, 57P01 before it closed) is not ours
        self.server = server
        self.unanswered = []
        self.retry_safe = server.txn_status == b"I" and self.pool_mode != _SESSION
        if self.reading_paused:
            self.resume_reading()

    async def _sync_state(self, server: ServerConnection, then: str = "") -> None:
        """Replay this client's session state on `server` if it differs, plus `then` (a held-back BEGIN),
        in one swallowed round trip."""
        wanted = self.snapshot()
        if server.session_state == wanted and not then:
            return
        sql = ";".join(part for part in (sync_sql(wanted, server.session_state), then) if part)
        self._preamble_done = asyncio.get_running_loop().create_future()
        server.run_preamble(sql)
        try:
            await self._preamble_done
        finally:
            self._preamble_done = None
        if server.swallow_error is not None:
            fields = codec.parse_error_fields(server.swallow_error[5:])
            server.broken = True
            raise ProxyError(fields.get("C", sqlstate.INTERNAL_ERROR),
                             fields.get("M", "could not restore session state"), fatal=True)
        server.session_state = wanted
        server.relayed = False

    def on_preamble_done(self, server: ServerConnection) -> None:
        done = self._preamble_done
        if done is not None and not done.done():
            done.set_result(None)

    async def _acquire(self) -> None:
        """Slow path: wait for a server, restore session state, then relay what the client sent meanwhile. A
        server lost while the session is restored on it is replaced once (nothing of the client's was sent)."""
        then: str | None = None  # the held-back BEGIN, taken once for both attempts
        for attempt in range(2):
            try:
                server = self.server or await self._checkout_routed()
            except asyncio.CancelledError:
                return
            except ProxyError as exc:  # pool timeout, server unreachable or refusing, no primary: nothing sent
                if then:
                    self.deferred_begin = then.encode()  # answered as part of the transaction it opened
                self.acquiring = False
                self._reject_waiting(exc)
                return
            if self.phase is CLOSED:
                server.pool.checkin(server)
                return
            if then is None:
                then = self._take_deferred_begin()
            try:
                self._link(server)
                await self._sync_state(server, then)
            except asyncio.CancelledError:
                return
            except ProxyError as exc:  # the session state could not be restored: its server is unusable for it
                if isinstance(exc, ServerLostError) and attempt == 0 and self.phase is not CLOSED:
                    log.info("event=server_lost_at_restore_retry peer=%s", self.peer)
                    continue
                self.acquiring = False
                self.fatal(exc.sqlstate, exc.message)
                self._release(closing=True)
                return
            break
        self.acquiring = False
        data, self.waiting = self.waiting, b""
        if data:
            self._ready_data(data)

    async def _checkout_routed(self) -> ServerConnection:
        """Check out for the current route; a replica that cannot be reached is banned and another tried."""
        if self.routing is None:
            assert self.pool is not None
            return await self.pool.checkout()
        assert self.cluster is not None and self.pool is not None
        pool = self.pool
        for _ in range(len(self.cluster.servers)):
            try:
                return await pool.checkout()
            except ServerError as exc:
                if self.route_role is not Role.REPLICA:
                    raise
                failed = self.cluster.server_at(pool.address)
                if failed is None or failed.role == "primary":
                    raise
                self.cluster.ban(failed, f"connect failed: {exc.message}")
                if self.sticky is failed:
                    self.sticky = None
                pool = self.pool = self._pool_for_route()
        return await pool.checkout()

    # ------------------------------------------------------------ read/write routing

    def _route_start(self, data: bytes, pos: int, size: int) -> bool:
        """A transaction starts: route every statement of the batch; True when the proxy answered it."""
        routing = self.routing
        assert routing is not None
        routes: list[Route] = []
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
                    self.write(codec.error_response(exc.sqlstate, str(exc)) + codec.ready_for_query(status))
                    return True
                if first and self.deferred_begin and route.ends_transaction and end == size:
                    # BEGIN; COMMIT with nothing between: no server needed
                    self.deferred_begin = b""
                    routing.on_transaction_end()
                    head = data[pos + 5 : pos + 25].lstrip()[:8].lower()
                    tag = "ROLLBACK" if head.startswith((b"rollback", b"abort")) else "COMMIT"
                    self.write(codec.command_complete(tag) + codec.ready_for_query(b"I"))
                    return True
                if first and route.local and data[pos + 5 : pos + 25].lstrip()[:4].lower() == b"show":
                    self._show_session_role(route)
                    return True
                if first and route.role_pending and end == size:
                    # a lone BEGIN: the next statement decides where the transaction runs
                    self.deferred_begin = data[pos + 5 : end - 1]
                    self.write(codec.command_complete("BEGIN") + codec.ready_for_query(b"T"))
                    return True
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
                    route = routing.on_statement(query.decode("utf-8", "replace"))
                except RoutingError:
                    route = Route(Role.ANY, write=False, reason="invalid session role")
                if first and route.role_pending and not name:
                    reply = _extended_begin_reply(data, end, size)
                    if reply is not None:
                        self.deferred_begin = query
                        self.write(reply)
                        return True
                if name:
                    self.statement_roles[name.decode("utf-8", "replace")] = route.role
                routes.append(route)
            elif type_code == _B:
                try:
                    _, statement, _ = codec.split_bind(data[pos + 5 : end])
                except ValueError:  # not terminated: the relay refuses it
                    statement = b""
                if statement:
                    known = self.statement_roles.get(statement.decode("utf-8", "replace"), Role.PRIMARY)
                    routes.append(Route(known, write=known is Role.PRIMARY, reason="prepared statement"))
            first = False
            pos = end
        role = Role.PRIMARY
        if self.deferred_begin:
            # a held-back BEGIN runs on a replica only if the transaction was declared read only
            if routing.state is TransactionState.REPLICA:
                role = Role.REPLICA
        elif routes and all(r.role is not Role.PRIMARY for r in routes) and any(
                r.role is Role.REPLICA for r in routes):
            role = Role.REPLICA
        self.route_role = role
        self.route_wrote = role is Role.PRIMARY and (bool(self.deferred_begin) or any(
            r.write or r.begins_transaction for r in routes))
        return False

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
                self.write(codec.error_response(
                    "25P02", "current transaction is aborted, commands ignored until end of transaction block")
                    + codec.ready_for_query(b"E"))
        elif type_code == _S:
            self.write(codec.ready_for_query(b"E"))
        else:
            self.discarding = True
            self.write(codec.error_response(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"))

    def _show_session_role(self, route: Route) -> None:
        """SHOW shardgate.role (simple protocol): the session routing hint lives in the proxy. SET and RESET
        of it also reach PostgreSQL, as a custom setting, so the extended protocol sees the same value."""
        value = "auto" if route.hint in (None, Role.ANY) else str(route.hint)
        row_description = codec.message(b"T", b"\x00\x01" + codec.cstr("shardgate.role") + _TEXT_COLUMN)
        data_row = codec.message(b"D", b"\x00\x01" + len(value).to_bytes(4, "big") + value.encode())
        self.write(row_description + data_row + codec.command_complete("SHOW") + codec.ready_for_query(b"I"))

    def _pool_for_route(self) -> Pool:
        cluster, user = self.cluster, self.user
        assert cluster is not None and user is not None
        if self.route_role is Role.REPLICA:
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
        return self.rt.pool_for_server(user, target.config)

    def _active_on(self, target: ClusterServer) -> int:
        assert self.user is not None
        return self.rt.pool_for_server(self.user, target.config).busy

    def _transaction_ended(self) -> None:
        assert self.routing is not None
        self.routing.on_transaction_end()
        if self.route_wrote:
            self.last_write_at = time.monotonic()
            self.route_wrote = False

    def _take_deferred_begin(self) -> str:
        begin, self.deferred_begin = self.deferred_begin, b""
        return begin.decode("utf-8", "replace")

    def _reject_waiting(self, exc: ProxyError) -> None:
        """No server for what the client sent: answer it as PostgreSQL answers an error, the session stays usable.

        Each Query gets the error and ReadyForQuery; an extended-protocol group gets the error once and its
        ReadyForQuery at its Sync (a group still missing its Sync is discarded up to it, as the server would).
        """
        data, self.waiting = self.waiting, b""
        if self.routing is not None:
            self.routing.on_transaction_end()
        status = b"E" if self.deferred_begin else b"I"
        self.local_failed = bool(self.deferred_begin)
        self.deferred_begin = b""
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

    def _unlink_and_release(self, *, closing: bool = False) -> None:
        server = self.server
        if server is None:
            return
        self.server = None
        self.parked = False
        self.lane = None
        server.client = None
        if self.unsynced:
            # extended-protocol messages with no Sync after them: the server may hold their results for the
            # next Sync, or be skipping everything up to one after an error. Nobody else gets it.
            server.broken = True
        server.pool.checkin(server, reset=self.pool_mode == _SESSION or (closing and self.pinned))

    def _release(self, *, closing: bool = False) -> None:
        if self.server is not None:
            self._unlink_and_release(closing=closing)

    # ------------------------------------------------------------ relay: client -> server

    def _ready_data(self, data: bytes) -> None:
        if self.inbuf:
            self.inbuf += data
            data = bytes(self.inbuf)
            self.inbuf.clear()
        if self.acquiring:
            self.waiting += data
            if len(self.waiting) > _HIGH_WATER_BYTES:
                self.pause_reading()
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
            if not attached:
                if server is None and (self.discarding or self.local_failed):
                    self._answer_without_server(type_code, data, pos, end)
                    pos = run = end
                    continue
                if self.routing is not None and self._route_start(data, pos, size):
                    pos = run = end  # answered by the proxy itself
                    continue
                try:
                    linked = self._attach_now()
                except ProxyError as exc:
                    self.waiting += data[pos:]
                    self._reject_waiting(exc)
                    return size
                if linked is None:
                    self.waiting += data[pos:]
                    return size
                server = linked
                attached = True
                sent_from = pos
            if kind <= _K_QUERY:  # Sync, FunctionCall or Query: answered with a ReadyForQuery
                server.outstanding += 1
                self.unsynced = False
                if kind == _K_QUERY:
                    sql = data[pos + 5 : end - 1]
                    refusal = self._refusal(sql) if self.refusals else None
                    if refusal is not None:
                        # the server raises the error itself: it aborts an open transaction as PostgreSQL
                        # would, and its reply keeps its place among pipelined responses
                        if out is None:
                            out = []
                        if run < pos:
                            out.append(memoryview(data)[run:pos])
                        out.append(_raising_query(*refusal))
                        pos = run = end
                        continue
                    if self.pool_mode is not _SESSION:
                        effects = self.effects_of(sql)
                        if effects:
                            self._note_effects(effects)
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
                elif kind == _K_DESCRIBE:
                    named = data[pos + 6]
                elif kind == _K_PARSE:
                    named = data[pos + 5] and self.pool_mode is not _SESSION
                    if not named:  # goes as it is, but its text is still read
                        try:
                            _, query, _ = codec.split_parse(data[pos + 5 : end])
                        except ValueError:
                            raise ProtocolError(_MALFORMED % "P") from None
                        self._parse_text(query)
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
            if self.effects_of(sql) or (self.refusals and self._refusal(sql) is not None):
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
        if size > self.max_message_bytes:
            return 0
        shape = self.lane_shape
        if shape is not None and data.startswith(shape[0]) and data.endswith(shape[1]):
            head, tail, shape_syncs, named = shape
            bind = len(head)
            bind_end = size - len(tail)
            if (bind_end - bind >= 7 and data[bind] == _B
                    and codec.unpack_u32(data, bind + 1)[0] == bind_end - bind - 1):
                if named is None:
                    if not data[bind + 5] and not data[bind + 6]:
                        return shape_syncs
                elif data.startswith(named.client_prefix, bind + 5) and named.usable(self, server):
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
                    named = _NamedBind.of(self, server, data, pos, end)
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
                if self.parsed_effects_of(query) or self._forges_claims(query):
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

    def _attach_now(self) -> ServerConnection | None:
        """Fast path: the server parked with us, or an idle one, whose session already matches; else
        start the slow path."""
        if self.routing is not None:
            self.pool = self._pool_for_route()
        pool = self.pool
        assert pool is not None
        server = self.server
        if server is not None:  # parked with this client since its last transaction
            self.parked = False
            if server.pool is pool and pool.unpark(server):
                if server.session_state is self._snapshot and not self.deferred_begin:
                    # nothing to restore: only the bookkeeping of a new transaction (see `_link`)
                    server.relayed = server.saw_error = False
                    self.unanswered = []
                    self.retry_safe = True
                    return server
            else:
                self.server = None
                if server.pool is not pool:
                    server.pool.checkin(server)
                server = pool.try_checkout()
        else:
            server = pool.try_checkout()
        if server is not None:
            self._link(server)
            state = server.session_state
            wanted = self._snapshot or self.snapshot()
            if state is not wanted and state == wanted:
                server.session_state = state = wanted  # the same object: compared by identity next time
            if state is wanted and not self.deferred_begin:
                return server
        self.acquiring = True
        self._start_task(self._acquire())
        return None

    def _pooled_extended(self, server: ServerConnection, type_code: int, data: bytes, pos: int,
                         end: int) -> bytes | None:
        """Rename named prepared statements to proxy-global names; None keeps the message as it is."""
        body_start = pos + 5
        if type_code == _P:
            raw_name, query_text, param_types = codec.split_parse(data[body_start:end])
            if not raw_name:
                return None  # unnamed: its ParseComplete needs no matching (they are all alike)
            self._parse_text(query_text)
            name = raw_name.decode()
            global_name = statement_global_name(query_text, param_types, self.settings_key())
            parse_message = codec.build_parse(global_name, query_text, param_types)
            self.statements[name] = (global_name, parse_message)
            if self.routing is not None and name not in self.statement_roles:
                text = query_text.decode("utf-8", "replace")
                self.statement_roles[name] = self.rt.router.route_statement(text).role
            if global_name in server.prepared:
                server.expect_rewrite(EXPECT_CLOSE_AS_PARSE)
                return NOOP_CLOSE
            server.prepared.add(global_name)
            server.expect_rewrite(EXPECT_PARSE, global_name)
            return parse_message
        if type_code == _B:
            portal, statement, rest = codec.split_bind(data[body_start:end])
            if not statement:
                return None
            return self._with_statement(server, statement.decode(),
                                        lambda g: codec.build_bind(portal, g.encode(), rest))
        if type_code in (_D, _C):
            if data[end - 1] != 0:
                raise ProtocolError(_MALFORMED % chr(type_code))
            kind = data[body_start]
            name = data[body_start + 1 : end - 1].decode()
            if kind != ord("S") or not name:
                if type_code == _C:
                    server.expect_rewrite(EXPECT_CLOSE)
                return None
            if type_code == _C:
                self.statements.pop(name, None)
                server.expect_rewrite(EXPECT_CLOSE)
                return NOOP_CLOSE
            return self._with_statement(server, name,
                                        lambda g: codec.message(b"D", b"S" + g.encode() + b"\x00"))
        return None

    def _with_statement(self, server: ServerConnection, name: str, build: object) -> bytes | None:
        known = self.statements.get(name)
        if known is None:
            return None
        global_name, parse_message = known
        message = build(global_name)  # type: ignore[operator]
        if global_name in server.prepared:
            return message  # type: ignore[no-any-return]
        server.prepared.add(global_name)
        server.expect_rewrite(EXPECT_PARSE_DROP, global_name)
        return parse_message + message  # type: ignore[no-any-return]

    def _refusal(self, sql: bytes) -> tuple[str, str, str] | None:
        """Statements the proxy answers with an error instead of forwarding: (sqlstate, message, hint)."""
        if self.pool_mode is _STATEMENT and _opens_transaction(sql):
            return (sqlstate.FEATURE_NOT_SUPPORTED, "transaction blocks are not allowed in statement pool mode",
                    'run each statement on its own, or use pool_mode = "transaction"')
        if self._forges_claims(sql):
            return (sqlstate.INSUFFICIENT_PRIVILEGE, "a JWT session cannot change its claims or role",
                    "request.jwt.* settings and the role come from the token")
        return None

    def _forges_claims(self, sql: bytes) -> bool:
        """A JWT session's statement text that could change its claims or role."""
        return self.jwt_guard and is_forgery_attempt(sql.decode("utf-8", "replace"))

    def _parse_text(self, query: bytes) -> None:
        """A Parse's statement text: refused when a JWT session forges its claims; when pooled, a SET or
        set_config in it is tracked like a Query's."""
        if self._forges_claims(query):
            raise ProxyError(sqlstate.INSUFFICIENT_PRIVILEGE, "a JWT session cannot change its claims or role")
        if self.pool_mode is not _SESSION:
            effects = self.parsed_effects_of(query)
            if effects:
                self._note_effects(effects)

    def _note_effects(self, effects: tuple[Effect, ...]) -> None:
        if any(e.kind == "pin" for e in effects):
            self.pinned = True
        self.pending_effects.extend(effects)
        if self.server is not None:
            self.server.track_tags(True)

    def _terminate(self) -> None:
        self.phase = CLOSED
        self._release(closing=True)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ relay: server -> client events

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        """A ReadyForQuery was relayed: settle session-state changes, maybe give the server back."""
        if server.outstanding or self.unsynced or server is not self.server:
            return
        if self.pending_effects or self.txn_effects:
            self._settle_effects(server, status)
        mode = self.pool_mode
        if mode is _SESSION or self.pinned or self.acquiring:
            return
        if status != b"I":
            if mode is _STATEMENT:
                self.write(codec.error_response(
                    sqlstate.FEATURE_NOT_SUPPORTED,
                    "transaction blocks are not allowed in statement pool mode", "FATAL"))
                self._terminate()
            elif self.lane_ok and not self.inbuf:  # inside a transaction: the server stays linked
                self.lane = server
            return
        if self.routing is not None:
            self._transaction_ended()
        if server.pool.park(server):
            self.parked = True
            if self.lane_ok and server.session_state is self._snapshot and not self.inbuf:
                self.lane = server
            return
        self.server = None
        server.pool.checkin(server)

    def on_server_taken(self, server: ServerConnection) -> None:
        """The pool gave our parked server to another client (or back to the idle list)."""
        if server is self.server:
            self.server = None
            self.parked = False
            self.lane = None

    def _settle_effects(self, server: ServerConnection, status: bytes) -> None:
        """Effects take hold once their transaction commits; an error or ROLLBACK drops them."""
        pending, self.pending_effects = self.pending_effects, []
        if server.saw_error:
            if status == b"I":
                self.txn_effects = []
            elif status == b"E":
                return
        elif status != b"I":
            self.txn_effects.extend(pending)
            return
        rolled_back = server.last_tag_rollback or server.saw_error
        effects = self.txn_effects + pending
        self.txn_effects = []
        server.last_tag_rollback = False
        server.track_tags(False)
        if rolled_back:
            return
        if self.state.apply(effects):
            self.pinned = True
        self._snapshot = None
        server.session_state = server_state_after(server.session_state, effects)
        if any(e.kind == "discard_all" or (e.kind == "deallocate" and not e.name) for e in effects):
            server.prepared.clear()
            self.statements.clear()

    def on_server_lost(self, server: ServerConnection) -> None:
        """The server died under us. If it never answered this transaction, replay it on another one."""
        if server is not self.server:
            return
        self.server = None
        self.lane = None
        done = self._preamble_done
        if done is not None and not done.done():  # restoring the session on it: nothing of the client's sent
            done.set_exception(ServerLostError(sqlstate.CONNECTION_FAILURE,
                                               "server connection lost while setting up the session"))
            return  # the login or `_acquire` awaiting it replaces the server
        if self.phase is not READY:
            return
        retry = self.retry_safe and not server.relayed and not self.acquiring
        replay = b"".join(bytes(chunk) for chunk in self.unanswered) if retry else b""
        if replay and self._only_reads(replay):
            log.info("event=server_lost_retry peer=%s server=%s:%s", self.peer, *server.address)
            self.unanswered = []
            self.pending_effects = []
            self.waiting = replay + self.waiting
            self.acquiring = True
            self._start_task(self._acquire())
            return
        self.fatal(sqlstate.CONNECTION_FAILURE, "server connection lost")

    def _only_reads(self, data: bytes) -> bool:
        """Whether `data`, what a lost server left unanswered, only reads. The server may have run it, and
        committed it, before it died: only a read may run again elsewhere without the client seeing it twice."""
        route = self.rt.router.route_statement
        pos = 0
        try:
            while len(data) - pos >= 5:
                type_code = data[pos]
                end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
                if type_code == _Q:
                    text = data[pos + 5 : end - 1]
                elif type_code == _P:
                    text = codec.split_parse(data[pos + 5 : end])[1]
                elif type_code == _B:
                    statement = codec.split_bind(data[pos + 5 : end])[1]
                    known = self.statements.get(statement.decode()) if statement else None
                    text = codec.split_parse(known[1][5:])[1] if known is not None else b""
                elif type_code == _F:
                    return False  # a function called by OID: no text to judge
                else:
                    text = b""
                if text and route(text.decode("utf-8", "replace")).write:
                    return False
                pos = end
        except (ValueError, RoutingError):  # not framed, named or routed as expected: not known to read
            return False
        return True

    def cancel_running(self) -> None:
        """A CancelRequest named this client: pass it to the server running its query, if any."""
        server = self.server
        if server is None or (server.outstanding == 0 and not self.unsynced):
            return
        self.rt.send_cancel(server.address, server.process_id, server.secret_key)


class _NamedBind:
    """How the lane renames a Bind of the client's named statement to the proxy-global name its server has
    it under: the Bind's body starts with `client_prefix` (unnamed portal, client's name) and is sent
    starting with `server_prefix` instead."""

    __slots__ = ("client_prefix", "known", "name", "server_prefix")

    def __init__(self, name: str, known: tuple[str, bytes], client_prefix: bytes) -> None:
        self.name = name
        self.known = known  # the client's `statements` entry the renaming was made from
        self.client_prefix = client_prefix
        self.server_prefix = b"\x00" + known[0].encode() + b"\x00"

    @classmethod
    def of(cls, client: ClientSession, server: ServerConnection, data: bytes, pos: int,
           end: int) -> _NamedBind | None:
        """The renaming of the Bind at `pos` (unnamed portal, named statement), or None when the statement
        is unknown, not prepared on `server`, or its name malformed (all left to the general path)."""
        name_end = data.find(b"\x00", pos + 6, end)
        if name_end == -1:
            return None
        try:
            name = data[pos + 6 : name_end].decode()
        except UnicodeDecodeError:
            return None
        known = client.statements.get(name)
        if known is None or known[0] not in server.prepared:
            return None
        return cls(name, known, data[pos + 5 : name_end + 1])

    def usable(self, client: ClientSession, server: ServerConnection) -> bool:
        """Still the client's statement of that name (not closed and parsed again), prepared on `server`."""
        return client.statements.get(self.name) is self.known and self.known[0] in server.prepared

    def renamed(self, data: bytes, bind: int, bind_end: int) -> bytes:
        """`data` with its Bind at `bind` naming the server's statement."""
        body_start = bind + 5 + len(self.client_prefix)
        length = 4 + len(self.server_prefix) + bind_end - body_start
        return b"".join((data[:bind], b"B", codec.pack_u32(length), self.server_prefix,
                         memoryview(data)[body_start:bind_end], data[bind_end:]))


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


_NO_PARAMETERS = codec.message(b"t", b"\x00\x00")
# RowDescription field: no table, text (oid 25), variable length, no modifier, text format
_TEXT_COLUMN = b"\x00\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x19" + b"\xff\xff" + b"\xff\xff\xff\xff" + b"\x00\x00"


def _parameter_block(params: dict[str, str]) -> bytes:
    return b"".join(codec.parameter_status(name, value) for name, value in params.items())


def _raising_query(code: str, message: str, hint: str) -> bytes:
    """A Query that makes the server raise `message` with SQLSTATE `code`."""
    return codec.query(
        f"DO $shardgate$BEGIN RAISE EXCEPTION USING ERRCODE = {quote_literal(code)}, "
        f"MESSAGE = {quote_literal(message)}, HINT = {quote_literal(hint)}; END$shardgate$"
    )


def _framing_problem(type_code: int, length: int, limit: int) -> str:
    if _KINDS_POOLED[type_code] is None:
        return f"invalid frontend message type {type_code}"
    if length < 4:
        return "invalid message length"
    return f"invalid message length: {length} bytes exceeds max_message_bytes ({limit})"


def _opens_transaction(sql: bytes) -> bool:
    head = sql.lstrip()[:17].lower()
    return head.startswith(b"begin") or head.startswith(b"start transaction")
