"""Which shards a client statement goes to when that is not the home shard alone, and the messages that go there."""

from __future__ import annotations

import re
from collections.abc import Callable

from proxy.guard import Guard
from proxy.protocol import codec, sqlstate
from routing.route import Route
from routing.router import Router

_Q, _P, _S, _X, _H = (ord(c) for c in "QPSXH")
_HINT_MARK = re.compile(rb"shardgate:", re.IGNORECASE)


class FanoutPlan:
    """The shards of one statement and whether it is an extended batch (Parse ... Sync) or one Query;
    `refusal` (sqlstate, message) when it cannot run there, answered by the proxy instead."""

    __slots__ = ("extended", "refusal", "shards")

    def __init__(self, shards: tuple[int, ...], extended: bool, refusal: tuple[str, str] | None = None) -> None:
        self.shards = shards
        self.extended = extended
        self.refusal = refusal


class Scatter:
    """Plans statements for several shards of one logical database, for one session."""

    def __init__(self, router: Router, database: str, shard_count: int, *, pooled: bool, guard: Guard,
                 changes_state: Callable[[bytes], bool]) -> None:
        self.router = router
        self.database = database
        self.shard_count = shard_count
        self.pooled = pooled
        self.guard = guard
        self.changes_state = changes_state

    def plan(self, data: bytes, pos: int, held: frozenset[int], multi: bool) -> FanoutPlan | None:
        """The plan for the Query or Parse at `pos`, or None when it goes to the home shard alone.
        `held`: the shards the client's transaction holds servers on; `multi`: more than the home one
        (then a COMMIT or ROLLBACK goes to them all)."""
        extended = data[pos] == _P
        end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
        try:
            if extended:
                name, text, _ = codec.split_parse(data[pos + 5 : end])
            else:
                name, text = b"", data[pos + 5 : end - 1]
        except ValueError:
            return None  # malformed: the relay refuses it
        if not multi and _HINT_MARK.search(text) is None:
            return None  # only a shard hint sends a statement elsewhere (until sharding keys exist)
        route = self.router.route_statement(text.decode("utf-8", "replace"))
        shards: tuple[int, ...] | None
        if multi and route.ends_transaction:
            shards = tuple(sorted(held))
        else:
            shards = self._shards_of(route)
            if shards is None:
                return None
        return FanoutPlan(shards, extended, self._refusal(route, text, bool(name), shards, multi))

    def _shards_of(self, route: Route) -> tuple[int, ...] | None:
        if route.shards is None:
            return tuple(range(self.shard_count))
        if route.shards == (0,):
            return None
        return route.shards

    def _refusal(self, route: Route, text: bytes, named: bool, shards: tuple[int, ...],
                 linked: bool) -> tuple[str, str] | None:
        unknown = [shard for shard in shards if shard >= self.shard_count]
        if unknown:
            return (sqlstate.INVALID_PARAMETER_VALUE,
                    f'database "{self.database}" has shards 0 to {self.shard_count - 1}, not {unknown[0]}')
        if not self.pooled:
            return (sqlstate.FEATURE_NOT_SUPPORTED,
                    'statements for several shards need pool_mode = "transaction" or "statement"')
        if named:
            return (sqlstate.FEATURE_NOT_SUPPORTED,
                    "a named prepared statement cannot be sent to several shards yet: use the unnamed statement")
        if self.changes_state(text):
            return (sqlstate.FEATURE_NOT_SUPPORTED,
                    "a statement that changes session state cannot be sent to several shards: "
                    "run it without a shard hint")
        if linked and route.ends_transaction and b";" in text.rstrip().rstrip(b";"):
            return (sqlstate.FEATURE_NOT_SUPPORTED,
                    "in a transaction over several shards, send COMMIT or ROLLBACK on its own")
        refusal = self.guard.refusal(text) if self.guard.refuses else None
        if refusal is not None:
            return refusal[0], refusal[1]
        return None


def next_part(data: bytes, extended: bool) -> tuple[int, bool] | None:
    """Where the next part of a batch for several shards ends in `data`, and whether it ends the batch:
    the first Query (simple protocol), the first Sync, or a Flush with nothing complete after it (the
    client waits for answers before it sends the rest). None while no such end has arrived."""
    pos = 0
    size = len(data)
    flushed = -1
    while size - pos >= 5:
        end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
        if end > size:
            break
        type_code = data[pos]
        if (not extended and type_code == _Q) or (extended and type_code == _S):
            return end, True
        if type_code == _X:
            break
        flushed = end if type_code == _H else -1
        pos = end
    if extended and flushed == pos and flushed > 0:
        return flushed, False
    return None


def unnamed_parse(batch: bytes) -> bytes | None:
    """The last Parse of the unnamed statement in `batch` (client messages), or None."""
    found = None
    pos = 0
    size = len(batch)
    while size - pos >= 5:
        end = pos + 1 + codec.unpack_u32(batch, pos + 1)[0]
        if batch[pos] == _P and batch[pos + 5] == 0:
            found = batch[pos:end]
        pos = end
    return found
