"""TLS contexts toward clients and toward PostgreSQL, built from [tls] and swapped whole on reload."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from asyncio import sslproto
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from config.model import TlsConfig

ALPN_POSTGRESQL = "postgresql"
TLS_HANDSHAKE_TIMEOUT_S = 30  # seconds, for a client or a server that stalls mid-handshake
TLS_RECORD_HANDSHAKE = 0x16  # first byte of a TLS ClientHello record: a direct-TLS client (PostgreSQL 17)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(ValueError):
    """A certificate, key or CA file named by [tls] cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class ClientTlsContext:
    """The listener's TLS as of one config: a connection keeps the one it started with."""

    context: ssl.SSLContext
    mode: str  # allow | require
    client_cert: str | None  # None, verify-ca or verify-full
    # tls-server-end-point channel binding data (RFC 5929) of our certificate; None: no SCRAM-SHA-256-PLUS
    end_point: bytes | None


@dataclass(frozen=True, slots=True)
class ServerTlsContext:
    """TLS toward PostgreSQL as of one config (server_tls other than disable)."""

    context: ssl.SSLContext
    mode: str  # prefer | require | verify-ca | verify-full


@dataclass(frozen=True, slots=True)
class PreparedTls:
    client: ClientTlsContext | None
    server: ServerTlsContext | None


class TlsContexts:
    """What new connections use: `client` (None while tls.mode is disable) and `server` (None while
    server_tls is disable). `reload` builds both from a new config, then swaps them: established
    connections keep their own, new ones get the new certificates."""

    def __init__(self, config: TlsConfig) -> None:
        prepared = self.prepare(config)
        self.client = prepared.client
        self.server = prepared.server

    @staticmethod
    def prepare(config: TlsConfig) -> PreparedTls:
        """Build both contexts (reading every file); raises TlsSetupError and changes nothing."""
        return PreparedTls(build_client_context(config), build_server_context(config))

    def install(self, prepared: PreparedTls) -> None:
        self.client = prepared.client
        self.server = prepared.server

    def reload(self, config: TlsConfig) -> None:
        self.install(self.prepare(config))

    @property
    def client_mode(self) -> str:
        return self.client.mode if self.client is not None else "disable"


def build_client_context(config: TlsConfig) -> ClientTlsContext | None:
    if config.mode == "disable":
        return None
    assert config.cert_file is not None and config.key_file is not None  # the loader requires them
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.set_ciphers(config.ciphers)
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TlsSetupError(f"tls.ciphers: no cipher can be selected from {config.ciphers!r} ({reason})")
    _load_chain(context, config.cert_file, config.key_file, "tls.cert_file")
    if config.client_ca_file is not None:
        _load_ca(context, config.client_ca_file, "tls.client_ca_file")
        # optional at the TLS level: a client without a certificate gets a FATAL it can read (28000);
        # a certificate the CA did not sign still fails the handshake
        context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    return ClientTlsContext(context, config.mode, config.client_cert, _end_point_of_file(config.cert_file))


def build_server_context(config: TlsConfig) -> ServerTlsContext | None:
    mode = config.server_tls
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    if mode in ("prefer", "require"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
        if config.server_ca_file is not None:
            _load_ca(context, config.server_ca_file, "tls.server_ca_file")
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.server_cert_file is not None and config.server_key_file is not None:
        _load_chain(context, config.server_cert_file, config.server_key_file, "tls.server_cert_file")
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    return ServerTlsContext(context, mode)


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str, key: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{key}: cannot load certificate {cert_file!r} with its key {key_file!r}: "
                            f"{getattr(exc, 'reason', None) or exc.strerror or exc}")


def _load_ca(context: ssl.SSLContext, ca_file: str, key: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{key}: cannot load CA certificates {ca_file!r}: "
                            f"{getattr(exc, 'reason', None) or exc.strerror or exc}")


def _end_point_of_file(cert_file: str) -> bytes | None:
    try:
        with open(cert_file, "rb") as file:
            pem = file.read()
        certificate = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"tls.cert_file: cannot read certificate {cert_file!r}: {exc}")
    return tls_server_end_point(certificate)


def tls_server_end_point(certificate: x509.Certificate) -> bytes | None:
    """RFC 5929 tls-server-end-point: the certificate's hash, with its signature's hash function (SHA-256
    for MD5 and SHA-1). None for a signature without one (Ed25519), as PostgreSQL has no binding then."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None:
        return None
    der = certificate.public_bytes(Encoding.DER)
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(der).digest()
    return hashlib.new(algorithm.name, der).digest()


def peer_common_name(peer_certificate: dict[str, Any] | None) -> str | None:
    """The CN of a verified peer certificate as `SSLObject.getpeercert()` returns it; None if it has none."""
    if not peer_certificate:
        return None
    for rdn in peer_certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer, but a failed handshake first sends the alert OpenSSL wrote (unknown CA, protocol
    version...): the client then says why it was refused instead of "unexpected EOF"."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            outgoing: ssl.MemoryBIO = getattr(self, "_outgoing")  # noqa: B009  # typeshed omits it
            alert = outgoing.read()
            transport = cast(asyncio.Transport | None, self._transport)
            if alert and transport is not None:
                transport.write(alert)
        super()._on_handshake_complete(handshake_exc)


async def start_client_tls(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                           protocol: asyncio.Protocol, context: ssl.SSLContext, received: bytes = b"") -> asyncio.Transport:
    """Server-side TLS on an accepted transport, as `loop.start_tls` does it; `received` are bytes of the
    handshake already read (the ClientHello of a direct-TLS client), fed to the TLS layer first. The
    handshake runs in the event loop's callbacks like any read, never blocking other clients."""
    waiter = loop.create_future()
    ssl_protocol = _AlertingSSLProtocol(loop, protocol, context, waiter, server_side=True,
                                        call_connection_made=False, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
    transport.pause_reading()
    transport.set_protocol(ssl_protocol)
    ssl_protocol.connection_made(transport)
    view = memoryview(received)
    while view:
        buffer = ssl_protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        ssl_protocol.buffer_updated(size)
        view = view[size:]
    transport.resume_reading()
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return ssl_protocol._app_transport  # what start_tls returns too


@dataclass(frozen=True, slots=True)
class ClientTlsSession:
    """An established client TLS connection, as the handshake needs it."""

    context: ClientTlsContext
    direct: bool  # TLS from the first byte (no SSLRequest)
    alpn: str | None
    peer_certificate: bool  # the client presented a certificate (the CA verified it)
    peer_cn: str | None
    version: str | None


def client_session_of(transport: asyncio.BaseTransport, context: ClientTlsContext, direct: bool) -> ClientTlsSession:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return ClientTlsSession(context, direct, None, False, None, None)
    peer = ssl_object.getpeercert()
    return ClientTlsSession(context, direct, ssl_object.selected_alpn_protocol(), bool(peer),
                            peer_common_name(peer), ssl_object.version())
