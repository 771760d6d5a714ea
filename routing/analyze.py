"""sqlglot analysis of queries: read or write, the tables named and the $n parameters used."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

DEFAULT_VOLATILE_FUNCTIONS = frozenset(
    {
        "nextval",
        "setval",
        "pg_advisory_lock",
        "pg_advisory_xact_lock",
        "pg_try_advisory_lock",
        "set_config",
        "pg_notify",
        "lo_create",
        "txid_current",
        "pg_current_xact_id",
        "pg_switch_wal",
        "pg_terminate_backend",
        "pg_cancel_backend",
    }
)

# One dialect instance: sqlglot.parse(..., read="postgres") looks the dialect up again on every call.
_POSTGRES = Postgres()

# Statement shapes that only read; anything else sqlglot returns is a write.
_READ_STATEMENTS = (exp.Query, exp.Values)
_WRITE_NODES = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.DDL,
    exp.Drop,
    exp.Alter,
    exp.TruncateTable,
    exp.Copy,
    exp.Command,
)


@dataclass(frozen=True, slots=True)
class Analysis:
    """What sqlglot found in a statement text (all of its statements together)."""

    write: bool
    reason: str
    # Distinct, as PostgreSQL resolves them (unquoted parts lower-cased), CTE names left out.
    tables: tuple[str, ...] = ()
    parameters: tuple[int, ...] = ()  # the distinct $n numbers, ascending
    statement_count: int = 1
    parsed: bool = True  # False: sqlglot could not parse it, and it is a write to be safe


def volatile_function_set(extra: Iterable[str] = ()) -> frozenset[str]:
    """The default volatile functions plus `extra` (lower-cased; `schema.name` entries match qualified calls)."""
    return DEFAULT_VOLATILE_FUNCTIONS | {name.strip().lower() for name in extra}


_FUNCTION_NAMES_BY_CLASS: dict[type[exp.Func], frozenset[str]] = {}


def _typed_function_names(node: exp.Func) -> frozenset[str]:
    """Names sqlglot knows a built-in function node by (nextval-like calls are Anonymous instead)."""
    cls = type(node)
    names = _FUNCTION_NAMES_BY_CLASS.get(cls)
    if names is None:
        names = frozenset(name.lower() for name in cls.sql_names())
        _FUNCTION_NAMES_BY_CLASS[cls] = names
    return names


def _volatile_call(node: exp.Func, volatile_functions: frozenset[str]) -> str | None:
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        if name in volatile_functions:
            return name
        parent = node.parent
        if (
            isinstance(parent, exp.Dot)
            and parent.expression is node
            and isinstance(parent.this, exp.Identifier)
        ):
            qualified = f"{parent.this.name.lower()}.{name}"
            if qualified in volatile_functions:
                return qualified
        return None
    names = _typed_function_names(node) & volatile_functions
    return min(names) if names else None


def _table_name(table: exp.Table) -> str | None:
    if not isinstance(table.this, exp.Identifier):
        return None  # a set-returning function in FROM
    parts = [part for part in table.parts if isinstance(part, exp.Identifier)]
    return ".".join(part.name if part.quoted else part.name.lower() for part in parts)


def _write_reason(statement: exp.Expr, volatile_functions: frozenset[str], found: _Found) -> str | None:
    """Walk the statement once: collect tables and parameters, and return why it writes (None: it reads)."""
    reason: str | None = None
    if not isinstance(statement, _READ_STATEMENTS):
        reason = f"write: {statement.key}"
    for node in statement.walk():
        if isinstance(node, exp.Table):
            name = _table_name(node)
            if name is not None:
                found.tables.setdefault(name, None)
        elif isinstance(node, exp.Parameter):
            if isinstance(node.this, exp.Literal) and not node.this.is_string and node.this.name.isdigit():
                found.parameters.add(int(node.this.name))
        elif isinstance(node, exp.CTE):
            found.cte_names.add(node.alias_or_name.lower())
        elif reason is not None:
            continue
        elif isinstance(node, _WRITE_NODES):
            reason = f"writing {node.key} inside a query"
        elif isinstance(node, exp.Lock):
            reason = "row lock (FOR UPDATE/SHARE)"
        elif isinstance(node, exp.Into):
            reason = "SELECT INTO creates a table"
        elif isinstance(node, exp.Func):
            function = _volatile_call(node, volatile_functions)
            if function is not None:
                reason = f"volatile function {function}"
    return reason


@dataclass(slots=True)
class _Found:
    tables: dict[str, None]  # insertion-ordered set
    parameters: set[int]
    cte_names: set[str]


def analyze(sql: str, volatile_functions: frozenset[str] = DEFAULT_VOLATILE_FUNCTIONS) -> Analysis:
    """Parse `sql` (one or more statements) with sqlglot's postgres dialect and judge it."""
    try:
        statements = [statement for statement in _POSTGRES.parse(sql) if statement is not None]
    except Exception as error:  # ParseError, TokenError, RecursionError on deep nesting: all mean "unknown"
        return Analysis(True, f"unparseable ({type(error).__name__})", parsed=False)
    found = _Found({}, set(), set())
    reason: str | None = None
    for statement in statements:
        statement_reason = _write_reason(statement, volatile_functions, found)
        if reason is None:
            reason = statement_reason
    tables = tuple(name for name in found.tables if "." in name or name not in found.cte_names)
    return Analysis(
        write=reason is not None,
        reason=reason or "read",
        tables=tables,
        parameters=tuple(sorted(found.parameters)),
        statement_count=len(statements),
    )
