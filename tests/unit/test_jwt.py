"""JWT validation: every acceptance and rejection rule, with keys and tokens made in the test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from auth.errors import AuthError
from auth.jwt import JwtValidator, ReplayGuard, check_scope, identity_from_claims
from auth.keys import JwtSetupError, KeySet
from config.model import JwtConfig

SECRET = "a-test-hmac-secret-long-enough-for-hs512-0123456789abcdefghijklmn"
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(header: dict[str, Any], payload: Any, sign: Callable[[bytes], bytes] | None = None) -> str:
    """A token assembled by hand, for shapes PyJWT refuses to produce (alg none, key confusion)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def hs256_with(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(secret, message, hashlib.sha256).digest()


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "role": "authenticated", "exp": NOW + 3600, "iat": NOW - 10}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(payload: dict[str, Any] | None = None, alg: str = "HS256", **headers: Any) -> str:
    return pyjwt.encode(
        payload if payload is not None else claims(), SECRET, algorithm=alg, headers=headers or None
    )


def pem_public(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def make_validator(cfg: JwtConfig, clock: Clock | None = None) -> JwtValidator:
    return JwtValidator(cfg, KeySet.from_config(cfg), now=clock or Clock())


def hs_cfg(**overrides: Any) -> JwtConfig:
    return replace(JwtConfig(secret=SECRET, algorithms=("HS256",)), **overrides)


def reject(validator: JwtValidator, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        validator.validate(token)
    return info.value


# -- acceptance for every key type -------------------------------------------------------------------


def test_hs256_token_returns_its_claims() -> None:
    payload = claims(email="a@example.com", app_metadata={"tenant_id": "t1"})
    assert make_validator(hs_cfg()).validate(hs_token(payload)) == payload


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_sizes(alg: str) -> None:
    validator = make_validator(hs_cfg(algorithms=(alg,)))
    assert validator.validate(hs_token(alg=alg))["sub"] == "user-1"


@pytest.mark.parametrize(
    ("alg", "key_fixture"),
    [
        ("RS256", "rsa_key"),
        ("RS512", "rsa_key"),
        ("PS256", "rsa_key"),
        ("ES256", "ec_key"),
        ("EdDSA", "ed_key"),
    ],
)
def test_asymmetric_token_verified_with_pem_public_key(
    tmp_path: Path, request: pytest.FixtureRequest, alg: str, key_fixture: str
) -> None:
    private_key = request.getfixturevalue(key_fixture)
    cfg = JwtConfig(algorithms=(alg,), public_keys=(write(tmp_path, "key.pem", pem_public(private_key)),))
    token = pyjwt.encode(claims(), private_key, algorithm=alg)
    assert make_validator(cfg).validate(token)["sub"] == "user-1"


def test_es384_token_with_p384_key(tmp_path: Path) -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    cfg = JwtConfig(
        algorithms=("ES384",), public_keys=(write(tmp_path, "p384.pem", pem_public(private_key)),)
    )
    assert make_validator(cfg).validate(pyjwt.encode(claims(), private_key, algorithm="ES384"))


def test_certificate_pem_is_accepted_as_a_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(rsa_key, hashes.SHA256())
    )
    cfg = JwtConfig(
        algorithms=("RS256",), public_keys=(write(tmp_path, "c.pem", certificate.public_bytes(Encoding.PEM)),)
    )
    assert make_validator(cfg).validate(pyjwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_secret_file_strips_the_trailing_newline(tmp_path: Path) -> None:
    cfg = JwtConfig(algorithms=("HS256",), secret_file=write(tmp_path, "secret", SECRET + "\n"))
    assert make_validator(cfg).validate(hs_token())


# -- shape of the token ------------------------------------------------------------------------------


def test_empty_token_is_jwt_required() -> None:
    error = reject(make_validator(hs_cfg()), "")
    assert (error.sqlstate, error.message) == ("28000", "JWT required")


def test_oversized_token_refused_before_parsing() -> None:
    validator = make_validator(hs_cfg(max_token_bytes=200))
    token = hs_token(claims(padding="x" * 300))
    error = reject(validator, token)
    assert (error.sqlstate, error.message) == ("28000", "token too large")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "eyJhbGciOiJIUzI1NiJ9.e30.!!!",
        "%%%.e30.abc",
        "eyJhbGciOiJIUzI1NiJ9=.e30.abc",  # padding is not base64url
        b64(b"not json") + ".e30.abc",
        b64(b"[1, 2]") + ".e30.abc",
        b64(b'{"alg": 256}') + ".e30.abc",
        b64(b'{"alg": "HS256", "alg": "none"}') + ".e30.abc",
        b64(b'{"alg": "HS256", "kid": 7}') + ".e30.abc",
        "ëyJhbGciOiJIUzI1NiJ9.e30.abc",
        b64(b"[" * 5000) + ".e30.abc",
    ],
)
def test_malformed_tokens(token: str) -> None:
    error = reject(make_validator(hs_cfg(max_token_bytes=100_000)), token)
    assert (error.sqlstate, error.message) == ("28000", "malformed token")


def test_payload_that_is_not_a_json_object_is_malformed_even_when_signed() -> None:
    token = raw_token({"alg": "HS256"}, ["a", "list"], hs256_with(SECRET.encode()))
    assert reject(make_validator(hs_cfg()), token).message == "malformed token"


@pytest.mark.parametrize("constant", ["NaN", "Infinity"])
def test_non_finite_exp_is_malformed(constant: str) -> None:
    header = b64(b'{"alg":"HS256"}')
    payload = b64(f'{{"sub":"u","exp":{constant}}}'.encode())
    signature = b64(hs256_with(SECRET.encode())(f"{header}.{payload}".encode()))
    assert reject(make_validator(hs_cfg()), f"{header}.{payload}.{signature}").message == "malformed token"


# -- algorithm and header rules ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims())
    error = reject(make_validator(hs_cfg()), token)
    assert (error.sqlstate, error.message) == ("28000", "algorithm none is not allowed")


def test_alg_none_refused_even_with_a_signature() -> None:
    token = raw_token({"alg": "none"}, claims(), hs256_with(SECRET.encode()))
    assert reject(make_validator(hs_cfg()), token).message == "algorithm none is not allowed"


def test_algorithm_not_in_config_is_refused() -> None:
    error = reject(make_validator(hs_cfg()), hs_token(alg="HS512"))
    assert (error.sqlstate, error.message) == ("28000", "algorithm HS512 is not allowed")


def test_unprintable_algorithm_is_not_echoed() -> None:
    token = raw_token({"alg": "HS256'); DROP"}, claims(), hs256_with(SECRET.encode()))
    assert reject(make_validator(hs_cfg()), token).message == "algorithm (unprintable) is not allowed"


@pytest.mark.parametrize("header", ["jku", "x5u", "crit", "jwk", "x5c"])
def test_headers_pointing_elsewhere_are_refused(header: str) -> None:
    value: Any = ["exp"] if header in ("crit", "x5c") else "https://attacker.example/keys"
    token = hs_token(**{header: value})
    error = reject(make_validator(hs_cfg()), token)
    assert (error.sqlstate, error.message) == ("28000", f"unexpected header {header}")


# -- signatures and key confusion --------------------------------------------------------------------


def test_tampered_payload_is_invalid_signature() -> None:
    header, _, signature = hs_token().split(".")
    forged = b64(json.dumps(claims(role="admin")).encode())
    error = reject(make_validator(hs_cfg()), f"{header}.{forged}.{signature}")
    assert (error.sqlstate, error.message) == ("28P01", "invalid signature")


def test_wrong_secret_is_invalid_signature() -> None:
    token = pyjwt.encode(
        claims(), "another-test-hmac-secret-long-enough-for-hs512-0123456789abcdefgh", algorithm="HS256"
    )
    error = reject(make_validator(hs_cfg()), token)
    assert (error.sqlstate, error.message) == ("28P01", "invalid signature")


def test_truncated_signature_is_invalid_signature(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    cfg = JwtConfig(algorithms=("ES256",), public_keys=(write(tmp_path, "ec.pem", pem_public(ec_key)),))
    token = pyjwt.encode(claims(), ec_key, algorithm="ES256")
    assert reject(make_validator(cfg), token[:-8]).sqlstate == "28P01"


def test_rsa_hmac_key_confusion_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic attack: HS256 signed with the server's RSA public key PEM as the HMAC secret."""
    public_pem = pem_public(rsa_key)
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, claims(role="admin"), hs256_with(public_pem))
    pem_path = write(tmp_path, "rsa.pem", public_pem)

    # Both algorithms allowed and an HMAC secret configured: the RSA key is never used as one.
    both = JwtConfig(algorithms=("HS256", "RS256"), secret=SECRET, public_keys=(pem_path,))
    error = reject(make_validator(both), forged)
    assert (error.sqlstate, error.message) == ("28P01", "invalid signature")

    # No HMAC secret at all: there is nothing an HS256 token can be checked against.
    rsa_only = JwtConfig(algorithms=("HS256", "RS256"), public_keys=(pem_path,))
    error = reject(make_validator(rsa_only), forged)
    assert (error.sqlstate, error.message) == ("28000", "no key for algorithm HS256")

    # The usual deployment: only RS256 allowed.
    error = reject(make_validator(JwtConfig(algorithms=("RS256",), public_keys=(pem_path,))), forged)
    assert error.message == "algorithm HS256 is not allowed"


def test_key_confusion_through_a_jwks_kid(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "rsa-1"}
    cfg = JwtConfig(
        algorithms=("HS256", "RS256"), jwks_file=write(tmp_path, "jwks.json", json.dumps({"keys": [jwk]}))
    )
    forged = raw_token({"alg": "HS256", "kid": "rsa-1"}, claims(), hs256_with(pem_public(rsa_key)))
    assert reject(make_validator(cfg), forged).message == "key id does not match algorithm HS256"


def test_secret_file_holding_a_public_key_is_a_setup_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = write(tmp_path, "oops.pem", pem_public(rsa_key))
    with pytest.raises(JwtSetupError, match="looks like a public key"):
        KeySet.from_config(JwtConfig(secret_file=path))


def test_es256_token_is_not_checked_against_a_p384_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    cfg = JwtConfig(
        algorithms=("ES256", "ES384"), public_keys=(write(tmp_path, "p384.pem", pem_public(p384)),)
    )
    token = pyjwt.encode(claims(), ec_key, algorithm="ES256")
    assert reject(make_validator(cfg), token).message == "no key for algorithm ES256"


# -- kid lookup, rotation, JWKS -----------------------------------------------------------------------


def jwks_cfg(
    tmp_path: Path, jwks: list[dict[str, Any]], algorithms: tuple[str, ...] = ("RS256",)
) -> JwtConfig:
    return JwtConfig(
        algorithms=algorithms, jwks_file=write(tmp_path, "jwks.json", json.dumps({"keys": jwks}))
    )


def test_kid_rotation_with_two_active_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks = [
        RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        | {"kid": "2024", "alg": "RS256", "use": "sig"},
        RSAAlgorithm.to_jwk(rsa_key2.public_key(), as_dict=True) | {"kid": "2025", "alg": "RS256"},
    ]
    validator = make_validator(jwks_cfg(tmp_path, jwks))
    old = pyjwt.encode(claims(sub="old"), rsa_key, algorithm="RS256", headers={"kid": "2024"})
    new = pyjwt.encode(claims(sub="new"), rsa_key2, algorithm="RS256", headers={"kid": "2025"})
    assert validator.validate(old)["sub"] == "old"
    assert validator.validate(new)["sub"] == "new"
    # Without a kid, every RSA key is tried.
    assert (
        validator.validate(pyjwt.encode(claims(sub="nokid"), rsa_key2, algorithm="RS256"))["sub"] == "nokid"
    )
    # Signed by one key but naming the other: the named key decides.
    mislabelled = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "2025"})
    assert reject(validator, mislabelled).sqlstate == "28P01"
    error = reject(validator, pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "2023"}))
    assert (error.sqlstate, error.message) == ("28000", "unknown key id")


def test_rotation_with_two_pem_files(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    cfg = JwtConfig(
        algorithms=("RS256",),
        public_keys=(
            write(tmp_path, "a.pem", pem_public(rsa_key)),
            write(tmp_path, "b.pem", pem_public(rsa_key2)),
        ),
    )
    validator = make_validator(cfg)
    for key in (rsa_key, rsa_key2):
        # PEM keys carry no kid, so they also serve tokens that name one.
        assert validator.validate(pyjwt.encode(claims(), key, algorithm="RS256", headers={"kid": "any"}))


def test_jwks_with_every_key_type(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    jwks = [
        RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "r"},
        ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True) | {"kid": "e", "alg": "ES256"},
        OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True) | {"kid": "d"},
        {"kty": "oct", "kid": "h", "k": b64(SECRET.encode()), "alg": "HS256"},
        # an encryption key is not a signature key and is skipped
        RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "enc", "use": "enc"},
    ]
    validator = make_validator(jwks_cfg(tmp_path, jwks, ("RS256", "PS256", "ES256", "EdDSA", "HS256")))
    assert validator.validate(pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r"}))
    assert validator.validate(pyjwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "r"}))
    assert validator.validate(pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e"}))
    assert validator.validate(pyjwt.encode(claims(), ed_key, algorithm="EdDSA", headers={"kid": "d"}))
    assert validator.validate(hs_token(kid="h"))
    assert reject(
        validator, pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "enc"})
    ).message == "unknown key id"


def test_jwk_alg_restricts_the_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = [RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "r", "alg": "RS256"}]
    validator = make_validator(jwks_cfg(tmp_path, jwks, ("RS256", "PS256")))
    token = pyjwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "r"})
    assert reject(validator, token).message == "key id does not match algorithm PS256"


# -- time, issuer, audience, required claims ----------------------------------------------------------


def test_expired_token() -> None:
    error = reject(make_validator(hs_cfg()), hs_token(claims(exp=NOW - 1)))
    assert (error.sqlstate, error.message) == ("28000", "token expired")


def test_exp_equal_to_now_is_expired() -> None:
    assert reject(make_validator(hs_cfg()), hs_token(claims(exp=NOW))).message == "token expired"


def test_leeway_accepts_a_slightly_expired_token() -> None:
    validator = make_validator(hs_cfg(leeway_s=30))
    assert validator.validate(hs_token(claims(exp=NOW - 20)))
    assert reject(validator, hs_token(claims(exp=NOW - 31))).message == "token expired"


def test_not_yet_valid() -> None:
    validator = make_validator(hs_cfg(leeway_s=5))
    assert reject(validator, hs_token(claims(nbf=NOW + 60))).message == "token not yet valid"
    assert validator.validate(hs_token(claims(nbf=NOW + 4)))


def test_issued_in_the_future() -> None:
    validator = make_validator(hs_cfg(leeway_s=5))
    assert reject(validator, hs_token(claims(iat=NOW + 60))).message == "token issued in the future"
    assert validator.validate(hs_token(claims(iat=NOW + 4)))


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["soon", True, [1]])
def test_time_claims_must_be_numbers(name: str, value: Any) -> None:
    assert (
        reject(make_validator(hs_cfg()), hs_token(claims(**{name: value}))).message == f"invalid claim {name}"
    )


def test_issuer() -> None:
    validator = make_validator(hs_cfg(issuer="https://auth.example.com"))
    assert validator.validate(hs_token(claims(iss="https://auth.example.com")))
    assert reject(validator, hs_token(claims(iss="https://evil.example.com"))).message == "issuer mismatch"
    assert reject(validator, hs_token(claims())).message == "missing claim iss"


def test_audience_string_or_list() -> None:
    validator = make_validator(hs_cfg(audience=("shardgate", "api")))
    assert validator.validate(hs_token(claims(aud="api")))
    assert validator.validate(hs_token(claims(aud=["other", "shardgate"])))
    assert reject(validator, hs_token(claims(aud="other"))).message == "audience mismatch"
    assert reject(validator, hs_token(claims(aud=["x", "y"]))).message == "audience mismatch"
    assert reject(validator, hs_token(claims())).message == "missing claim aud"
    assert reject(validator, hs_token(claims(aud=7))).message == "invalid claim aud"


def test_token_with_an_audience_needs_one_configured() -> None:
    # RFC 7519 4.1.3: a reader that is not among the token's audiences must refuse it.
    assert (
        reject(make_validator(hs_cfg()), hs_token(claims(aud="authenticated"))).message == "audience mismatch"
    )


def test_required_claims_including_nested_paths() -> None:
    validator = make_validator(hs_cfg(required_claims=("tenant_id", "app_metadata.org")))
    assert validator.validate(hs_token(claims(tenant_id="t1", app_metadata={"org": "o1"})))
    assert (
        reject(validator, hs_token(claims(app_metadata={"org": "o1"}))).message == "missing claim tenant_id"
    )
    error = reject(validator, hs_token(claims(tenant_id="t1", app_metadata={"other": 1})))
    assert (error.sqlstate, error.message) == ("28000", "missing claim app_metadata.org")
    assert reject(validator, hs_token(claims(tenant_id=None, app_metadata={"org": "o"}))).message == (
        "missing claim tenant_id"
    )


# -- roles and scopes ---------------------------------------------------------------------------------


def test_role_must_be_allowed() -> None:
    validator = make_validator(hs_cfg(allowed_roles=("authenticated", "anon")))
    assert validator.validate(hs_token(claims(role="anon")))
    error = reject(validator, hs_token(claims(role="postgres")))
    assert (error.sqlstate, error.message) == ("42501", "role postgres is not allowed")
    error = reject(validator, hs_token(claims(role=None)))
    assert (error.sqlstate, error.message) == ("42501", "missing claim role")
    assert reject(validator, hs_token(claims(role=["anon"]))).message == "role (unprintable) is not allowed"


def test_role_from_a_nested_claim() -> None:
    validator = make_validator(hs_cfg(role_claim="app_metadata.role", allowed_roles=("tenant_user",)))
    assert validator.validate(hs_token(claims(app_metadata={"role": "tenant_user"})))
    assert reject(validator, hs_token(claims(role="tenant_user"))).sqlstate == "42501"


def test_any_role_when_allowed_roles_is_empty() -> None:
    assert make_validator(hs_cfg()).validate(hs_token(claims(role="whatever")))


@pytest.mark.parametrize(
    ("scope", "required", "ok"),
    [
        ("read write", "write", True),
        (["read", "write"], "read write", True),
        ("read", "write", False),
        (None, "read", False),
        ("read", None, True),
        ("readwrite", "read", False),
    ],
)
def test_check_scope(scope: Any, required: str | None, ok: bool) -> None:
    token_claims = claims(scope=scope)
    if ok:
        check_scope(token_claims, required)
        return
    with pytest.raises(AuthError) as info:
        check_scope(token_claims, required)
    assert info.value.sqlstate == "42501"
    assert info.value.message.startswith("missing scope ")


def test_check_scope_reads_scp_lists() -> None:
    check_scope({"scp": ["db.read"]}, "db.read")


# -- revocation and replay ----------------------------------------------------------------------------


def test_revoked_jti(tmp_path: Path) -> None:
    revoked = write(tmp_path, "revoked.txt", "# revoked on 2024-01-01\njti-1\n\n  jti-2  \n")
    validator = make_validator(hs_cfg(revoked_jti_file=revoked))
    assert reject(validator, hs_token(claims(jti="jti-2"))).message == "token revoked"
    assert validator.validate(hs_token(claims(jti="jti-3")))
    Path(revoked).write_text("jti-3\n")
    assert validator.reload_revocations() == 1
    assert reject(validator, hs_token(claims(jti="jti-3"))).message == "token revoked"
    assert validator.validate(hs_token(claims(jti="jti-2")))


def test_revocation_reload_error_keeps_the_old_list(tmp_path: Path) -> None:
    revoked = write(tmp_path, "revoked.txt", "jti-1\n")
    validator = make_validator(hs_cfg(revoked_jti_file=revoked))
    Path(revoked).unlink()
    with pytest.raises(JwtSetupError, match=r"revoked\.txt"):
        validator.reload_revocations()
    assert reject(validator, hs_token(claims(jti="jti-1"))).message == "token revoked"


def test_replay_protection_accepts_a_jti_once() -> None:
    clock = Clock()
    validator = make_validator(hs_cfg(replay_protection=True), clock)
    token = hs_token(claims(jti="once", exp=NOW + 60))
    assert validator.validate(token)
    assert reject(validator, token).message == "token replayed"
    # a different token with the same jti is a replay too
    assert reject(validator, hs_token(claims(jti="once", exp=NOW + 61))).message == "token replayed"
    assert validator.validate(hs_token(claims(jti="twice", exp=NOW + 60)))


def test_replay_protection_needs_jti_and_exp() -> None:
    validator = make_validator(hs_cfg(replay_protection=True))
    assert reject(validator, hs_token(claims())).message == "missing claim jti"
    assert reject(validator, hs_token(claims(jti="j", exp=None))).message == "missing claim exp"


def test_replay_guard_forgets_expired_jtis_and_is_bounded() -> None:
    guard = ReplayGuard(capacity=2)
    assert guard.accept("a", expires_at=10, now=0)
    assert guard.accept("b", expires_at=20, now=0)
    with pytest.raises(AuthError) as info:
        guard.accept("c", expires_at=30, now=5)
    assert info.value.sqlstate == "53000"
    assert not guard.accept("a", expires_at=10, now=9)
    assert guard.accept("c", expires_at=30, now=10)  # "a" expired and was forgotten
    assert len(guard) == 2
    assert guard.seen("b", now=15) and not guard.seen("a", now=15)


def test_a_rejected_token_does_not_burn_its_jti() -> None:
    validator = make_validator(hs_cfg(replay_protection=True, allowed_roles=("authenticated",)))
    assert reject(validator, hs_token(claims(jti="j1", role="admin"))).sqlstate == "42501"
    assert validator.validate(hs_token(claims(jti="j1")))


def test_reloaded_validator_keeps_seen_jtis() -> None:
    cfg = hs_cfg(replay_protection=True)
    validator = make_validator(cfg)
    token = hs_token(claims(jti="j"))
    validator.validate(token)
    assert reject(validator.reloaded(cfg, KeySet.from_config(cfg)), token).message == "token replayed"


# -- hygiene ------------------------------------------------------------------------------------------


def test_messages_never_contain_the_token_or_the_secret(tmp_path: Path) -> None:
    validator = make_validator(hs_cfg(issuer="iss", audience=("aud",), required_claims=("tenant_id",)))
    tokens = [
        hs_token(claims(exp=NOW - 5, iss="iss", aud="aud")),
        hs_token(claims(iss="other", aud="aud")),
        hs_token(claims(iss="iss", aud="aud")),
        hs_token(claims(iss="iss", aud="aud", tenant_id="t"))[:-3] + "AAA",
        raw_token({"alg": "none"}, claims()),
    ]
    for token in tokens:
        error = reject(validator, token)
        for part in token.split("."):
            if part:
                assert part not in error.message and part not in str(error)
        assert SECRET not in error.message


def test_rejection_reasons_are_counted() -> None:
    validator = make_validator(hs_cfg())
    reject(validator, hs_token(claims(exp=NOW - 1)))
    reject(validator, hs_token(claims(exp=NOW - 1)))
    reject(validator, "")
    assert validator.rejections == {"expired": 2, "missing": 1}


def test_identity_from_claims() -> None:
    token_claims = claims(role="anon")
    identity = identity_from_claims(token_claims, hs_cfg(), user="app", database="db")
    assert identity.is_jwt and identity.role == "anon" and identity.token_exp == NOW + 3600
    assert (identity.user, identity.database, identity.claims) == ("app", "db", token_claims)


# -- setup errors name the file or key, never key material --------------------------------------------


def test_setup_refuses_alg_none_and_unknown_algorithms() -> None:
    with pytest.raises(JwtSetupError, match="none is never allowed"):
        make_validator(hs_cfg(algorithms=("HS256", "none")))
    with pytest.raises(JwtSetupError, match="unsupported XS256"):
        make_validator(hs_cfg(algorithms=("XS256",)))


def test_setup_needs_a_key_for_the_algorithms(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(JwtSetupError, match="no key fits"):
        make_validator(JwtConfig(algorithms=("HS256",)))
    cfg = JwtConfig(algorithms=("HS256",), public_keys=(write(tmp_path, "k.pem", pem_public(rsa_key)),))
    with pytest.raises(JwtSetupError, match="no key fits"):
        make_validator(cfg)


def test_short_hmac_secret_is_refused() -> None:
    with pytest.raises(JwtSetupError, match=r"jwt.secret: HMAC secret is 6 bytes") as info:
        KeySet.from_config(JwtConfig(secret="secret"))
    assert "secret'" not in str(info.value)


def test_private_key_in_public_keys_is_refused_without_echoing_it(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = rsa_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path = write(tmp_path, "private.pem", pem)
    with pytest.raises(JwtSetupError) as info:
        KeySet.from_config(JwtConfig(algorithms=("RS256",), public_keys=(path,)))
    assert path in str(info.value) and "private key" in str(info.value)
    assert pem.decode().splitlines()[1] not in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("no pem here", "no PEM block"),
        ("-----BEGIN PUBLIC KEY-----\nZm9v\n-----END PUBLIC KEY-----\n", "cannot parse PUBLIC KEY"),
        ("-----BEGIN DH PARAMETERS-----\nZm9v\n-----END DH PARAMETERS-----\n", "unsupported PEM block"),
    ],
)
def test_bad_pem_files_name_the_file(tmp_path: Path, content: str, match: str) -> None:
    path = write(tmp_path, "bad.pem", content)
    with pytest.raises(JwtSetupError, match=match) as info:
        KeySet.from_config(JwtConfig(public_keys=(path,)))
    assert path in str(info.value)


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.pem")
    with pytest.raises(JwtSetupError, match=r"absent\.pem: cannot read"):
        KeySet.from_config(JwtConfig(public_keys=(path,)))


def test_small_rsa_key_is_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(JwtSetupError, match="1024 bits"):
        KeySet.from_config(JwtConfig(public_keys=(write(tmp_path, "small.pem", pem_public(small)),)))


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"kes": []}', 'expected an object with a "keys" list'),
        ('{"keys": [{"kty": "XYZ"}]}', "key 0: unsupported kty"),
        ('{"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB"}]}', r"key 0 \(kid k\): not a valid RSA key"),
        ('{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}', "HMAC secret is 5 bytes"),
        (
            '{"keys": [{"kty": "EC", "crv": "P-256", "alg": "RS256", "x": "", "y": ""}]}',
            "cannot be used with a EC key",
        ),
    ],
)
def test_bad_jwks_names_the_file_and_key(tmp_path: Path, document: str, match: str) -> None:
    path = write(tmp_path, "jwks.json", document)
    with pytest.raises(JwtSetupError, match=match) as info:
        KeySet.from_config(JwtConfig(jwks_file=path))
    assert path in str(info.value)


def test_jwks_with_private_material_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    path = write(tmp_path, "jwks.json", json.dumps({"keys": [jwk]}))
    with pytest.raises(JwtSetupError, match="private key material") as info:
        KeySet.from_config(JwtConfig(jwks_file=path))
    assert jwk["d"] not in str(info.value)


def test_key_repr_hides_material() -> None:
    keys = KeySet.from_config(hs_cfg())
    assert SECRET not in repr(keys.keys) and SECRET not in str(keys.describe())
