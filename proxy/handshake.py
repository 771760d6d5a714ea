"""A client's startup packet and authentication exchange, up to a verified identity."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import Enum

from auth.errors import AuthError
from auth.identity import Identity
from auth.scram import ScramKeys, ScramServer, ScramVerifier
from config.model import UserConfig
from config.passwords import is_md5_hash, is_scram_verifier
from proxy.console import CONSOLE_DATABASES
from proxy.errors import ProxyError
from proxy.protocol import codec, sqlstate
from proxy.protocol.codec import ProtocolError
from proxy.runtime import Runtime
from proxy.tls import ALPN_POSTGRESQL, TLS_RECORD_HANDSHAKE, ClientTlsContext, ClientTlsSession

_STARTUP_ONLY = frozenset(("user", "database", "options", "replication"))


class HandshakeState(Enum):
    STARTUP = "startup"  # waiting for the startup packet (after any SSL/GSS request)
    TLS = "tls"  # `tls_wanted` set: the session runs the TLS handshake, then calls `tls_established`
    LOOKUP = "lookup"  # a user the config does not list: the session awaits `look_up` (auth_query)
    AUTH = "auth"  # a password, an md5 hash, SCRAM messages or a JWT expected
    DONE = "done"  # `identity` is set
    CANCELLED = "cancelled"  # the connection was a CancelRequest, already forwarded: close it


class Handshake:
    """Fed what a client sends before it is logged in; `state` says where the exchange stands. Raises
    ProtocolError, AuthError or ProxyError (each with its SQLSTATE) for anything it refuses."""

    def __init__(self, runtime: Runtime, write: Callable[[bytes], None]) -> None:
        self.rt = runtime
        self.write = write
        self.state = HandshakeState.STARTUP
        self.user: UserConfig | None = None
        self.database = ""
        self.settings: dict[str, str] = {}
        self.identity: Identity | None = None
        self._method = ""
        self._scram: ScramServer | None = None
        self._md5_salt = b""
        self._scram_started = False
        self._first_packet = True
        self.peer_host = ""  # the client's address (set by the session), for proxy/limits.py
        self.user_name = ""  # as the startup packet gave it, known to the config or not
        self.tls: ClientTlsSession | None = None  # once the connection is TLS
        self.tls_wanted: ClientTlsContext | None = None  # in state TLS: the context to start it with
        self.tls_direct = False  # in state TLS: the ClientHello is what `buffer` holds
        self._alpn_missing = False  # direct TLS without ALPN "postgresql": refused at the startup packet
        self.looking_up = False  # in state LOOKUP: the session started `look_up`
        self.queried = False  # `user` was made from what auth_query found (or a mock, when it found nothing)
        self._known = False  # auth_query found the user: a matching proof logs it in

    def tls_established(self, session: ClientTlsSession) -> None:
        """The session finished the TLS handshake: the startup packet comes next, encrypted."""
        self.tls = session
        self.tls_wanted = None
        self.state = HandshakeState.STARTUP
        # PostgreSQL 17's rule: direct TLS only for clients that say they speak PostgreSQL over it. Refused
        # once the startup packet is in: closing with it unread would reset the connection under the error.
        self._alpn_missing = session.direct and session.alpn != ALPN_POSTGRESQL

    def feed(self, buffer: bytearray) -> None:
        """Consume what `buffer` holds of the exchange; what follows it stays in `buffer`."""
        if self.state is HandshakeState.STARTUP:
            if self._first_packet and buffer and buffer[0] == TLS_RECORD_HANDSHAKE:
                self._want_tls(direct=True)  # no startup packet starts so: its length is below 2**24
                return
            packet = codec.read_startup_packet(buffer)
            if packet is not None and self._alpn_missing:
                raise ProtocolError("received direct SSL connection request without ALPN protocol negotiation extension")
            while packet is not None:
                self._startup_packet(packet, buffer)
                if self.state is not HandshakeState.STARTUP:
                    break
                packet = codec.read_startup_packet(buffer)
        if self.state is HandshakeState.AUTH:
            self._auth_data(buffer)

    def _want_tls(self, *, direct: bool) -> None:
        context = self.rt.tls.client
        if context is None or self.tls is not None:
            if direct:
                raise ProtocolError("direct TLS connection refused: TLS is off (tls.mode = disable)")
            raise ProtocolError("unsupported frontend protocol: SSL negotiation already done")
        self.tls_wanted = context
        self.tls_direct = direct
        self.state = HandshakeState.TLS

    def _startup_packet(self, packet: codec.StartupPacket, buffer: bytearray) -> None:
        self._first_packet = False
        if isinstance(packet, codec.SSLRequest | codec.GSSENCRequest):
            if buffer:
                # bytes sent before the answer would be taken as if they had come over TLS (CVE-2021-23214)
                raise ProtocolError("unexpected data after SSL/GSS encryption request")
            if isinstance(packet, codec.SSLRequest) and (self.rt.tls.client is not None or self.tls is not None):
                self._want_tls(direct=False)
                self.write(codec.SSL_ACCEPTED)
                return
            self.write(codec.SSL_REFUSED)
            return
        if isinstance(packet, codec.CancelRequest):
            self.state = HandshakeState.CANCELLED
            if packet.secret_key is not None:  # a longer key than ours names no client: closed unanswered
                self.rt.forward_cancel(packet.process_id, packet.secret_key)
            return
        params = packet.parameters
        # Protocol 3.x with x > 0, or `_pq_.` protocol options: answered as PostgreSQL 15 does, with the
        # version served (3.0) and the options it does not know, then on with 3.0.
        protocol_options = [name for name in params if name.startswith("_pq_.")]
        if packet.protocol & 0xFFFF or protocol_options:
            self.write(codec.negotiate_protocol_version(0, protocol_options))
            params = {name: value for name, value in params.items() if not name.startswith("_pq_.")}
        user_name = params.get("user", "")
        if not user_name:
            raise ProtocolError("no PostgreSQL user name specified in startup packet", sqlstate.INVALID_AUTHORIZATION)
        if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
            raise ProtocolError("replication connections are not supported by shardgate", sqlstate.FEATURE_NOT_SUPPORTED)
        self._check_tls(user_name)
        if len(self.rt.clients) > self.rt.config.general.max_client_connections:
            raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        if self.rt.shutting_down and not self.rt.drain_waits_for_clients:
            raise ProxyError(sqlstate.CANNOT_CONNECT_NOW, "the proxy is shutting down")
        self.database = params.get("database") or user_name
        settings = {k.lower(): v for k, v in params.items() if k.lower() not in _STARTUP_ONLY}
        settings.update(codec.parse_options(params.get("options", "")))
        self.settings = settings
        self.user_name = user_name
        self.rt.limits.check_auth(self.peer_host, user_name)  # a cool-off refuses before any check runs
        user = self.rt.config.user(user_name)
        if user is None:
            if self.rt.auth_query.enabled and self.database not in CONSOLE_DATABASES:
                self.state = HandshakeState.LOOKUP
                return
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, f'role "{user_name}" does not exist')
        self.user = user
        self.state = HandshakeState.AUTH
        self._begin_auth(user)

    async def look_up(self) -> None:
        """In state LOOKUP: the user's stored secret from PostgreSQL (auth_query, cached), then on with the
        exchange it calls for (SCRAM for a SCRAM verifier, md5 for an md5 hash). A user PostgreSQL does not
        know goes through a SCRAM exchange that no password passes, so it fails as a wrong password does.
        Raises ProxyError when the lookup cannot run."""
        rt = self.rt
        name = self.user_name
        try:
            pool = rt.auth_query_pool(self.database)
        except ProxyError as exc:  # no such database, or no server of it reachable
            raise rt.auth_query.failed(rt.config.general.auth_dbname or self.database, name, exc) from None
        secret = await rt.auth_query.lookup(pool, name)
        self.queried = True
        self._known = secret is not None
        auth = "md5" if secret is not None and is_md5_hash(secret) else "scram-sha-256"
        user = self.user = UserConfig(name=name, password=secret or "", auth=auth)
        self.state = HandshakeState.AUTH
        if auth == "md5":
            self._begin_auth(user)
            return
        if secret is None:
            verifier = ScramVerifier.mock(name, rt.auth.mock_nonce)
        elif is_scram_verifier(secret):
            try:
                verifier = ScramVerifier.parse(secret)
            except ValueError:
                self._known = False
                verifier = ScramVerifier.mock(name, rt.auth.mock_nonce)
        else:  # a password stored as it is (servers before PostgreSQL 10)
            verifier = ScramVerifier.from_password(secret)
        self._method = auth
        binding = self.tls.context.end_point if self.tls is not None else None
        scram = self._scram = ScramServer(verifier, binding)
        self.write(codec.auth_sasl(scram.mechanisms()))

    def _check_tls(self, user_name: str) -> None:
        """tls.mode = require and client certificates, before any authentication (all 28000, as
        PostgreSQL's pg_hba.conf refusals)."""
        tls = self.tls
        if tls is None:
            if self.rt.tls.client_mode == "require":
                raise AuthError(sqlstate.INVALID_AUTHORIZATION, f'connection without TLS refused for user "{user_name}": '
                                "the proxy requires TLS (tls.mode = require); connect with sslmode=require")
            return
        required = tls.context.client_cert
        if required is None:
            return
        if not tls.peer_certificate:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, "connection requires a valid client certificate")
        if required == "verify-full" and tls.peer_cn != user_name:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION,
                            f'certificate validation (client_cert = verify-full) failed for user "{user_name}": '
                            "CN mismatch")

    def _begin_auth(self, user: UserConfig) -> None:
        method = self._method = user.auth
        if method == "trust":
            self._authenticated(Identity(user.name, self.database))
        elif method in ("plain", "jwt"):
            self.write(codec.AUTH_CLEARTEXT)
        elif method == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self.write(codec.auth_md5(self._md5_salt))
        else:
            binding = self.tls.context.end_point if self.tls is not None else None
            scram = self._scram = ScramServer(self.rt.auth.verifier_for(user), binding)
            self.write(codec.auth_sasl(scram.mechanisms()))

    def _auth_data(self, buffer: bytearray) -> None:
        while self.state is HandshakeState.AUTH and len(buffer) >= 5:
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
        method = self._method
        auth = self.rt.auth
        failed = AuthError(sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user.name}"')
        if method in ("md5", "plain", "jwt"):
            given = body.rstrip(b"\x00").decode("utf-8", "replace")
            if method == "jwt":
                self._authenticated(auth.authenticate_jwt(user, self.database, given))
                return
            ok = auth.check_md5(user, given, self._md5_salt) if method == "md5" else auth.check_plain(user, given)
            if not ok or (self.queried and not self._known):
                raise failed
            if self.queried:
                self.rt.use_server_secret(user.name, user.password)  # its md5 hash answers the server
            self._authenticated(Identity(user.name, self.database))
            return
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
            if self.queried:
                if not self._known:
                    raise failed
                # the server login uses the client's proof from now on (PgBouncer's SCRAM passthrough)
                self.rt.use_server_secret(user.name, ScramKeys(scram.client_key, scram.verifier.server_key))
            self.write(codec.auth_sasl_final(final))
            self._authenticated(Identity(user.name, self.database))

    def _authenticated(self, identity: Identity) -> None:
        self.identity = identity
        self.state = HandshakeState.DONE
