"""Which shards a client statement goes to when that is not the home shard alone, and the messages that go there."""

from __future__ import annotations

import re
from collections.abc import Callable

from proxy.guard import PREPARE_TRANSACTION_POOLED, Guard
from proxy.protocol import codec, sqlstate
from proxy.splitter import integer_shape
from routing.errors import RoutingError
from routing.route import Role, Route
from routing.router import Router
from routing.shard_key import Literal
from routing.sharding import Placement, ShardDecision, ShardRouter, ShardSession

_Q, _P, _B, _S, _X, _H = (ord(c) for c in "QPBSXH")
_HINT_MARK = re.compile(rb"shardgate:", re.IGNORECASE)


class FanoutPlan:
    """The shards of one statement and whether it is an extended batch (Parse ... Sync) or one Query;
    `refusal` (sqlstate, message) when it cannot run there, answered by the proxy instead. `decision`:
    the sharding decision it came from (a merge plan, the SQL each shard runs, a split INSERT)."""

    __slots__ = ("commit", "decision", "explain", "extended", "prefix", "reads", "refusal", "shards")

    def __init__(self, shards: tuple[int, ...], extended: bool, refusal: tuple[str, str] | None = None,
                 decision: ShardDecision | None = None, prefix: bytes = b"") -> None:
        self.shards = shards
        self.extended = extended
        self.refusal = refusal
        self.decision = decision
        self.prefix = prefix  # the unnamed statement's Parse, sent first (its ParseComplete hidden)
        self.reads = False  # a plain read: outside a transaction, shards' replicas may answer it
        self.explain: str | None = None  # EXPLAIN: its format ("text", "json", ...); plans kept per shard
        self.commit = False  # the COMMIT of a transaction over several shards (see proxy.twophase)


class _Point:
    """See `Scatter._learn_point`: the bytes before and after the key (a Query's body around its integer,
    or a batch around its Bind), the key's placement, its parameter number (0: a literal, in `head`), the
    shard of that literal, and the batch's Parse."""

    __slots__ = ("head", "param", "parse", "placement", "router", "shard", "tail")

    def __init__(self, head: bytes, tail: bytes, placement: Placement, param: int, shard: int,
                 parse: bytes, router: ShardRouter) -> None:
        self.router = router  # the placement is this router's: a reload's new router forgets it
        self.head = head
        self.tail = tail
        self.placement = placement
        self.param = param
        self.shard = shard
        self.parse = parse


class Scatter:
    """Plans statements for the shards of one logical database, for one session: the shard a transaction
    starts on (`home`), and the statements that go elsewhere or to several shards."""

    def __init__(self, router: Router, database: str, shard_count: int, *, pooled: bool, guard: Guard,
                 changes_state: Callable[[bytes], bool], shards: ShardRouter | None = None,
                 tenant: str | None = None) -> None:
        self.router = router
        self.database = database
        self.shard_count = shard_count
        self.pooled = pooled
        self.guard = guard
        self.changes_state = changes_state
        self.shards = shards
        self.session = ShardSession(tenant=tenant)
        self.home = 0  # the shard of the session's home server (chosen when a transaction starts)
        self.last: ShardDecision | None = None  # the last decision, for EXPLAIN
        self.unnamed_parse: bytes | None = None  # the client's last Parse of the unnamed statement
        # the Bind a Parse was routed by, in the same batch (its bytes and the Bind's position): not again
        self._bind_decided: tuple[bytes, int] | None = None
        # the last transaction's first statement, when one key alone chose its shard (see `repeats_point`)
        self._point: _Point | None = None

    def plan(self, data: bytes, pos: int, held: frozenset[int], multi: bool, attached: bool,
             statement_text: Callable[[str], bytes | None]) -> FanoutPlan | None:
        """The plan for the Query, Parse or Bind at `pos`, or None when it goes to the home shard alone
        (when not `attached`, a transaction starts: `home` moves to the shard it goes to).
        `held`: the shards the client's transaction holds servers on; `multi`: more than the home one
        (then a COMMIT or ROLLBACK goes to them all)."""
        type_code = data[pos]
        extended = type_code != _Q
        end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
        parameters: list[tuple[int, bytes | None]] | None = None
        prefix = b""
        try:
            if type_code == _P:
                name, text, _ = codec.split_parse(data[pos + 5 : end])
                found_bind = _next_bind(data, end, name)
                parameters = None
                if found_bind is not None:
                    parameters, bind_at = found_bind
                    self._bind_decided = (data, bind_at)
                if self.shards is not None:
                    if not name:
                        self.unnamed_parse = data[pos:end]
                    if parameters is None:
                        return None  # prepared on the home shard; its Binds are routed
            elif type_code == _B:
                decided = self._bind_decided
                if decided is not None and decided[0] is data and decided[1] == pos:
                    # its Parse in the same batch was routed with these parameters: to the home shard
                    self._bind_decided = None
                    return None
                _, statement, rest = codec.split_bind(data[pos + 5 : end])
                if self.shards is None:
                    return None
                if statement:
                    found_text = statement_text(statement.decode("utf-8", "replace"))
                    if found_text is None:
                        return None  # unknown statement: the server says so
                    text = found_text
                else:
                    if self.unnamed_parse is None:
                        return None  # no unnamed statement: the server says so
                    prefix = self.unnamed_parse
                    text = codec.split_parse(prefix[5:])[1]
                parameters = bind_parameters(rest)
                name = b""
            else:
                name, text = b"", data[pos + 5 : end - 1]
        except (ValueError, UnicodeDecodeError):
            return None  # malformed: the relay refuses it
        if self.shards is None:
            if not multi and _HINT_MARK.search(text) is None:
                if not attached:
                    self.home = 0  # without sharded tables, unhinted transactions run on shard 0
                return None  # only a shard hint sends a statement elsewhere (no sharded tables)
        elif _SESSION_MARK.search(text) is not None:
            refusal = self._session_setting(text)
            if refusal is not None:
                return FanoutPlan((self.home,), extended, refusal)
            return None
        sql = text.decode("utf-8", "replace")
        route = self.router.route_statement(sql)
        explain = None
        if self.shards is not None and (found_explain := _EXPLAIN.match(sql)) is not None:
            explain = _explain_format(found_explain.group(1) or "")
            sql = sql[found_explain.end():]
        if multi and route.ends_transaction:
            held_shards = tuple(sorted(held))
            refusal = self._refusal(route, text, bool(name), held_shards, multi)
            ending = FanoutPlan(held_shards, extended, refusal)
            if _COMMIT.match(text) is not None:
                ending.commit = True
            elif _PREPARE_TRANSACTION.match(text) is not None:
                code, message, _ = PREPARE_TRANSACTION_POOLED
                ending.refusal = (code, message)
            elif refusal is None and _CHAIN.search(text) is not None:
                ending.refusal = (sqlstate.FEATURE_NOT_SUPPORTED,
                                  "COMMIT AND CHAIN is not supported in a transaction over several shards: "
                                  "send COMMIT, then BEGIN")
            return ending
        decision = None
        if self.shards is not None:
            decision = self.shards.decide(sql, parameters, self.session)
            self.last = decision
            if decision.refusal is not None:
                return FanoutPlan(decision.shards, extended, decision.refusal, decision)
            if decision.anywhere:
                return None  # the home shard answers it (or the transaction's first statement with a key)
            shards = decision.shards
        else:
            found = self._shards_of(route)
            if found is None:
                return None
            shards = found
        if explain is not None:
            refusal = self._refusal(route, text, bool(name), shards, multi)
            if refusal is None and decision_rewrites(decision):
                refusal = (sqlstate.FEATURE_NOT_SUPPORTED,
                           "EXPLAIN of an INSERT split over several shards is not supported: EXPLAIN one row")
            planned = FanoutPlan(shards, extended, refusal, decision, prefix)
            planned.explain = explain
            return planned
        if len(shards) == 1 and not decision_rewrites(decision):
            shard = shards[0]
            if not attached and shard < self.shard_count:
                self.home = shard
                if self.shards is not None and pos == 0:
                    self._learn_point(data, end, sql, shard)
                return None
            if shard == self.home:
                return None
        refusal = self._refusal(route, text, bool(name), shards, multi)
        if refusal is None and name and decision_rewrites(decision):
            refusal = (sqlstate.FEATURE_NOT_SUPPORTED,
                       "a named prepared INSERT whose rows go to different shards is not supported: "
                       "use the unnamed statement, or one row per statement")
        if refusal is None and extended and self.shards is not None and _binds_before_sync(data, pos) > 1:
            refusal = (sqlstate.FEATURE_NOT_SUPPORTED,
                       "a pipeline whose statements go to different shards is not supported: "
                       "send a Sync after each statement, or use a shard hint")
        planned = FanoutPlan(shards, extended, refusal, decision, prefix)
        planned.reads = not route.write and route.role is not Role.PRIMARY
        return planned

    def _learn_point(self, data: bytes, end: int, sql: str, shard: int) -> None:
        """A transaction starts with the statement at the head of `data`, sent to `shard` by one key: a
        Query whose one integer is that key, or an unnamed Parse, Bind, ..., Sync whose Parse names the key
        (a literal or a parameter). Remember the bytes around the integer, or around the Bind."""
        assert self.shards is not None
        found = self.shards.point_key(sql)
        if found is None:
            return
        placement, key = found
        if data[0] == _Q:
            if end != len(data) or not isinstance(key, Literal):
                return
            shape = integer_shape(data)
            if shape is None or key.text != data[len(shape[0]) : len(data) - len(shape[1])].decode("ascii"):
                return
            self._point = _Point(shape[0][5:], shape[1], placement, 0, shard, b"", self.shards)
            return
        decided = self._bind_decided
        if data[0] != _P or data[5] or decided is None or decided[0] is not data:
            return
        bind_at = decided[1]
        bind_end = bind_at + 1 + codec.unpack_u32(data, bind_at + 1)[0]
        if data[bind_at + 5] or data[bind_at + 6] or bind_end > len(data) or data[-5] != _S:
            return
        param = 0 if isinstance(key, Literal) else key.number
        self._point = _Point(data[:bind_at], data[bind_end:], placement, param, shard, data[:end], self.shards)

    def repeats_point(self, data: bytes, size: int) -> int | None:
        """The shard of a new transaction's first statement when it is the last one `_learn_point` kept with
        another value for its key (another integer in the Query, another Bind): the shard that key's
        placement gives, without the parser or the router. None for anything else (the slow path decides)."""
        point = self._point
        if point is None or point.router is not self.shards:  # a reload changed the shard map since
            return None
        session = self.session
        if session.shard is not None or session.key is not None or session.tenant is not None:
            return None
        try:
            if data[0] == _Q:
                start, stop = 5 + len(point.head), size - len(point.tail)
                digits = data[start:stop]
                if not data.startswith(point.head, 5) or not data.endswith(point.tail) or not digits.isdigit():
                    return None
                shard = point.placement.shard_of_text(digits.decode("ascii"))
            else:
                start, stop = len(point.head), size - len(point.tail)
                if (not data.startswith(point.head) or not data.endswith(point.tail)
                        or not codec.whole_bind_at(data, start, stop) or data[start + 5] or data[start + 6]):
                    return None
                shard = point.shard
                if point.param:
                    parameters = bind_parameters(data[start + 7 : stop])
                    if point.param > len(parameters):
                        return None
                    format_code, raw = parameters[point.param - 1]
                    if raw is None:
                        return None
                    shard = (point.placement.shard_of_text(raw.decode("utf-8")) if format_code == 0
                             else point.placement.shard_of_binary(raw))
                self.unnamed_parse = point.parse
        except (RoutingError, ValueError):  # not a key of this column (UnicodeDecodeError is a ValueError)
            return None
        if not 0 <= shard < self.shard_count:
            return None
        return shard

    def start_point(self, shard: int) -> None:
        """`repeats_point` said `shard`: the transaction starts there, counted as the router counts it."""
        self.home = shard
        if self.shards is not None:
            self.shards.count_single()

    def _session_setting(self, text: bytes) -> tuple[str, str] | None:
        """SET/RESET shardgate.shard or shardgate.sharding_key (they also reach PostgreSQL, as custom
        settings, so SHOW answers them); RESET ALL and DISCARD ALL forget them. A refusal for a bad value."""
        sql = text.decode("utf-8", "replace")
        match = _SET_SHARD_SETTING.match(sql)
        session = self.session
        if match is not None:
            setting, value = match.group(1).lower(), _setting_value(match.group(2))
            if setting == "shard":
                if value is None or value.lower() in ("default", "none", ""):
                    session.shard = None
                    return None
                if not value.isdigit() or int(value) >= self.shard_count:
                    return (sqlstate.INVALID_PARAMETER_VALUE,
                            f'database "{self.database}" has shards 0 to {self.shard_count - 1}, not {value!r}')
                session.shard = int(value)
            else:
                session.key = None if value is None or value.lower() == "default" else value
            return None
        match = _RESET_SHARD_SETTING.match(sql)
        if match is not None:
            which = match.group(1).lower()
            if which in ("all", "shardgate.shard"):
                session.shard = None
            if which in ("all", "shardgate.sharding_key"):
                session.key = None
        return None

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
        if named and self.shards is None:
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


def decision_rewrites(decision: ShardDecision | None) -> bool:
    """The statement is not sent as the client wrote it (a split INSERT)."""
    return decision is not None and bool(decision.inserts)


_COMMIT = re.compile(rb"\s*(?:commit|end)(?:\s+(?:work|transaction))?(?:\s+and\s+no\s+chain)?\s*;?\s*\Z",
                     re.IGNORECASE)
_PREPARE_TRANSACTION = re.compile(rb"\s*prepare\s+transaction\b", re.IGNORECASE)
_CHAIN = re.compile(rb"\band\s+chain\b", re.IGNORECASE)
_SESSION_MARK = re.compile(rb"shardgate\.(?:shard|sharding_key)\b|\b(?:reset|discard)\s+all\b", re.IGNORECASE)
_SET_SHARD_SETTING = re.compile(
    r"\s*set\s+(?:session\s+|local\s+)?shardgate\.(shard|sharding_key)\s*(?:=|\bto\b)\s*(.*?)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL)
_RESET_SHARD_SETTING = re.compile(r"\s*(?:reset|discard)\s+(all|shardgate\.shard|shardgate\.sharding_key)\b",
                                  re.IGNORECASE)


def _setting_value(raw: str) -> str | None:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1].replace("''", "'")
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return raw[1:-1]
    return raw or None


def bind_parameters(rest: bytes) -> list[tuple[int, bytes | None]]:
    """A Bind's parameters after its two names: (format code, value or None), in order. ValueError when
    it is malformed."""
    return split_bind_parameters(rest)[0]


def split_bind_parameters(rest: bytes) -> tuple[list[tuple[int, bytes | None]], bytes]:
    """A Bind's parameters after its two names, and what follows them (the result format codes)."""
    unpack = codec.unpack_u32
    count = int.from_bytes(rest[0:2], "big")
    formats = [int.from_bytes(rest[2 + 2 * i : 4 + 2 * i], "big") for i in range(count)]
    pos = 2 + 2 * count
    values = int.from_bytes(rest[pos : pos + 2], "big")
    pos += 2
    if count not in (0, 1, values):
        raise ValueError("format codes do not match the parameters")
    out: list[tuple[int, bytes | None]] = []
    for index in range(values):
        if pos + 4 > len(rest):
            raise ValueError("truncated Bind")
        length = unpack(rest, pos)[0]
        pos += 4
        format_code = formats[index] if count == values else formats[0] if count == 1 else 0
        if length == 0xFFFFFFFF:
            out.append((format_code, None))
            continue
        out.append((format_code, rest[pos : pos + length]))
        pos += length
    return out, rest[pos:]


_EXPLAIN = re.compile(
    r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*explain\b\s*(\([^)]*\)\s*|(?:(?:analy[sz]e|verbose)\b\s*)*)",
    re.IGNORECASE | re.DOTALL)
_FORMAT_OPTION = re.compile(r"\bformat\s+(\w+)", re.IGNORECASE)


def _explain_format(options: str) -> str:
    found = _FORMAT_OPTION.search(options)
    return found.group(1).lower() if found is not None else "text"


def _binds_before_sync(data: bytes, pos: int) -> int:
    """How many Binds the batch from `pos` holds up to its Sync (or the end of what has arrived)."""
    size = len(data)
    binds = 0
    while size - pos >= 5:
        type_code = data[pos]
        if type_code == _S:
            break
        if type_code == _B:
            binds += 1
        pos += 1 + codec.unpack_u32(data, pos + 1)[0]
    return binds


def _next_bind(data: bytes, pos: int, name: bytes) -> tuple[list[tuple[int, bytes | None]], int] | None:
    """The parameters and position of the Bind of statement `name` that follows its Parse in the same
    batch (before its Sync), None when there is none yet."""
    size = len(data)
    while size - pos >= 5:
        end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
        if end > size:
            return None
        type_code = data[pos]
        if type_code == _B:
            _, statement, rest = codec.split_bind(data[pos + 5 : end])
            return (bind_parameters(rest), pos) if statement == name else None
        if type_code in (_S, _P, _Q):
            return None
        pos = end
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
