"""One client connection: its phases (startup, auth, login, ready), its link set of servers, server events."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Coroutine
from enum import Enum

from auth.errors import AuthError
from auth.identity import Identity
from config.model import UserConfig
from proxy.cluster import WAITABLE_SQLSTATES, Cluster
from proxy.console import CONSOLE_DATABASES, Console, may_enter, may_enter_as, refusal
from proxy.errors import ProxyError, ServerError, ServerLostError
from proxy.executor import FanoutExecutor
from proxy.fanout import FanoutRelay
from proxy.guard import Guard, raising_query
from proxy.handshake import Handshake, HandshakeState
from proxy.limits import IDLE, IDLE_IN_TRANSACTION, LOGGING_IN, OTHER, RUNNING
from proxy.listening import LISTENING_KINDS, MAX_PENDING_NOTIFICATION_BYTES, Listening
from proxy.login import SessionSetup, login_pool, parameter_block, setup_session
from proxy.notify import NotifyHub
from proxy.pool import Pool
from proxy.protocol import codec, sqlstate
from proxy.protocol.codec import ProtocolError
from proxy.relay import KINDS_POOLED, SESSION, STATEMENT, TRANSACTION
from proxy.retry import only_reads
from proxy.runtime import Runtime, SessionInfo
from proxy.scatter import FanoutPlan, Scatter
from proxy.server import ServerConnection
from proxy.session_state import Effect, ServerState, SessionState
from proxy.splitter import ReadWriteSplit
from proxy.statements import PreparedStatements
from proxy.tls import ClientTlsContext, client_session_of, start_client_tls
from routing.route import Role

log = logging.getLogger("shardgate.client")

# ParameterStatus values that follow the role (SET ROLE, a JWT's role, SET SESSION AUTHORIZATION): the server
# reports a change while the proxy replays a session on it, unseen by the client, so the client is told then.
_ROLE_PARAMETERS = ("is_superuser", "session_authorization")
_ROLE_PARAMETER_NAMES = frozenset(name.encode() for name in _ROLE_PARAMETERS)
_NOT_TRANSACTIONAL = ("prepare", "deallocate", "discard_all")  # effects a ROLLBACK does not undo
_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"



_PRIMARY, _REPLICA, _SHARD = "primary", "replica", "shard"  # proxy.metrics.ROUTES

class Phase(Enum):
    STARTUP = "startup"  # startup packet and authentication (see Handshake)
    LOGIN = "login"  # authenticated; waiting for a server to log in with (session mode, new settings)
    READY = "ready"  # relaying
    CONSOLE = "console"  # logged in to the admin console (proxy/console.py answers)
    CLOSED = "closed"


STARTUP, LOGIN, READY, CLOSED = Phase.STARTUP, Phase.LOGIN, Phase.READY, Phase.CLOSED
CONSOLE = Phase.CONSOLE


class ClientSession(FanoutRelay):
    """A client from its first byte to its last. In `ready` each message is relayed (see Relay) to the
    session's home server, which the pool lends per transaction (or for the session); a statement for
    several shards goes through a fan-out executor instead, whose servers join the transaction's link set."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.traffic = runtime.traffic
        self.batch_at = 0.0  # when the client's last bytes came: a statement's duration runs from there
        self.transport = None
        self.phase = STARTUP
        self.handshake: Handshake | None = Handshake(runtime, self._handshake_write)
        self.inbuf = bytearray()
        self.peer = ""
        self.identity: Identity | None = None
        self.database = ""
        self.pool = None
        self.pool_mode = TRANSACTION
        self.server = None
        # the rest of the link set: servers on other shards in this transaction (or session), by shard
        self.links: dict[int, ServerConnection] = {}
        self.fanout: FanoutExecutor | None = None  # while a fan-out statement runs
        self.committing = False
        self.state = SessionState({}, {}, {})
        self._snapshot = None
        self._settings_key = b""
        self.statements = PreparedStatements()
        self.waiting = b""
        self.acquiring = False
        self.pinned = False
        self.parked = False
        self.lane = None
        self.lane_ok = False
        self.lane_routed = False
        self.lane_shape = None
        self.lane_send = b""
        self.unsynced = False
        self.pending_effects = []
        self.unanswered = []
        self.retry_safe = False
        self.txn_effects: list[Effect] = []
        self.cancel_key: tuple[int, int] | None = None
        self.reading_paused = False
        self.guard = Guard(jwt=False, statement_mode=False)
        self.refusals = False
        self.kinds = KINDS_POOLED
        self.cluster: Cluster | None = None
        self.user: UserConfig | None = None
        self.scatter: Scatter | None = None
        self.sharded = False
        self.split = None
        self.split_pending = False  # a reload gave the database replicas: split reads from the next transaction
        self._home_waiter: asyncio.Future[None] | None = None  # a fan-out waits for the home server's answers
        self._more_waiter: asyncio.Future[None] | None = None  # a fan-out waits for the rest of its batch
        # the unnamed statement was last prepared by a fan-out: on which shards, and its Parse
        self.unnamed_fanout: tuple[FanoutPlan, bytes] | None = None
        self.discarding = False
        self.local_failed = False
        self.max_message_bytes = runtime.config.general.max_message_bytes
        self.effects_of = runtime.effects.effects
        self.parsed_effects_of = runtime.effects.parsed_effects
        self._task: asyncio.Task[None] | None = None
        self.client_id = next(runtime.client_ids)
        self.connected_at = 0.0
        self.console: Console | None = None
        self.application_name = ""
        self.tls_starting = False
        self.progress = 0  # moves at each ReadyForQuery and proxy write: the timeout sweep's sign of life
        self.admitted: tuple[str, str] | None = None  # (user, database) counted against max_connections
        self.turn_pending = False  # max_new_connections_per_s: what it sends waits in inbuf for its turn
        self.reported: dict[str, str] = {}  # the role's ParameterStatus values as the client was last told
        self.listen_ok = False
        self.listen_statements: dict[str, tuple[Effect, ...]] = {}
        self.listen_unheld = False
        self.listening: Listening | None = None  # from its first LISTEN (pooled modes, see proxy/notify.py)
        self.primary_waiting = False  # what the client sent waits for a primary (primary_wait_timeout_ms)

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected_at = time.time()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.rt.clients.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            receive_buffer_bytes = self.rt.config.general.client_to_server_buffer_bytes
            if receive_buffer_bytes:
                # the client's half of client_to_server_buffer_bytes (see ServerConnection.connection_made)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self._pace_accept(peer[0] if isinstance(peer, tuple) else "")

    def _pace_accept(self, host: str) -> None:
        """max_new_connections_per_s: a connection over the pace waits for its turn (what it sends is kept,
        not handled, for at most ACCEPT_MAX_WAIT_S), or is refused with 53300 when its turn is further away."""
        if self.handshake is not None:
            self.handshake.peer_host = host
        try:
            delay = self.rt.limits.accept_delay()
        except ProxyError as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        if delay > 0:
            self.turn_pending = True
            asyncio.get_running_loop().call_later(delay, self._accept_turn)

    def _accept_turn(self) -> None:
        self.turn_pending = False
        if self.phase is not CLOSED and self.inbuf:
            try:
                self._startup_data()
            except Exception as exc:
                self._fault(exc)

    def data_received(self, data: bytes) -> None:
        self.traffic.client_bytes += len(data)
        self.batch_at = time.monotonic()
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
                if self.listening is not None and self.listening.pending:
                    self._flush_notifications()  # a transaction the proxy answered the end of
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
        """Run a slow path (a login needing a server, a checkout, a fan-out) as this client's task; an error
        escaping it (a malformed message among those that waited for it, say) closes the client as in
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
        if self.admitted is not None:
            self.rt.limits.release(*self.admitted)
            self.admitted = None
        if self.cancel_key is not None:
            self.rt.cancel_keys.pop(self.cancel_key, None)
        if self.committing:
            return  # the commit round finishes, then gives the servers back (FanoutRelay._commit_across)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.console is not None:
            self.console.close()
        if self.listening is not None:
            self.listening.close()
        self._release(closing=True)

    def pause_writing(self) -> None:
        for server in self._link_set():
            server.pause_reading()

    def resume_writing(self) -> None:
        for server in self._link_set():
            server.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.progress += 1
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def fatal(self, code: str, text: str) -> None:
        """Send a FATAL error and close this client only."""
        if self.phase is CLOSED or self.transport is None:
            return
        self.traffic.error("proxy", code)
        self.write(codec.error_response(code, text, "FATAL"))
        self.phase = CLOSED
        self.lane = None
        self.transport.close()

    def busy(self) -> bool:
        """A transaction or a statement is in flight on one of the session's servers, or a commit round."""
        return self.committing or any(server.outstanding or server.txn_status != b"I" for server in self._link_set())

    def _link_set(self) -> list[ServerConnection]:
        """Every server this session holds now: its home server, the other shards', a fan-out's legs."""
        servers = [self.server] if self.server is not None else []
        servers.extend(self.links.values())
        if self.fanout is not None:
            servers.extend(s for s in self.fanout.servers() if s not in servers)
        return servers

    # ------------------------------------------------------------ startup, authentication, login

    def _startup_data(self) -> None:
        if self.turn_pending:  # its startup packet is read at its turn (see _pace_accept)
            if len(self.inbuf) > 65536:
                raise ProtocolError("too much data before the startup packet was read")
            return
        handshake = self.handshake
        if handshake is None:
            if self.console is not None:
                self.console.feed(self.inbuf)
            return
        try:
            handshake.feed(self.inbuf)
        except AuthError as exc:
            if exc.message != refusal().message:
                reason = _FAILURE_REASONS.get(handshake.user.auth, "password") if handshake.user else "unknown_user"
                self.rt.limits.auth_failed(handshake.peer_host, handshake.user_name, reason, exc.message)
            if handshake.user is None and handshake.database in CONSOLE_DATABASES:
                raise refusal()  # an unknown user gets the answer a refused one gets
            raise
        if handshake.state is HandshakeState.CANCELLED:
            self.phase = CLOSED
            if self.transport is not None:
                self.transport.close()
        elif handshake.state is HandshakeState.LOOKUP:
            if not handshake.looking_up:  # what the client sends meanwhile waits in inbuf
                handshake.looking_up = True
                self._start_task(self._look_up(handshake))
        elif handshake.state is HandshakeState.TLS:
            if not self.tls_starting:
                self._start_tls(handshake)
        elif handshake.state is HandshakeState.DONE:
            self.handshake = None
            assert handshake.identity is not None
            self._authenticated(handshake, handshake.identity)

    async def _look_up(self, handshake: Handshake) -> None:
        """A user the config does not list: auth_query runs (other clients go on), then the exchange it
        calls for. An error escaping here closes the client with its SQLSTATE (see `_task_done`)."""
        try:
            await handshake.look_up()
        except asyncio.CancelledError:
            return
        if self.phase is not CLOSED:
            self._startup_data()

    def _start_tls(self, handshake: Handshake) -> None:
        context = handshake.tls_wanted
        assert context is not None
        received = b""
        if handshake.tls_direct:  # the ClientHello came first and is in inbuf
            received = bytes(self.inbuf)
            self.inbuf.clear()
        self.tls_starting = True
        self._start_task(self._tls_handshake(handshake, context, received))

    async def _tls_handshake(self, handshake: Handshake, context: ClientTlsContext, received: bytes) -> None:
        """The TLS handshake on this connection, in the event loop like any read (other clients go on); the
        startup packet then comes over the TLS transport (it may already wait in inbuf)."""
        raw = self.transport
        assert raw is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await start_client_tls(loop, raw, self, context.context, received)
        except asyncio.CancelledError:
            return
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError: refused certificate, old version
            log.info("event=client_tls_failed peer=%s direct=%s error=%r", self.peer, bool(received),
                     getattr(exc, "reason", None) or str(exc))
            raw.close()
            self.connection_lost(None)
            return
        self.transport = transport  # type: ignore[assignment]
        self.tls_starting = False
        handshake.tls_established(client_session_of(transport, context, direct=bool(received)))
        if self.inbuf:
            self._startup_data()

    def _authenticated(self, handshake: Handshake, identity: Identity) -> None:
        self.identity = identity
        self.database = handshake.database
        self.application_name = handshake.settings.get("application_name", "")
        if self.database in CONSOLE_DATABASES:
            self._open_console(identity)
            return
        user = handshake.user
        assert user is not None
        try:
            self.rt.limits.admit(user.name, self.database)
        except ProxyError as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        self.admitted = (user.name, self.database)
        self.state = SessionState.from_startup(handshake.settings)
        if identity.is_jwt:
            self.state.claims = self.rt.auth.claims_sql(identity)
        self.phase = LOGIN
        self.user = user
        try:
            tenant = self.rt.auth.tenant_of(identity) if identity.is_jwt else None
            setup = setup_session(self.rt, user, self.database, jwt=identity.is_jwt, tenant=tenant)
        except (ProxyError, AuthError) as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        try:
            pool = login_pool(self.rt, user, setup)
        except ProxyError as exc:
            # no server can take the login now (no primary, and no replica for a pooled client): a login
            # waits for a primary as a write does
            if exc.sqlstate in WAITABLE_SQLSTATES and setup.cluster.waits_for_primary():
                self._start_task(self._login_when_primary(user, setup, exc))
            else:
                self.fatal(exc.sqlstate, exc.message)
            return
        self._log_in(setup, pool)

    async def _login_when_primary(self, user: UserConfig, setup: SessionSetup, failed: ProxyError) -> None:
        log.info("event=primary_wait peer=%s database=%s shard=%d reason=%r at=login", self.peer,
                 setup.cluster.name, setup.cluster.shard, failed.message)
        deadline = time.monotonic() + self.rt.config.general.primary_wait_timeout_ms / 1000
        try:
            await setup.cluster.wait_for_primary(deadline, failed)
            pool = login_pool(self.rt, user, setup)
        except asyncio.CancelledError:
            return
        except ProxyError as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        if self.phase is not CLOSED:
            self._log_in(setup, pool)

    def _log_in(self, setup: SessionSetup, pool: Pool) -> None:
        """The login's pool is known: the session takes what the login decided, then logs in."""
        self.pool = pool
        self.pool_mode = setup.pool_mode
        self.guard = setup.guard
        self.refusals = setup.guard.refuses
        self.kinds = setup.kinds
        self.cluster = setup.cluster
        self.split = setup.split
        self.scatter = setup.scatter
        self.sharded = setup.scatter is not None
        self.lane_ok = setup.lane_ok
        self.lane_routed = setup.pool_mode is TRANSACTION and setup.split is not None
        self.listen_ok = setup.pool_mode is not SESSION and setup.scatter is None
        if self.pool_mode is not SESSION:
            params = self.rt.login_params.get(self._login_params_key(pool))
            if params is not None:  # the usual case: no server needed to log in
                self._finish_login(params, (secrets.randbits(31), secrets.randbits(31) - (1 << 30)))
                return
        self._start_task(self._login(pool))

    async def _login(self, pool: Pool) -> None:
        """Slow path of a login: a server is needed (session mode, or startup settings not seen before). A
        server lost while the client's startup settings are set on it is replaced once; a primary that cannot
        be reached is waited for (primary_wait_timeout_ms), as a write waits."""
        deadline = 0.0
        attempt = 0
        while attempt < 2:
            attempt += 1
            try:
                if self.pool_mode is SESSION:
                    server = await pool.checkout()
                    self._link(server)
                    await pool.restore(server, self.snapshot())
                    params = parameter_block(server.params)
                    cancel_key = (server.process_id, server.secret_key)
                else:
                    params = await self._canonical_params(pool)
                    cancel_key = (secrets.randbits(31), secrets.randbits(31) - (1 << 30))
            except ServerLostError as exc:
                self._forget_server()
                if attempt == 1 and self.phase is not CLOSED:
                    log.info("event=server_lost_at_login_retry peer=%s", self.peer)
                    continue
                self.fatal(exc.sqlstate, exc.message)
                return
            except ProxyError as exc:
                cluster = self._cluster_waiting_for(exc) if isinstance(exc, ServerError) else None
                if cluster is None or self.user is None:
                    self.fatal(exc.sqlstate, exc.message)
                    return
                if not deadline:
                    deadline = time.monotonic() + self.rt.config.general.primary_wait_timeout_ms / 1000
                    log.info("event=primary_wait peer=%s database=%s shard=%d reason=%r at=login", self.peer,
                             cluster.name, cluster.shard, exc.message)
                try:
                    primary = await cluster.wait_for_primary(deadline, exc)
                except ProxyError as timed_out:
                    self.fatal(timed_out.sqlstate, timed_out.message)
                    return
                except asyncio.CancelledError:
                    return
                pool = self.pool = self.rt.pool_for_server(self.user, primary.config)
                attempt -= 1  # waiting is not a lost server's retry
                continue
            except asyncio.CancelledError:
                return
            self._finish_login(params, cancel_key)
            return

    def _finish_login(self, params: bytes, cancel_key: tuple[int, int]) -> None:
        """AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery in one write."""
        self.cancel_key = cancel_key
        self.rt.cancel_keys[cancel_key] = self
        self.reported = _role_parameters(params)
        self.write(codec.AUTH_OK + params + codec.backend_key_data(*cancel_key) + codec.ready_for_query(b"I"))
        self.phase = READY
        self._snapshot = None
        if self.inbuf:
            pending = bytes(self.inbuf)
            self.inbuf.clear()
            self._ready_data(pending)

    def _login_params_key(self, pool: Pool) -> tuple[str, tuple[tuple[str, str], ...]]:
        return pool.name, tuple(sorted(self.state.settings.items()))

    async def _canonical_params(self, pool: Pool) -> bytes:
        """ParameterStatus messages as the server reports them for this client's startup settings
        (called when the login cache has none for them)."""
        server = await pool.checkout()
        self._link(server)
        try:
            # without JWT claims: the block is shared by every client with these startup settings, and a
            # claim's role is reported at the client's first transaction (see `_report_role`)
            snapshot = self.snapshot()
            await pool.restore(server, (snapshot[0], snapshot[1], ("", "")))
            params = parameter_block(server.params)
        finally:
            self._unlink_and_release()
        if len(self.rt.login_params) < 10_000:
            self.rt.login_params[self._login_params_key(pool)] = params
        return params

    # ------------------------------------------------------------ the admin console

    def _handshake_write(self, data: bytes) -> None:
        """What the handshake sends; a user the console refuses is refused before any password is asked
        for, with the answer an unknown user gets."""
        handshake = self.handshake
        if (handshake is not None and handshake.user is not None and handshake.database in CONSOLE_DATABASES
                and not may_enter(self.rt.config, handshake.user.name)):
            raise refusal()
        self.write(data)


    def _open_console(self, identity: Identity) -> None:
        if not may_enter_as(self.rt.config, identity):
            self.fatal(sqlstate.INVALID_AUTHORIZATION, refusal().message)
            return
        console = self.console = Console(self.rt, self, identity.user)
        self.phase = CONSOLE
        self.write(console.login_messages((secrets.randbits(31), secrets.randbits(31) - (1 << 30))))
        log.info("event=console_login user=%s peer=%s", identity.user, self.peer)
        if self.inbuf:
            console.feed(self.inbuf)

    def disconnect(self) -> None:
        """Terminate from a console client."""
        self._terminate()

    def info(self) -> SessionInfo:
        """This client as the admin views show it."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        phase = self.phase
        if phase is CONSOLE:
            state = "console"
        elif phase is not READY:
            state = "login"
        else:
            state = "waiting" if self.acquiring else "active"
        user = self.user.name if self.user is not None else (self.identity.user if self.identity else "")
        return SessionInfo(
            client_id=self.client_id, user=user, database=self.database, state=state,
            addr=str(peer[0]) if isinstance(peer, tuple) else "", port=int(peer[1]) if isinstance(peer, tuple) else 0,
            local_addr=str(local[0]) if isinstance(local, tuple) else "",
            local_port=int(local[1]) if isinstance(local, tuple) else 0,
            connect_time=self.connected_at, application_name=self.application_name,
            pool_mode=str(self.pool_mode) if phase is not CONSOLE else "",
            pool=self.pool if phase is READY else None, server=self.server,
            prepared_statements=len(self.statements.known))

    # ------------------------------------------------------------ the home server

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
        server.sink = self
        server.out = self.transport
        server.relayed = False
        server.saw_error = False  # an error it sent while idle (say, 57P01 before it closed) is not ours
        self.server = server
        self.unanswered = []
        self.retry_safe = server.txn_status == b"I" and self.pool_mode != SESSION
        if self.reading_paused:
            self.resume_reading()

    def _forget_server(self) -> None:
        """The home server is gone (lost, or taken back by the pool): nothing is checked in."""
        self.server = None
        self.parked = False
        self.lane = None

    async def _acquire(self) -> None:
        """Slow path: wait for a server, restore session state, then relay what the client sent meanwhile. A
        server lost while the session is restored on it is replaced once (nothing of the client's was sent)."""
        then: str | None = None  # the held-back BEGIN, taken once for both attempts
        split = self.split
        for attempt in range(2):
            try:
                server = self.server
                if server is None:
                    server = await self._checkout_for_route()
            except asyncio.CancelledError:
                return
            except ProxyError as exc:  # pool timeout, server unreachable or refusing, no primary: nothing sent
                if then and split is not None:
                    split.deferred_begin = then.encode()  # answered as part of the transaction it opened
                self.acquiring = False
                self._reject_waiting(exc)
                return
            if self.phase is CLOSED:
                server.pool.checkin(server)
                return
            if then is None:
                then = split.take_deferred_begin() if split is not None else ""
                if not then and self.links:
                    then = "BEGIN"  # joining a transaction other shards' servers are already in
            try:
                self._link(server)
                await server.pool.restore(server, self.snapshot(), then)
                self._report_role(server)
            except asyncio.CancelledError:
                return
            except ProxyError as exc:  # the session state could not be restored: its server is unusable for it
                if isinstance(exc, ServerLostError):
                    self._forget_server()
                    if attempt == 0 and self.phase is not CLOSED:
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

    async def _checkout_for_route(self) -> ServerConnection:
        """A server for the transaction's route. When the primary cannot be reached (a failover, a restart
        the probes have not seen yet), the checkout waits for a probe to find a primary, up to
        primary_wait_timeout_ms, and is tried again there."""
        split = self.split
        deadline = 0.0
        while True:
            assert self.pool is not None
            try:
                if split is not None:
                    server, self.pool = await split.checkout(self.pool)
                    return server
                return await self.pool.checkout()
            except ServerError as exc:
                cluster = self._cluster_waiting_for(exc)
                if cluster is None:
                    raise
                if not deadline:
                    deadline = time.monotonic() + self.rt.config.general.primary_wait_timeout_ms / 1000
                    log.info("event=primary_wait peer=%s database=%s shard=%d reason=%r", self.peer, cluster.name,
                             cluster.shard, exc.message)
                self.primary_waiting = True
                try:
                    await cluster.wait_for_primary(deadline, exc)
                finally:
                    self.primary_waiting = False
                if split is not None:
                    self.pool = split.pool_for_route()

    def _cluster_waiting_for(self, exc: ProxyError) -> Cluster | None:
        """The cluster whose primary a refused statement may wait for (see primary_wait_timeout_ms), or
        None when `exc` is not for want of a reachable primary or waiting is off."""
        if exc.sqlstate not in WAITABLE_SQLSTATES:
            return None
        cluster = self.split.cluster if self.split is not None else self.cluster
        if cluster is None or not cluster.waits_for_primary():
            return None
        return cluster

    def _wait_for_primary(self, exc: ProxyError) -> bool:
        """`_attach_now` found no server for the transaction (no primary now): when it may wait for one,
        start waiting (what the client sent stays in `waiting`) and return True."""
        cluster = self._cluster_waiting_for(exc)
        if cluster is None:
            return False
        log.info("event=primary_wait peer=%s database=%s shard=%d reason=%r", self.peer, cluster.name,
                 cluster.shard, exc.message)
        self.acquiring = True
        self._start_task(self._attach_when_primary(cluster, exc))
        return True

    async def _attach_when_primary(self, cluster: Cluster, failed: ProxyError) -> None:
        deadline = time.monotonic() + self.rt.config.general.primary_wait_timeout_ms / 1000
        self.primary_waiting = True
        try:
            await cluster.wait_for_primary(deadline, failed)
        except asyncio.CancelledError:
            return
        except ProxyError as exc:
            self.acquiring = False
            self._reject_waiting(exc)
            return
        finally:
            self.primary_waiting = False
        self.acquiring = False
        if self.phase is CLOSED:
            return
        try:
            linked = self._attach_now()  # may go on to `_acquire`, which relays `waiting` itself
        except ProxyError as exc:
            self._reject_waiting(exc)
            return
        if linked is not None:
            data, self.waiting = self.waiting, b""
            if data:
                self._ready_data(data)

    def _attach_now(self) -> ServerConnection | None:
        """Fast path: the server parked with us, or an idle one, whose session already matches; else
        start the slow path."""
        split = self.split
        if split is not None:
            self.pool = split.pool_for_route()
        pool = self.pool
        assert pool is not None
        server = self.server
        if server is not None:  # parked with this client since its last transaction
            self.parked = False
            if server.pool is pool and pool.unpark(server):
                if server.session_state is self._snapshot and (split is None or not split.deferred_begin):
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
                Pool.adopt(server, wanted)
                state = wanted
            if state is wanted and (split is None or not split.deferred_begin) and not self.links:
                self._report_role(server)
                return server
        self.acquiring = True
        self._start_task(self._acquire())
        return None

    def _report_role(self, server: ServerConnection) -> None:
        """Tell the client the role's ParameterStatus values of a server it now uses where they differ from
        what it was told: the role was replayed there with its answers hidden (or was the server's own)."""
        params = server.params
        reported = self.reported
        for name in _ROLE_PARAMETERS:
            value = params.get(name)
            if value is not None and reported.get(name, value) != value:
                reported[name] = value
                self.write(codec.parameter_status(name, value))

    def _unlink_and_release(self, *, closing: bool = False) -> None:
        server = self.server
        if server is None:
            return
        self.server = None
        self.parked = False
        self.lane = None
        if self.unsynced:
            # extended-protocol messages with no Sync after them: the server may hold their results for the
            # next Sync, or be skipping everything up to one after an error. Nobody else gets it.
            server.broken = True
        server.pool.checkin(server, reset=self.pool_mode == SESSION or (closing and self.pinned))

    def _release(self, *, closing: bool = False) -> None:
        if self.server is not None:
            self._unlink_and_release(closing=closing)
        self._release_links(closing=closing)
        if self.fanout is not None:
            self.fanout.release_checked_out()

    def _phase_closed(self) -> bool:
        return self.phase is CLOSED

    def _terminate(self) -> None:
        self.phase = CLOSED
        self._release(closing=True)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ server -> client events (the home server)

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        """A ReadyForQuery was relayed: settle session-state changes, maybe give the server back."""
        self.progress += 1
        statements = self.statements
        if server.failed_parses or statements.dropped:
            statements.dropped.clear()
            statements.forget_failed(Pool.take_failed_parses(server))
        if server.outstanding or self.unsynced or server is not self.server:
            return
        # counted per answered batch, not per message: its route, and its time since the client's bytes came
        traffic = self.traffic
        split = self.split
        route = _REPLICA if split is not None and split.role is Role.REPLICA else _SHARD if self.sharded else _PRIMARY
        traffic.query_duration.observe(time.monotonic() - self.batch_at)
        traffic.queries[route] += 1
        if status == b"I":
            traffic.transactions[route] += 1
        waiter = self._home_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.pending_effects or self.txn_effects:
            self._settle_effects(server, status)
        listening = self.listening
        if listening is not None and status == b"I":
            if listening.reserved:
                listening.release()
            if listening.pending and not self.acquiring:
                self._flush_notifications()
        mode = self.pool_mode
        if mode is SESSION or self.pinned or self.acquiring:
            return
        if status != b"I":
            if mode is STATEMENT:
                self.write(codec.error_response(
                    sqlstate.FEATURE_NOT_SUPPORTED,
                    "transaction blocks are not allowed in statement pool mode", "FATAL"))
                self._terminate()
            elif self.lane_ok and not self.inbuf:  # inside a transaction: the server stays linked
                self.lane = server
            return
        if self.split is not None:
            self.split.transaction_ended()
        elif self.split_pending:
            self._adopt_split()
        if self.links:
            self._release_links()
        if not server.broken and server.pool.park(server, self):
            self.parked = True
            if (self.lane_ok or self.lane_routed) and server.session_state is self._snapshot and not self.inbuf:
                self.lane = server
            return
        self.server = None
        server.pool.checkin(server)

    def reconfigure(self) -> None:
        """A reload: the user's new settings, the database's new servers and shard map apply from the next
        transaction (a transaction in flight finishes where it is); a database that now has replicas starts
        splitting reads at the session's next transaction. The pool mode stays as it was at login."""
        user, cluster = self.user, self.cluster
        if user is None or cluster is None or self.phase is CLOSED:
            return
        rt = self.rt
        user = self.user = rt.config.user(user.name) or user  # a removed user's clients stay connected
        home = rt.cluster_for(self.database)
        if home is not None:
            self.cluster = home
        if self.split is not None:
            self.split.reconfigure(user)
        elif home is not None:
            try:
                self.pool = rt.pool_for_server(user, home.primary().config)
            except ProxyError:
                pass  # no primary now: the next transaction reports it, as before the reload
            if self.pool_mode is not SESSION and rt.splits_reads(home):
                self.split_pending = True
                if not self.acquiring and (self.server is None or self.parked):
                    self._adopt_split()  # between transactions; otherwise when this one ends
        scatter = self.scatter
        if scatter is not None and len(rt.shards_of(self.database)) > 1:
            scatter.shard_count = len(rt.shards_of(self.database))
            scatter.shards = rt.shard_router(self.database)

    def _adopt_split(self) -> None:
        """Reads are split from now on (a reload gave the database replicas): as a login would set it up,
        between transactions."""
        self.split_pending = False
        if self.split is not None or self.cluster is None or self.user is None:
            return
        self.split = ReadWriteSplit(self.rt, self.cluster, self.user)
        self.lane = None
        self.lane_ok = False
        self.lane_routed = self.pool_mode is TRANSACTION

    def on_server_taken(self, server: ServerConnection) -> None:
        """The pool gave our parked server to another client (or back to the idle list)."""
        if server is self.server:
            self._forget_server()

    def _settle_effects(self, server: ServerConnection, status: bytes) -> None:
        """Effects take hold once their transaction commits; an error or ROLLBACK drops them, but for those
        of PREPARE and DEALLOCATE, which a ROLLBACK does not undo."""
        pending, self.pending_effects = self.pending_effects, []
        if server.saw_error:
            if any(e.kind in _NOT_TRANSACTIONAL for e in pending):
                # which of them ran before the error is not known: the server's SQL prepared statements
                # are not either, so it is not lent again
                server.broken = True
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
            # PREPARE and DEALLOCATE are not undone by a ROLLBACK (DISCARD ALL cannot run in a transaction)
            effects = [e for e in effects if e.kind in _NOT_TRANSACTIONAL]
            if server.saw_error or not effects:
                return
        if self.state.apply(effects):
            self.pinned = True
        if self.listening is not None and any(e.kind in LISTENING_KINDS for e in effects):
            self._listen_apply(effects)
        self._snapshot = None
        Pool.settle(server, effects)

    def on_server_lost(self, server: ServerConnection) -> None:
        """The server died under us. If it never answered this transaction, replay it on another one."""
        if server is not self.server:
            if server in self.links.values():  # another shard's server in this transaction: it is lost
                del self.links[next(shard for shard, s in self.links.items() if s is server)]
                self.fatal(sqlstate.CONNECTION_FAILURE, "server connection lost")
            return
        self._forget_server()
        if self.phase is not READY:
            return
        retry = self.retry_safe and not server.relayed and not self.acquiring and not self.links
        replay = b"".join(bytes(chunk) for chunk in self.unanswered) if retry else b""
        if replay and only_reads(replay, self.statements, self.rt.router):
            log.info("event=server_lost_retry peer=%s server=%s:%s", self.peer, *server.address)
            self.unanswered = []
            self.pending_effects = []
            self.waiting = replay + self.waiting
            self.acquiring = True
            self._start_task(self._acquire())
            return
        self.fatal(sqlstate.CONNECTION_FAILURE, "server connection lost")

    # ------------------------------------------------------------ LISTEN/NOTIFY (pooled modes)

    def _listening(self) -> Listening:
        listening = self.listening
        if listening is None:
            listening = self.listening = Listening(self._notify_hub, self)
        return listening

    def _notify_hub(self) -> NotifyHub:
        """The hub of the database for the session's user, or for general.listen_user."""
        rt, database, own, home = self.rt, self.database, self.user, self.cluster
        assert own is not None
        name = rt.config.general.listen_user or own.name

        def primary_pool() -> Pool:  # asked at each connect of the hub: it follows a failover
            user = rt.config.user(name) or own  # a user found by auth_query is in no config
            cluster = rt.cluster_for(database) or home  # the wildcard's databases are not either
            if cluster is None:
                raise ProxyError(sqlstate.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
            return rt.pool_for_server(user, cluster.primary().config)

        return rt.notify.hub_for(name, database, primary_pool)

    def _answer_listen(self, effects: tuple[Effect, ...], tags: tuple[str, ...], status: bytes,
                       rest: bytes) -> bool:
        if status == b"E":
            self.write(codec.error_response("25P02", _ABORTED) + codec.ready_for_query(b"E"))
            return True
        reply = b"".join(codec.command_complete(tag) for tag in tags) + codec.ready_for_query(status)
        listening = self._listening()
        try:
            channels = listening.reserve(effects)  # inside a transaction: held until it ends
            hub = listening.hub_now()
        except ProxyError as exc:  # no primary to listen on
            self._listen_refused(status, exc)
            return True
        if hub.is_listening(channels):
            self._listen_answered(effects, status, reply)
            return True
        # as on a direct connection, what is notified once LISTEN (or its COMMIT) has answered reaches the
        # client: the answer waits for the hub's own LISTEN, and what the client sends meanwhile waits with it
        self.acquiring = True
        self.waiting += rest
        self._start_task(self._listen_when_ready(hub, effects, channels, status, reply))
        return False

    def _listen_answered(self, effects: tuple[Effect, ...], status: bytes, reply: bytes) -> None:
        listening = self._listening()
        if status == b"I":
            listening.apply(effects)
            listening.release()
        else:  # registered when the transaction commits (see `_settle_effects`)
            self.pending_effects.extend(effects)
            if self.server is not None:
                self.server.track_tags(True)
        self.write(reply)

    def _listen_refused(self, status: bytes, exc: ProxyError) -> None:
        if status == b"T" and self.server is not None:
            # the server raises it: the transaction aborts there too, as it would on a direct connection
            self.server.outstanding += 1
            self.server.send(raising_query((exc.sqlstate, exc.message, "the proxy listens through its own "
                                            "connection to the primary: retry once it is up")))
            return
        self._listening().release()
        self.write(codec.error_response(exc.sqlstate, exc.message) + codec.ready_for_query(b"I"))

    async def _listen_when_ready(self, hub: NotifyHub, effects: tuple[Effect, ...], channels: frozenset[str],
                                 status: bytes, reply: bytes) -> None:
        try:
            await hub.ready(channels, self.rt.config.general.server_connect_timeout_ms / 1000 + 1)
        except asyncio.CancelledError:
            return  # the client is gone (its reservations go with it)
        except ProxyError as exc:
            log.info("event=listen_refused peer=%s sqlstate=%s error=%r", self.peer, exc.sqlstate, exc.message)
            self.acquiring = False
            if self.phase is not CLOSED:
                self._listen_refused(status, exc)
        else:
            self.acquiring = False
            if self.phase is not CLOSED:
                self._listen_answered(effects, status, reply)
        if self.phase is CLOSED:
            return
        data, self.waiting = self.waiting, b""
        if data:
            self._ready_data(data)
        self._flush_notifications()

    def _listen_hold(self, effects: tuple[Effect, ...]) -> bool:
        channels = frozenset(e.name for e in effects if e.kind == "listen")
        if not channels or not self.listen_ok:
            return False
        if self.listen_unheld:  # held once already and the hub did not come up: it goes now
            self.listen_unheld = False
            return False
        listening = self._listening()
        try:
            hub = listening.hub_now()
        except ProxyError:
            return False  # no primary: the statement fails on its way to one
        if hub.is_listening(channels):
            return False
        listening.reserve(effects)
        self.acquiring = True
        self._start_task(self._relay_when_listening(hub, channels))
        return True

    async def _relay_when_listening(self, hub: NotifyHub, channels: frozenset[str]) -> None:
        try:
            await hub.ready(channels, self.rt.config.general.server_connect_timeout_ms / 1000 + 1)
        except asyncio.CancelledError:
            return
        except ProxyError as exc:  # the statement runs: its registration waits for the hub to come up
            log.info("event=listen_hub_not_ready peer=%s error=%r", self.peer, exc.message)
            self.listen_unheld = True
        self.acquiring = False
        if self.phase is CLOSED:
            return
        data, self.waiting = self.waiting, b""
        if data:
            self._ready_data(data)

    def _listen_noted(self, effects: tuple[Effect, ...]) -> None:
        if not self.listen_ok:
            if any(e.kind == "listen" for e in effects):
                self.pinned = True  # several shards: its server listens, as before the hub
            return
        try:
            self._listening().reserve(effects)
        except ProxyError:
            pass  # no primary: the statement fails on its way to one

    def _listen_apply(self, effects: list[Effect]) -> None:
        listening = self.listening
        assert listening is not None
        try:
            listening.apply(effects)
        except ProxyError as exc:
            log.warning("event=listen_not_registered peer=%s error=%r", self.peer, exc.message)

    def notify(self, message: bytes) -> None:
        """A notification on one of the client's channels: written now when the client is idle, as PostgreSQL
        does, else kept until its transaction ends."""
        listening = self.listening
        if listening is None or self.phase is not READY:
            return
        if self._idle():
            if listening.pending:  # kept while it was busy: they go first
                listening.pending.append(message)
                self._flush_notifications()
            else:
                self._write_notifications(message)
            return
        listening.pending_bytes += len(message)
        if listening.pending_bytes > MAX_PENDING_NOTIFICATION_BYTES:
            self.fatal(sqlstate.PROGRAM_LIMIT_EXCEEDED, f"more than {MAX_PENDING_NOTIFICATION_BYTES >> 20} MiB of "
                       "notifications waited for this client to end its transaction")
            return
        listening.pending.append(message)

    def _write_notifications(self, data: bytes) -> None:
        """Straight to the transport: a notification is no sign of life of the client's (client_idle_timeout_s
        goes on, as PostgreSQL's idle_session_timeout does). A client that reads none of them is closed
        rather than buffered for without bound."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > MAX_PENDING_NOTIFICATION_BYTES:
            self.fatal(sqlstate.PROGRAM_LIMIT_EXCEEDED, f"more than {MAX_PENDING_NOTIFICATION_BYTES >> 20} MiB of "
                       "notifications are not read by this client")
            return
        transport.write(data)

    def _idle(self) -> bool:
        """Between transactions, with nothing of the client's under way: a notification may be written."""
        if (self.acquiring or self.fanout is not None or self.links or self.committing or self.discarding
                or self.local_failed or (self.split is not None and self.split.deferred_begin)):
            return False
        server = self.server
        if server is None or self.parked:
            return True
        return (not server.outstanding and not self.unsynced and server.txn_status == b"I"
                and server.at_message_boundary())

    def _flush_notifications(self) -> None:
        listening = self.listening
        if listening is not None and listening.pending and self.phase is READY and self._idle():
            pending, listening.pending = listening.pending, []
            listening.pending_bytes = 0
            self._write_notifications(b"".join(pending))

    # ------------------------------------------------------------ limits (the janitor's timeout sweep)

    def activity(self) -> tuple[str, int, str]:
        """Where this client is for the timeouts (see proxy/limits.py), read once a second."""
        phase = self.phase
        if phase is STARTUP:
            return LOGGING_IN, 0, ""
        if phase is not READY or self.acquiring:
            return OTHER, 0, ""  # logging in or waiting for a server: checkout_timeout_ms applies
        user = self.user.name if self.user is not None else ""
        server = self.server
        if self.fanout is not None or (server is not None and not self.parked and (server.outstanding or self.unsynced)):
            return RUNNING, self.progress, user
        if self.links or (server is not None and not self.parked and server.txn_status != b"I") or (
                self.split is not None and self.split.deferred_begin):
            return IDLE_IN_TRANSACTION, self.progress, user
        return IDLE, self.progress, user

    def timed_out(self, kind: str, limit: str) -> None:
        if kind == "query":
            server = self.server
            # a note to the client, where its stream is between two messages (never inside a relayed one)
            if self.fanout is None and server is not None and server.at_message_boundary():
                self.write(b"N" + codec.error_response(
                    sqlstate.QUERY_CANCELED, f"shardgate: canceling statement due to {limit} ms", "NOTICE")[1:])
            self.cancel_running()
        elif kind == "idle_in_transaction":
            # the server goes back with ROLLBACK when the connection is gone (see _release)
            self.fatal(sqlstate.IDLE_IN_TRANSACTION_TIMEOUT, "terminating connection due to idle-in-transaction "
                       f"timeout ({limit} ms)")
        elif kind == "client_idle":
            self.fatal(sqlstate.IDLE_SESSION_TIMEOUT, f"terminating connection due to idle-session timeout ({limit} s)")
        else:
            self.fatal(sqlstate.PROTOCOL_VIOLATION, f"login not finished within {limit} s")

    def cancel_running(self) -> None:
        """A CancelRequest named this client: pass it to every server of its link set running its query. A
        statement waiting for a primary is not anywhere yet: it (and what waits behind it) is answered
        57014 here, as PostgreSQL answers a canceled statement, and the session goes on."""
        if self.primary_waiting and self._task is not None and not self._task.done():
            self._task.cancel()
            self.primary_waiting = False
            self.acquiring = False
            self._reject_waiting(ProxyError(sqlstate.QUERY_CANCELED,
                                            "canceling statement due to user request (it was waiting for a "
                                            "primary)"))
            return
        for server in self._link_set():
            if server.outstanding or (server is self.server and self.unsynced):
                self.rt.send_cancel(server.address, server.process_id, server.secret_key)


# auth method -> the reason an auth failure is counted under (shardgate_auth_failures_total{reason})
_FAILURE_REASONS = {"scram-sha-256": "scram", "md5": "md5", "plain": "password", "jwt": "jwt", "trust": "trust"}


def _role_parameters(block: bytes) -> dict[str, str]:
    """The role's values among a login's ParameterStatus messages."""
    found: dict[str, str] = {}
    pos = 0
    while pos + 5 <= len(block):
        length = codec.unpack_u32(block, pos + 1)[0]
        name, _, value = block[pos + 5 : pos + 1 + length].rstrip(b"\x00").partition(b"\x00")
        if name in _ROLE_PARAMETER_NAMES:
            found[name.decode()] = value.decode()
        pos += 1 + length
    return found
