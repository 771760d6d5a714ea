"""JWT validation: signature against the key set, time and audience rules, revocation and replay.

Pure and synchronous; the clock is injectable. Every rejection is an AuthError whose message
names the reason and never contains the token or a key.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from jwt.algorithms import Algorithm, get_default_algorithms

from auth.claims import check_claim_names, claim_at, printable
from auth.errors import AuthError
from auth.identity import Identity
from auth.keys import SUPPORTED_ALGORITHMS, JwtSetupError, KeySet, VerificationKey
from config.model import JwtConfig

INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
INSUFFICIENT_PRIVILEGE = "42501"
INSUFFICIENT_RESOURCES = "53000"

# Headers that point at keys or semantics we never honour; a token carrying them is refused.
REFUSED_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
DEFAULT_REPLAY_CAPACITY = 100_000

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_ALGORITHM_NAME = re.compile(r"[A-Za-z0-9]{1,16}")
_IMPLEMENTATIONS: dict[str, Algorithm] = {
    name: impl for name, impl in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS
}


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    claims: dict[str, Any]
    payload: bytes  # the signed JSON, what the token cache keeps
    expires_at: float | None  # exp, None when the token has none


class _Malformed(Exception):
    pass


class ReplayGuard:
    """jtis seen and not yet expired. Bounded: expired jtis are forgotten first; when every slot holds
    a live token, new tokens are refused rather than forgetting a jti that could then be replayed."""

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, jti: str, now: float) -> bool:
        expires_at = self._expiry.get(jti)
        return expires_at is not None and expires_at > now

    def accept(self, jti: str, expires_at: float, now: float) -> bool:
        """Record a first use; False when the jti was already used within its lifetime."""
        self.forget_expired(now)
        if jti in self._expiry:
            return False
        if len(self._expiry) >= self.capacity:
            raise AuthError(
                INSUFFICIENT_RESOURCES, "too many live tokens for replay protection, try again later"
            )
        self._expiry[jti] = expires_at
        heapq.heappush(self._by_expiry, (expires_at, jti))
        return True

    def forget_expired(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now:
            _, jti = heapq.heappop(self._by_expiry)
            self._expiry.pop(jti, None)


def load_revoked_jtis(path: str) -> frozenset[str]:
    """One jti per line; blank lines and lines starting with # are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise JwtSetupError(f"jwt.revoked_jti_file {path}: cannot read ({reason})") from None
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )


class JwtValidator:
    """Checks tokens against one [jwt] configuration and key set."""

    def __init__(
        self,
        cfg: JwtConfig,
        keys: KeySet,
        now: Callable[[], float] = time.time,
        *,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        for alg in cfg.algorithms:
            if alg.lower() == "none":
                raise JwtSetupError("jwt.algorithms: none is never allowed")
            if alg not in SUPPORTED_ALGORITHMS:
                raise JwtSetupError(
                    f"jwt.algorithms: unsupported {alg} (supported: {', '.join(SUPPORTED_ALGORITHMS)})"
                )
        if not cfg.algorithms:
            raise JwtSetupError("jwt.algorithms: name at least one algorithm")
        if not any(keys.candidates(alg, None) for alg in cfg.algorithms):
            raise JwtSetupError(
                "jwt: no key fits any of jwt.algorithms (set secret, secret_file, public_keys or jwks_file)"
            )
        check_claim_names(cfg)
        self.cfg = cfg
        self.keys = keys
        self._now = now
        self._allowed = frozenset(cfg.algorithms)
        self._audience = frozenset(cfg.audience)
        self._allowed_roles = frozenset(cfg.allowed_roles)
        self.rejections: Counter[str] = Counter()  # reason -> count, for metrics
        self.revoked: frozenset[str] = (
            load_revoked_jtis(cfg.revoked_jti_file) if cfg.revoked_jti_file else frozenset()
        )
        self.replay_guard: ReplayGuard | None = None
        if cfg.replay_protection:
            capacity = getattr(cfg, "replay_capacity", DEFAULT_REPLAY_CAPACITY)
            self.replay_guard = replay_guard if replay_guard is not None else ReplayGuard(capacity)

    def reloaded(self, cfg: JwtConfig, keys: KeySet) -> JwtValidator:
        """A validator for a new configuration that keeps the jtis already seen (a reload must not
        reopen a replay window)."""
        return JwtValidator(cfg, keys, self._now, replay_guard=self.replay_guard)

    def reload_revocations(self) -> int:
        """Re-read revoked_jti_file; on error the old list stays and JwtSetupError is raised."""
        path = self.cfg.revoked_jti_file
        self.revoked = load_revoked_jtis(path) if path else frozenset()
        return len(self.revoked)

    # -- the full check -------------------------------------------------------------------------

    def validate(self, token: str) -> dict[str, Any]:
        """The claims of a valid token, else AuthError."""
        return self.validate_token(token).claims

    def validate_token(self, token: str) -> ValidatedToken:
        self.check_size(token)
        now = self._now()
        try:
            header_b64, payload_b64, signature_b64 = _split(token)
            header = _json_object(_b64decode(header_b64))
        except _Malformed:
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")
        alg, kid = self._check_header(header)
        candidates = self._candidates(alg, kid)
        try:
            signature = _b64decode(signature_b64)
        except _Malformed:
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        if not _verify_any(_IMPLEMENTATIONS[alg], signing_input, signature, candidates):
            raise self._reject(INVALID_PASSWORD, "invalid_signature", "invalid signature")
        # The payload is only parsed once the signature vouches for it.
        try:
            payload = _b64decode(payload_b64)
            claims = _json_object(payload)
        except _Malformed:
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")
        expires_at = self._check_claims(claims, now)
        self.check_role(claims)
        self.check_revoked_and_replayed(claims, now, expires_at, first_use=True)
        return ValidatedToken(claims, payload, expires_at)

    def check_size(self, token: str) -> None:
        if not token:
            raise self._reject(INVALID_AUTHORIZATION, "missing", "JWT required")
        if len(token) > self.cfg.max_token_bytes:
            raise self._reject(INVALID_AUTHORIZATION, "too_large", "token too large")
        if not token.isascii():
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")

    def _check_header(self, header: dict[str, Any]) -> tuple[str, str | None]:
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")
        if alg.lower() == "none":
            raise self._reject(INVALID_AUTHORIZATION, "alg_none", "algorithm none is not allowed")
        if alg not in self._allowed:
            shown = alg if _ALGORITHM_NAME.fullmatch(alg) else "(unprintable)"
            raise self._reject(INVALID_AUTHORIZATION, "alg_not_allowed", f"algorithm {shown} is not allowed")
        for name in REFUSED_HEADERS:
            if name in header:
                raise self._reject(INVALID_AUTHORIZATION, "refused_header", f"unexpected header {name}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise self._reject(INVALID_AUTHORIZATION, "malformed", "malformed token")
        return alg, kid

    def _candidates(self, alg: str, kid: str | None) -> tuple[VerificationKey, ...]:
        candidates = self.keys.candidates(alg, kid)
        if candidates:
            return candidates
        if kid is not None and not self.keys.has_kid(kid):
            raise self._reject(INVALID_AUTHORIZATION, "unknown_kid", "unknown key id")
        if kid is not None:
            raise self._reject(
                INVALID_AUTHORIZATION, "kid_alg_mismatch", f"key id does not match algorithm {alg}"
            )
        raise self._reject(INVALID_AUTHORIZATION, "no_key", f"no key for algorithm {alg}")

    def _check_claims(self, claims: dict[str, Any], now: float) -> float | None:
        leeway_s = self.cfg.leeway_s
        exp = self._numeric(claims, "exp")
        if exp is not None and now >= exp + leeway_s:
            raise self._reject(INVALID_AUTHORIZATION, "expired", "token expired")
        nbf = self._numeric(claims, "nbf")
        if nbf is not None and now + leeway_s < nbf:
            raise self._reject(INVALID_AUTHORIZATION, "not_yet_valid", "token not yet valid")
        iat = self._numeric(claims, "iat")
        if iat is not None and iat > now + leeway_s:
            raise self._reject(INVALID_AUTHORIZATION, "iat_future", "token issued in the future")
        if self.cfg.issuer is not None:
            issuer = claims.get("iss")
            if issuer is None:
                raise self._reject(INVALID_AUTHORIZATION, "missing_claim", "missing claim iss")
            if issuer != self.cfg.issuer:
                raise self._reject(INVALID_AUTHORIZATION, "issuer", "issuer mismatch")
        self._check_audience(claims)
        for name in self.cfg.required_claims:
            if claim_at(claims, name) is None:
                raise self._reject(INVALID_AUTHORIZATION, "missing_claim", f"missing claim {name}")
        if self.replay_guard is not None:
            if exp is None:
                raise self._reject(INVALID_AUTHORIZATION, "missing_claim", "missing claim exp")
            if not isinstance(claims.get("jti"), str) or not claims["jti"]:
                raise self._reject(INVALID_AUTHORIZATION, "missing_claim", "missing claim jti")
        # float() of a huge integer overflows; such a token is as good as eternal.
        return None if exp is None else float(min(exp, 1e18))

    def _check_audience(self, claims: dict[str, Any]) -> None:
        audience = claims.get("aud")
        if audience is None:
            if self._audience:
                raise self._reject(INVALID_AUTHORIZATION, "missing_claim", "missing claim aud")
            return
        if isinstance(audience, str):
            audience = [audience]
        if not isinstance(audience, list) or not all(isinstance(item, str) for item in audience):
            raise self._reject(INVALID_AUTHORIZATION, "invalid_claim", "invalid claim aud")
        # RFC 7519 4.1.3: a token meant for an audience is refused by a reader that has none configured.
        if not self._audience.intersection(audience):
            raise self._reject(INVALID_AUTHORIZATION, "audience", "audience mismatch")

    def _numeric(self, claims: dict[str, Any], name: str) -> float | int | None:
        value = claims.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._reject(INVALID_AUTHORIZATION, "invalid_claim", f"invalid claim {name}")
        return value

    def check_role(self, claims: dict[str, Any]) -> None:
        if not self._allowed_roles:
            return
        role = claim_at(claims, self.cfg.role_claim)
        if role is None:
            raise self._reject(INSUFFICIENT_PRIVILEGE, "role", f"missing claim {self.cfg.role_claim}")
        if not isinstance(role, str) or role not in self._allowed_roles:
            raise self._reject(INSUFFICIENT_PRIVILEGE, "role", f"role {printable(role)} is not allowed")

    def check_revoked_and_replayed(
        self, claims: dict[str, Any], now: float, expires_at: float | None, *, first_use: bool
    ) -> None:
        """Revocation, then replay. `first_use` records the jti; a cached token is only looked up."""
        jti = claims.get("jti")
        if jti is None:
            return
        jti_key = jti if isinstance(jti, str) else json.dumps(jti)
        if jti_key in self.revoked:
            raise self._reject(INVALID_AUTHORIZATION, "revoked", "token revoked")
        guard = self.replay_guard
        if guard is None:
            return
        if not first_use:
            raise self._reject(INVALID_AUTHORIZATION, "replayed", "token replayed")
        if expires_at is None:  # _check_claims already demands exp under replay protection
            raise self._reject(INVALID_AUTHORIZATION, "missing_claim", "missing claim exp")
        # Remembered for as long as the token itself is accepted.
        if not guard.accept(jti_key, expires_at + self.cfg.leeway_s, now):
            raise self._reject(INVALID_AUTHORIZATION, "replayed", "token replayed")

    def recheck(self, claims: dict[str, Any], expires_at: float | None) -> None:
        """What a token cache hit must still check: time, revocation, replay."""
        now = self._now()
        self._check_claims(claims, now)
        self.check_revoked_and_replayed(claims, now, expires_at, first_use=False)

    def now(self) -> float:
        return self._now()

    def _reject(self, sqlstate: str, reason: str, message: str) -> AuthError:
        self.rejections[reason] += 1
        return AuthError(sqlstate, message)


def _split(token: str) -> tuple[str, str, str]:
    parts = token.split(".")
    if len(parts) != 3:
        raise _Malformed
    return parts[0], parts[1], parts[2]


def _b64decode(segment: str) -> bytes:
    # Strict base64url without padding: the stdlib decoder would skip stray characters.
    if len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
        raise _Malformed
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would make exp never expire


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")  # two "alg" or "sub" members: which one counts is ambiguous
    return result


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = _STRICT_JSON.decode(data.decode("utf-8"))  # RFC 7519: JWT JSON is UTF-8
    except (ValueError, RecursionError):
        raise _Malformed
    if not isinstance(value, dict):
        raise _Malformed
    return value


def _verify_any(
    impl: Algorithm, signing_input: bytes, signature: bytes, candidates: tuple[VerificationKey, ...]
) -> bool:
    for key in candidates:
        try:
            if impl.verify(signing_input, key.key, signature):
                return True
        except (InvalidSignature, ValueError, TypeError):
            continue
    return False


def check_scope(claims: dict[str, Any], required_scope: str | None) -> None:
    """42501 unless the token's scope (space-separated string or list; `scp` as a fallback) holds
    every scope in `required_scope` (space-separated)."""
    if not required_scope:
        return
    granted_claim = claims.get("scope", claims.get("scp"))
    if isinstance(granted_claim, str):
        granted = set(granted_claim.split())
    elif isinstance(granted_claim, list):
        granted = {item for item in granted_claim if isinstance(item, str)}
    else:
        granted = set()
    for scope in required_scope.split():
        if scope not in granted:
            raise AuthError(INSUFFICIENT_PRIVILEGE, f"missing scope {scope}")


def role_of(claims: dict[str, Any], cfg: JwtConfig) -> str | None:
    role = claim_at(claims, cfg.role_claim)
    return role if isinstance(role, str) else None


def identity_from_claims(claims: dict[str, Any], cfg: JwtConfig, *, user: str, database: str) -> Identity:
    exp = claims.get("exp")
    token_exp = float(min(exp, 1e18)) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    return Identity(
        user=user, database=database, claims=claims, role=role_of(claims, cfg), token_exp=token_exp
    )
