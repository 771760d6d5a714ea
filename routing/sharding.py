"""Which shards one statement of a sharded database goes to, from its SQL, its parameters and the session."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import sqlglot
from sqlglot import exp

from routing.classify import shard_hint, sharding_key_hint
from routing.copy_split import CopyStatement, parse_copy
from routing.errors import RoutingError
from routing.merge_plan import MergePlan, plan_select
from routing.shard_key import (
    KeyFinding,
    KeyRef,
    Literal,
    Param,
    ParamArray,
    ShardedColumn,
    array_elements,
    find_keys,
    split_insert,
)

FEATURE_NOT_SUPPORTED = "0A000"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_PARAMETER_VALUE = "22023"
_MAX_CACHED = 4096
_COPY = re.compile(r"\s*(?:/\*.*?\*/\s*)*copy\b", re.IGNORECASE | re.DOTALL)
_MAX_CACHED_SQL_LENGTH = 16384


class Placement(Protocol):
    """Where a sharded column's values live (routing.shard builds one per sharded table)."""

    def shard_of_text(self, text: str) -> int: ...

    def shard_of_binary(self, data: bytes) -> int: ...

    def same_key(self, left: str, right: str) -> bool: ...

    def parse_binary(self, data: bytes) -> object: ...


# One Bind's parameters: (format code, value or None for NULL), in order.
Parameters = Sequence[tuple[int, bytes | None]]


@dataclass(frozen=True, slots=True)
class ShardInsert:
    """One shard's part of a split INSERT: its SQL and the client's parameter numbers in their new order."""

    shard: int
    sql: str
    parameters: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShardDecision:
    """Where one statement goes. `shards` sorted, never empty. `refusal` (sqlstate, message): answered by
    the proxy instead. `merge`/`shard_sql`: a SELECT on several shards, how to merge and what each runs
    (None: the client's text). `inserts`: an INSERT split by key, one part per shard."""

    shards: tuple[int, ...]
    reason: str
    refusal: tuple[str, str] | None = None
    merge: MergePlan | None = None
    shard_sql: str | None = None
    inserts: tuple[ShardInsert, ...] = ()
    write: bool = False
    anywhere: bool = False  # no sharded table in it: any shard answers it alike (the session's home does)
    copy: CopyStatement | None = None  # a COPY for several shards
    copy_key: int | None = None  # COPY FROM STDIN: the key's column in each row (None: every row everywhere)


@dataclass(slots=True)
class ShardSession:
    """What a session says about its shard: `SET shardgate.shard`, `SET shardgate.sharding_key`, and the
    tenant of a JWT client when the database is sharded by the tenant claim."""

    shard: int | None = None
    key: str | None = None
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class _Analysis:
    """What a statement's text says, whatever its parameters: cached by text."""

    sql: str
    finding: KeyFinding
    hint_shards: tuple[int, ...] | None
    hint_key: str | None
    merge: MergePlan | None = None
    merge_sql: str | None = None
    merge_refusal: tuple[str, str] | None = None
    write: bool = False
    copy: CopyStatement | None = None


@dataclass(slots=True)
class ShardRouter:
    """Routes the statements of one sharded logical database (shards 0..shard_count-1)."""

    database: str
    shard_count: int
    columns: Sequence[ShardedColumn]
    placements: dict[ShardedColumn, Placement]
    omnisharded: frozenset[str] = frozenset()
    allow_cross_shard_writes: bool = False
    tenant_column: ShardedColumn | None = None  # the sharded column the JWT tenant claim is a value of
    _cache: dict[str, _Analysis] = field(default_factory=dict)
    _shapes: dict[str, KeyFinding] = field(default_factory=dict)
    _merges: dict[str, tuple[MergePlan | None, str | None, tuple[str, str] | None]] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=lambda: {"single": 0, "multi": 0, "all": 0})
    # the database's user-defined aggregates (lower-case names), None until the proxy has read them: a
    # function not known to be a plain one may be an aggregate, and is not merged blindly meanwhile
    user_aggregates: frozenset[str] | None = None

    def set_user_aggregates(self, names: frozenset[str]) -> None:
        """What the catalog says (see proxy.catalog); merge plans made without it are made again."""
        if names != self.user_aggregates:
            self.user_aggregates = names
            self._merges.clear()
            self._cache.clear()

    def decide(self, sql: str, parameters: Parameters | None = None,
               session: ShardSession | None = None) -> ShardDecision:
        analysis = self._analysis(sql)
        decision = self._decide(analysis, parameters, session)
        if decision.refusal is None:
            count = len(decision.shards)
            self.decisions["single" if count == 1 else "all" if count == self.shard_count else "multi"] += 1
        return decision

    def count_single(self) -> None:
        """A statement routed to one shard without `decide` (a repeat of one it decided)."""
        self.decisions["single"] += 1

    def _analysis(self, sql: str) -> _Analysis:
        cached = self._cache.get(sql)
        if cached is not None:
            return cached
        finding = self._finding(sql)
        copy = parse_copy(sql) if _COPY.match(sql) is not None else None
        if (not finding.parsed and (finding.sharded_tables or finding.omnisharded_tables) and finding.refusal is None
                and copy is None):  # a COPY the proxy reads itself (sqlglot does not know every COPY option)
            # which shards it touches, and whether it writes, are unknown: never guess
            finding = replace(finding, refusal=(
                FEATURE_NOT_SUPPORTED, "the proxy cannot parse this statement, so it cannot tell which shards it "
                                       f"touches ({', '.join(finding.sharded_tables or finding.omnisharded_tables)}): "
                                       "add a /* shardgate: shard=N */ hint"))
        if _COPY.match(sql) is not None:
            if copy is not None and copy.query is not None:
                inner = find_keys(copy.query, self.columns, self.omnisharded)
                finding = replace(inner, statement="copy")
            elif copy is not None:
                finding = replace(finding, statement="copy")
            elif finding.sharded_tables or finding.omnisharded_tables:
                finding = replace(finding, refusal=(
                    FEATURE_NOT_SUPPORTED, "a COPY of a sharded table other than FROM STDIN or TO STDOUT is not "
                                           "supported"))
        hints = "shardgate:" in sql.lower()
        hint_shards = shard_hint(sql) if hints else None
        hint_key = sharding_key_hint(sql) if hints else None
        write = finding.statement in ("insert", "update", "delete") or (
            finding.statement == "other" and bool(finding.omnisharded_tables))
        merge = merge_sql = merge_refusal = None  # a SELECT's merge is planned when it goes to several shards
        if copy is not None and copy.query is not None and finding.refusal is None:
            try:
                merge_sql, merge = plan_select(copy.query, self.user_aggregates)
            except RoutingError as exc:
                merge_refusal = (exc.sqlstate, str(exc))
            if merge_refusal is None and merge is not None and not merge.concatenates:
                merge_refusal = (FEATURE_NOT_SUPPORTED, "COPY (query) TO STDOUT over several shards only "
                                 "concatenates rows: ORDER BY, LIMIT, aggregates and DISTINCT need a SELECT")
            merge, merge_sql = None, None
        if copy is not None and copy.incoming:
            write = True
        analysis = _Analysis(sql, finding, hint_shards, hint_key, merge, merge_sql, merge_refusal, write, copy)
        if len(sql) <= _MAX_CACHED_SQL_LENGTH:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[sql] = analysis
        return analysis

    def _finding(self, sql: str) -> KeyFinding:
        """find_keys, shared by statements that differ only in their integer literals: the text with its
        integers as extra parameters is analysed once, and each text's integers stand in for them."""
        shape = _literal_shape(sql)
        if shape is None:
            return find_keys(sql, self.columns, self.omnisharded)
        template_sql, literals, base = shape
        template = self._shapes.get(template_sql)
        if template is None:
            template = find_keys(template_sql, self.columns, self.omnisharded)
            if len(self._shapes) >= _MAX_CACHED:
                self._shapes.pop(next(iter(self._shapes)))
            self._shapes[template_sql] = template
        if template.refusal is not None or not template.parsed:
            return find_keys(sql, self.columns, self.omnisharded)  # its message names the real values
        return _instantiate(template, literals, base)

    def point_key(self, sql: str) -> tuple[Placement, KeyRef] | None:
        """Where `sql` (just decided) went depends on one key alone: its placement and the key (a literal
        or a parameter), so that the same text with another value in that place needs no new decision
        (see proxy.scatter's `repeats_point`). None for anything else: hints, COPY, INSERT, several keys, a
        refusal, an unparsed text."""
        analysis = self._cache.get(sql)
        if analysis is None or analysis.hint_shards is not None or analysis.hint_key is not None:
            return None
        finding = analysis.finding
        keys = finding.keys
        if (keys is None or len(keys) != 1 or isinstance(keys[0], ParamArray) or finding.insert is not None
                or finding.refusal is not None or not finding.parsed or analysis.copy is not None
                or not finding.sharded_tables):
            return None
        return self._placement(finding), keys[0]

    def _merge_of(self, analysis: _Analysis) -> tuple[MergePlan | None, str | None, tuple[str, str] | None]:
        """A SELECT for several shards: how to merge its rows, the SQL each shard runs, or why it cannot."""
        sql = analysis.sql
        found = self._merges.get(sql)
        if found is not None:
            return found
        merge = merge_sql = refusal = None
        try:
            merge_sql, merge = plan_select(sql, self.user_aggregates)
        except RoutingError as exc:
            refusal = (exc.sqlstate, str(exc))
        if merge_sql == sql:
            merge_sql = None
        if refusal is None:
            refusal = _nested_refusal(sql)
        found = (merge, merge_sql, refusal)
        if len(sql) <= _MAX_CACHED_SQL_LENGTH:
            if len(self._merges) >= _MAX_CACHED:
                self._merges.pop(next(iter(self._merges)))
            self._merges[sql] = found
        return found

    def _decide(self, analysis: _Analysis, parameters: Parameters | None,
                session: ShardSession | None) -> ShardDecision:
        finding = analysis.finding
        if analysis.hint_shards is not None:
            shards = analysis.hint_shards or tuple(range(self.shard_count))
            return self._fanned(analysis, shards, "comment hint shard", hinted=True)
        if finding.refusal is not None:
            return ShardDecision((0,), "refused", refusal=finding.refusal)
        tenant = session.tenant if session is not None else None
        try:
            if analysis.hint_key is not None:
                return self._fanned(analysis, (self._shard_of_value(analysis.hint_key),),
                                    f"comment hint sharding_key={analysis.hint_key}", hinted=True)
            if session is not None and tenant is None:
                if session.shard is not None:
                    return self._fanned(analysis, (session.shard,), "SET shardgate.shard", hinted=True)
                if session.key is not None:
                    return self._fanned(analysis, (self._shard_of_value(session.key),),
                                        "SET shardgate.sharding_key", hinted=True)
            if analysis.copy is not None:
                return self._copy(analysis, parameters, tenant)
            if finding.insert is not None and not finding.omnisharded_tables:
                return self._insert(analysis, parameters, tenant)
            if finding.keys is not None and finding.sharded_tables:
                shards = self._shards_of_keys(finding.keys, parameters, tenant, self._placement(finding))
                return self._fanned(analysis, shards, f"{self._column_of(finding)} = "
                                                      f"{_described(finding.keys, parameters, self._placement(finding))}")
            if tenant is not None:
                return self._fanned(analysis, (self._shard_of_value(tenant),), "tenant claim", hinted=True)
        except RoutingError as exc:
            return ShardDecision((0,), "refused", refusal=(exc.sqlstate, str(exc)))
        if finding.omnisharded_tables and not finding.sharded_tables:
            if analysis.write:
                return ShardDecision(tuple(range(self.shard_count)), "omnisharded table: every shard",
                                     write=True)
            return ShardDecision((0,), "omnisharded table: one shard", anywhere=True)
        if not finding.sharded_tables:
            return ShardDecision((0,), "no sharded table", anywhere=True)
        return self._fanned(analysis, tuple(range(self.shard_count)), "no sharding key: all shards")



    def _fanned(self, analysis: _Analysis, shards: tuple[int, ...], reason: str, *,
                hinted: bool = False) -> ShardDecision:
        unknown = [shard for shard in shards if not 0 <= shard < self.shard_count]
        if unknown:
            return ShardDecision((0,), "refused", refusal=(
                INVALID_PARAMETER_VALUE,
                f'database "{self.database}" has shards 0 to {self.shard_count - 1}, not {unknown[0]}'))
        write = analysis.write
        if len(shards) == 1:
            return ShardDecision(shards, reason, write=write)
        finding = analysis.finding
        if write and not hinted:
            if finding.statement == "insert":
                column = self._column_of(finding)
                return ShardDecision((0,), "refused", refusal=(
                    FEATURE_NOT_SUPPORTED, f"no sharding key in INSERT into {_tables(finding)}: add {column} "
                                           "or a /* shardgate: shard=N */ hint"))
            if not self.allow_cross_shard_writes:
                return ShardDecision((0,), "refused", refusal=(
                    FEATURE_NOT_SUPPORTED,
                    f"{finding.statement.upper()} of {_tables(finding)} without its sharding key "
                    f"({self._column_of(finding)}) would change every shard: add the key to the WHERE clause, "
                    "a /* shardgate: shard=N */ hint, or set allow_cross_shard_writes = true"))
        if finding.statement == "select":
            merge, merge_sql, merge_refusal = self._merge_of(analysis)
            if merge_refusal is not None:
                return ShardDecision((0,), "refused", refusal=merge_refusal)
            return ShardDecision(shards, reason, merge=merge, shard_sql=merge_sql)
        return ShardDecision(shards, reason, write=write)

    def _copy(self, analysis: _Analysis, parameters: Parameters | None, tenant: str | None) -> ShardDecision:
        """COPY FROM STDIN into a sharded table: every shard, rows split by key; COPY ... TO STDOUT: the
        shards its query's key names (every shard without one), rows concatenated."""
        copy = analysis.copy
        finding = analysis.finding
        assert copy is not None
        everywhere = tuple(range(self.shard_count))
        if tenant is not None:
            shard = (self._shard_of_value(tenant),)
            if copy.incoming and finding.sharded_tables:
                return ShardDecision((0,), "refused", refusal=(
                    FEATURE_NOT_SUPPORTED, "COPY FROM STDIN is not available to a client confined to its tenant"))
            return ShardDecision(shard, "tenant claim", write=copy.incoming)
        if not copy.incoming:
            if not finding.sharded_tables:
                return ShardDecision((0,), "no sharded table", anywhere=True)
            shards = everywhere
            if finding.keys is not None:
                shards = self._shards_of_keys(finding.keys, parameters, None, self._placement(finding))
            if len(shards) == 1:
                return ShardDecision(shards, "sharding key in the COPY query")
            if analysis.merge_refusal is not None:
                return ShardDecision((0,), "refused", refusal=analysis.merge_refusal)
            if copy.format == "binary" or copy.header:
                return ShardDecision((0,), "refused", refusal=(
                    FEATURE_NOT_SUPPORTED, "COPY TO STDOUT over several shards in binary format or with HEADER "
                                           "is not supported: each shard would send its own header"))
            return ShardDecision(shards, "no sharding key: all shards", copy=copy)
        table = copy.table or ""
        if table in self.omnisharded:
            return ShardDecision(everywhere, "omnisharded table: every shard", write=True, copy=copy)
        if not finding.sharded_tables:
            return ShardDecision((0,), "no sharded table", anywhere=True)
        key = _key_of(table, self.columns)
        if copy.columns is None or key not in copy.columns:
            return ShardDecision((0,), "refused", refusal=(
                FEATURE_NOT_SUPPORTED, f"COPY into sharded table {table} needs a column list naming {key}"))
        return ShardDecision(everywhere, "COPY rows split by sharding key", write=True, copy=copy,
                             copy_key=copy.columns.index(key))

    def placement_of(self, table: str) -> Placement:
        """The placement of a table's rows (its [[sharded_tables]] entry, or the table-less one)."""
        for column in self.columns:
            if column.table == table:
                return self.placements[column]
        return self._first_placement()

    def _insert(self, analysis: _Analysis, parameters: Parameters | None, tenant: str | None) -> ShardDecision:
        finding = analysis.finding
        assert finding.insert is not None
        placement = self._placement(finding)
        rows = finding.insert.rows
        groups: dict[int, list[int]] = {}
        for index, ref in enumerate(rows):
            (shard,) = self._shards_of_keys((ref,), parameters, tenant, placement)
            groups.setdefault(shard, []).append(index)
        if len(groups) == 1:
            return ShardDecision(tuple(groups), "sharding key in INSERT", write=True)
        shards = tuple(sorted(groups))
        parts = split_insert(analysis.sql, [groups[shard] for shard in shards])
        inserts = tuple(ShardInsert(shard, sql, order) for shard, (sql, order) in zip(shards, parts, strict=True))
        return ShardDecision(shards, "INSERT rows split by sharding key", inserts=inserts, write=True)

    def _shards_of_keys(self, keys: Sequence[KeyRef], parameters: Parameters | None, tenant: str | None,
                        placement: Placement | None = None) -> tuple[int, ...]:
        if placement is None:
            placement = self._first_placement()
        shards: set[int] = set()
        for ref in keys:
            for text, binary in _values(ref, parameters):
                if text is None and binary is None:
                    raise RoutingError(f"the sharding key of a row is NULL: {self.database} has no shard for NULL",
                                       INVALID_PARAMETER_VALUE)
                if tenant is not None and (text is None or not placement.same_key(text, tenant)):
                    raise RoutingError("the statement names another tenant's sharding key than the token's",
                                       INSUFFICIENT_PRIVILEGE)
                shards.add(placement.shard_of_text(text) if text is not None
                           else placement.shard_of_binary(binary or b""))
        if not shards:  # key IN () or an empty array: no rows anywhere; any one shard answers that
            return (0,)
        return tuple(sorted(shards))

    def _shard_of_value(self, value: str) -> int:
        return self._first_placement().shard_of_text(value)

    def _first_placement(self) -> Placement:
        column = self.tenant_column or self.columns[0]
        return self.placements[column]

    def _placement(self, finding: KeyFinding) -> Placement:
        for column in self.columns:
            if column.table is not None and column.table in finding.sharded_tables:
                return self.placements[column]
        return self._first_placement()

    def _column_of(self, finding: KeyFinding) -> str:
        for column in self.columns:
            if column.table is None or column.table in finding.sharded_tables:
                return column.column
        return self.columns[0].column


_SHAPE_INTEGER = re.compile(r"(?<![\w$.])(-\s*)?\d+(?![\w.])")
_SHAPE_UNSAFE = re.compile(r"['\"\\]|--|/\*|\$\$|\d\.|\.\d|\d[eE]")
# words after which a minus sign is the sign of the number that follows (elsewhere, after a name, a number
# or a closing bracket, it is the binary operator and the number is a plain positive literal)
_UNARY_AFTER = frozenset((
    "select", "where", "and", "or", "not", "between", "in", "is", "then", "else", "when", "case", "values",
    "set", "by", "limit", "offset", "like", "ilike", "as", "on", "having", "any", "all", "some", "returning",
    "distinct", "exists", "array", "over", "filter", "using", "to", "from", "into", "default", "return"))
_PARAMETER_NUMBER = re.compile(r"\$(\d+)")


def _literal_shape(sql: str) -> tuple[str, list[str], int] | None:
    """The text with each integer literal replaced by a parameter numbered after the client's own, the
    integers (a sign included where the minus is one), and the client's highest parameter number; None for
    a text with no integer, or with quotes, comments or decimals (its literals are not all integers)."""
    if _SHAPE_UNSAFE.search(sql) is not None:
        return None
    numbers = _PARAMETER_NUMBER.findall(sql)
    base = max(map(int, numbers)) if numbers else 0
    literals: list[str] = []

    def parameter(found: re.Match[str]) -> str:
        sign = found.group(1)
        digits = found.group()[len(sign):] if sign else found.group()
        literals.append("-" + digits if sign and _unary_minus(sql, found.start()) else digits)
        kept = sign if sign and literals[-1][0] != "-" else ""
        return f"{kept}${base + len(literals)}"

    template = _SHAPE_INTEGER.sub(parameter, sql)
    if not literals:
        return None
    return template, literals, base


def _unary_minus(sql: str, at: int) -> bool:
    """Whether the minus at `at` is a number's sign (after an operator, a bracket, a comma or a keyword)
    rather than a subtraction (after a name, a number or a closing bracket)."""
    end = at - 1
    while end >= 0 and sql[end].isspace():
        end -= 1
    if end < 0:
        return True
    last = sql[end]
    if last in ")]":
        return False
    if not (last.isalnum() or last in "_$"):
        return True
    start = end
    while start > 0 and (sql[start - 1].isalnum() or sql[start - 1] in "_$"):
        start -= 1
    return sql[start : end + 1].lower() in _UNARY_AFTER


def _instantiate(template: KeyFinding, literals: list[str], base: int) -> KeyFinding:
    """A shape's finding for one text: its literal parameters back to that text's integers."""
    def real(ref: KeyRef) -> KeyRef:
        if isinstance(ref, Param) and ref.number > base:
            return Literal(literals[ref.number - base - 1])
        return ref
    keys = None if template.keys is None else tuple(real(ref) for ref in template.keys)
    insert = template.insert
    if insert is not None:
        insert = replace(insert, rows=tuple(real(ref) for ref in insert.rows))
    return replace(template, keys=keys, insert=insert)


def _key_of(table: str, columns: Sequence[ShardedColumn]) -> str:
    for column in columns:
        if column.table == table:
            return column.column
    return next((column.column for column in columns if column.table is None), columns[0].column)


def _described(keys: Sequence[KeyRef], parameters: Parameters | None, placement: Placement) -> str:
    """The key values as EXPLAIN shows them: literals as written, parameters with their values."""
    parts = []
    for ref in keys[:8]:
        if isinstance(ref, Literal):
            parts.append(repr(ref.text) if ref.text is not None else "NULL")
            continue
        value = None
        if parameters is not None and 1 <= ref.number <= len(parameters):
            format_code, raw = parameters[ref.number - 1]
            if raw is None:
                value = "NULL"
            elif format_code == 0:
                value = raw.decode("utf-8", "replace")[:40]
            else:
                try:
                    value = str(placement.parse_binary(raw))[:40]
                except RoutingError:
                    value = "binary"
        shown = f"${ref.number}" + (f" ({value})" if value is not None else "")
        parts.append(f"ANY({shown})" if isinstance(ref, ParamArray) else shown)
    if len(keys) > 8:
        parts.append(f"... {len(keys)} values")
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def _tables(finding: KeyFinding) -> str:
    return ", ".join(finding.sharded_tables) or "the table"


def _values(ref: KeyRef, parameters: Parameters | None) -> list[tuple[str | None, bytes | None]]:
    """A key reference's values: (text, None) for text, (None, bytes) for a binary parameter."""
    if isinstance(ref, Literal):
        return [(ref.text, None)]
    if parameters is None:
        raise RoutingError("the sharding key is a parameter whose value has not arrived (send Bind with Parse)",
                           FEATURE_NOT_SUPPORTED)
    number = ref.number
    if not 1 <= number <= len(parameters):
        raise RoutingError(f"the sharding key is parameter ${number}, which the Bind does not have",
                           "08P01")
    format_code, value = parameters[number - 1]
    if isinstance(ref, Param):
        if value is None:
            return [(None, None)]
        if format_code == 0:
            return [(value.decode("utf-8"), None)]
        return [(None, value)]
    assert isinstance(ref, ParamArray)
    if value is None:
        return []
    if format_code == 0:
        return [(element, None) for element in parse_text_array(value.decode("utf-8"))]
    return [(None, element) for element in parse_binary_array(value)]


def parse_text_array(text: str) -> list[str]:
    """A one-dimensional array literal `{1,2,"a b"}`; NULL elements are refused (no shard holds NULL)."""
    if text.strip()[1:].lstrip().startswith("{"):  # an array of arrays
        raise RoutingError("a multi-dimensional array of sharding keys is not supported", FEATURE_NOT_SUPPORTED)
    elements = array_elements(text)
    if elements is None:
        raise RoutingError(f"malformed array literal for the sharding key: {text[:60]!r}", "22P02")
    if any(element is None for element in elements):
        raise RoutingError("a NULL sharding key has no shard", INVALID_PARAMETER_VALUE)
    return [element for element in elements if element is not None]


def parse_binary_array(data: bytes) -> list[bytes]:
    """The elements of a one-dimensional array in binary format (ndim, flags, element type, dims...)."""
    try:
        ndim = int.from_bytes(data[0:4], "big", signed=True)
        if ndim == 0:
            return []
        if ndim != 1:
            raise RoutingError("a multi-dimensional array of sharding keys is not supported", FEATURE_NOT_SUPPORTED)
        count = int.from_bytes(data[12:16], "big", signed=True)
        pos = 20
        elements = []
        for _ in range(count):
            length = int.from_bytes(data[pos : pos + 4], "big", signed=True)
            pos += 4
            if length < 0:
                raise RoutingError("a NULL sharding key has no shard", INVALID_PARAMETER_VALUE)
            elements.append(data[pos : pos + length])
            pos += length
        if pos != len(data):
            raise ValueError("trailing bytes")
        return elements
    except (IndexError, ValueError) as exc:
        raise RoutingError(f"malformed binary array for the sharding key: {exc}", "22P02") from None


def decision_rows(decision: ShardDecision) -> list[str]:
    """The lines EXPLAIN adds to say where a statement went."""
    return [f"Shardgate: shards {', '.join(map(str, decision.shards))}", f"Shardgate: decided by {decision.reason}"]


_NESTED_MARK = re.compile(r"\(\s*select\b|\bwith\b", re.IGNORECASE)


def _nested_refusal(sql: str) -> tuple[str, str] | None:
    """A subquery or CTE that aggregates, groups, deduplicates or limits: on several shards each would see
    only its shard's rows, and the merged answer would be wrong."""
    if _NESTED_MARK.search(sql) is None:
        return None
    try:
        tree = sqlglot.parse_one(sql, read="postgres")
    except sqlglot.errors.SqlglotError:
        return (FEATURE_NOT_SUPPORTED, "a statement for several shards that the proxy cannot parse is not sent")
    if tree is None:
        return None
    for select in tree.find_all(exp.Select):
        if select is tree:
            continue
        if (select.args.get("group") or select.args.get("limit") or select.args.get("distinct")
                or select.args.get("offset") or select.args.get("having")
                or any(isinstance(node, exp.AggFunc) for node in select.find_all(exp.AggFunc)
                       if _owner(node) is select)):
            return (FEATURE_NOT_SUPPORTED, "a subquery or CTE that aggregates, groups, deduplicates or limits "
                                           "rows of a sharded table would see one shard's rows on each shard: "
                                           "filter it by the sharding key, or use a shard hint")
    return None


def _owner(node: Any) -> Any:
    """The SELECT a node belongs to."""
    parent = node.parent
    while parent is not None and not isinstance(parent, exp.Select):
        parent = parent.parent
    return parent
