"""Global ids of Shardgate's prepared transactions: `shardgate_<instance>_<txid>_<shard>`."""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

PREFIX = "shardgate_"
# what `pg_prepared_xacts.gid LIKE` matches (the underscore escaped: it is a wildcard there)
LIKE_PATTERN = "shardgate\\_%"
_GID = re.compile(r"shardgate_([0-9a-f]{1,32})_([0-9]{1,19})_([0-9]{1,9})\Z")


class Gid(NamedTuple):
    """One shard's part of a global transaction. `decision_key` names the transaction in the log."""

    instance: str
    txid: int
    shard: int

    @property
    def text(self) -> str:
        return f"{PREFIX}{self.instance}_{self.txid}_{self.shard}"

    @property
    def decision_key(self) -> str:
        return decision_key(self.instance, self.txid)


def decision_key(instance: str, txid: int) -> str:
    return f"{instance}_{txid}"


def parse(text: str) -> Gid | None:
    """The parts of a gid Shardgate made, None for any other (a gid someone else prepared)."""
    found = _GID.match(text)
    if found is None:
        return None
    return Gid(found.group(1), int(found.group(2)), int(found.group(3)))


def new_instance_id() -> str:
    """A fresh id for one run of one proxy process: a restarted proxy is a new instance."""
    return secrets.token_hex(5)
