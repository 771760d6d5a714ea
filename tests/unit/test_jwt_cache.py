"""Token cache: LRU by token hash, bounded by exp, and hits that still honour revocation and replay."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

import auth.jwt
from auth.errors import AuthError
from auth.jwt import JwtValidator
from auth.keys import KeySet
from auth.token_cache import CachedJwtValidator, CacheEntry, TokenCache, token_digest
from tests.unit.test_jwt import NOW, Clock, claims, hs_cfg, hs_token


def cached(clock: Clock, **overrides: Any) -> CachedJwtValidator:
    cfg = hs_cfg(**overrides)
    return CachedJwtValidator(JwtValidator(cfg, KeySet.from_config(cfg), now=clock))


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = auth.jwt._verify_any

    def counting(*args: Any) -> bool:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(auth.jwt, "_verify_any", counting)
    return calls


def test_hit_skips_signature_verification(verify_calls: list[int]) -> None:
    validator = cached(Clock())
    token = hs_token()
    first = validator.validate(token)
    second = validator.validate(token)
    assert first == second == claims()
    assert len(verify_calls) == 1
    assert (validator.cache.hits, validator.cache.misses) == (1, 1)


def test_hits_return_independent_claims() -> None:
    validator = cached(Clock())
    token = hs_token(claims(app_metadata={"tenant_id": "t1"}))
    validator.validate(token)["app_metadata"]["tenant_id"] = "t2"
    assert validator.validate(token)["app_metadata"]["tenant_id"] == "t1"


def test_cache_is_keyed_by_sha256_and_never_holds_the_token() -> None:
    validator = cached(Clock())
    token = hs_token()
    validator.validate(token)
    entries = validator.cache._entries
    assert list(entries) == [hashlib.sha256(token.encode()).digest()]
    signature = token.split(".")[2]
    assert signature not in repr(entries) and token not in repr(entries)


def test_expired_token_is_not_served_from_the_cache(verify_calls: list[int]) -> None:
    clock = Clock()
    validator = cached(clock)
    token = hs_token(claims(exp=NOW + 60))
    assert validator.validate(token)
    clock.t = NOW + 60
    with pytest.raises(AuthError) as info:
        validator.validate(token)
    assert info.value.message == "token expired"
    assert validator.cache.expirations == 1 and len(validator.cache) == 0
    assert len(verify_calls) == 2  # the second attempt went through full validation


def test_entry_never_outlives_exp_even_with_leeway() -> None:
    clock = Clock()
    validator = cached(clock, leeway_s=30)
    token = hs_token(claims(exp=NOW + 60))
    validator.validate(token)
    assert validator.cache._entries[token_digest(token)].expires_at == NOW + 60
    clock.t = NOW + 70  # past exp, inside leeway: a full validation accepts it, the cache does not serve it
    assert validator.validate(token)
    assert validator.cache.expirations == 1


def test_lru_eviction_order_and_counters() -> None:
    cache = TokenCache(capacity=2)
    a, b, c = (hashlib.sha256(name).digest() for name in (b"a", b"b", b"c"))
    cache.put(a, CacheEntry(b"{}", None))
    cache.put(b, CacheEntry(b"{}", None))
    assert cache.get(a, NOW) is not None  # a becomes the most recent
    cache.put(c, CacheEntry(b"{}", None))  # evicts b, the least recent
    assert cache.get(b, NOW) is None
    assert cache.get(a, NOW) is not None and cache.get(c, NOW) is not None
    assert (cache.hits, cache.misses, cache.evictions, len(cache)) == (3, 1, 1, 2)


def test_validator_cache_is_bounded_by_cache_size() -> None:
    validator = cached(Clock(), cache_size=3)
    tokens = [hs_token(claims(sub=f"user-{n}")) for n in range(5)]
    for token in tokens:
        validator.validate(token)
    assert len(validator.cache) == 3 and validator.cache.evictions == 2
    validator.validate(tokens[0])
    assert validator.cache.misses == 6


def test_cache_size_zero_disables_caching() -> None:
    validator = cached(Clock(), cache_size=0)
    token = hs_token()
    validator.validate(token)
    validator.validate(token)
    assert len(validator.cache) == 0 and validator.cache.hits == 0


def test_purge_expired() -> None:
    cache = TokenCache(capacity=10)
    cache.put(b"1" * 32, CacheEntry(b"{}", NOW + 1))
    cache.put(b"2" * 32, CacheEntry(b"{}", NOW + 100))
    cache.put(b"3" * 32, CacheEntry(b"{}", None))
    assert cache.purge_expired(NOW + 50) == 1
    assert len(cache) == 2


def test_revoked_token_is_refused_even_when_cached(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    validator = cached(Clock(), revoked_jti_file=str(revoked))
    token = hs_token(claims(jti="j-1"))
    validator.validate(token)
    revoked.write_text("j-1\n")
    assert validator.reload_revocations() == 1
    with pytest.raises(AuthError) as info:
        validator.validate(token)
    assert info.value.message == "token revoked"


def test_replayed_token_is_refused_through_the_cache() -> None:
    validator = cached(Clock(), replay_protection=True)
    token = hs_token(claims(jti="once"))
    validator.validate(token)
    with pytest.raises(AuthError) as info:
        validator.validate(token)
    assert info.value.message == "token replayed"
    assert len(validator.cache) == 0  # one-use tokens are not worth caching


def test_a_hit_is_refused_when_the_guard_has_the_jti() -> None:
    # Even if an entry got into the cache, a hit never counts as the first use of its jti.
    clock = Clock()
    validator = cached(clock, replay_protection=True)
    token = hs_token(claims(jti="once"))
    validated = validator.validator.validate_token(token)
    validator.cache.put(token_digest(token), CacheEntry(validated.payload, validated.expires_at))
    with pytest.raises(AuthError, match="token replayed"):
        validator.validate(token)


def test_reload_drops_cached_tokens_and_needs_the_new_key() -> None:
    clock = Clock()
    validator = cached(clock)
    token = hs_token()
    validator.validate(token)
    new_cfg = hs_cfg(secret="a-brand-new-rotated-secret-that-is-long-enough-012345")
    validator.reload(new_cfg, KeySet.from_config(new_cfg))
    assert len(validator.cache) == 0
    with pytest.raises(AuthError) as info:
        validator.validate(token)
    assert info.value.sqlstate == "28P01"


def test_size_and_empty_checks_come_before_the_cache() -> None:
    validator = cached(Clock(), max_token_bytes=50)
    with pytest.raises(AuthError, match="JWT required"):
        validator.validate("")
    with pytest.raises(AuthError, match="token too large"):
        validator.validate(hs_token())
    assert validator.cache.misses == 0
