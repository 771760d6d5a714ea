"""One PostgreSQL server connection: login, then relay of its responses to the sink its owner gave it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from auth.errors import AuthError
from auth.scram import MECHANISM, ScramClient, ScramKeys, md5_response
from proxy.errors import ServerError, ServerLostError
from proxy.metrics import Traffic, error_code
from proxy.protocol import codec, sqlstate
from proxy.session_state import EMPTY_SERVER_STATE, ServerState
from proxy.tls import TLS_HANDSHAKE_TIMEOUT_S, ServerTlsContext, TlsContexts


class Writer(Protocol):
    """Where a sink's bytes go: a client's transport, or a fan-out leg feeding a merger."""

    def write(self, data: bytes | bytearray | memoryview, /) -> None: ...


class ServerSink(Protocol):
    """What a checked-out server reports to: its responses go to `out`, these events to the sink.

    The single-server sink is the client session itself with `out` its transport (zero copy); a fan-out
    sink is one leg of a fan-out executor, with `out` feeding the merger."""

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None: ...

    def on_server_lost(self, server: ServerConnection) -> None: ...


    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ServerOwner(ServerSink, Protocol):
    """A sink a server may stay parked with between transactions: told when the pool takes it back."""

    def on_server_taken(self, server: ServerConnection) -> None: ...


class ServerPool(Protocol):
    """The pool a server belongs to, as the server and the sessions holding it see it (proxy.pool.Pool)."""

    def checkin(self, server: ServerConnection, *, reset: bool = False) -> None: ...

    def park(self, server: ServerConnection, owner: ServerOwner) -> bool: ...

    def unpark(self, server: ServerConnection) -> bool: ...

    async def restore(self, server: ServerConnection, wanted: ServerState, then: str = "") -> None: ...

    def on_server_lost(self, server: ServerConnection) -> None: ...

# Response accounting for statements the proxy renamed, injected or answered itself (transaction mode). Each
# expected reply is (kind, statement name, batch): batch counts the Syncs still unanswered before the
# message's own, so 0 is the batch the server is running now. Plain Syncs need no entry: `outstanding`
# counts them.
EXPECT_PARSE = 1       # a client Parse: forward its ParseComplete
EXPECT_PARSE_DROP = 2  # a Parse the proxy injected: drop its ParseComplete
EXPECT_CLOSE = 3       # a client Close: forward CloseComplete
EXPECT_CLOSE_DROP = 4  # a Close the proxy injected (a statement prepared afresh): drop its CloseComplete
EXPECT_SYNC_DROP = 5   # a Sync the proxy injected (a statement prepared before a Query): drop its ReadyForQuery
EXPECT_DUPLICATE = 6   # a client Parse of a name it has (sent as a Bind that fails): answer 42P05 instead

# The statement a Bind of EXPECT_DUPLICATE names: it never exists, so the server raises 26000 for it and skips
# to the client's Sync, as it would after its own 42P05.
DUPLICATE_PROBE = "sg_no_such_statement"
_PROBE_BYTES = DUPLICATE_PROBE.encode()

NOOP_CLOSE = codec.message(b"C", b"Ssg_noop\x00")

_Z, _E, _PARSE_DONE, _CLOSE_DONE, _PARAM, _COMPLETE = b"Z"[0], b"E"[0], b"1"[0], b"3"[0], b"S"[0], b"C"[0]
_DATA_ROW = b"D"[0]
_READY_HEADER = b"Z\x00\x00\x00\x05"


def _types_table(types: tuple[int, ...]) -> list[bool]:
    return [type_code in types for type_code in range(256)]


# The response types the relay looks at, indexed by type byte (a list lookup is cheaper than a set's).
# ParseComplete/CloseComplete are watched only while a renamed, injected or locally answered statement is in
# flight; CommandComplete only while a client has transaction-scoped state to settle (COMMIT vs ROLLBACK).
_WATCHED = {
    (False, False): _types_table((_Z, _E, _PARAM)),
    (True, False): _types_table((_Z, _E, _PARAM, _PARSE_DONE, _CLOSE_DONE)),
    (False, True): _types_table((_Z, _E, _PARAM, _COMPLETE)),
    (True, True): _types_table((_Z, _E, _PARAM, _PARSE_DONE, _CLOSE_DONE, _COMPLETE)),
}
_ALL_TYPES = [True] * 256  # while proxy SQL runs: every response is the proxy's
_PLAIN = _WATCHED[False, False]
_NO_SHAPE = (b"\x00", b"", b"")  # no response starts with a zero byte: matches nothing
_SHAPE_PATIENCE = 8  # misses before the relay learns a new response shape
# A server's write buffer pauses its client's reading above this fraction of client_to_server_buffer_bytes
# (and resumes it at a quarter of that, asyncio's default low-water mark)
CLIENT_TO_SERVER_HIGH_WATER_DIVISOR = 8
MIN_HIGH_WATER_BYTES = 4096


class ServerConnection(asyncio.Protocol):
    """A server socket. Only the pool changes `state`, `session_state` and `prepared`; while checked out,
    responses go to `out` and events to `sink` (both None while idle or parked)."""

    def __init__(self, pool: ServerPool, address: tuple[str, int], user: str, password: str | ScramKeys,
                 database: str, tls: TlsContexts | None = None, send_buffer_bytes: int = 0) -> None:
        self.pool = pool
        # what it relays is counted with its pool's (a monitor's stand-in pool counts apart)
        self.traffic: Traffic = getattr(pool, "traffic", None) or Traffic()
        self.send_buffer_bytes = send_buffer_bytes
        self.tls = tls
        self.tls_version: str | None = None  # once logged in over TLS: "TLSv1.3", say
        self.address = address
        self.user = user
        self.password = password
        self.database = database
        self.transport: asyncio.Transport | None = None
        self.state = "connecting"
        self.params: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.sink: ServerSink | None = None
        self.out: Writer | None = None
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.retire_at = float("inf")  # server_lifetime_s after its login (set by the pool)
        self.session_state: ServerState = EMPTY_SERVER_STATE
        self.prepared: set[str] = set()
        # statements the server may or may not have (after a DEALLOCATE ALL or DISCARD ALL, or a Parse of
        # them that failed): prepared afresh, with a Close before the Parse, at their next use
        self.stale: set[str] = set()
        # the client's renamed Parses that failed in the batch that just ended (their global names)
        self.failed_parses: list[str] = []
        self.expect: deque[tuple[int, str, int]] = deque()
        self.outstanding = 0
        self.txn_status = b"I"
        self.swallow = 0
        self.swallow_error: bytes | None = None
        self.saw_error = False
        self.last_tag_rollback = False
        self.relayed = False
        self.broken = False
        self.rewrites = 0
        self.tags = False
        self.watched = _PLAIN
        self.shape: tuple[bytes, bytes, bytes] | None = None
        self.shape_misses = 0
        self.rows: list[list[str | None]] | None = None
        self._pending = b""
        self._skip = 0
        self._login: asyncio.Future[None] | None = None
        self._login_buffer = bytearray()
        self._scram: ScramClient | None = None
        self._drain: asyncio.Future[None] | None = None
        self._tls_answer: asyncio.Future[bytes] | None = None

    # ------------------------------------------------------------ login

    async def connect(self, startup: dict[str, str], timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._login = loop.create_future()
        try:
            await asyncio.wait_for(self._open(loop, startup), timeout_s)
        except (TimeoutError, OSError, ServerError) as exc:
            self.broken = True
            if self.transport is not None:
                self.transport.abort()
            if isinstance(exc, ServerError):
                raise
            reason: object = exc or "timeout"
            if isinstance(exc, ssl.SSLCertVerificationError):  # the server's certificate was refused: say why
                reason = f"TLS certificate verify failed: {exc.verify_message}"
            raise ServerError(sqlstate.CONNECTION_FAILURE,
                              f"cannot connect to server {self.address[0]}:{self.address[1]}: {reason}")

    async def _open(self, loop: asyncio.AbstractEventLoop, startup: dict[str, str]) -> None:
        await loop.create_connection(lambda: self, self.address[0], self.address[1])
        assert self.transport is not None and self._login is not None
        tls = self.tls.server if self.tls is not None else None
        if tls is not None:
            await self._start_tls(loop, tls)
        params = {"user": self.user, "database": self.database, **startup}
        self.transport.write(codec.startup_message(params))
        await self._login

    async def _start_tls(self, loop: asyncio.AbstractEventLoop, tls: ServerTlsContext) -> None:
        """SSLRequest, then TLS if the server says `S`; `N` is fine for server_tls = prefer only."""
        assert self.transport is not None
        answer = self._tls_answer = loop.create_future()
        self.transport.write(codec.SSL_REQUEST)
        try:
            reply = await answer
        finally:
            self._tls_answer = None
        if reply == codec.SSL_ACCEPTED:
            host = self.address[0]
            started = await loop.start_tls(self.transport, self, tls.context, server_hostname=host,
                                           ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            assert started is not None
            self.transport = started  # type: ignore[assignment]
            ssl_object = started.get_extra_info("ssl_object")
            self.tls_version = ssl_object.version() if ssl_object is not None else None
        elif reply == codec.SSL_REFUSED:
            if tls.mode != "prefer":
                raise ServerError(sqlstate.CONNECTION_FAILURE,
                                  f"server {self.address[0]}:{self.address[1]} does not support TLS, "
                                  f"but tls.server_tls is {tls.mode}")
        else:
            raise ServerError(sqlstate.PROTOCOL_VIOLATION,
                              f"server {self.address[0]}:{self.address[1]} answered the SSLRequest with {reply!r}")

    def _tls_reply(self, answer: asyncio.Future[bytes], data: bytes) -> None:
        if answer.done():
            return
        if len(data) != 1:
            # bytes after the answer would be taken as if they had come over TLS (CVE-2021-23222)
            answer.set_exception(ServerError(sqlstate.PROTOCOL_VIOLATION,
                                             "server sent unexpected data after its answer to the SSLRequest"))
            return
        answer.set_result(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.send_buffer_bytes:
                # What a client sends is held back as the server takes it: the kernel's autotuned buffer
                # (megabytes on loopback) would let the client run far ahead of the server and see its
                # error late; the client's reading pauses once the rest exceeds the write buffer's mark.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
                self.transport.set_write_buffer_limits(  # type: ignore[union-attr]
                    high=max(self.send_buffer_bytes // CLIENT_TO_SERVER_HIGH_WATER_DIVISOR, MIN_HIGH_WATER_BYTES))

    def _login_data(self, data: bytes) -> None:
        answer = self._tls_answer
        if answer is not None:
            self._tls_reply(answer, data)
            return
        buffer = self._login_buffer
        buffer += data
        while len(buffer) >= 5:
            length = codec.unpack_u32(buffer, 1)[0]
            if len(buffer) < length + 1:
                return
            type_code = buffer[0]
            body = bytes(buffer[5 : length + 1])
            del buffer[: length + 1]
            try:
                done = self._login_message(type_code, body)
            except (AuthError, ServerError) as exc:
                self._fail_login(exc)
                return
            if done:
                rest = bytes(buffer)
                buffer.clear()
                login, self._login = self._login, None
                if login is not None and not login.done():
                    login.set_result(None)
                if rest:
                    self.data_received(rest)
                return

    def _login_message(self, type_code: int, body: bytes) -> bool:
        assert self.transport is not None
        if type_code == b"R"[0]:
            code = codec.unpack_i32(body, 0)[0]
            if code == 0:
                return False
            if code == 3:
                self.transport.write(codec.password_message(codec.cstr(self._password_text())))
            elif code == 5:
                response = md5_response(self.user, self._password_text(), body[4:8])
                self.transport.write(codec.password_message(codec.cstr(response)))
            elif code == 10:
                mechanisms = body[4:].split(b"\x00")
                if MECHANISM.encode() not in mechanisms:
                    raise ServerError(sqlstate.FEATURE_NOT_SUPPORTED, "server offers no supported SASL mechanism")
                self._scram = ScramClient(self.password)
                self.transport.write(codec.sasl_initial_response(MECHANISM, self._scram.first_message()))
            elif code == 11 and self._scram is not None:
                self.transport.write(codec.password_message(self._scram.final_message(body[4:])))
            elif code == 12 and self._scram is not None:
                self._scram.verify_final(body[4:])
            else:
                raise ServerError(sqlstate.FEATURE_NOT_SUPPORTED, f"unsupported server authentication request {code}")
        elif type_code == b"S"[0]:
            name, _, rest = body.partition(b"\x00")
            self.params[name.decode()] = rest.rstrip(b"\x00").decode()
        elif type_code == b"K"[0]:
            self.process_id = codec.unpack_i32(body, 0)[0]
            self.secret_key = codec.unpack_i32(body, 4)[0]
        elif type_code == b"E"[0]:
            fields = codec.parse_error_fields(body)
            raise ServerError(fields.get("C", sqlstate.CONNECTION_FAILURE), fields.get("M", "server refused login"),
                              fatal=True)
        elif type_code == b"Z"[0]:
            return True
        return False

    def _password_text(self) -> str:
        """The password (or md5 hash) a cleartext or md5 request is answered with."""
        password = self.password
        if isinstance(password, ScramKeys):
            raise ServerError(sqlstate.INVALID_AUTHORIZATION,
                              f'server {self.address[0]}:{self.address[1]} asks user "{self.user}" for a password, '
                              "but the proxy has only its SCRAM keys (from auth_query): use scram-sha-256 for it "
                              "in pg_hba.conf")
        return password

    def _fail_login(self, exc: Exception) -> None:
        answer = self._tls_answer
        if answer is not None and not answer.done():
            answer.set_exception(exc)  # the connection went while the SSLRequest waited for its answer
        login, self._login = self._login, None
        self.broken = True
        if self.transport is not None:
            self.transport.close()
        if login is not None and not login.done():
            if isinstance(exc, AuthError):
                exc = ServerError(exc.sqlstate, f"server login failed: {exc.message}")
            login.set_exception(exc)

    # ------------------------------------------------------------ relay

    def data_received(self, data: bytes) -> None:
        if self._login is not None:
            self._login_data(data)
            return
        self.relayed = True
        self.traffic.server_bytes += len(data)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        size = len(data)
        pos = self._skip
        if pos:
            if pos >= size:
                self._skip = pos - size
                if self.sink is not None and not self.swallow:
                    self.out.write(data)  # type: ignore[union-attr]  # set with the sink
                return
            self._skip = 0
        else:
            # The same kind of statement gets the same kind of answer: when the bytes before and after its one
            # DataRow are those of this server's last such answer, only that DataRow's length is read.
            shape = self.shape
            if shape is not None:
                head, tail, status = shape
                row = len(head)
                tail_at = size - len(tail)
                if (tail_at - row >= 5 and data[row] == _DATA_ROW and data.startswith(head)
                        and data.endswith(tail) and codec.unpack_u32(data, row + 1)[0] == tail_at - row - 1):
                    self.outstanding -= 1  # the tail ends in ReadyForQuery, as in the walk below
                    self.txn_status = status
                    sink = self.sink
                    if sink is not None:
                        self.out.write(data)  # type: ignore[union-attr]  # set with the sink
                        sink.on_server_ready(self, status)
                    self.saw_error = False
                    return
                self.shape_misses += 1
                if self.shape_misses > _SHAPE_PATIENCE:
                    self.shape = None
        # Messages are walked header by header; unwatched ones are forwarded in runs, untouched.
        run = 0
        header = codec.unpack_header
        watched = self.watched
        last = size - 5  # the last position where a whole header fits
        while pos <= last:
            type_code, length = header(data, pos)
            if not watched[type_code]:
                pos += 1 + length
                continue
            end = pos + 1 + length
            if end > size:
                break  # kept whole in _pending until the rest arrives
            if type_code == _Z and not self.swallow:
                # ReadyForQuery, inlined: it ends every transaction and is the hottest watched message.
                if self.rewrites and self._batch_done():  # the answer to a Sync the proxy injected
                    self.outstanding -= 1
                    self.txn_status = data[pos + 5 : pos + 6]
                    self._flush_run(data, run, pos)
                    pos = run = end
                    watched = self.watched
                    continue
                self.outstanding -= 1
                status = data[pos + 5 : pos + 6]
                self.txn_status = status
                if end == size and self.shape is None:
                    self._learn_shape(data, size)
                sink = self.sink
                if sink is not None:
                    self.out.write(  # type: ignore[union-attr]  # set with the sink
                        data if run == 0 and end == size else data[run:end])
                    sink.on_server_ready(self, status)
                self.saw_error = False
                run = end
            elif self._watched(data, type_code, pos, end, run):
                run = end
            watched = self.watched
            pos = end
        if pos > size:  # the last message continues in the next read: forward what came, skip the rest
            self._skip = pos - size
            pos = size
        elif pos < size:
            self._pending = data[pos:]
        if run < pos and self.sink is not None and not self.swallow:
            self.out.write(data[run:pos] if run or pos < size else data)  # type: ignore[union-attr]

    def _learn_shape(self, data: bytes, size: int) -> None:
        """Remember the shape of an answer that ends in its only ReadyForQuery and holds one DataRow and
        nothing else the relay watches, for `data_received` to recognise the next one like it."""
        self.shape = _NO_SHAPE
        self.shape_misses = 0
        if self.watched is not _PLAIN:
            return
        header = codec.unpack_header
        pos = 0
        row = row_end = -1
        last = size - 6  # where the ReadyForQuery starts
        while pos < last:
            type_code, length = header(data, pos)
            if _PLAIN[type_code] or length < 4:
                return
            if type_code == _DATA_ROW:
                if row >= 0:
                    return
                row = pos
                row_end = pos + 1 + length
            pos += 1 + length
        if pos == last and row >= 0 and data.startswith(_READY_HEADER, last):
            self.shape = (data[:row], data[row_end:], data[last + 5 : last + 6])

    def _watched(self, data: bytes, type_code: int, pos: int, end: int, run: int) -> bool:
        """Handle one watched message; True when it was consumed here (the caller skips it)."""
        if self.swallow:
            if type_code == _DATA_ROW and self.rows is not None:
                self.rows.append(_decode_row(data, pos + 5, end))
            elif type_code == _E:
                self.swallow_error = data[pos:end]
            elif type_code == _PARAM:
                self._record_parameter(data, pos, end)
            elif type_code == _Z:
                self.swallow -= 1
                self.outstanding -= 1
                if self.rewrites:
                    self._batch_done()
                self.txn_status = data[pos + 5 : pos + 6]
                if not self.swallow:
                    self._rewatch()
                    if self._drain is not None and not self._drain.done():
                        self._drain.set_result(None)
            return True
        if type_code == _COMPLETE:
            self.last_tag_rollback = data.startswith(b"ROLLBACK", pos + 5)
            return False
        if type_code == _E:
            self.saw_error = True
            self.traffic.error("server", error_code(data[pos + 5 : end]))
            if self.rewrites:
                expect = self.expect
                if (expect and not expect[0][2] and expect[0][0] == EXPECT_DUPLICATE
                        and data.find(_PROBE_BYTES, pos, end) != -1):
                    _, name, _ = expect.popleft()
                    self._rewrite_done()
                    self._batch_failed()
                    self._flush_run(data, run, pos)
                    if self.sink is not None:
                        self.out.write(codec.error_response(  # type: ignore[union-attr]
                            sqlstate.DUPLICATE_PSTATEMENT, f'prepared statement "{name}" already exists'))
                    return True
                self._batch_failed()
            return False
        if type_code == _PARAM:
            self._record_parameter(data, pos, end)
            return False
        expect = self.expect
        if not expect or expect[0][2]:
            return False  # nothing expected from the batch running now
        kind = expect[0][0]
        if type_code == _PARSE_DONE and kind in (EXPECT_PARSE, EXPECT_PARSE_DROP):
            expect.popleft()
            self._rewrite_done()
            if kind == EXPECT_PARSE_DROP:
                self._flush_run(data, run, pos)
                return True
        elif type_code == _CLOSE_DONE and kind in (EXPECT_CLOSE, EXPECT_CLOSE_DROP):
            expect.popleft()
            self._rewrite_done()
            if kind == EXPECT_CLOSE_DROP:
                self._flush_run(data, run, pos)
                return True
        return False

    def expect_rewrite(self, kind: int, name: str = "") -> None:
        """A Parse/Close whose reply the relay must match up (renamed, injected or answered differently)."""
        self.expect.append((kind, name, self.outstanding))
        self.rewrites += 1
        if self.rewrites == 1:
            self._rewatch()

    def _rewrite_done(self) -> None:
        self.rewrites -= 1
        if not self.rewrites:
            self._rewatch()

    def _batch_failed(self) -> None:
        """An error: the server skips the rest of the running batch, up to its Sync (an injected Sync's
        entry stays for its ReadyForQuery)."""
        expect = self.expect
        while expect and not expect[0][2] and expect[0][0] != EXPECT_SYNC_DROP:
            kind, name, _ = expect.popleft()
            if kind in (EXPECT_PARSE, EXPECT_PARSE_DROP) and name:
                # not known to be there any more: it may have been before (a Parse after a DEALLOCATE)
                if name in self.prepared:
                    self.prepared.discard(name)
                    self.stale.add(name)
                if kind == EXPECT_PARSE:
                    self.failed_parses.append(name)
            self._rewrite_done()

    def _batch_done(self) -> bool:
        """A ReadyForQuery: what the finished batch did not answer never will be; the next batch runs. True
        when the batch was one the proxy ended with a Sync of its own (the client does not see its answer)."""
        self._batch_failed()
        expect = self.expect
        injected = bool(expect) and not expect[0][2] and expect[0][0] == EXPECT_SYNC_DROP
        if injected:
            expect.popleft()
            self._rewrite_done()
        if expect:
            self.expect = deque((kind, name, batch - 1) for kind, name, batch in expect)
        return injected

    def _record_parameter(self, data: bytes, pos: int, end: int) -> None:
        raw_name, _, raw_value = data[pos + 5 : end - 1].partition(b"\x00")
        self.params[raw_name.decode()] = raw_value.rstrip(b"\x00").decode()

    def _flush_run(self, data: bytes, run: int, pos: int) -> None:
        if run < pos and self.sink is not None:
            self.out.write(data[run:pos])  # type: ignore[union-attr]

    def send(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def run_preamble(self, sql: str, params: Sequence[str] | None = None) -> None:
        """Send proxy SQL whose responses are swallowed (`execute_internal` waits for them); with `params`,
        as one bound statement (see codec.bound_query)."""
        self.swallow = 1
        self.watched = _ALL_TYPES
        self.shape = None
        self.swallow_error = None
        self.outstanding += 1
        self.send(codec.query(sql) if params is None else codec.bound_query(sql, params))

    async def execute_internal(self, sql: str, timeout_s: float | None,
                               params: Sequence[str] | None = None) -> bytes | None:
        """Run proxy SQL, its responses swallowed; returns the ErrorResponse bytes if it failed. Raises
        ServerLostError if the connection closes first."""
        self._drain = asyncio.get_running_loop().create_future()
        self.run_preamble(sql, params)
        try:
            await asyncio.wait_for(self._drain, timeout_s)
        finally:
            self._drain = None
        return self.swallow_error

    # ------------------------------------------------------------ flow control and teardown

    async def fetch_rows(self, sql: str, timeout_s: float,
                         params: Sequence[str] | None = None) -> list[list[str | None]]:
        """Run proxy SQL on an unlinked server and return its rows as text (monitoring queries, auth_query
        with the user name as its parameter)."""
        self.rows = []
        try:
            failed = await self.execute_internal(sql, timeout_s, params)
            rows = self.rows
        finally:
            self.rows = None
        if failed is not None:
            fields = codec.parse_error_fields(failed[5:])
            raise ServerError(fields.get("C", sqlstate.INTERNAL_ERROR), fields.get("M", "query failed"))
        return rows

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_reading()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        if self._login is not None:
            self._fail_login(ServerError(sqlstate.CONNECTION_FAILURE, "server closed the connection during login"))
            return
        drain = self._drain
        if drain is not None and not drain.done():
            # proxy SQL was running (a health check, a reset, a session restore): whoever awaits it
            # handles the loss; nothing of a client's was sent
            drain.set_exception(ServerLostError(sqlstate.CONNECTION_FAILURE,
                                                "server connection lost while setting up the session"))
        elif self.sink is not None:
            self.sink.on_server_lost(self)
        self.pool.on_server_lost(self)

    def close(self) -> None:
        self.broken = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(codec.TERMINATE)
            finally:
                self.transport.close()

    @property
    def idle_clean(self) -> bool:
        """At a message boundary with nothing outstanding: safe to hand to another client."""
        return (not self.broken and self.outstanding == 0 and self._skip == 0 and not self._pending
                and not self.swallow)

    def at_message_boundary(self) -> bool:
        """Everything relayed so far ended with a whole message: the proxy may write one of its own."""
        return self._skip == 0 and not self._pending and not self.swallow

    def track_tags(self, enabled: bool) -> None:
        self.tags = enabled
        self._rewatch()

    def _rewatch(self) -> None:
        self.watched = _ALL_TYPES if self.swallow else _WATCHED[self.rewrites > 0, self.tags]
        self.shape = None  # learnt under the plain table only

    def reset_tracking(self) -> None:
        self.session_state = EMPTY_SERVER_STATE
        self.prepared.clear()
        self.stale.clear()
        self.failed_parses.clear()
        self.expect.clear()
        self.rewrites = 0
        self._rewatch()



def _decode_row(data: bytes, pos: int, end: int) -> list[str | None]:
    count = codec.unpack_i16(data, pos)[0]
    pos += 2
    values: list[str | None] = []
    for _ in range(count):
        length = codec.unpack_i32(data, pos)[0]
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(data[pos : pos + length].decode("utf-8", "replace"))
            pos += length
    del end
    return values
