"""SCRAM-SHA-256 and md5 exchanges, checked against RFC 7677's test vector and against each other."""

from __future__ import annotations

import base64
import hashlib

import pytest

from auth.errors import AuthError
from auth.scram import ScramClient, ScramServer, ScramVerifier, md5_hash, md5_response


def test_rfc7677_vector() -> None:
    """RFC 7677 section 3: user 'user', password 'pencil', fixed nonces and salt."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = ScramVerifier.from_password("pencil", salt, 4096)
    server = ScramServer(verifier)
    server._nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    server._client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server._server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = server.handle_final(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_proxy_client_against_proxy_server() -> None:
    server = ScramServer(ScramVerifier.from_password("s3cret"))
    client = ScramClient("s3cret")
    server_first = server.handle_first("SCRAM-SHA-256", client.first_message())
    server_final = server.handle_final(client.final_message(server_first))
    client.verify_final(server_final)


def test_wrong_password_is_28p01() -> None:
    server = ScramServer(ScramVerifier.from_password("right"))
    client = ScramClient("wrong")
    server_first = server.handle_first("SCRAM-SHA-256", client.first_message())
    with pytest.raises(AuthError) as info:
        server.handle_final(client.final_message(server_first))
    assert info.value.sqlstate == "28P01"


def test_tampered_nonce_is_rejected() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"))
    client = ScramClient("pw")
    server_first = server.handle_first("SCRAM-SHA-256", client.first_message())
    final = client.final_message(server_first).replace(b"r=", b"r=x", 1)
    with pytest.raises(AuthError) as info:
        server.handle_final(final)
    assert info.value.sqlstate == "08P01"


def test_channel_binding_and_unknown_mechanism_refused() -> None:
    server = ScramServer(ScramVerifier.from_password("pw"))
    with pytest.raises(AuthError):
        server.handle_first("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc")
    with pytest.raises(AuthError):
        server.handle_first("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc")


def test_verifier_text_round_trip() -> None:
    verifier = ScramVerifier.from_password("pw", b"0123456789abcdef", 4096)
    assert ScramVerifier.parse(verifier.to_text()) == verifier
    with pytest.raises(ValueError):
        ScramVerifier.parse("md5abc")


def test_md5_response_matches_postgres_formula() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"pwuser").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert md5_response("user", "pw", salt) == expected
    assert md5_response("user", md5_hash("user", "pw"), salt) == expected
