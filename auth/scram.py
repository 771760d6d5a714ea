"""SCRAM-SHA-256 (RFC 5802/7677) and md5 password exchanges, both as server (toward clients) and as client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from auth.errors import AuthError
from config.passwords import is_md5_hash

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"  # with channel binding (RFC 5802 section 6), over TLS only
CHANNEL_BINDING_TYPE = "tls-server-end-point"  # RFC 5929, the only type PostgreSQL implements
DEFAULT_ITERATIONS = 4096
_INVALID_PASSWORD = "28P01"
_PROTOCOL_VIOLATION = "08P01"


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> ScramVerifier:
        salt = salt if salt is not None else secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as stored in pg_authid."""
        try:
            mechanism, iter_salt, keys = text.split("$")
            iterations, salt = iter_salt.split(":")
            stored, server = keys.split(":")
            if mechanism != MECHANISM:
                raise ValueError(mechanism)
            return cls(int(iterations), base64.b64decode(salt, validate=True),
                       base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except ValueError as exc:
            raise ValueError("not a SCRAM-SHA-256 verifier") from exc

    def to_text(self) -> str:
        return f"{MECHANISM}${self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"

    @classmethod
    def mock(cls, user: str, nonce: bytes) -> ScramVerifier:
        """A verifier no password matches, for a user that does not exist: its salt depends on the user name
        only (the same each time, as a real one), so the exchange cannot tell a missing user from a wrong
        password. `nonce` is a secret of the process (PostgreSQL's mock authentication nonce)."""
        salt = hashlib.sha256(b"salt:" + nonce + user.encode()).digest()[:16]
        return cls(DEFAULT_ITERATIONS, salt, secrets.token_bytes(32), secrets.token_bytes(32))


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What logs in to PostgreSQL for a client without its password (PgBouncer's SCRAM passthrough): the
    ClientKey recovered from the client's proof and the ServerKey of the stored verifier. Never logged."""

    client_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return "ScramKeys(<secret>)"


def client_key_from_proof(stored_key: bytes, auth_message: bytes, proof: bytes) -> bytes | None:
    """RFC 5802: ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); it is the client's only if
    H(ClientKey) == StoredKey. None for a proof that does not match."""
    signature = _hmac(stored_key, auth_message)
    if len(proof) != len(signature):
        return None
    client_key = _xor(proof, signature)
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return None
    return client_key


def _parse_attributes(text: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message")
        attributes[part[0]] = part[2:]
    return attributes


class ScramServer:
    """The proxy's side of a client's SCRAM exchange: first message in, final verdict out.

    `channel_binding` is the tls-server-end-point data of the TLS connection the exchange runs on (None
    without TLS): SCRAM-SHA-256-PLUS is then offered, and checked in the client's final message."""

    def __init__(self, verifier: ScramVerifier, channel_binding: bytes | None = None) -> None:
        self.verifier = verifier
        self.channel_binding = channel_binding
        self.bound = False  # the client used SCRAM-SHA-256-PLUS and its binding matched
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._binding_input = b"n,,"  # what the client's c= attribute must hold, decoded (set by handle_first)
        self.client_key = b""  # once the proof matched: what logs in to PostgreSQL in its name (passthrough)

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms to offer, preferred first (as PostgreSQL orders them)."""
        return [MECHANISM_PLUS, MECHANISM] if self.channel_binding is not None else [MECHANISM]

    def handle_first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism not in self.mechanisms():
            raise AuthError(_PROTOCOL_VIOLATION, f"SASL mechanism {mechanism!r} is not supported")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message")
        gs2_flag, _, rest = text.partition(",")
        self._check_gs2_flag(mechanism, gs2_flag)
        _authzid, _, bare = rest.partition(",")
        self._binding_input = text[: len(text) - len(bare)].encode()  # the GS2 header, with its commas
        if gs2_flag.startswith("p="):
            assert self.channel_binding is not None  # PLUS is offered only with it
            self._binding_input += self.channel_binding
        attributes = _parse_attributes(bare)
        client_nonce = attributes.get("r", "")
        if not client_nonce:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message: missing nonce")
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(secrets.token_bytes(18))
        self._server_first = f"r={self._nonce},s={_b64(self.verifier.salt)},i={self.verifier.iterations}"
        return self._server_first.encode()

    def handle_final(self, data: bytes) -> bytes:
        """Check the client's proof; returns the server-final message (raises on a wrong password)."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message")
        without_proof, sep, proof_part = text.rpartition(",p=")
        if not sep:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message: missing proof")
        attributes = _parse_attributes(without_proof)
        if attributes.get("r") != self._nonce:
            raise AuthError(_PROTOCOL_VIOLATION, "SCRAM nonce mismatch")
        try:
            binding = base64.b64decode(attributes.get("c", ""), validate=True)
        except ValueError:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM channel binding")
        if not hmac.compare_digest(binding, self._binding_input):
            raise AuthError(_PROTOCOL_VIOLATION, "SCRAM channel binding check failed")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM proof")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = client_key_from_proof(self.verifier.stored_key, auth_message, proof)
        if client_key is None:
            raise AuthError(_INVALID_PASSWORD, "password authentication failed")
        self.client_key = client_key
        self.bound = self._binding_input.startswith(b"p=")
        return f"v={_b64(_hmac(self.verifier.server_key, auth_message))}".encode()

    def _check_gs2_flag(self, mechanism: str, gs2_flag: str) -> None:
        """RFC 5802's downgrade rules, with PostgreSQL's wording."""
        if gs2_flag == "n" or gs2_flag == "y":
            if mechanism == MECHANISM_PLUS:
                raise AuthError(_PROTOCOL_VIOLATION, "channel binding is required, but client does not support it")
            if gs2_flag == "y" and self.channel_binding is not None:
                # the client can bind and thinks we cannot: somebody in between removed the PLUS offer
                raise AuthError(_PROTOCOL_VIOLATION, "SCRAM channel binding negotiation error: the client "
                                "supports channel binding but thinks the server does not")
            return
        if gs2_flag.startswith("p="):
            if mechanism != MECHANISM_PLUS:
                raise AuthError(_PROTOCOL_VIOLATION, "channel binding requested without SCRAM-SHA-256-PLUS")
            if gs2_flag[2:] != CHANNEL_BINDING_TYPE:
                raise AuthError(_PROTOCOL_VIOLATION, f"unsupported SCRAM channel-binding type {gs2_flag[2:]!r}")
            return
        raise AuthError(_PROTOCOL_VIOLATION, "malformed SCRAM message: bad GS2 header")


class ScramClient:
    """The proxy's side of a server's SCRAM exchange (logging in to PostgreSQL), with a password or with a
    client's ScramKeys (passthrough: the server's salt and iteration count are those of the keys' verifier)."""

    def __init__(self, password: str | ScramKeys) -> None:
        self._password = password
        self._client_nonce = _b64(secrets.token_bytes(18))
        self._client_first_bare = f"n=,r={self._client_nonce}"
        self._auth_message = b""
        self._salted = b""

    def first_message(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attributes = _parse_attributes(text)
        nonce, salt, iterations = attributes.get("r", ""), attributes.get("s", ""), attributes.get("i", "")
        if not nonce.startswith(self._client_nonce) or not salt or not iterations.isdigit():
            raise AuthError(_PROTOCOL_VIOLATION, "server sent an invalid SCRAM challenge")
        secret = self._password
        if isinstance(secret, ScramKeys):
            client_key = secret.client_key
        else:
            self._salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), base64.b64decode(salt), int(iterations))
            client_key = _hmac(self._salted, b"Client Key")
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), self._auth_message)
        return f"{without_proof},p={_b64(_xor(client_key, signature))}".encode()

    def verify_final(self, server_final: bytes) -> None:
        attributes = _parse_attributes(server_final.decode())
        secret = self._password
        server_key = secret.server_key if isinstance(secret, ScramKeys) else _hmac(self._salted, b"Server Key")
        expected = _b64(_hmac(server_key, self._auth_message))
        if not hmac.compare_digest(attributes.get("v", ""), expected):
            raise AuthError(_PROTOCOL_VIOLATION, "server SCRAM signature mismatch")


def md5_hash(user: str, password: str) -> str:
    """`md5` + md5(password || user): the form PostgreSQL stores and pgbouncer userlists use."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """The md5 password message for a plain password or a stored `md5...` hash."""
    inner = secret[3:] if is_md5_hash(secret) else hashlib.md5((secret + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
