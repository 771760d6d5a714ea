"""Who an authenticated client is: the configured user plus, for JWT clients, the token's claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    database: str
    claims: dict[str, Any] | None = None
    role: str | None = None
    token_exp: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_jwt(self) -> bool:
        return self.claims is not None
