"""TLS pieces without sockets: [tls] validation, the tls-server-end-point hash, SCRAM-SHA-256-PLUS."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from auth.errors import AuthError
from auth.scram import ScramServer, ScramVerifier
from config.loader import ConfigError, parse
from config.model import TlsConfig
from proxy.tls import TlsContexts, TlsSetupError, peer_common_name, tls_server_end_point
from tests.tls_certs import CertificateAuthority

BASE: dict[str, Any] = {"users": [{"name": "app", "password": "pw"}], "databases": [{"name": "app"}]}


def problems(tls: Any) -> list[str]:
    try:
        parse({**BASE, "tls": tls})
    except ConfigError as exc:
        return exc.problems
    return []


def test_tls_config_defaults_and_problems_name_their_key() -> None:
    config = parse(BASE).tls
    assert (config.mode, config.min_version, config.server_tls) == ("disable", "1.2", "prefer")
    assert "!aNULL" in config.ciphers and "!MD5" in config.ciphers
    assert problems({"mode": "require"}) == ['tls.cert_file: required when tls.mode is "require"',
                                             'tls.key_file: required when tls.mode is "require"']
    assert problems({"min_version": "1.1"}) == ['tls.min_version: TLS 1.1 is refused (insecure); use "1.2" or "1.3"']
    assert problems({"min_version": "1.0"})[0].startswith("tls.min_version: TLS 1.0 is refused")
    assert problems({"mode": "sometimes"})[0].startswith("tls.mode: must be one of disable, allow, require")
    assert problems({"client_cert": "verify-full"}) == [
        "tls.client_cert: needs tls.client_ca_file, the CA that signs client certificates"]
    assert problems({"server_tls": "verify-full", "server_key_file": "k"})[0].startswith("tls.server_cert_file:")
    assert problems({"sslmode": "require"}) == ['tls.sslmode: unknown key (did you mean "mode"?)']
    assert problems("on")[0].startswith("tls: must be a table ([tls])")
    with_ca = parse({**BASE, "tls": {"mode": "allow", "cert_file": "c", "key_file": "k", "client_ca_file": "ca"}})
    assert with_ca.tls.client_cert == "verify-ca"  # a client CA alone means verify-ca, as in PostgreSQL


def test_unusable_files_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(TlsSetupError, match=r"^tls\.cert_file: cannot load certificate"):
        TlsContexts(TlsConfig(mode="require", cert_file=str(tmp_path / "none.crt"), key_file=str(tmp_path / "k")))
    ca = CertificateAuthority.create(tmp_path)
    leaf = ca.issue(tmp_path, "localhost", dns=("localhost",))
    with pytest.raises(TlsSetupError, match=r"^tls\.client_ca_file: cannot load CA"):
        TlsContexts(TlsConfig(mode="allow", cert_file=str(leaf.cert), key_file=str(leaf.key),
                              client_ca_file=str(tmp_path / "missing.crt")))
    with pytest.raises(TlsSetupError, match=r"^tls\.ciphers: no cipher"):
        TlsContexts(TlsConfig(mode="allow", cert_file=str(leaf.cert), key_file=str(leaf.key), ciphers="NOPE"))
    with pytest.raises(TlsSetupError, match=r"^tls\.server_ca_file:"):
        TlsContexts(TlsConfig(server_tls="verify-ca", server_ca_file=str(tmp_path / "missing.crt")))
    contexts = TlsContexts(TlsConfig(mode="allow", cert_file=str(leaf.cert), key_file=str(leaf.key)))
    assert contexts.client is not None and contexts.client_mode == "allow"
    assert contexts.server is not None and contexts.server.mode == "prefer"
    assert TlsContexts(TlsConfig(server_tls="disable")).server is None


def test_end_point_hash_follows_the_signature_hash(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    sha256 = ca.issue(tmp_path, "a", file_stem="a").certificate
    sha384 = ca.issue(tmp_path, "b", file_stem="b", hash_name="sha384").certificate
    assert tls_server_end_point(sha256) == hashlib.sha256(sha256.public_bytes(Encoding.DER)).digest()
    digest = tls_server_end_point(sha384)
    assert digest == hashlib.sha384(sha384.public_bytes(Encoding.DER)).digest() and len(digest) == 48


def test_peer_common_name() -> None:
    peer = {"subject": ((("countryName", "FR"),), (("commonName", "app"),))}
    assert peer_common_name(peer) == "app"
    assert peer_common_name({"subject": ((("organizationName", "x"),),)}) is None
    assert peer_common_name(None) is None


# ---------------------------------------------------------------- SCRAM-SHA-256-PLUS (RFC 5802, 5929)

BINDING = hashlib.sha256(b"the proxy certificate").digest()


def _client_final(server: ScramServer, password: str, gs2_header: bytes, binding: bytes, mechanism: str) -> bytes:
    """A client's side written from RFC 5802 directly (not with ScramClient)."""
    client_first_bare = "n=,r=clientnonce"
    server_first = server.handle_first(mechanism, gs2_header + client_first_bare.encode()).decode()
    attributes = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = f"c={base64.b64encode(gs2_header + binding).decode()},r={attributes['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def test_plus_exchange_with_the_right_binding() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"), BINDING)
    assert server.mechanisms() == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    final = _client_final(server, "pw", b"p=tls-server-end-point,,", BINDING, "SCRAM-SHA-256-PLUS")
    assert server.handle_final(final).startswith(b"v=")
    assert server.bound


def test_plus_exchange_with_another_certificate_is_refused() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"), BINDING)
    final = _client_final(server, "pw", b"p=tls-server-end-point,,", b"\x00" * 32, "SCRAM-SHA-256-PLUS")
    with pytest.raises(AuthError, match="channel binding check failed") as refused:
        server.handle_final(final)
    assert refused.value.sqlstate == "08P01"


def test_plain_scram_over_tls_still_works_without_binding() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"), BINDING)
    assert server.handle_final(_client_final(server, "pw", b"n,,", b"", "SCRAM-SHA-256")).startswith(b"v=")
    assert not server.bound


@pytest.mark.parametrize(("binding", "mechanism", "header", "message"), [
    (BINDING, "SCRAM-SHA-256", b"y,,", "negotiation error"),  # a PLUS offer was stripped on the way
    (BINDING, "SCRAM-SHA-256-PLUS", b"n,,", "client does not support it"),
    (BINDING, "SCRAM-SHA-256", b"p=tls-server-end-point,,", "without SCRAM-SHA-256-PLUS"),
    (BINDING, "SCRAM-SHA-256-PLUS", b"p=tls-unique,,", "unsupported SCRAM channel-binding type"),
    (None, "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,", "not supported"),  # no TLS: no PLUS
])
def test_downgrades_and_bad_headers_are_refused(binding: bytes | None, mechanism: str, header: bytes,
                                                message: str) -> None:
    server = ScramServer(ScramVerifier.from_password("pw"), binding)
    with pytest.raises(AuthError, match=message) as refused:
        server.handle_first(mechanism, header + b"n=,r=nonce")
    assert refused.value.sqlstate == "08P01"


def test_y_flag_without_tls_is_fine() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"))
    assert server.handle_final(_client_final(server, "pw", b"y,,", b"", "SCRAM-SHA-256")).startswith(b"v=")
