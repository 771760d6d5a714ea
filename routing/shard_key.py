"""What in one SQL statement decides its shard: key values in WHERE, IN, ANY and INSERT VALUES (sqlglot).

Conservative by design: a key is trusted only where it can only restrict rows; anything unsure leaves the
statement without a key (every shard), and what cannot be answered correctly on shards (a join of sharded
tables off the key, a key changed by UPDATE) is refused.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp

FEATURE_NOT_SUPPORTED = "0A000"


@dataclass(frozen=True, slots=True)
class ShardedColumn:
    column: str  # lower-cased unless quoted
    table: str | None = None  # None: any table (see find_keys)


@dataclass(frozen=True, slots=True)
class Literal:
    text: str | None  # the literal's value as text; None for NULL


@dataclass(frozen=True, slots=True)
class Param:
    number: int  # $n, 1-based


@dataclass(frozen=True, slots=True)
class ParamArray:
    number: int  # key = ANY($n): every element of the array parameter


KeyRef = Literal | Param | ParamArray


@dataclass(frozen=True, slots=True)
class InsertPlan:
    rows: tuple[KeyRef, ...]  # the key of each VALUES row, in order


@dataclass(frozen=True, slots=True)
class KeyFinding:
    statement: str  # "select" | "insert" | "update" | "delete" | "other"
    keys: tuple[KeyRef, ...] | None  # None: no key restricts it; else only the shards of these values
    sharded_tables: tuple[str, ...]
    omnisharded_tables: tuple[str, ...]
    insert: InsertPlan | None = None
    refusal: tuple[str, str] | None = None


_KINDS: dict[type, str] = {exp.Select: "select", exp.Insert: "insert", exp.Update: "update",
                                            exp.Delete: "delete", exp.Union: "select", exp.Intersect: "select",
                                            exp.Except: "select"}


def _name(identifier: Any) -> str:
    if identifier is None:
        return ""
    text = identifier.name
    return text if isinstance(identifier, exp.Identifier) and identifier.quoted else text.lower()


def _table_name(table: exp.Table) -> str:
    return _name(table.this)


class _Scope:
    """The sharded tables one SELECT/UPDATE/DELETE reads directly, by the names its columns use for them."""

    def __init__(self, node: Any, columns: Sequence[ShardedColumn], omni: Collection[str],
                 ctes: set[str]) -> None:
        self.node = node
        self.by_alias: dict[str, tuple[str, str]] = {}  # alias or name -> (table, key column)
        tables: list[exp.Table] = []
        if isinstance(node, exp.Update | exp.Delete) and isinstance(node.this, exp.Table):
            tables.append(node.this)
        from_ = node.args.get("from_") or node.args.get("from")
        if from_ is not None and isinstance(from_.this, exp.Table):
            tables.append(from_.this)
        for join in node.args.get("joins") or []:
            if isinstance(join.this, exp.Table):
                tables.append(join.this)
        for using in node.args.get("using") or []:
            if isinstance(using, exp.Table):
                tables.append(using)
        for table in tables:
            name = _table_name(table)
            if name in ctes or name in omni:
                continue
            column = _key_column(name, columns)
            if column is None:
                continue
            alias = _alias(table) or name
            self.by_alias[alias] = (name, column)

    def is_key(self, column: Any) -> str | None:
        """The table whose sharding key `column` is, or None."""
        if not isinstance(column, exp.Column):
            return None
        name = _name(column.this)
        qualifier = _name(column.args.get("table")) if column.args.get("table") is not None else ""
        if qualifier:
            found = self.by_alias.get(qualifier)
            return found[0] if found is not None and found[1] == name else None
        matches = [table for table, key in self.by_alias.values() if key == name]
        return matches[0] if matches else None


def _alias(table: Any) -> str:
    alias = table.args.get("alias")
    return _name(alias.this) if alias is not None else ""


def _cte_names(trees: Sequence[Any]) -> set[str]:
    return {_alias(cte) for tree in trees for cte in tree.find_all(exp.CTE)} - {""}


def _key_column(table: str, columns: Sequence[ShardedColumn]) -> str | None:
    for column in columns:
        if column.table == table:
            return column.column
    for column in columns:
        if column.table is None:
            return column.column
    return None


def _value(node: Any) -> KeyRef | None:
    """A literal, NULL or $n (through casts and parentheses), else None."""
    while isinstance(node, exp.Cast | exp.Paren):
        node = node.this
    if isinstance(node, exp.Null):
        return Literal(None)
    if isinstance(node, exp.Literal):
        return Literal(str(node.this))
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        return Literal("-" + str(node.this.this))
    if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal):
        try:
            return Param(int(node.this.this))
        except ValueError:
            return None
    return None


def _any_values(node: Any) -> tuple[KeyRef, ...] | None:
    """The values of `= ANY(...)`: an array parameter, ARRAY[...] or an array literal '{...}'."""
    inner = node.this
    while isinstance(inner, exp.Paren | exp.Cast):
        inner = inner.this
    if isinstance(inner, exp.Parameter):
        found = _value(inner)
        return (ParamArray(found.number),) if isinstance(found, Param) else None
    if isinstance(inner, exp.Array):
        values = [_value(item) for item in inner.expressions]
        return None if any(v is None for v in values) else tuple(v for v in values if v is not None)
    if isinstance(inner, exp.Literal) and inner.is_string:
        text = str(inner.this).strip()
        if not (text.startswith("{") and text.endswith("}")) or '"' in text:
            return None
        body = text[1:-1].strip()
        return tuple(Literal(part.strip()) for part in body.split(",")) if body else ()
    return None


def _keys_of(condition: Any, scope: _Scope) -> tuple[KeyRef, ...] | None:
    """The key values `condition` restricts the scope's sharded rows to, or None."""
    if condition is None:
        return None
    if isinstance(condition, exp.Where):
        return _keys_of(condition.this, scope)
    if isinstance(condition, exp.Paren):
        return _keys_of(condition.this, scope)
    if isinstance(condition, exp.And):
        left = _keys_of(condition.this, scope)
        return left if left is not None else _keys_of(condition.expression, scope)
    if isinstance(condition, exp.Or):
        left = _keys_of(condition.this, scope)
        right = _keys_of(condition.expression, scope)
        return None if left is None or right is None else left + right
    if isinstance(condition, exp.EQ):
        for column, other in ((condition.this, condition.expression), (condition.expression, condition.this)):
            if scope.is_key(column) is None:
                continue
            if isinstance(other, exp.Any):
                return _any_values(other)
            found = _value(other)
            if found is not None:
                return (found,)
        return None
    if isinstance(condition, exp.In) and scope.is_key(condition.this) is not None:
        if condition.args.get("query") is not None or not condition.expressions:
            return None
        values = [_value(item) for item in condition.expressions]
        return None if any(v is None for v in values) else tuple(v for v in values if v is not None)
    return None


def _joined_on_key(scope: _Scope, node: Any) -> bool:
    """Every sharded table of the scope is joined to the others on the sharding key (colocated)."""
    tables = {table for table, _ in scope.by_alias.values()}
    if len(scope.by_alias) < 2:
        return True
    linked: dict[str, set[str]] = {alias: set() for alias in scope.by_alias}
    conditions: list[Any] = []
    where = node.args.get("where")
    if where is not None:
        conditions.append(where)
    for join in node.args.get("joins") or []:
        on = join.args.get("on")
        if on is not None:
            conditions.append(on)
    for condition in conditions:
        for equality in condition.find_all(exp.EQ):
            left, right = equality.this, equality.expression
            if not (isinstance(left, exp.Column) and isinstance(right, exp.Column)):
                continue
            a = _name(left.args.get("table")) if left.args.get("table") is not None else ""
            b = _name(right.args.get("table")) if right.args.get("table") is not None else ""
            if a in scope.by_alias and b in scope.by_alias and scope.is_key(left) and scope.is_key(right):
                linked[a].add(b)
                linked[b].add(a)
    aliases = list(scope.by_alias)
    for join in node.args.get("joins") or []:
        using = [_name(column) for column in join.args.get("using") or []]
        joined = join.this
        if isinstance(joined, exp.Table) and using:
            alias = _alias(joined) or _table_name(joined)
            if alias in linked and scope.by_alias[alias][1] in using:
                for other in aliases:
                    if other != alias and scope.by_alias[other][1] in using:
                        linked[alias].add(other)
                        linked[other].add(alias)
    start = aliases[0]
    seen, todo = {start}, [start]
    while todo:
        for neighbour in linked[todo.pop()]:
            if neighbour not in seen:
                seen.add(neighbour)
                todo.append(neighbour)
    return len(seen) == len(linked) or len(tables) < 1


def find_keys(sql: str, sharded: Sequence[ShardedColumn], omnisharded: Collection[str]) -> KeyFinding:
    try:
        statements = sqlglot.parse(sql, read="postgres")
    except (sqlglot.errors.SqlglotError, ValueError, RecursionError):
        return KeyFinding("other", None, (), ())
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        return KeyFinding("other", None, _sharded_names(statements, sharded, omnisharded),
                          _omni_names(statements, omnisharded))
    tree: Any = statements[0]
    kind = _KINDS.get(type(tree), "other")
    sharded_tables = _sharded_names([tree], sharded, omnisharded)
    omni_tables = _omni_names([tree], omnisharded)
    if not sharded_tables:
        return KeyFinding(kind, None, (), omni_tables)
    if kind == "insert":
        return _insert(tree, sharded, omnisharded, sharded_tables, omni_tables)
    if kind == "other":
        return KeyFinding(kind, None, sharded_tables, omni_tables)
    ctes = _cte_names([tree])
    if isinstance(tree, exp.Update):
        for assignment in tree.expressions:
            target = assignment.this if isinstance(assignment, exp.EQ) else None
            scope = _Scope(tree, sharded, omnisharded, ctes)
            if target is not None and isinstance(target, exp.Column) and _name(target.this) in {
                    key for _, key in scope.by_alias.values()}:
                return KeyFinding(kind, None, sharded_tables, omni_tables,
                                  refusal=(FEATURE_NOT_SUPPORTED, f"UPDATE cannot change the sharding key "
                                           f"{_name(target.this)}: the row would have to move to another shard"))
    union: list[KeyRef] = []
    restricted = True
    nodes: list[Any] = [tree, *(n for n in tree.find_all(exp.Select, exp.Update, exp.Delete) if n is not tree)]
    for node in nodes:
        scope = _Scope(node, sharded, omnisharded, ctes)
        if not scope.by_alias:
            continue
        if not _joined_on_key(scope, node):
            names = sorted({table for table, _ in scope.by_alias.values()})
            key_names = sorted({key for _, key in scope.by_alias.values()})
            return KeyFinding(kind, None, sharded_tables, omni_tables, refusal=(
                FEATURE_NOT_SUPPORTED, f"a join of {' and '.join(names)} that is not on the sharding key "
                                       f"({', '.join(key_names)}) would need rows from several shards: join on the key"))
        keys = _keys_of(node.args.get("where"), scope)
        if keys is None:
            restricted = False
        else:
            union.extend(keys)
    return KeyFinding(kind, tuple(union) if restricted else None, sharded_tables, omni_tables)


def _tables_in(trees: Sequence[Any]) -> list[str]:
    return [_table_name(table) for tree in trees for table in tree.find_all(exp.Table) if table.name]


def _sharded_names(trees: Sequence[Any], columns: Sequence[ShardedColumn],
                   omni: Collection[str]) -> tuple[str, ...]:
    ctes = _cte_names(trees)
    names = []
    for name in _tables_in(trees):
        if name in ctes or name in omni or name in names:
            continue
        if _key_column(name, columns) is not None:
            names.append(name)
    return tuple(names)


def _omni_names(trees: Sequence[Any], omni: Collection[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for name in _tables_in(trees) if name in omni))


def _insert(tree: Any, columns: Sequence[ShardedColumn], omni: Collection[str],
            sharded_tables: tuple[str, ...], omni_tables: tuple[str, ...]) -> KeyFinding:
    target = tree.this
    schema = target if isinstance(target, exp.Schema) else None
    table = schema.this if schema is not None else target
    if not isinstance(table, exp.Table):
        return KeyFinding("insert", None, sharded_tables, omni_tables)
    name = _table_name(table)
    key = _key_column(name, columns) if name not in omni else None
    if key is None:  # into an unsharded or omnisharded table (maybe reading sharded ones)
        source = tree.expression
        if isinstance(source, exp.Select | exp.Union) and _sharded_names([source], columns, omni):
            return KeyFinding("insert", None, sharded_tables, omni_tables, refusal=(
                FEATURE_NOT_SUPPORTED, f"INSERT into {name} from a SELECT of sharded tables is not supported"))
        return KeyFinding("insert", None, (), omni_tables)
    def refuse(message: str) -> KeyFinding:
        return KeyFinding("insert", None, (name,), omni_tables, refusal=(FEATURE_NOT_SUPPORTED, message))
    names = [_name(c) for c in schema.expressions] if schema is not None else []
    if key not in names:
        if schema is None:
            return refuse(f"INSERT into sharded table {name} needs a column list naming {key}")
        return refuse(f"no sharding key in INSERT into {name}: add column {key} or a /* shardgate: shard=N */ hint")
    position = names.index(key)
    conflict = tree.args.get("conflict")
    if conflict is not None:
        for assignment in conflict.find_all(exp.EQ):
            if isinstance(assignment.this, exp.Column) and _name(assignment.this.this) == key and (
                    assignment.find_ancestor(exp.OnConflict) is conflict and assignment.parent is not None
                    and not isinstance(assignment.parent, exp.Where)):
                return refuse(f"ON CONFLICT DO UPDATE cannot change the sharding key {key}")
    source = tree.expression
    if not isinstance(source, exp.Values):
        return refuse(f"INSERT into sharded table {name} from a query is not supported: use VALUES with {key}")
    rows: list[KeyRef] = []
    for index, row in enumerate(source.expressions):
        values = row.expressions if isinstance(row, exp.Tuple) else [row]
        if position >= len(values):
            return refuse(f"row {index + 1} of the INSERT into {name} has no value for {key}")
        found = _value(values[position])
        if found is None:
            return refuse(f"the sharding key of row {index + 1} of the INSERT into {name} is an expression: "
                          f"give {key} as a literal or a parameter")
        rows.append(found)
    return KeyFinding("insert", tuple(rows), (name,), omni_tables, insert=InsertPlan(tuple(rows)))


def split_insert(sql: str, groups: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, ...]]]:
    """The INSERT ... VALUES once per group of row indexes: its SQL with only those rows, parameters
    renumbered from $1, and the original parameter numbers in their new order."""
    tree = sqlglot.parse_one(sql, read="postgres")
    total = len(tree.expression.expressions)
    out: list[tuple[str, tuple[int, ...]]] = []
    for group in groups:
        if len(group) == total and list(group) == list(range(total)):
            numbers = sorted({int(p.this.this) for p in tree.find_all(exp.Parameter)
                              if isinstance(p.this, exp.Literal)})
            out.append((sql, tuple(numbers)))
            continue
        copy = tree.copy()
        values = copy.expression
        values.set("expressions", [values.expressions[index] for index in group])
        order: list[int] = []
        renumbered: dict[int, int] = {}
        for parameter in list(copy.find_all(exp.Parameter)):
            if not isinstance(parameter.this, exp.Literal):
                continue
            original = int(parameter.this.this)
            if original not in renumbered:
                order.append(original)
                renumbered[original] = len(order)
            parameter.set("this", exp.Literal.number(renumbered[original]))
        out.append((copy.sql(dialect="postgres"), tuple(order)))
    return out
