"""Plans a SELECT that runs on several shards: the SQL each shard runs and how to merge the shards' rows
into the answer one server holding every row would give (or a 0A000 refusal saying why it cannot be)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NoReturn

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.tokens import Token, TokenType

from routing.errors import RoutingError

FEATURE_NOT_SUPPORTED = "0A000"
# What PostgreSQL itself answers for these mistakes; the shards would answer the same.
INVALID_COLUMN_REFERENCE = "42P10"
GROUPING_ERROR = "42803"
SYNTAX_ERROR = "42601"
AMBIGUOUS_COLUMN = "42702"
INVALID_ROW_COUNT_IN_LIMIT = "2201W"
INVALID_ROW_COUNT_IN_OFFSET = "2201X"
NUMERIC_VALUE_OUT_OF_RANGE = "22003"

# Columns the rewrite appends get these names, so they can never capture an ORDER BY name.
HIDDEN_COLUMN_PREFIX = "_shardgate_hidden_"

_INT8_MAX = 2**63 - 1
_POSTGRES = Postgres()
_SUGGESTION = "filter on the sharding key to run it on one shard"


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ORDER BY key, on a column the shards return."""

    column: int  # 0-based index into the columns each shard returns
    descending: bool = False
    nulls_first: bool = False  # resolved: PostgreSQL puts NULLs last for ASC, first for DESC
    collation: str | None = None  # an explicit COLLATE "x" on the sort expression, else None (the column's own)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """An aggregate the merger combines from the shards' partial results."""

    column: int  # the column each shard returns for it (for avg: the shard's sum)
    kind: str  # "count" | "sum" | "min" | "max" | "bool_and" | "bool_or" | "avg"
    count_column: int | None = None  # avg only: the hidden column holding the shard's count
    collation: str | None = None  # min/max only: an explicit COLLATE "x" on the argument, else None


@dataclass(frozen=True, slots=True)
class MergePlan:
    """How to combine the shards' rows into one answer."""

    order_by: tuple[SortKey, ...] = ()
    limit: int | None = None  # applied at the proxy after offset
    offset: int = 0
    group_by: tuple[int, ...] | None = None  # column indexes of the group keys; None: no grouping
    aggregates: tuple[Aggregate, ...] = ()  # with group_by None and aggregates present: one group over all rows
    distinct: bool = False  # SELECT DISTINCT over the visible columns
    visible_columns: int | None = None  # the client sees only the first N columns (hidden ones follow); None: all

    @property
    def concatenates(self) -> bool:
        """True when the shards' rows can simply be sent one after the other."""
        return (not self.order_by and self.limit is None and self.offset == 0 and self.group_by is None
                and not self.aggregates and not self.distinct)


_CONCATENATE = MergePlan()


# The user-defined aggregates of the database being planned for (None: not known yet, so any function that is
# not a known built-in may be one). Set for the length of one plan_select call.
_USER_AGGREGATES: ContextVar[frozenset[str] | None] = ContextVar("user_aggregates", default=frozenset())


def plan_select(sql: str, user_aggregates: frozenset[str] | None = frozenset()) -> tuple[str, MergePlan]:
    """The SQL each shard runs and how to merge. Raises RoutingError(0A000) for what cannot be merged.

    The SQL is `sql` itself (the same object) when the shards can run the client's text; otherwise the
    client's text with only the needed parts changed, comments and parameters ($n) left as they were.
    `user_aggregates`: the database's own aggregates, which cannot be combined (None: not known yet)."""
    token = _USER_AGGREGATES.set(user_aggregates)
    try:
        return _plan_select(sql)
    finally:
        _USER_AGGREGATES.reset(token)


def _plan_select(sql: str) -> tuple[str, MergePlan]:
    tokens, statement = _parse(sql)
    if statement is None:
        return sql, _CONCATENATE
    if statement.find(exp.Window) is not None:
        _refuse("window functions across shards cannot be merged: each shard would compute them over its own "
                f"rows only; {_SUGGESTION}")
    node = statement
    parenthesized = False
    while isinstance(node, exp.Subquery):
        if any(value for key, value in node.args.items() if key != "this"):
            _refuse_parenthesized()
        node = node.this
        parenthesized = True
    if isinstance(node, exp.SetOperation):
        _refuse(f"{_set_operation_name(node)} across shards is not supported: each shard would apply it to its "
                "own rows only; send each SELECT on its own, or " + _SUGGESTION)
    if isinstance(node, exp.Values):
        if any(value for key, value in node.args.items() if key not in ("expressions", "alias")):
            _refuse("VALUES with ORDER BY, LIMIT or OFFSET across shards is not supported: run it on one shard")
        return sql, _CONCATENATE
    if not isinstance(node, exp.Select):
        _refuse(f"{node.key.upper()} across shards cannot be planned: only a SELECT can be merged")
    plan, edits = _Planner(sql, tokens, node, parenthesized).plan()
    return (_apply(sql, edits) if edits else sql), plan


def _refuse(message: str) -> NoReturn:
    raise RoutingError(message, FEATURE_NOT_SUPPORTED)


def _refuse_parenthesized() -> NoReturn:
    _refuse("a parenthesized SELECT that must be rewritten for the shards (ORDER BY or LIMIT outside the "
            "parentheses, OFFSET, avg, or a column appended for ORDER BY or GROUP BY) is not supported: write it "
            "without the outer parentheses")


def _parse(sql: str) -> tuple[list[Token], exp.Expr | None]:
    try:
        tokens = _POSTGRES.tokenize(sql)
        statements = [statement for statement in _POSTGRES.parser().parse(tokens, sql)
                      if statement is not None and not isinstance(statement, exp.Semicolon)]  # `; -- note`
    except Exception as error:  # ParseError, TokenError, RecursionError on deep nesting: none can be planned
        _refuse(f"this SELECT cannot be planned across shards: it could not be parsed ({type(error).__name__})")
    if len(statements) > 1:
        _refuse("several statements in one query across shards cannot be merged: send them one at a time")
    return tokens, statements[0] if statements else None


def _set_operation_name(node: exp.SetOperation) -> str:
    name = {exp.Union: "UNION", exp.Intersect: "INTERSECT", exp.Except: "EXCEPT"}.get(type(node), "UNION")
    return name if node.args.get("distinct", True) else f"{name} ALL"


# --- aggregates ---------------------------------------------------------------------------------------

_MERGEABLE_CLASSES: dict[type[exp.Expr], str] = {
    exp.Count: "count", exp.Sum: "sum", exp.Min: "min", exp.Max: "max", exp.Avg: "avg",
    exp.LogicalAnd: "bool_and", exp.LogicalOr: "bool_or",
}
_MERGEABLE_NAMES = {"every": "bool_and"}  # sqlglot keeps every() as an anonymous call
# PostgreSQL's built-in aggregates, for the ones sqlglot parses as anonymous calls.
_POSTGRES_AGGREGATES = frozenset({
    "any_value", "array_agg", "avg", "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or", "corr", "count",
    "covar_pop", "covar_samp", "cume_dist", "dense_rank", "every", "json_agg", "json_agg_strict",
    "json_arrayagg", "json_object_agg", "json_object_agg_strict", "json_object_agg_unique",
    "json_object_agg_unique_strict", "json_objectagg", "jsonb_agg", "jsonb_agg_strict", "jsonb_object_agg",
    "jsonb_object_agg_strict", "jsonb_object_agg_unique", "jsonb_object_agg_unique_strict", "max", "min",
    "mode", "percent_rank", "percentile_cont", "percentile_disc", "range_agg", "range_intersect_agg", "rank",
    "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy",
    "regr_syy", "stddev", "stddev_pop", "stddev_samp", "string_agg", "sum", "var_pop", "var_samp", "variance",
    "xmlagg", "grouping",
})
_LIST_AGGREGATES = frozenset({
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_agg_strict", "jsonb_agg_strict", "json_arrayagg",
    "json_object_agg", "jsonb_object_agg", "json_objectagg", "json_object_agg_strict", "json_object_agg_unique",
    "json_object_agg_unique_strict", "jsonb_object_agg_strict", "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict", "xmlagg", "range_agg", "group_concat",
})
_WHOLE_SET_AGGREGATES = frozenset({
    "percentile_cont", "percentile_disc", "mode", "median", "rank", "dense_rank", "percent_rank", "cume_dist",
})
_STATISTICS_AGGREGATES = frozenset({
    "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr", "covar_pop", "covar_samp",
    "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy",
    "regr_syy",
})
_DISTINCT_SENSITIVE = frozenset({"count", "sum", "avg"})


@dataclass(frozen=True, slots=True)
class _AggregateCall:
    kind: str
    collation: str | None  # min/max over an argument with an explicit COLLATE


def _show(node: exp.Expr) -> str:
    text = node.sql(dialect=_POSTGRES, normalize_functions="lower", comments=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _function_name(node: exp.Expr) -> str | None:
    """The aggregate's name if `node` is a call of one (its FILTER is the caller's), else None."""
    if isinstance(node, exp.WithinGroup):
        return _function_name(node.this) or "an ordered-set aggregate"
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        if name in _POSTGRES_AGGREGATES:
            return name
        users = _USER_AGGREGATES.get()
        return name if users is None or name in users else None
    kind = _MERGEABLE_CLASSES.get(type(node))
    if kind is not None:
        return kind
    if isinstance(node, exp.AggFunc):
        return _show(node).split("(", 1)[0].lower()
    if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Func) \
            and _function_name(node.expression) is not None:
        _refuse(f"the schema-qualified aggregate {_show(node)} across shards is not supported: "
                "write it without the schema")
    return None


def _aggregate_call(node: exp.Expr) -> _AggregateCall | None:
    """What the merger does with `node` if it is an aggregate call (FILTER allowed); refuses the aggregates
    whose shard results cannot be combined; None when `node` is not an aggregate call."""
    call = node.this if isinstance(node, exp.Filter) else node
    name = _function_name(call)
    if name is None:
        return None
    shown = _show(node)
    if isinstance(call, exp.WithinGroup) or name in _WHOLE_SET_AGGREGATES:
        _refuse(f"{shown} across shards cannot be merged: it needs all the rows in one place; {_SUGGESTION}")
    if isinstance(call, exp.Anonymous):
        kind = _MERGEABLE_NAMES.get(name)
    else:
        kind = _MERGEABLE_CLASSES.get(type(call))
    if kind is None:
        if name in _LIST_AGGREGATES:
            reason = "the shards' lists cannot be combined in the order one server would build them"
        elif name in _STATISTICS_AGGREGATES:
            reason = "it cannot be computed from the shards' partial results (not supported yet)"
        elif name not in _POSTGRES_AGGREGATES and _USER_AGGREGATES.get() is None:
            reason = ("the proxy has not read this database's aggregates yet, so it cannot tell whether this "
                      "function is one (try again in a moment)")
        elif name not in _POSTGRES_AGGREGATES:
            reason = "it is a user-defined aggregate, whose shard results the proxy cannot combine"
        else:
            reason = "only count, sum, min, max, avg, bool_and, bool_or and every can be combined across shards"
        _refuse(f"{shown} across shards cannot be merged: {reason}; {_SUGGESTION}")
    argument = call.expressions[0] if isinstance(call, exp.Anonymous) and call.expressions else call.this
    if isinstance(argument, exp.Distinct):
        if kind in _DISTINCT_SENSITIVE:
            _refuse(f"{shown} across shards cannot be merged: the same value can be on several shards, so the "
                    f"shards' DISTINCT results cannot be added up; {_SUGGESTION}")
        argument = argument.expressions[0] if len(argument.expressions) == 1 else None
    if isinstance(argument, exp.Order):
        argument = argument.this
    collation = None
    if kind in ("min", "max") and isinstance(argument, exp.Collate):
        collation = _collation_name(argument.expression)
    return _AggregateCall(kind, collation)


def _scope(node: exp.Expr) -> Iterator[exp.Expr]:
    """The nodes of `node` that belong to this query level (nested queries are theirs)."""
    for child in node.walk(prune=lambda inner: isinstance(inner, exp.Query | exp.Subquery) and inner is not node):
        if not isinstance(child, exp.Query | exp.Subquery) or child is node:
            yield child


def _nested_aggregate(node: exp.Expr) -> exp.Expr | None:
    """An aggregate call somewhere inside `node` at this query level (refusing unmergeable ones)."""
    for child in _scope(node):
        call = child.parent if isinstance(child.parent, exp.Filter) else child
        if _aggregate_call(call) is not None:
            return child
    return None


def _collation_name(node: exp.Expr | None) -> str | None:
    """The collation a COLLATE clause names, as PostgreSQL resolves it; None for "default"."""
    schema: str | None = None
    if isinstance(node, exp.Column):
        schema = _identifier_name(node.args.get("table"))
        node = node.this
    name = _identifier_name(node)
    if name is None or name == "default":
        return None
    return name if schema in (None, "pg_catalog") else f"{schema}.{name}"


def _identifier_name(node: exp.Expr | None) -> str | None:
    if isinstance(node, exp.Identifier):
        return node.name if node.quoted else node.name.lower()
    if isinstance(node, exp.Var):
        return node.name.lower()
    return None


# --- the text of the statement ------------------------------------------------------------------------

_OPENING = frozenset({TokenType.L_PAREN, TokenType.L_BRACKET})
_CLOSING = frozenset({TokenType.R_PAREN, TokenType.R_BRACKET})
# Depth-0 tokens that start a clause after the select list (FETCH only before FIRST/NEXT).
_CLAUSE_STARTS = {
    TokenType.FROM: "from", TokenType.INTO: "into", TokenType.WHERE: "where", TokenType.GROUP_BY: "group",
    TokenType.HAVING: "having", TokenType.WINDOW: "window", TokenType.ORDER_BY: "order",
    TokenType.LIMIT: "limit", TokenType.OFFSET: "offset", TokenType.FETCH: "fetch", TokenType.FOR: "for",
    TokenType.UNION: "union", TokenType.INTERSECT: "intersect", TokenType.EXCEPT: "except",
}


# The clauses of the text that hold what sqlglot keeps under each argument of a Select.
_CLAUSES_OF_ARG = {"order": {"order"}, "limit": {"limit", "fetch"}, "offset": {"offset"}}
_EDITED_CLAUSES = frozenset({"group", "order", "limit", "offset", "fetch"})


@dataclass(frozen=True, slots=True)
class _Span:
    first: int  # token indexes, inclusive
    last: int


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the main SELECT's parts are in the token list."""

    select: int  # the SELECT token (or the DISTINCT/ALL after it)
    items: tuple[_Span, ...]
    clauses: dict[str, _Span]  # keyword through its last token
    order_items: tuple[_Span, ...]
    group_items: tuple[_Span, ...]


def _split(tokens: Sequence[Token], first: int, last: int) -> tuple[_Span, ...]:
    """The comma-separated parts of tokens[first..last] (commas inside brackets do not split)."""
    spans: list[_Span] = []
    depth = 0
    start = first
    for index in range(first, last + 1):
        kind = tokens[index].token_type
        if kind in _CLOSING:
            depth -= 1
        elif depth == 0 and kind == TokenType.COMMA:
            spans.append(_Span(start, index - 1))
            start = index + 1
        if kind in _OPENING:
            depth += 1
    if start <= last:
        spans.append(_Span(start, last))
    return tuple(spans)


def _is_clause_start(tokens: Sequence[Token], index: int) -> bool:
    kind = tokens[index].token_type
    if kind not in _CLAUSE_STARTS:
        return False
    if kind == TokenType.FROM:  # a IS [NOT] DISTINCT FROM b
        return not (index >= 2 and tokens[index - 1].token_type == TokenType.DISTINCT
                    and tokens[index - 2].token_type in (TokenType.IS, TokenType.NOT))
    if kind == TokenType.FETCH:
        return index + 1 < len(tokens) and tokens[index + 1].token_type in (TokenType.FIRST, TokenType.NEXT)
    return True


def _layout(tokens: Sequence[Token]) -> _Layout | None:
    depth = 0
    select: int | None = None
    starts: list[int] = []
    end = len(tokens)
    for index, token in enumerate(tokens):
        kind = token.token_type
        if kind in _CLOSING:
            depth -= 1
        elif depth == 0:
            if kind == TokenType.SEMICOLON:
                end = index
                break
            if select is None:
                if kind == TokenType.SELECT:
                    select = index
            elif _is_clause_start(tokens, index):
                starts.append(index)
        if kind in _OPENING:
            depth += 1
    if select is None:
        return None
    first_item = select + 1
    if first_item < end and tokens[first_item].token_type in (TokenType.DISTINCT, TokenType.ALL):
        first_item += 1
    list_end = starts[0] if starts else end
    items = _split(tokens, first_item, list_end - 1)
    clauses: dict[str, _Span] = {}
    for position, start in enumerate(starts):
        stop = starts[position + 1] if position + 1 < len(starts) else end
        name = _CLAUSE_STARTS[tokens[start].token_type]
        if name in clauses:
            if name in _EDITED_CLAUSES:
                return None
            continue  # FROM ROWS FROM (...), FOR UPDATE OF a FOR SHARE OF b: only the first one matters
        clauses[name] = _Span(start, stop - 1)
    order_items: tuple[_Span, ...] = ()
    group_items: tuple[_Span, ...] = ()
    if "order" in clauses:
        order_items = _split(tokens, clauses["order"].first + 1, clauses["order"].last)
    if "group" in clauses:
        first = clauses["group"].first + 1
        if first <= clauses["group"].last and tokens[first].token_type in (TokenType.DISTINCT, TokenType.ALL):
            first += 1
        group_items = _split(tokens, first, clauses["group"].last)
    return _Layout(first_item - 1, items, clauses, order_items, group_items)


@dataclass(frozen=True, slots=True)
class _Edit:
    start: int  # character offsets into the client's text
    end: int
    text: str


def _apply(sql: str, edits: list[_Edit]) -> str:
    # Insertions at one position keep the order they were made in.
    # An insertion sorts before a deletion that starts where it is inserted.
    ordered = sorted(enumerate(edits), key=lambda pair: (pair[1].start, pair[1].end, pair[0]))
    pieces: list[str] = []
    position = 0
    for _, edit in ordered:
        if edit.start < position:  # a planner bug: refuse rather than send a mangled statement
            _refuse("this SELECT cannot be rewritten for the shards: its changes overlap")
        pieces.append(sql[position:edit.start])
        pieces.append(edit.text)
        position = edit.end
    pieces.append(sql[position:])
    return "".join(pieces)


# --- the planner --------------------------------------------------------------------------------------


def _key(node: exp.Expr) -> str:
    """Two expressions with one key are the same expression (unquoted names compared as PostgreSQL does)."""
    node = _unwrapped(node)
    return normalize_identifiers(node.copy(), dialect=_POSTGRES).sql(dialect=_POSTGRES, comments=False)


def _unwrapped(node: exp.Expr) -> exp.Expr:
    """`node` without the parentheses around it: to PostgreSQL `(x)` is `x`."""
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _output_name(item: exp.Expr) -> str | None:
    """The column name PostgreSQL gives a select-list item, where it can be told from the text."""
    if isinstance(item, exp.Alias):
        return _identifier_name(item.args.get("alias"))
    item = _unwrapped(item)
    while isinstance(item, exp.Cast):
        item = _unwrapped(item.this)
    if isinstance(item, exp.Filter):
        item = item.this
    if isinstance(item, exp.Column):
        return None if isinstance(item.this, exp.Star) else _identifier_name(item.this)
    if isinstance(item, exp.Anonymous):
        return item.name.lower()
    if isinstance(item, exp.Func):
        return _show(item).split("(", 1)[0].strip().lower() or None
    return None


def _is_star(item: exp.Expr) -> bool:
    return isinstance(item, exp.Star) or (isinstance(item, exp.Column) and isinstance(item.this, exp.Star))


def _integer(node: exp.Expr) -> int | None:
    """The value of an integer constant (`2`, `-1`, `(2)`), else None."""
    node = _unwrapped(node)
    negative = isinstance(node, exp.Neg)
    if negative:
        node = _unwrapped(node.this)
    if isinstance(node, exp.Literal) and not node.is_string and node.name.isdigit():
        return -int(node.name) if negative else int(node.name)
    return None


def _is_other_constant(node: exp.Expr) -> bool:
    """A string or non-integer number constant: PostgreSQL refuses it in ORDER BY and GROUP BY."""
    node = _unwrapped(node)
    if isinstance(node, exp.Neg):
        node = _unwrapped(node.this)
    return isinstance(node, exp.Literal) and _integer(node) is None


def _is_bare_name(node: exp.Expr) -> bool:
    return isinstance(node, exp.Column) and not node.table and isinstance(node.this, exp.Identifier)


class _Planner:
    """Plans one SELECT: resolves its sort keys, group keys and aggregates to columns, and collects the
    edits that turn the client's text into what each shard runs."""

    def __init__(self, sql: str, tokens: list[Token], select: exp.Select, parenthesized: bool) -> None:
        self.sql = sql
        self.parenthesized = parenthesized  # (SELECT ...): planned, but its text is not rewritten
        self.tokens = tokens
        self.select = select
        self.items: list[exp.Expr] = list(select.expressions)
        self.visible = len(self.items)
        star = next((index for index, item in enumerate(self.items) if _is_star(item)), None)
        self.star_at = star  # items from here on have no known column index
        self.columns: dict[str, int] = {}  # expression key -> column index
        self.hidden: list[str] = []  # the texts of the appended columns
        self.aggregates: list[Aggregate] = []
        self.edits: list[_Edit] = []
        self.layout_cache: _Layout | None = None

    # --- entry point ---

    def plan(self) -> tuple[MergePlan, list[_Edit]]:
        select = self.select
        distinct = select.args.get("distinct")
        if distinct is not None and distinct.args.get("on") is not None:
            _refuse("SELECT DISTINCT ON across shards is not supported: the first row of each group would have to "
                    f"be chosen among all the shards' rows; use GROUP BY, or {_SUGGESTION}")
        if select.args.get("having") is not None:
            _refuse("HAVING across shards cannot be merged: each shard would filter its own partial groups before "
                    "they are combined; move a condition without aggregates to WHERE, filter the merged rows in "
                    f"the client, or {_SUGGESTION}")
        if select.args.get("qualify") is not None:
            _refuse("QUALIFY across shards cannot be merged")
        self._project()
        group_by = self._group_by()
        order_by = self._order_by(distinct is not None)
        limit, offset = self._limit()
        aggregated = group_by is not None or bool(self.aggregates)
        if aggregated:
            self._drop_clauses()
        elif offset:
            self._push_down_limit(limit, offset)
        plan = MergePlan(
            order_by=order_by,
            limit=limit,
            offset=offset,
            group_by=group_by,
            aggregates=tuple(self.aggregates),
            distinct=distinct is not None,
            visible_columns=self.visible if self.hidden else None,
        )
        self._check_locks(plan, aggregated)
        if select.args.get("into") is not None and not plan.concatenates:
            _refuse("SELECT INTO across shards with ORDER BY, LIMIT, OFFSET, DISTINCT, GROUP BY or aggregates is "
                    "not supported: each shard would create its table from its own rows only")
        if self.hidden:
            self._append_hidden()
        return plan, self.edits

    def _check_locks(self, plan: MergePlan, aggregated: bool) -> None:
        if not self.select.args.get("locks"):
            return
        if aggregated or plan.distinct:
            _refuse("FOR UPDATE/FOR SHARE is not allowed with aggregates, GROUP BY or DISTINCT")
        if plan.limit is not None or plan.offset:
            _refuse("SELECT ... FOR UPDATE/FOR SHARE with LIMIT or OFFSET across shards is not supported: every "
                    f"shard would lock up to LIMIT + OFFSET rows, more than the rows returned; {_SUGGESTION}")

    # --- the select list ---

    def _project(self) -> None:
        # Expression keys are only needed to find ORDER BY and GROUP BY expressions in the select list.
        keyed = self.select.args.get("order") is not None or self.select.args.get("group") is not None
        for index, item in enumerate(self.items):
            inner = item.this if isinstance(item, exp.Alias) else item
            known = self.star_at is None or index < self.star_at
            if known and keyed:
                self.columns.setdefault(_key(inner), index)
            call = _aggregate_call(_unwrapped(inner))
            if call is None:
                nested = _nested_aggregate(inner)
                if nested is not None:
                    _refuse(f"an aggregate inside an expression ({_show(inner)}) across shards cannot be merged: "
                            "the expression would be computed on each shard's partial result; select the "
                            "aggregate on its own")
                continue
            if not known:
                _refuse(f"{_show(inner)} after * in the select list across shards cannot be merged: list the "
                        "columns instead of *")
            if call.kind == "avg":
                self._rewrite_avg(index, item)
                self.aggregates.append(Aggregate(index, "avg", self._add_hidden(self._avg_count_text(index))))
            else:
                self.aggregates.append(Aggregate(index, call.kind, collation=call.collation))

    def _rewrite_avg(self, index: int, item: exp.Expr) -> None:
        """avg(x) -> sum(x) AS avg, in place; its count follows as a hidden column."""
        span = self._layout().items[index]
        name = self.tokens[span.first]
        if name.text.lower() != "avg":
            _refuse("this avg() cannot be rewritten for the shards: write it as avg(expression)")
        self.edits.append(_Edit(name.start, name.end + 1, "sum"))
        if not isinstance(item, exp.Alias):
            self.edits.append(_Edit(self.tokens[span.last].end + 1, self.tokens[span.last].end + 1, " AS avg"))

    def _avg_count_text(self, index: int) -> str:
        span = self._layout().items[index]
        if isinstance(self.items[index], exp.Alias):
            span = self._without_alias(span)
        return self._call_text(span, "count")

    def _without_alias(self, span: _Span) -> _Span:
        last = span.last - 1  # the alias
        if last > span.first and self.tokens[last].token_type == TokenType.ALIAS:
            last -= 1
        return _Span(span.first, last)

    def _call_text(self, span: _Span, function: str) -> str:
        """`function(...)`: the aggregate call in `span` with its name replaced."""
        tokens = self.tokens
        if span.first + 1 > span.last or tokens[span.first + 1].token_type != TokenType.L_PAREN:
            _refuse("this avg() cannot be rewritten for the shards: write it as avg(expression)")
        return function + self.sql[tokens[span.first + 1].start:tokens[span.last].end + 1]

    # --- GROUP BY ---

    def _group_by(self) -> tuple[int, ...] | None:
        group = self.select.args.get("group")
        if group is None:
            return None
        if any(group.args.get(name) for name in ("grouping_sets", "cube", "rollup", "totals")) or any(
                isinstance(item, exp.GroupingSets | exp.Cube | exp.Rollup | exp.Tuple)
                for item in group.expressions):
            _refuse("GROUPING SETS, ROLLUP, CUBE and parenthesized GROUP BY lists across shards cannot be merged: "
                    "a subtotal row cannot be told apart from a group whose key is NULL; list the keys as "
                    f"GROUP BY a, b, or {_SUGGESTION}")
        keys: list[int] = []
        for position, item in enumerate(group.expressions):
            column = self._group_key(position, item)
            if column not in keys:
                keys.append(column)
        return tuple(keys)

    def _group_key(self, position: int, item: exp.Expr) -> int:
        number = _integer(item)
        if number is not None:
            index = self._position(number, "GROUP BY")
            if _nested_aggregate(self._inner(index)) is not None:
                raise RoutingError("aggregate functions are not allowed in GROUP BY", GROUPING_ERROR)
            return index
        if _is_other_constant(item):
            raise RoutingError("non-integer constant in GROUP BY", SYNTAX_ERROR)
        if _nested_aggregate(item) is not None:
            raise RoutingError("aggregate functions are not allowed in GROUP BY", GROUPING_ERROR)
        key = _key(item)
        if key in self.columns:
            return self.columns[key]
        if _is_bare_name(item):
            # PostgreSQL takes a GROUP BY name as an input column first, as an output column name only when no
            # input column has it. `lower(name) AS name ... GROUP BY name` groups by the column.
            name = _identifier_name(item.this)
            aliases = [index for index, candidate in enumerate(self.items)
                       if isinstance(candidate, exp.Alias) and _output_name(candidate) == name]
            if aliases and not any(self._names_column(self._inner(index), name) for index in aliases):
                self._same_expression(aliases, f'GROUP BY "{name}" is ambiguous')
                index = aliases[0]
                self._known(index, "GROUP BY")
                return index
        return self._hidden_column(key, lambda: self._group_text(position), "GROUP BY", item)

    def _names_column(self, node: exp.Expr, name: str | None) -> bool:
        """Does `node` contain an aggregate or mention a column called `name` (which then exists)?"""
        if _nested_aggregate(node) is not None:
            return True
        return any(_identifier_name(column.this) == name for column in node.find_all(exp.Column))

    def _group_text(self, position: int) -> str:
        spans = self._layout().group_items
        if len(spans) != len(self.select.args["group"].expressions):
            self._unlocated()
        return self._text(spans[position])

    # --- ORDER BY ---

    def _order_by(self, distinct: bool) -> tuple[SortKey, ...]:
        order = self.select.args.get("order")
        if order is None:
            return ()
        keys: list[SortKey] = []
        for position, ordered in enumerate(order.expressions):
            column, collation = self._sort_column(position, ordered.this)
            if distinct and column >= self.visible:
                _refuse(f"ORDER BY {_show(ordered.this)} of a SELECT DISTINCT across shards must be one of the "
                        "selected columns, written as in the select list or by its position")
            descending = bool(ordered.args.get("desc"))
            keys.append(SortKey(column, descending, bool(ordered.args.get("nulls_first")), collation))
        return tuple(keys)

    def _sort_column(self, position: int, node: exp.Expr) -> tuple[int, str | None]:
        number = _integer(node)
        if number is not None:
            index = self._position(number, "ORDER BY")
            return index, self._projection_collation(index)
        if _is_other_constant(node):
            raise RoutingError("non-integer constant in ORDER BY", SYNTAX_ERROR)
        if _is_bare_name(node):
            # An ORDER BY name is an output column name first (SQL92), an input column otherwise.
            name = _identifier_name(node.this)
            named = [index for index, item in enumerate(self.items) if _output_name(item) == name]
            if named:
                self._same_expression(named, f'ORDER BY "{name}" is ambiguous')
                self._known(named[0], "ORDER BY")
                return named[0], self._projection_collation(named[0])
        collation = _collation_name(node.expression) if isinstance(node, exp.Collate) else None
        key = _key(node)
        if key in self.columns:
            index = self.columns[key]
            return index, collation or self._projection_collation(index)
        base = node
        if isinstance(node, exp.Collate):
            base = node.this
            base_key = _key(base)
            if base_key in self.columns:
                return self.columns[base_key], collation
        call = _aggregate_call(_unwrapped(base))
        if call is None and _nested_aggregate(base) is not None:
            _refuse(f"an aggregate inside an expression ({_show(base)}) in ORDER BY across shards cannot be merged: "
                    "select the aggregate on its own and order by it")
        if call is None:
            return self._hidden_column(key, lambda: self._order_text(position), "ORDER BY", node), collation
        self._require_hidden_possible("ORDER BY", node)
        span = self._order_expression_span(position)
        if call.kind == "avg":
            column = self._add_hidden(self._call_text(span, "sum"))
            self.aggregates.append(Aggregate(column, "avg", self._add_hidden(self._call_text(span, "count"))))
        else:
            column = self._add_hidden(self._text(span))
            self.aggregates.append(Aggregate(column, call.kind, collation=call.collation))
        self.columns[key] = column
        return column, collation

    def _projection_collation(self, index: int) -> str | None:
        if index >= self.visible:
            return None
        inner = self._inner(index)
        return _collation_name(inner.expression) if isinstance(inner, exp.Collate) else None

    def _order_expression_span(self, position: int) -> _Span:
        spans = self._layout().order_items
        if len(spans) != len(self.select.args["order"].expressions):
            self._unlocated()
        span = spans[position]
        last = span.last
        tokens = self.tokens
        if last - 1 > span.first and tokens[last].text.upper() in ("FIRST", "LAST") \
                and tokens[last - 1].text.upper() == "NULLS":
            last -= 2
        if last > span.first and tokens[last].token_type in (TokenType.ASC, TokenType.DESC):
            last -= 1
        return _Span(span.first, last)

    def _order_text(self, position: int) -> str:
        return self._text(self._order_expression_span(position))

    # --- LIMIT / OFFSET ---

    def _limit(self) -> tuple[int | None, int]:
        limit_node = self.select.args.get("limit")
        offset_node = self.select.args.get("offset")
        limit: int | None = None
        if isinstance(limit_node, exp.Fetch):
            options = limit_node.args.get("limit_options")
            if options is not None and (options.args.get("with_ties") or options.args.get("percent")):
                _refuse("FETCH FIRST ... WITH TIES across shards is not supported: use LIMIT, or " + _SUGGESTION)
            count = limit_node.args.get("count")
            limit = 1 if count is None else _row_count(count, "FETCH FIRST", INVALID_ROW_COUNT_IN_LIMIT)
        elif isinstance(limit_node, exp.Limit):
            limit = _row_count(limit_node.expression, "LIMIT", INVALID_ROW_COUNT_IN_LIMIT)
        elif limit_node is not None:
            _refuse(f"{_show(limit_node)} across shards cannot be planned")
        offset = 0
        if offset_node is not None:
            offset = _row_count(offset_node.expression, "OFFSET", INVALID_ROW_COUNT_IN_OFFSET) or 0
        return limit, offset

    def _push_down_limit(self, limit: int | None, offset: int) -> None:
        """Shards run LIMIT limit + offset and no OFFSET: the proxy skips the offset in the merged rows."""
        layout = self._layout()
        spans = [layout.clauses[name] for name in ("limit", "offset", "fetch") if name in layout.clauses]
        if not spans:
            self._unlocated()
        spans.sort(key=lambda span: span.first)
        shard_limit = None if limit is None else 0 if limit == 0 else limit + offset
        for number, span in enumerate(spans):
            text = f" LIMIT {shard_limit}" if number == 0 and shard_limit is not None and shard_limit <= _INT8_MAX \
                else ""
            self._replace_clause(span, text)

    def _drop_clauses(self) -> None:
        """Aggregated rows are sorted and limited at the proxy, after the groups are combined."""
        present = [name for name in _CLAUSES_OF_ARG if self.select.args.get(name) is not None]
        if not present:
            return
        layout = self._layout()
        if any(not (_CLAUSES_OF_ARG[name] & layout.clauses.keys()) for name in present):
            self._unlocated()
        for name in ("order", "limit", "offset", "fetch"):
            span = layout.clauses.get(name)
            if span is not None:
                self._replace_clause(span, "")

    def _replace_clause(self, span: _Span, text: str) -> None:
        start = self.tokens[span.first].start
        while start > 0 and self.sql[start - 1] in " \t\r\n\f\v":
            start -= 1
        self.edits.append(_Edit(start, self.tokens[span.last].end + 1, text))

    # --- columns ---

    def _inner(self, index: int) -> exp.Expr:
        item = self.items[index]
        return item.this if isinstance(item, exp.Alias) else item

    def _position(self, number: int, clause: str) -> int:
        if self.star_at is not None and number > self.star_at:
            self._known(number - 1, clause)  # * expands to columns the proxy cannot count
        if not 1 <= number <= self.visible:
            raise RoutingError(f"{clause} position {number} is not in select list", INVALID_COLUMN_REFERENCE)
        self._known(number - 1, clause)
        return number - 1

    def _known(self, index: int, clause: str) -> None:
        if self.star_at is not None and index >= self.star_at:
            _refuse(f"{clause} on a column at or after * in the select list across shards cannot be planned: the "
                    "proxy cannot tell which column it is; list the columns instead of *")

    def _same_expression(self, indexes: list[int], message: str) -> None:
        if len({_key(self._inner(index)) for index in indexes}) > 1:
            raise RoutingError(message, AMBIGUOUS_COLUMN)

    def _require_hidden_possible(self, clause: str, node: exp.Expr) -> None:
        if self.star_at is not None:
            _refuse(f"{clause} {_show(node)} across shards needs it in the select list, and the select list has *: "
                    "list the columns instead of *, or add it to the select list")

    def _hidden_column(self, key: str, text: Callable[[], str], clause: str, node: exp.Expr) -> int:
        if key in self.columns:
            return self.columns[key]
        self._require_hidden_possible(clause, node)
        column = self._add_hidden(text())
        self.columns[key] = column
        return column

    def _add_hidden(self, text: str) -> int:
        self.hidden.append(text)
        return self.visible + len(self.hidden) - 1

    def _append_hidden(self) -> None:
        layout = self._layout()
        if len(layout.items) != self.visible:
            self._unlocated()
        anchor = self.tokens[layout.items[-1].last if layout.items else layout.select]
        columns = [f"{text} AS {HIDDEN_COLUMN_PREFIX}{number}" for number, text in enumerate(self.hidden, 1)]
        self.edits.append(_Edit(anchor.end + 1, anchor.end + 1, (", " if layout.items else " ") + ", ".join(columns)))

    # --- text ---

    def _layout(self) -> _Layout:
        if self.parenthesized:
            _refuse_parenthesized()
        if self.layout_cache is None:
            layout = _layout(self.tokens)
            if layout is None or len(layout.items) != self.visible:
                self._unlocated()
            self.layout_cache = layout
        return self.layout_cache

    def _text(self, span: _Span) -> str:
        return self.sql[self.tokens[span.first].start:self.tokens[span.last].end + 1]

    def _unlocated(self) -> NoReturn:
        _refuse("this SELECT cannot be rewritten for the shards: its clauses could not be located in the text; "
                "write it as a plain SELECT ... FROM ... statement")


def _row_count(node: exp.Expr, clause: str, sqlstate: str) -> int | None:
    """The number a LIMIT/OFFSET/FETCH clause gives; None for LIMIT ALL / LIMIT NULL (and OFFSET NULL)."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Null) or (isinstance(node, exp.Var) and node.name.upper() == "ALL"):
        return None
    if node.find(exp.Parameter, exp.Placeholder) is not None:
        _refuse(f"{clause} with a parameter across shards is not supported yet: write the number in the statement "
                f"(the proxy applies {clause} to the merged rows, so it needs the value when planning)")
    number = _integer(node)
    if number is None:
        _refuse(f"{clause} across shards must be a whole number written in the statement, not {_show(node)}")
    if number < 0:
        raise RoutingError(f"{clause.split()[0]} must not be negative", sqlstate)
    if number > _INT8_MAX:
        raise RoutingError("bigint out of range", NUMERIC_VALUE_OUT_OF_RANGE)
    return number
