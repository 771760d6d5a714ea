"""Plain data the router hands the session: which shards, which role."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one statement goes. `shards` None means every shard.

    `write` is the parser's verdict (the statement needs the primary) even when a hint moved `role`.
    `local`: the proxy answers the statement itself (SET/RESET/SHOW shardgate.role) and `hint` holds the
    session role set or shown (ANY means auto); otherwise `hint` is the comment hint that chose `role`.
    `role_pending`: a lone BEGIN whose role the next statement may still change (SET TRANSACTION READ
    ONLY moves it to a replica): hold the BEGIN back and send it together with that statement.
    """

    role: Role = Role.PRIMARY
    shards: tuple[int, ...] | None = (0,)
    write: bool = True
    reason: str = ""
    local: bool = False
    hint: Role | None = None
    begins_transaction: bool = False
    ends_transaction: bool = False
    role_pending: bool = False

