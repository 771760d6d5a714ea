"""Router: statement text to Route (cached by text), and the per-client transaction routing state machine."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from routing.analyze import Analysis, analyze, volatile_function_set
from routing.classify import Classification, StatementKind, classify, shard_hint, split_statements
from routing.errors import RoutingError
from routing.route import Role, Route

SESSION_ROLE_SETTING = "shardgate.role"
READ_WRITE_SPLIT_MODES = ("include_primary", "exclude_primary")

# Session role values; ANY stands for "auto" (the parser decides).
_SESSION_ROLES = {"primary": Role.PRIMARY, "replica": Role.REPLICA, "auto": Role.ANY, "default": Role.ANY}

# Statements that touch no data and run wherever the client's transaction (if any) runs.
_ANY_ROLE_KINDS = frozenset(
    {
        StatementKind.COMMIT,
        StatementKind.ROLLBACK,
        StatementKind.SAVEPOINT,
        StatementKind.RELEASE_SAVEPOINT,
        StatementKind.ROLLBACK_TO_SAVEPOINT,
        StatementKind.SET_TRANSACTION,
        StatementKind.SET,
        StatementKind.RESET,
        StatementKind.DISCARD,
        StatementKind.EMPTY,
    }
)
_SESSION_ROLE_KINDS = frozenset({StatementKind.SET, StatementKind.RESET, StatementKind.SHOW})
_SESSION_RESET_KINDS = frozenset({StatementKind.RESET, StatementKind.DISCARD})
# EXPLAIN EXPLAIN ... or COPY (EXPLAIN ...) nests; past this depth give up and call it a write.
_MAX_INNER_DEPTH = 4

Analyzer = Callable[[str, frozenset[str]], Analysis]


@dataclass(frozen=True, slots=True)
class StatementDecision:
    """One statement of a text: what the keywords said, where it goes alone, and sqlglot's findings."""

    classification: Classification
    route: Route  # stateless; a comment hint is already applied
    analysis: Analysis | None = None  # None when the keyword classifier decided without sqlglot


@dataclass(frozen=True, slots=True)
class Decision:
    """The cached result for one statement text (several statements when it holds several)."""

    route: Route
    statements: tuple[StatementDecision, ...]


def _keyword_role(classification: Classification) -> Role:
    if classification.write:
        return Role.PRIMARY
    if classification.kind is StatementKind.BEGIN:
        return Role.REPLICA if classification.read_only_transaction else Role.PRIMARY
    if classification.kind in _ANY_ROLE_KINDS:
        return Role.ANY
    return Role.REPLICA


def _keyword_reason(classification: Classification) -> str:
    if classification.kind is StatementKind.COPY:
        return "copy from" if classification.write else "copy to"
    keyword = classification.keyword.lower()
    kind = classification.kind.value
    return kind if not keyword or keyword == kind else f"{kind}: {keyword}"


def _session_role_route(classification: Classification) -> Route:
    """SET/RESET/SHOW shardgate.role: answered by the proxy, never sent to a server."""
    role: Role | None = Role.ANY
    if classification.kind is StatementKind.SHOW:
        role = None  # the session state machine knows the current value
    elif classification.kind is StatementKind.SET:
        value = (classification.value or "").lower()
        role = _SESSION_ROLES.get(value)
        if role is None:
            raise RoutingError(
                f"invalid value for {SESSION_ROLE_SETTING}: {classification.value!r} "
                "(use 'primary', 'replica' or 'auto')"
            )
    return Route(Role.ANY, write=False, reason="session role", local=True, hint=role)


def _combine(routes: Sequence[Route], hint: Role | None) -> Route:
    """One route for a text that holds several statements: it all goes to one server."""
    roles = [route.role for route in routes]
    role = Role.PRIMARY if Role.PRIMARY in roles else Role.REPLICA if Role.REPLICA in roles else Role.ANY
    reason = next(route.reason for route in routes if route.role is role)
    if hint is not None and role is not Role.ANY:
        role, reason = hint, "comment hint"
    return Route(
        role,
        write=any(route.write for route in routes),
        reason=f"multi-statement: {reason}",
        hint=hint,
        begins_transaction=any(route.begins_transaction for route in routes),
        ends_transaction=any(route.ends_transaction for route in routes),
    )


# Literals and quoted identifiers of a statement; identifiers are kept, literals become `?`.
_LITERALS = re.compile(r"""("(?:[^"]|"")*")|'(?:[^']|'')*'|(?<![\w$.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?""")
_SHAPE_HEADS = ("select", "with", "values", "table", "(")
# the numeric literals of _LITERALS, alone
_NUMBER = re.compile(r"(?<![\w$.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_MAX_SHAPES = 16


def _keep_identifiers(match: re.Match[str]) -> str:
    return match.group(1) or "?"


def literal_free_key(sql: str) -> str | None:
    """The statement with literals replaced, for reads sqlglot decides; None where that is not safe.

    Only SELECT-like statements (a SET's value changes its meaning), and only texts without backslashes,
    dollar quotes or comments, where a quote cannot be told from a string boundary without a full lexer.
    """
    head = sql.lstrip()[:6].lower()
    if not head.startswith(_SHAPE_HEADS):
        return None
    if "\\" in sql or "$" in sql or "--" in sql or "/*" in sql:
        return None
    return "\x00" + _LITERALS.sub(_keep_identifiers, sql)


class Router:
    """Decides where a statement text goes, ignoring transaction state; decisions are cached by text."""

    def __init__(
        self,
        volatile_functions: Iterable[str] = (),
        cache_size: int = 4096,
        *,
        max_cached_sql_length: int = 65536,
        analyzer: Analyzer = analyze,
    ) -> None:
        self.volatile_functions = volatile_function_set(volatile_functions)
        # Huge texts (bulk INSERTs with literals) are rarely repeated: caching them only costs memory.
        self.max_cached_sql_length = max_cached_sql_length
        self._analyzer = analyzer
        self._cache: OrderedDict[str, Decision] = OrderedDict()
        self._cache_size = cache_size
        self._shapes: list[tuple[str, str, Decision]] = []  # see _learn_shape
        self._hits = 0
        self._misses = 0

    def route_statement(self, sql: str) -> Route:
        return self.decide(sql).route

    def decide(self, sql: str) -> Decision:
        """Cached by text, then by the text with its literals blanked: `WHERE id = 1` and `WHERE id = 2` are
        one decision, so clients that inline values (simple protocol) are parsed once per statement shape."""
        if len(sql) > self.max_cached_sql_length:
            self._misses += 1
            return self._decide_uncached(sql)
        cache = self._cache
        decision = cache.get(sql)
        if decision is not None:
            self._hits += 1
            cache.move_to_end(sql)
            return decision
        for head, tail, shaped in self._shapes:
            # a recent statement with one number in it, that number changed: blanking the literals
            # (several µs of regex) would find the same decision
            if sql.startswith(head) and sql.endswith(tail):
                middle = sql[len(head) : len(sql) - len(tail)]
                if middle.isdigit() and middle.isascii():
                    self._hits += 1
                    return shaped
        key = literal_free_key(sql)
        if key is not None:
            decision = cache.get(key)
            if decision is not None:
                self._hits += 1
                cache.move_to_end(key)
                self._learn_shape(sql, decision)
                return decision
        self._misses += 1
        decision = self._decide_uncached(sql)
        cache[key if key is not None else sql] = decision
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        if key is not None:
            self._learn_shape(sql, decision)
        return decision

    def _learn_shape(self, sql: str, decision: Decision) -> None:
        """Remember the text around `sql`'s only literal when it is an integer and nothing is quoted (the
        text passed `literal_free_key`'s checks): the same text with another integer there is the same
        statement shape."""
        if "'" in sql or '"' in sql:
            return
        numbers = _NUMBER.findall(sql)
        if len(numbers) != 1 or not numbers[0].isdigit():
            return
        match = _NUMBER.search(sql)
        assert match is not None
        head, tail = sql[: match.start()], sql[match.end() :]
        shapes = self._shapes
        if any(h == head and t == tail for h, t, _ in shapes):
            return
        shapes.insert(0, (head, tail, decision))
        del shapes[_MAX_SHAPES:]

    def count_reuse(self) -> None:
        """A caller reused a decision it had from this router (a session's own memo): a cache hit too."""
        self._hits += 1

    @property
    def cache_hits(self) -> int:
        return self._hits

    @property
    def cache_misses(self) -> int:
        return self._misses

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        """Forget cached decisions (after the volatile function list changes) and zero the counters."""
        self._cache.clear()
        self._shapes.clear()
        self._hits = self._misses = 0

    def _decide_uncached(self, sql: str) -> Decision:
        decision = self._decide_text(sql)
        if "shardgate:" in sql.lower() and (shards := shard_hint(sql)) is not None:
            # `shards` None means every shard (see Route)
            decision = replace(decision, route=replace(decision.route, shards=shards or None))
        return decision

    def _decide_text(self, sql: str) -> Decision:
        if ";" in sql:
            pieces = split_statements(sql)
            if len(pieces) > 1:
                statements = tuple(self._decide_statement(piece, 0) for piece in pieces)
                hint = next((s.classification.hint for s in statements if s.classification.hint), None)
                return Decision(_combine([s.route for s in statements], hint), statements)
        statement = self._decide_statement(sql, 0)
        return Decision(statement.route, (statement,))

    def _decide_statement(self, sql: str, depth: int) -> StatementDecision:
        classification = classify(sql)
        if classification.kind in _SESSION_ROLE_KINDS and classification.name == SESSION_ROLE_SETTING:
            return StatementDecision(classification, _session_role_route(classification))
        analysis: Analysis | None = None
        if classification.write is not None:
            write = classification.write
            role = _keyword_role(classification)
            reason = _keyword_reason(classification)
        elif classification.inner_sql is not None:
            # EXPLAIN and COPY (query) TO are as much a write as the statement they wrap.
            if depth >= _MAX_INNER_DEPTH:
                write, reason = True, f"{classification.kind.value}: nested too deep"
            else:
                inner = self._decide_statement(classification.inner_sql, depth + 1)
                analysis = inner.analysis
                write, reason = inner.route.write, f"{classification.kind.value}: {inner.route.reason}"
            role = Role.PRIMARY if write else Role.REPLICA
        else:
            analysis = self._analyzer(sql, self.volatile_functions)
            write, reason = analysis.write, analysis.reason
            role = Role.PRIMARY if write else Role.REPLICA
        role_pending = classification.kind is StatementKind.BEGIN and role is Role.PRIMARY
        hint = classification.hint
        if hint is not None and role is not Role.ANY:
            role, reason, role_pending = hint, f"comment hint ({reason})", False
        route = Route(
            role,
            write=write,
            reason=reason,
            hint=hint,
            begins_transaction=classification.begins_transaction,
            ends_transaction=classification.ends_transaction,
            role_pending=role_pending,
        )
        return StatementDecision(classification, route, analysis)


class TransactionState(StrEnum):
    IDLE = "idle"  # no transaction open: each statement is routed alone
    # No BEGIN, but a write went to the primary since the server was last idle (a pipeline before Sync).
    IMPLICIT_PRIMARY = "implicit_primary"
    PENDING = "pending"  # after BEGIN: its first statement decides (SET TRANSACTION READ ONLY: replica)
    PRIMARY = "primary"  # explicit transaction on the primary
    REPLICA = "replica"  # explicit read-only transaction on a replica


_IN_TRANSACTION = frozenset({TransactionState.PENDING, TransactionState.PRIMARY, TransactionState.REPLICA})


class TransactionRouting:
    """Per-client routing across statements: transactions stay on one server, session hints apply.

    The proxy calls `on_statement` for every statement it is about to send and `on_transaction_end`
    whenever a server reports ReadyForQuery with status idle (that also closes implicit transactions,
    such as an extended-protocol pipeline before Sync).
    """

    def __init__(self, router: Router, read_write_split: str = "include_primary") -> None:
        if read_write_split not in READ_WRITE_SPLIT_MODES:
            raise ValueError(
                f"read_write_split must be one of {', '.join(READ_WRITE_SPLIT_MODES)}, not {read_write_split!r}"
            )
        self.router = router
        # Which servers serve REPLICA routes is the proxy's business; kept here for it to read.
        self.read_write_split = read_write_split
        self.state = TransactionState.IDLE
        self.session_role = Role.ANY  # set by SET shardgate.role; ANY means auto

    @property
    def in_transaction(self) -> bool:
        return self.state in _IN_TRANSACTION

    def on_transaction_end(self) -> None:
        self.state = TransactionState.IDLE

    def on_statement(self, sql: str) -> Route:
        decision = self.router.decide(sql)
        if len(decision.statements) == 1:
            return self._step(decision.statements[0])
        routes = [self._step(statement) for statement in decision.statements]
        if self.state is TransactionState.PENDING:
            # Nothing after the BEGIN settled it, and it travels with the rest: it cannot wait.
            self.state = TransactionState.PRIMARY
            return _combine(routes, decision.route.hint)
        # A BEGIN that was pending goes wherever the statement that settled it goes.
        settled = [replace(route, role=Role.ANY) if route.role_pending else route for route in routes]
        return _combine(settled, decision.route.hint)

    def _step(self, statement: StatementDecision) -> Route:
        classification, route = statement.classification, statement.route
        if route.local:
            return self._session_role_statement(classification, route)
        if classification.kind in _SESSION_RESET_KINDS and classification.name == "all":
            self.session_role = Role.ANY  # RESET ALL / DISCARD ALL reset shardgate.role too
        state = self.state
        if state is TransactionState.PRIMARY or state is TransactionState.REPLICA:
            role = Role.PRIMARY if state is TransactionState.PRIMARY else Role.REPLICA
            self._after_transaction_statement(classification)
            return self._pinned(route, role, f"transaction on {role.value}")
        if state is TransactionState.PENDING:
            return self._first_in_transaction(classification, route)
        if classification.kind is StatementKind.BEGIN:
            return self._begin(route)
        if state is TransactionState.IMPLICIT_PRIMARY:
            if classification.ends_transaction:
                self.state = TransactionState.IDLE
            return self._pinned(route, Role.PRIMARY, "implicit transaction already wrote")
        role = self.chosen_role(route)
        if route.write and role is Role.PRIMARY:
            self.state = TransactionState.IMPLICIT_PRIMARY
        if role is route.role:
            return route
        return self._pinned(route, role, f"session role {role.value}")

    def _session_role_statement(self, classification: Classification, route: Route) -> Route:
        if classification.kind is StatementKind.SHOW:
            return Route(Role.ANY, write=False, reason=route.reason, local=True, hint=self.session_role)
        self.session_role = route.hint if route.hint is not None else Role.ANY
        return route

    def chosen_role(self, route: Route) -> Role:
        """Comment hint, else the session role, else the parser."""
        if route.hint is not None or route.role is Role.ANY or self.session_role is Role.ANY:
            return route.role
        return self.session_role

    def _begin(self, route: Route) -> Route:
        if self.state is TransactionState.IMPLICIT_PRIMARY:
            self.state = TransactionState.PRIMARY
            return self._pinned(route, Role.PRIMARY, "implicit transaction already wrote")
        role = self.chosen_role(route)
        if route.role_pending and self.session_role is Role.ANY:
            self.state = TransactionState.PENDING
            return Route(
                Role.PRIMARY, write=False, reason="begin", begins_transaction=True, role_pending=True
            )
        self.state = TransactionState.PRIMARY if role is Role.PRIMARY else TransactionState.REPLICA
        if role is route.role and not route.role_pending:
            return route
        return self._pinned(route, role, f"session role {role.value}")

    def _first_in_transaction(self, classification: Classification, route: Route) -> Route:
        if classification.kind is StatementKind.SET_TRANSACTION and route.hint is None:
            if classification.read_only_transaction:
                self.state = TransactionState.REPLICA
                return self._pinned(route, Role.REPLICA, "read-only transaction")
            return Route(Role.PRIMARY, write=False, reason="begin", role_pending=True)
        role = route.hint if route.hint is not None else Role.PRIMARY
        self.state = TransactionState.PRIMARY if role is Role.PRIMARY else TransactionState.REPLICA
        self._after_transaction_statement(classification)
        return self._pinned(route, role, f"transaction on {role.value}")

    def _after_transaction_statement(self, classification: Classification) -> None:
        if classification.ends_transaction and not classification.chain:
            self.state = TransactionState.IDLE

    @staticmethod
    def _pinned(route: Route, role: Role, reason: str) -> Route:
        return Route(
            role,
            shards=route.shards,
            write=route.write,
            reason=reason,
            begins_transaction=route.begins_transaction,
            ends_transaction=route.ends_transaction,
        )
