"""The forms a `password` value takes in the config: plain text, an `md5...` hash or a SCRAM verifier."""

from __future__ import annotations

SCRAM_PREFIX = "SCRAM-SHA-256$"
_HEX_DIGITS = frozenset("0123456789abcdef")


def is_md5_hash(secret: str) -> bool:
    """`md5` followed by 32 lowercase hex digits, as PostgreSQL stores an md5 password."""
    return len(secret) == 35 and secret.startswith("md5") and _HEX_DIGITS.issuperset(secret[3:])


def is_scram_verifier(secret: str) -> bool:
    """A stored SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>`)."""
    return secret.startswith(SCRAM_PREFIX)
