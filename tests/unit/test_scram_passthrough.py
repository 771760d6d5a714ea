"""SCRAM passthrough math: the ClientKey recovered from a client's proof (RFC 7677's vector, computed here
from the password with hashlib alone), and a login to a SCRAM server with the keys instead of the password."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from auth.errors import AuthError
from auth.scram import ScramClient, ScramKeys, ScramServer, ScramVerifier, client_key_from_proof

# RFC 7677 section 3: user "user", password "pencil"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
CLIENT_FIRST_BARE = f"n=user,r={CLIENT_NONCE}"
SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = ("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def reference_keys(password: str) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) as RFC 5802 defines them, without the module under test."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, hashlib.sha256(client_key).digest(), server_key


def test_client_key_recovered_from_the_rfc_proof() -> None:
    client_key, stored_key, _ = reference_keys("pencil")
    without_proof, _, proof = CLIENT_FINAL.rpartition(",p=")
    auth_message = f"{CLIENT_FIRST_BARE},{SERVER_FIRST},{without_proof}".encode()
    assert client_key_from_proof(stored_key, auth_message, base64.b64decode(proof)) == client_key


def test_a_wrong_proof_gives_no_key() -> None:
    _, stored_key, _ = reference_keys("pencil")
    without_proof, _, proof = CLIENT_FINAL.rpartition(",p=")
    auth_message = f"{CLIENT_FIRST_BARE},{SERVER_FIRST},{without_proof}".encode()
    tampered = bytearray(base64.b64decode(proof))
    tampered[0] ^= 1
    assert client_key_from_proof(stored_key, auth_message, bytes(tampered)) is None
    assert client_key_from_proof(stored_key, auth_message + b"x", base64.b64decode(proof)) is None
    assert client_key_from_proof(stored_key, auth_message, b"short") is None


def test_the_server_side_keeps_the_client_key_of_a_good_proof() -> None:
    client_key, _, _ = reference_keys("pencil")
    server = ScramServer(ScramVerifier.from_password("pencil", SALT, 4096))
    server._nonce = SERVER_FIRST.split(",")[0][2:]
    server._client_first_bare = CLIENT_FIRST_BARE
    server._server_first = SERVER_FIRST
    assert server.handle_final(CLIENT_FINAL.encode()).decode() == SERVER_FINAL
    assert server.client_key == client_key


def test_keys_answer_the_rfc_exchange_as_the_password_does() -> None:
    client_key, _, server_key = reference_keys("pencil")
    client = ScramClient(ScramKeys(client_key, server_key))
    client._client_nonce = CLIENT_NONCE
    client._client_first_bare = CLIENT_FIRST_BARE
    assert client.final_message(SERVER_FIRST.encode()).decode() == CLIENT_FINAL
    client.verify_final(SERVER_FINAL.encode())  # the server's signature checked with the ServerKey


def test_passthrough_end_to_end() -> None:
    """A client logs in to the proxy with its password; the proxy then logs in to a server holding the same
    verifier with what the proof gave it, never seeing the password."""
    verifier = ScramVerifier.from_password("their-secret")
    proxy_side = ScramServer(verifier)
    client = ScramClient("their-secret")
    client.verify_final(proxy_side.handle_final(client.final_message(
        proxy_side.handle_first("SCRAM-SHA-256", client.first_message()))))
    keys = ScramKeys(proxy_side.client_key, verifier.server_key)

    postgres = ScramServer(ScramVerifier.parse(verifier.to_text()))
    toward_server = ScramClient(keys)
    final = postgres.handle_final(toward_server.final_message(
        postgres.handle_first("SCRAM-SHA-256", toward_server.first_message())))
    toward_server.verify_final(final)
    assert "their-secret" not in repr(keys) and proxy_side.client_key.hex() not in repr(keys)


def test_mock_verifier_hides_a_missing_user() -> None:
    nonce = b"0123456789abcdef"
    first, again, other = (ScramVerifier.mock(name, nonce) for name in ("ghost", "ghost", "other"))
    assert first.salt == again.salt and first.iterations == again.iterations  # as a stored verifier would
    assert first.salt != other.salt
    assert first.salt != ScramVerifier.mock("ghost", b"another-process!").salt
    server = ScramServer(first)
    client = ScramClient("any password")
    server_first = server.handle_first("SCRAM-SHA-256", client.first_message())
    with pytest.raises(AuthError) as info:
        server.handle_final(client.final_message(server_first))
    assert info.value.sqlstate == "28P01"
