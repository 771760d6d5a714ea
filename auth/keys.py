"""JWT verification keys (HMAC secrets, PEM public keys, a JWKS file), looked up by kid and algorithm.

Every key has a family (hmac, rsa, ec, okp) and a token is only ever checked against keys of the
family its `alg` names: an HS256 token never meets an RSA key, which defeats RSA/HMAC key confusion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from config.model import JwtConfig

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
OKP_ALGORITHMS = ("EdDSA",)
SUPPORTED_ALGORITHMS = (
    *HMAC_ALGORITHMS,
    *RSA_ALGORITHMS,
    *EC_ALGORITHM_BY_CURVE.values(),
    *OKP_ALGORITHMS,
)

# RFC 7518 3.2: an HMAC key at least as long as the hash output; we ask for the HS256 size everywhere.
MIN_HMAC_SECRET_BYTES = 32
MIN_RSA_KEY_BITS = 2048

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_ASYMMETRIC_MARKERS = (b"-----BEGIN", b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-")


class JwtSetupError(ValueError):
    """A [jwt] setting or key file that cannot be used; the message names the key or file, never key material."""


def algorithm_family(alg: str) -> str | None:
    """The key family an algorithm needs: hmac, rsa, ec or okp (None when unsupported)."""
    if alg in HMAC_ALGORITHMS:
        return "hmac"
    if alg in RSA_ALGORITHMS:
        return "rsa"
    if alg in EC_ALGORITHM_BY_CURVE.values():
        return "ec"
    if alg in OKP_ALGORITHMS:
        return "okp"
    return None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key that can verify signatures. `key` is bytes for HMAC, a cryptography public key otherwise."""

    family: str
    key: Any
    source: str
    kid: str | None = None
    alg: str | None = None  # a JWK's "alg": the only algorithm this key may verify
    curve: str | None = None  # EC keys: the curve fixes the algorithm (P-256 -> ES256 ...)

    def fits(self, alg: str) -> bool:
        if algorithm_family(alg) != self.family:
            return False
        if self.alg is not None and self.alg != alg:
            return False
        return not (self.family == "ec" and EC_ALGORITHM_BY_CURVE.get(self.curve or "") != alg)

    def __repr__(self) -> str:  # never show key material, even in a debugger or a log line
        return f"VerificationKey(family={self.family!r}, source={self.source!r}, kid={self.kid!r}, alg={self.alg!r})"


class KeySet:
    """All active keys; several may be active at once during a rotation."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.keys: tuple[VerificationKey, ...] = tuple(keys)
        self._by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        for key in self.keys:
            if key.kid is not None:
                self._by_kid[key.kid] = (*self._by_kid.get(key.kid, ()), key)
        self._by_alg = {alg: tuple(key for key in self.keys if key.fits(alg)) for alg in SUPPORTED_ALGORITHMS}
        self._kidless_by_alg = {
            alg: tuple(key for key in fitting if key.kid is None) for alg, fitting in self._by_alg.items()
        }

    @classmethod
    def from_config(cls, cfg: JwtConfig) -> KeySet:
        keys: list[VerificationKey] = []
        if cfg.secret:
            keys.append(_hmac_key(cfg.secret.encode("utf-8"), "jwt.secret"))
        if cfg.secret_file:
            keys.append(_hmac_key(_read_secret_file(cfg.secret_file), f"jwt.secret_file {cfg.secret_file}"))
        for path in cfg.public_keys:
            keys.extend(load_pem_keys(path))
        if cfg.jwks_file:
            keys.extend(load_jwks_file(cfg.jwks_file))
        return cls(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def has_kid(self, kid: str) -> bool:
        return kid in self._by_kid

    def candidates(self, alg: str, kid: str | None) -> tuple[VerificationKey, ...]:
        """Keys to try for a token: with a kid, the keys carrying it plus keys without any kid
        (PEM files, secrets); without a kid, every key whose family fits the algorithm."""
        if kid is None:
            return self._by_alg.get(alg, ())
        named = tuple(key for key in self._by_kid.get(kid, ()) if key.fits(alg))
        return named + self._kidless_by_alg.get(alg, ())

    def describe(self) -> list[dict[str, str | None]]:
        """What is loaded, for the admin console and logs: no key material."""
        return [{"family": k.family, "source": k.source, "kid": k.kid, "alg": k.alg} for k in self.keys]


def _hmac_key(secret: bytes, source: str, kid: str | None = None, alg: str | None = None) -> VerificationKey:
    if any(secret.lstrip().startswith(marker) for marker in _ASYMMETRIC_MARKERS):
        raise JwtSetupError(
            f"{source}: looks like a public key, not an HMAC secret; list it in jwt.public_keys"
        )
    if len(secret) < MIN_HMAC_SECRET_BYTES:
        raise JwtSetupError(
            f"{source}: HMAC secret is {len(secret)} bytes, at least {MIN_HMAC_SECRET_BYTES} are required (RFC 7518 3.2)"
        )
    return VerificationKey("hmac", secret, source, kid=kid, alg=alg)


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise JwtSetupError(f"{what} {path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _read_secret_file(path: str) -> bytes:
    # `echo secret > file` leaves a newline that is not part of the secret.
    return _read_bytes(path, "jwt.secret_file").rstrip(b"\r\n")


def load_pem_keys(path: str) -> list[VerificationKey]:
    """Public keys (or certificates) from one PEM file; a file may hold several blocks."""
    data = _read_bytes(path, "jwt.public_keys")
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise JwtSetupError(
            f"jwt.public_keys {path}: no PEM block found (expected -----BEGIN PUBLIC KEY-----)"
        )
    keys = []
    for number, block in enumerate(blocks, start=1):
        label = block.group(1).decode("ascii")
        where = f"jwt.public_keys {path} block {number}"
        if "PRIVATE" in label:
            raise JwtSetupError(f"{where}: is a private key; give the public key (openssl pkey -pubout)")
        try:
            if label == "CERTIFICATE":
                public_key: Any = x509.load_pem_x509_certificate(block.group(0)).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                public_key = load_pem_public_key(block.group(0))
            else:
                raise JwtSetupError(f"{where}: unsupported PEM block {label}")
        except (ValueError, TypeError) as exc:
            if isinstance(exc, JwtSetupError):
                raise
            raise JwtSetupError(f"{where}: cannot parse {label}") from None
        keys.append(_public_key(public_key, where))
    return keys


def _public_key(
    public_key: Any, where: str, kid: str | None = None, alg: str | None = None
) -> VerificationKey:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_KEY_BITS:
            raise JwtSetupError(
                f"{where}: RSA key is {public_key.key_size} bits, at least {MIN_RSA_KEY_BITS} are required"
            )
        return VerificationKey("rsa", public_key, where, kid=kid, alg=alg)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = public_key.curve.name
        if curve not in EC_ALGORITHM_BY_CURVE:
            raise JwtSetupError(f"{where}: unsupported EC curve {curve} (use P-256, P-384 or P-521)")
        return VerificationKey("ec", public_key, where, kid=kid, alg=alg, curve=curve)
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return VerificationKey("okp", public_key, where, kid=kid, alg=alg)
    raise JwtSetupError(f"{where}: unsupported key type {type(public_key).__name__}")


_JWK_FAMILY = {"oct": "hmac", "RSA": "rsa", "EC": "ec", "OKP": "okp"}
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi")


def load_jwks_file(path: str) -> list[VerificationKey]:
    """Signature keys from a JWKS document ({"keys": [...]}); encryption-only keys are skipped."""
    data = _read_bytes(path, "jwt.jwks_file")
    try:
        document = json.loads(data)
    except ValueError:
        raise JwtSetupError(f"jwt.jwks_file {path}: not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwtSetupError(f'jwt.jwks_file {path}: expected an object with a "keys" list')
    keys = []
    for index, jwk in enumerate(document["keys"]):
        key = _jwk_key(jwk, f"jwt.jwks_file {path} key {index}")
        if key is not None:
            keys.append(key)
    return keys


def _jwk_key(jwk: Any, where: str) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        raise JwtSetupError(f"{where}: not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtSetupError(f"{where}: kid must be a string")
    if kid is not None:
        where = f"{where} (kid {kid})"
    kty = jwk.get("kty")
    family = _JWK_FAMILY.get(kty) if isinstance(kty, str) else None
    if family is None:
        raise JwtSetupError(f"{where}: unsupported kty {kty!r} (use oct, RSA, EC or OKP)")
    if family != "hmac" and any(member in jwk for member in _PRIVATE_JWK_MEMBERS):
        raise JwtSetupError(f"{where}: contains private key material; publish only the public key")
    if jwk.get("use", "sig") != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if isinstance(key_ops, list) and "verify" not in key_ops:
        return None
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or algorithm_family(alg) != family):
        raise JwtSetupError(f"{where}: alg {alg!r} cannot be used with a {kty} key")
    try:
        if family == "hmac":
            return _hmac_key(HMACAlgorithm.from_jwk(jwk), where, kid=kid, alg=alg)
        if family == "rsa":
            public_key: Any = RSAAlgorithm.from_jwk(jwk)
        elif family == "ec":
            public_key = ECAlgorithm.from_jwk(jwk)
        else:
            public_key = OKPAlgorithm.from_jwk(jwk)
    except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, JwtSetupError):
            raise
        raise JwtSetupError(f"{where}: not a valid {kty} key") from None
    key = _public_key(public_key, where, kid=kid, alg=alg)
    if alg is not None and not key.fits(alg):
        raise JwtSetupError(f"{where}: alg {alg} does not match the key's curve")
    return key
