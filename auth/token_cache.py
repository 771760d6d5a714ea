"""LRU cache of validated tokens, keyed by the token's SHA-256 so that tokens are never kept.

A hit skips signature verification but still checks time, revocation and replay; an entry never
outlives the token's exp.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, NamedTuple

from auth.jwt import JwtValidator, ValidatedToken
from auth.keys import KeySet
from config.model import JwtConfig

_JSON = json.JSONDecoder()


class CacheEntry(NamedTuple):
    payload: bytes  # the signed claims JSON; parsed again on a hit so no caller shares a dict
    expires_at: float | None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


class TokenCache:
    """Bounded LRU of validated tokens with hit/miss/eviction counters for metrics."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 0)
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # dropped to make room
        self.expirations = 0  # dropped because the token expired

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> CacheEntry | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at is not None and entry.expires_at <= now:
            del self._entries[digest]
            self.expirations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return entry

    def put(self, digest: bytes, entry: CacheEntry) -> None:
        if self.capacity == 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1

    def purge_expired(self, now: float) -> int:
        """Drop every expired entry (a janitor job; lookups drop them lazily too)."""
        expired = [
            digest
            for digest, entry in self._entries.items()
            if entry.expires_at is not None and entry.expires_at <= now
        ]
        for digest in expired:
            del self._entries[digest]
        self.expirations += len(expired)
        return len(expired)

    def clear(self) -> None:
        self._entries.clear()


class CachedJwtValidator:
    """A JwtValidator with a token cache in front; same `validate` contract."""

    def __init__(self, validator: JwtValidator, cache: TokenCache | None = None) -> None:
        self.validator = validator
        self.cache = cache if cache is not None else TokenCache(validator.cfg.cache_size)

    @classmethod
    def from_config(cls, cfg: JwtConfig, keys: KeySet | None = None, **kwargs: Any) -> CachedJwtValidator:
        return cls(JwtValidator(cfg, keys if keys is not None else KeySet.from_config(cfg), **kwargs))

    def reload(self, cfg: JwtConfig, keys: KeySet) -> None:
        """Swap configuration and keys; cached tokens were judged by the old ones, so they go."""
        self.validator = self.validator.reloaded(cfg, keys)
        self.cache = TokenCache(cfg.cache_size)

    def reload_revocations(self) -> int:
        return self.validator.reload_revocations()

    def validate(self, token: str) -> dict[str, Any]:
        return self.validate_token(token).claims

    def validate_token(self, token: str) -> ValidatedToken:
        validator = self.validator
        validator.check_size(token)
        digest = token_digest(token)
        entry = self.cache.get(digest, validator.now())
        if entry is not None:
            claims = _JSON.decode(entry.payload.decode("utf-8"))
            validator.recheck(claims, entry.expires_at)
            return ValidatedToken(claims, entry.payload, entry.expires_at)
        validated = validator.validate_token(token)
        # Under replay protection a token is good for one connect: caching it would buy nothing.
        if validator.replay_guard is None:
            self.cache.put(digest, CacheEntry(validated.payload, validated.expires_at))
        return validated
