"""Keyword pre-classifier: names a statement from its first tokens, without sqlglot.

Transaction control, session commands, COPY, maintenance and DDL are decided here; only queries
(SELECT, WITH, VALUES, TABLE) and the statement inside EXPLAIN or COPY (...) TO are left to sqlglot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from routing.route import Role


class StatementKind(StrEnum):
    QUERY = "query"  # SELECT, WITH, VALUES, TABLE, (SELECT ...): sqlglot decides
    DML = "dml"  # INSERT, UPDATE, DELETE, MERGE
    EXPLAIN = "explain"
    BEGIN = "begin"  # BEGIN, START TRANSACTION
    COMMIT = "commit"  # COMMIT, END
    ROLLBACK = "rollback"  # ROLLBACK, ABORT
    SAVEPOINT = "savepoint"
    RELEASE_SAVEPOINT = "release_savepoint"
    ROLLBACK_TO_SAVEPOINT = "rollback_to_savepoint"
    SET_TRANSACTION = "set_transaction"
    PREPARE_TRANSACTION = "prepare_transaction"
    COMMIT_PREPARED = "commit_prepared"
    ROLLBACK_PREPARED = "rollback_prepared"
    SET = "set"
    SHOW = "show"
    RESET = "reset"
    LISTEN = "listen"
    UNLISTEN = "unlisten"
    NOTIFY = "notify"
    DISCARD = "discard"
    DEALLOCATE = "deallocate"
    PREPARE = "prepare"  # SQL-level PREPARE name AS ...
    EXECUTE = "execute"
    COPY = "copy"
    MAINTENANCE = "maintenance"  # VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT
    LOCK = "lock"
    DDL = "ddl"  # CREATE, ALTER, DROP, COMMENT, GRANT, REVOKE, TRUNCATE, REFRESH, ...
    DO = "do"
    CALL = "call"
    EMPTY = "empty"  # only whitespace and comments
    UNKNOWN = "unknown"  # not a statement we know: a write, to be safe


BEGINS_TRANSACTION_KINDS = frozenset({StatementKind.BEGIN})
ENDS_TRANSACTION_KINDS = frozenset(
    {StatementKind.COMMIT, StatementKind.ROLLBACK, StatementKind.PREPARE_TRANSACTION}
)
# The statements whose completion the proxy must watch to know where a transaction starts or stops.
TRANSACTION_BOUNDARY_KINDS = BEGINS_TRANSACTION_KINDS | ENDS_TRANSACTION_KINDS


@dataclass(frozen=True, slots=True)
class Classification:
    """What the first tokens say about one statement."""

    kind: StatementKind
    write: bool | None  # None: ask sqlglot (about `inner_sql` when it is set)
    keyword: str = ""  # the first keyword, upper-case
    hint: Role | None = None  # from a leading /* shardgate: primary|replica */ comment
    begins_transaction: bool = False
    read_only_transaction: bool = False  # BEGIN / START / SET TRANSACTION ... READ ONLY
    ends_transaction: bool = False
    chain: bool = False  # COMMIT/ROLLBACK AND CHAIN: a transaction like it starts at once
    name: str | None = None  # SET/RESET/SHOW parameter, prepared statement, savepoint, DISCARD target
    value: str | None = None  # SET: the first value, unquoted
    inner_sql: str | None = None  # EXPLAIN, COPY (query) TO: the statement sqlglot should judge


# Token kinds; a token never runs past a top-level ';' (that reads as _END).
_WORD, _QUOTED_IDENT, _STRING, _NUMBER, _PARAM, _PUNCT, _END = range(7)


class _Token(NamedTuple):
    kind: int
    text: str  # words lower-cased, quoted identifiers and strings unquoted, otherwise the source
    start: int
    end: int


# Every pattern below scans a character class once or uses possessive quantifiers: nothing backtracks,
# however long the SQL is.
_SPACE_RE = re.compile(r"[ \t\n\r\f\v]+")
_WORD_RE = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_NUMBER_RE = re.compile(r"[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")
_PARAM_RE = re.compile(r"\$[0-9]+")
_DOLLAR_TAG_RE = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_COMMENT_MARK_RE = re.compile(r"/\*|\*/")
# Possessive quantifiers (Python 3.11+): a quoted body is consumed in C and never backtracked.
_STRING_BODY_RE = re.compile(r"(?:[^']++|'')*+")
_IDENT_BODY_RE = re.compile(r'(?:[^"]++|"")*+')
_ESCAPE_STRING_BODY_RE = re.compile(r"(?:[^'\\]++|''|\\.)*+", re.DOTALL)
# A '$' right after an identifier character continues the identifier: it opens no dollar quote.
_DOLLAR_MARK = r"(?<![A-Za-z0-9_$\x80-\U0010ffff])\$"
_PAREN_MARK_RE = re.compile(rf"[()';\"]|{_DOLLAR_MARK}|--|/\*")
_HINT_PREFIX = "shardgate:"
_HINT_ROLES = {"primary": Role.PRIMARY, "replica": Role.REPLICA}


def _block_comment_end(sql: str, pos: int) -> int:
    """End of the block comment opening at `pos`; PostgreSQL block comments nest."""
    depth = 0
    while True:
        mark = _COMMENT_MARK_RE.search(sql, pos)
        if mark is None:
            return len(sql)
        depth += 1 if mark.group() == "/*" else -1
        pos = mark.end()
        if depth == 0:
            return pos


def _comment_hint(body: str) -> Role | None:
    text = body.strip().lower()
    if not text.startswith(_HINT_PREFIX):
        return None
    return _HINT_ROLES.get(text[len(_HINT_PREFIX) :].strip())


_SHARD_HINT_RE = re.compile(r"shardgate:\s*shard\s*=\s*(all|[0-9]+(?:\s*,\s*[0-9]+)*)\s*", re.IGNORECASE)
_KEY_HINT_RE = re.compile(r"shardgate:\s*sharding_key\s*=\s*(?:'((?:[^']|'')*)'|\"((?:[^\"]|\"\")*)\"|(\S+))\s*",
                          re.IGNORECASE)
ALL_SHARDS: tuple[int, ...] = ()


def _leading_comments(sql: str) -> Iterator[str]:
    """The bodies of the comments before the statement's first word."""
    pos = 0
    length = len(sql)
    while pos < length:
        space = _SPACE_RE.match(sql, pos)
        if space is not None:
            pos = space.end()
        if sql.startswith("/*", pos):
            end = _block_comment_end(sql, pos)
            yield sql[pos + 2 : max(pos + 2, end - 2)]
        elif sql.startswith("--", pos):
            newline = sql.find("\n", pos + 2)
            end = length if newline < 0 else newline + 1
            yield sql[pos + 2 : end]
        else:
            return
        pos = end


def shard_hint(sql: str) -> tuple[int, ...] | None:
    """The shards a leading `/* shardgate: shard=N */` (or `shard=1,2`, `shard=all`) comment names:
    ALL_SHARDS for all, None without such a comment."""
    for body in _leading_comments(sql):
        match = _SHARD_HINT_RE.fullmatch(body.strip())
        if match is not None:
            value = match.group(1).lower()
            if value == "all":
                return ALL_SHARDS
            return tuple(sorted({int(part) for part in value.split(",")}))
    return None


def sharding_key_hint(sql: str) -> str | None:
    """The value a leading `/* shardgate: sharding_key=v */` comment names (quoted 'v' or "v" may hold
    spaces; a doubled quote stands for one), None without such a comment."""
    for body in _leading_comments(sql):
        match = _KEY_HINT_RE.fullmatch(body.strip())
        if match is not None:
            quoted, double, bare = match.groups()
            if quoted is not None:
                return quoted.replace("''", "'")
            if double is not None:
                return double.replace('""', '"')
            return bare
    return None


def _skip_trivia(sql: str, pos: int, hints: list[Role] | None = None) -> int:
    """Skip whitespace and comments from `pos`; collect shardgate hints when `hints` is given."""
    length = len(sql)
    while pos < length:
        char = sql[pos]
        if char in " \t\n\r\f\v":
            space = _SPACE_RE.match(sql, pos)
            pos = space.end() if space is not None else pos + 1
        elif char == "-" and sql.startswith("--", pos):
            newline = sql.find("\n", pos + 2)
            end = length if newline < 0 else newline + 1
            if hints is not None and (hint := _comment_hint(sql[pos + 2 : end])) is not None:
                hints.append(hint)
            pos = end
        elif char == "/" and sql.startswith("/*", pos):
            end = _block_comment_end(sql, pos)
            if (
                hints is not None
                and (hint := _comment_hint(sql[pos + 2 : max(pos + 2, end - 2)])) is not None
            ):
                hints.append(hint)
            pos = end
        else:
            break
    return pos


def _body_end(pattern: re.Pattern[str], sql: str, pos: int, quote: str) -> int:
    """End of a quoted token whose body starts at `pos`: past the closing quote, or the end of the text."""
    body = pattern.match(sql, pos)
    end = body.end() if body is not None else pos
    return end + 1 if sql.startswith(quote, end) else len(sql)


def _quoted_end(sql: str, pos: int, quote: str) -> int:
    """End of a '...' string or "..." identifier whose body starts at `pos` (doubled quotes escape)."""
    return _body_end(_STRING_BODY_RE if quote == "'" else _IDENT_BODY_RE, sql, pos, quote)


def _escape_string_end(sql: str, pos: int) -> int:
    """End of an E'...' string whose body starts at `pos` (backslash escapes)."""
    return _body_end(_ESCAPE_STRING_BODY_RE, sql, pos, "'")


def _dollar_quoted_end(sql: str, tag_end: int, tag: str) -> int:
    close = sql.find(tag, tag_end)
    return len(sql) if close < 0 else close + len(tag)


def _read_token(sql: str, pos: int) -> _Token:
    """The token at `pos` (already past trivia)."""
    if pos >= len(sql) or sql[pos] == ";":
        return _Token(_END, "", pos, pos)
    char = sql[pos]
    if char in "eE" and sql.startswith("'", pos + 1):
        end = _escape_string_end(sql, pos + 2)
        return _Token(_STRING, sql[pos + 2 : end - 1], pos, end)
    word = _WORD_RE.match(sql, pos)
    if word is not None:
        return _Token(_WORD, word.group().lower(), pos, word.end())
    if char == "'":
        end = _quoted_end(sql, pos + 1, "'")
        return _Token(_STRING, sql[pos + 1 : end - 1].replace("''", "'"), pos, end)
    if char == '"':
        end = _quoted_end(sql, pos + 1, '"')
        return _Token(_QUOTED_IDENT, sql[pos + 1 : end - 1].replace('""', '"'), pos, end)
    if char == "$":
        param = _PARAM_RE.match(sql, pos)
        if param is not None:
            return _Token(_PARAM, param.group(), pos, param.end())
        tag = _DOLLAR_TAG_RE.match(sql, pos)
        if tag is not None:
            end = _dollar_quoted_end(sql, tag.end(), tag.group())
            return _Token(_STRING, sql[tag.end() : end - len(tag.group())], pos, end)
    number = _NUMBER_RE.match(sql, pos)
    if number is not None:
        return _Token(_NUMBER, number.group(), pos, number.end())
    return _Token(_PUNCT, char, pos, pos + 1)


class _Cursor:
    """Reads tokens of one statement from a position; stops at a top-level ';'."""

    __slots__ = ("pos", "sql")

    def __init__(self, sql: str, pos: int) -> None:
        self.sql = sql
        self.pos = pos

    def next(self) -> _Token:
        token = _read_token(self.sql, _skip_trivia(self.sql, self.pos))
        self.pos = token.end
        return token

    def peek(self) -> _Token:
        return _read_token(self.sql, _skip_trivia(self.sql, self.pos))

    def next_is(self, *words: str) -> bool:
        """Consume the next token if it is one of `words`."""
        token = self.peek()
        if token.kind == _WORD and token.text in words:
            self.pos = token.end
            return True
        return False

    def skip_parens(self) -> int:
        """After an opening '(' was read: move past its matching ')'; return where that ')' starts."""
        depth = 1
        pos = self.pos
        while True:
            mark = _PAREN_MARK_RE.search(self.sql, pos)
            if mark is None or mark.group() == ";":
                self.pos = len(self.sql) if mark is None else mark.start()
                return self.pos
            text, at = mark.group(), mark.start()
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
                if depth == 0:
                    self.pos = at + 1
                    return at
            else:
                pos = _skip_quoted(self.sql, at, text)
                continue
            pos = at + 1

    def dotted_name(self) -> str | None:
        """A possibly qualified name (`shardgate.role`, `"My"."Table"`); unquoted parts lower-cased."""
        token = self.next()
        if token.kind not in (_WORD, _QUOTED_IDENT):
            return None
        parts = [token.text]
        while (dot := self.peek()).kind == _PUNCT and dot.text == ".":
            self.pos = dot.end
            part = self.next()
            if part.kind not in (_WORD, _QUOTED_IDENT):
                break
            parts.append(part.text)
        return ".".join(parts)


@dataclass(frozen=True, slots=True)
class _Head:
    keyword: str
    hint: Role | None


_MAX_MODE_TOKENS = 24  # transaction modes are a handful of words; do not read a whole long text


def _read_only_mode(cursor: _Cursor) -> bool:
    """Read transaction modes (ISOLATION LEVEL ..., READ ONLY|WRITE, [NOT] DEFERRABLE); True if READ ONLY."""
    read_only = False
    previous = ""
    for _ in range(_MAX_MODE_TOKENS):
        token = cursor.next()
        if token.kind == _END:
            break
        if previous == "read" and token.kind == _WORD:
            if token.text == "only":
                read_only = True
            elif token.text == "write":
                read_only = False
        previous = token.text if token.kind == _WORD else ""
    return read_only


def _chain(cursor: _Cursor) -> bool:
    """AND [NO] CHAIN after COMMIT / ROLLBACK."""
    if not cursor.next_is("and"):
        return False
    return not cursor.next_is("no") and cursor.next_is("chain")


def _begin(cursor: _Cursor, head: _Head) -> Classification:
    cursor.next_is("work", "transaction")
    return _transaction_start(cursor, head)


def _start(cursor: _Cursor, head: _Head) -> Classification:
    if not cursor.next_is("transaction"):
        return _unknown(head)
    return _transaction_start(cursor, head)


def _transaction_start(cursor: _Cursor, head: _Head) -> Classification:
    """BEGIN [WORK|TRANSACTION] / START TRANSACTION, then the transaction modes."""
    return Classification(
        StatementKind.BEGIN,
        False,
        head.keyword,
        head.hint,
        begins_transaction=True,
        read_only_transaction=_read_only_mode(cursor),
    )


def _commit(cursor: _Cursor, head: _Head) -> Classification:
    if cursor.next_is("prepared"):
        return Classification(
            StatementKind.COMMIT_PREPARED, True, head.keyword, head.hint, name=_string_or_word(cursor)
        )
    cursor.next_is("work", "transaction")
    return Classification(
        StatementKind.COMMIT, False, head.keyword, head.hint, ends_transaction=True, chain=_chain(cursor)
    )


def _rollback(cursor: _Cursor, head: _Head) -> Classification:
    if head.keyword == "ROLLBACK" and cursor.next_is("prepared"):
        return Classification(
            StatementKind.ROLLBACK_PREPARED, True, head.keyword, head.hint, name=_string_or_word(cursor)
        )
    cursor.next_is("work", "transaction")
    if cursor.next_is("to"):
        cursor.next_is("savepoint")
        return Classification(
            StatementKind.ROLLBACK_TO_SAVEPOINT, False, head.keyword, head.hint, name=_string_or_word(cursor)
        )
    return Classification(
        StatementKind.ROLLBACK, False, head.keyword, head.hint, ends_transaction=True, chain=_chain(cursor)
    )


def _savepoint(cursor: _Cursor, head: _Head) -> Classification:
    return Classification(
        StatementKind.SAVEPOINT, False, head.keyword, head.hint, name=_string_or_word(cursor)
    )


def _release(cursor: _Cursor, head: _Head) -> Classification:
    cursor.next_is("savepoint")
    return Classification(
        StatementKind.RELEASE_SAVEPOINT, False, head.keyword, head.hint, name=_string_or_word(cursor)
    )


def _string_or_word(cursor: _Cursor) -> str | None:
    token = cursor.next()
    return token.text if token.kind in (_WORD, _QUOTED_IDENT, _STRING) else None


def _set(cursor: _Cursor, head: _Head) -> Classification:
    if cursor.next_is("transaction"):
        return Classification(
            StatementKind.SET_TRANSACTION,
            False,
            head.keyword,
            head.hint,
            read_only_transaction=_read_only_mode(cursor),
        )
    if cursor.next_is("session"):
        following = cursor.peek()
        if following.kind == _WORD and following.text in ("characteristics", "authorization"):
            cursor.pos = following.end
            return Classification(
                StatementKind.SET, False, head.keyword, head.hint, name=f"session {following.text}"
            )
    else:
        cursor.next_is("local")
    name = cursor.dotted_name()
    if name == "time" and cursor.next_is("zone"):
        name = "timezone"
    cursor.next_is("to")
    equals = cursor.peek()
    if equals.kind == _PUNCT and equals.text == "=":
        cursor.pos = equals.end
    value = cursor.next()
    return Classification(
        StatementKind.SET,
        False,
        head.keyword,
        head.hint,
        name=name,
        value=value.text if value.kind != _END else None,
    )


def _session_command(kind: StatementKind) -> Callable[[_Cursor, _Head], Classification]:
    def classify_session_command(cursor: _Cursor, head: _Head) -> Classification:
        name = cursor.dotted_name()
        if name == "time" and cursor.next_is("zone"):
            name = "timezone"
        return Classification(kind, False, head.keyword, head.hint, name=name)

    return classify_session_command


def _discard(cursor: _Cursor, head: _Head) -> Classification:
    return Classification(StatementKind.DISCARD, False, head.keyword, head.hint, name=_string_or_word(cursor))


def _deallocate(cursor: _Cursor, head: _Head) -> Classification:
    cursor.next_is("prepare")
    # SQL-level prepared statements live on the primary so PREPARE, EXECUTE and DEALLOCATE meet there.
    return Classification(
        StatementKind.DEALLOCATE, True, head.keyword, head.hint, name=_string_or_word(cursor)
    )


def _prepare(cursor: _Cursor, head: _Head) -> Classification:
    following = cursor.peek()
    if following.kind == _WORD and following.text == "transaction":
        cursor.pos = following.end
        gid = cursor.next()
        if gid.kind == _STRING:
            return Classification(
                StatementKind.PREPARE_TRANSACTION,
                True,
                head.keyword,
                head.hint,
                ends_transaction=True,
                name=gid.text,
            )
        return Classification(StatementKind.PREPARE, True, head.keyword, head.hint, name="transaction")
    return Classification(StatementKind.PREPARE, True, head.keyword, head.hint, name=_string_or_word(cursor))


def _execute(cursor: _Cursor, head: _Head) -> Classification:
    # What EXECUTE runs was named in an earlier PREPARE: unknown here, so treat it as a write.
    return Classification(StatementKind.EXECUTE, True, head.keyword, head.hint, name=_string_or_word(cursor))


def _copy(cursor: _Cursor, head: _Head) -> Classification:
    token = cursor.next()
    if token.kind == _PUNCT and token.text == "(":
        query_end = cursor.skip_parens()
        inner = cursor.sql[token.end : query_end]
        if cursor.next_is("to"):
            return Classification(StatementKind.COPY, None, head.keyword, head.hint, inner_sql=inner)
        return Classification(StatementKind.COPY, True, head.keyword, head.hint)
    if token.kind == _WORD and token.text == "binary":  # pre-9.0 syntax: COPY BINARY table ...
        token = cursor.next()
    if token.kind not in (_WORD, _QUOTED_IDENT):
        return Classification(StatementKind.COPY, True, head.keyword, head.hint)
    cursor.pos = token.start
    table = cursor.dotted_name()
    columns = cursor.peek()
    if columns.kind == _PUNCT and columns.text == "(":
        cursor.pos = columns.end
        cursor.skip_parens()
    direction = cursor.next()
    reads = direction.kind == _WORD and direction.text == "to"
    return Classification(StatementKind.COPY, not reads, head.keyword, head.hint, name=table)


def _explain(cursor: _Cursor, head: _Head) -> Classification:
    options = cursor.peek()
    if options.kind == _PUNCT and options.text == "(":
        cursor.pos = options.end
        cursor.skip_parens()
    else:
        while cursor.next_is("analyze", "analyse", "verbose"):
            pass
    inner_start = _skip_trivia(cursor.sql, cursor.pos)
    return Classification(
        StatementKind.EXPLAIN, None, head.keyword, head.hint, inner_sql=cursor.sql[inner_start:]
    )


_NAMEDATALEN = 64  # PostgreSQL's identifier limit, with its terminator
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def channel_name(text: str, quoted: bool) -> str:
    """A channel as PostgreSQL names it: unquoted identifiers lower-cased (ASCII letters only, as in a UTF-8
    database), both forms cut to 63 bytes on a character boundary."""
    name = text if quoted else text.translate(_ASCII_LOWER)
    encoded = name.encode("utf-8")
    if len(encoded) >= _NAMEDATALEN:
        name = encoded[: _NAMEDATALEN - 1].decode("utf-8", "ignore")
    return name


def _closed_identifier(sql: str, start: int) -> bool:
    body = _IDENT_BODY_RE.match(sql, start + 1)
    return body is not None and sql.startswith('"', body.end())


def _listen(kind: StatementKind) -> Callable[[_Cursor, _Head], Classification]:
    """LISTEN channel, UNLISTEN channel | *: the channel in `name` (None when the statement is not that
    simple form: PostgreSQL then judges it), `value` "*" for UNLISTEN *."""

    def classify_listen(cursor: _Cursor, head: _Head) -> Classification:
        token = cursor.next()
        name: str | None = None
        value: str | None = None
        if token.kind == _WORD:  # from the source: the token's text is lowered beyond ASCII
            name = channel_name(cursor.sql[token.start : token.end], quoted=False)
        elif token.kind == _QUOTED_IDENT and token.text and _closed_identifier(cursor.sql, token.start):
            name = channel_name(token.text, quoted=True)
        elif kind is StatementKind.UNLISTEN and token.kind == _PUNCT and token.text == "*":
            value = "*"
        if cursor.next().kind != _END:
            name = value = None
        return Classification(kind, True, head.keyword, head.hint, name=name, value=value)

    return classify_listen


def _fixed(kind: StatementKind, write: bool | None) -> Callable[[_Cursor, _Head], Classification]:
    def classify_fixed(cursor: _Cursor, head: _Head) -> Classification:
        return Classification(kind, write, head.keyword, head.hint)

    return classify_fixed


def _unknown(head: _Head) -> Classification:
    return Classification(StatementKind.UNKNOWN, True, head.keyword, head.hint)


_HANDLERS: dict[str, Callable[[_Cursor, _Head], Classification]] = {
    "select": _fixed(StatementKind.QUERY, None),
    "with": _fixed(StatementKind.QUERY, None),
    "values": _fixed(StatementKind.QUERY, None),
    "table": _fixed(StatementKind.QUERY, None),
    "insert": _fixed(StatementKind.DML, True),
    "update": _fixed(StatementKind.DML, True),
    "delete": _fixed(StatementKind.DML, True),
    "merge": _fixed(StatementKind.DML, True),
    "explain": _explain,
    "begin": _begin,
    "start": _start,
    "commit": _commit,
    "end": _commit,
    "rollback": _rollback,
    "abort": _rollback,
    "savepoint": _savepoint,
    "release": _release,
    "prepare": _prepare,
    "set": _set,
    "show": _session_command(StatementKind.SHOW),
    "reset": _session_command(StatementKind.RESET),
    "listen": _listen(StatementKind.LISTEN),  # a hot standby refuses LISTEN/UNLISTEN/NOTIFY
    "unlisten": _listen(StatementKind.UNLISTEN),
    "notify": _fixed(StatementKind.NOTIFY, True),
    "discard": _discard,
    "deallocate": _deallocate,
    "execute": _execute,
    "copy": _copy,
    "vacuum": _fixed(StatementKind.MAINTENANCE, True),
    "analyze": _fixed(StatementKind.MAINTENANCE, True),
    "analyse": _fixed(StatementKind.MAINTENANCE, True),
    "cluster": _fixed(StatementKind.MAINTENANCE, True),
    "reindex": _fixed(StatementKind.MAINTENANCE, True),
    "checkpoint": _fixed(StatementKind.MAINTENANCE, True),
    "lock": _fixed(StatementKind.LOCK, True),
    "truncate": _fixed(StatementKind.DDL, True),
    "grant": _fixed(StatementKind.DDL, True),
    "revoke": _fixed(StatementKind.DDL, True),
    "create": _fixed(StatementKind.DDL, True),
    "alter": _fixed(StatementKind.DDL, True),
    "drop": _fixed(StatementKind.DDL, True),
    "comment": _fixed(StatementKind.DDL, True),
    "refresh": _fixed(StatementKind.DDL, True),
    "security": _fixed(StatementKind.DDL, True),  # SECURITY LABEL
    "reassign": _fixed(StatementKind.DDL, True),  # REASSIGN OWNED
    "import": _fixed(StatementKind.DDL, True),  # IMPORT FOREIGN SCHEMA
    "do": _fixed(StatementKind.DO, True),
    "call": _fixed(StatementKind.CALL, True),
}


def classify(sql: str) -> Classification:
    """Classify the first statement of `sql` from its leading comments and first keywords."""
    hints: list[Role] = []
    cursor = _Cursor(sql, _skip_trivia(sql, 0, hints))
    hint = hints[0] if hints else None
    first = cursor.next()
    if first.kind == _END:
        return Classification(StatementKind.EMPTY, False, "", hint)
    if first.kind == _PUNCT and first.text == "(":
        return Classification(StatementKind.QUERY, None, "(", hint)
    head = _Head(first.text.upper() if first.kind == _WORD else "", hint)
    handler = _HANDLERS.get(first.text) if first.kind == _WORD else None
    if handler is None:
        return _unknown(head)
    return handler(cursor, head)


# Splitting a multi-statement string: jump between the characters that can open a string, a comment or
# end a statement, so long texts are not walked one character at a time in Python.
_SPLIT_MARK_RE = re.compile(rf"[;'\"]|{_DOLLAR_MARK}|--|/\*")
# Inside CREATE FUNCTION/PROCEDURE, words and parentheses matter too (BEGIN ATOMIC ... END bodies).
_SPLIT_MARK_WITH_WORDS_RE = re.compile(
    rf"[;'\"()]|{_DOLLAR_MARK}|--|/\*|[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*"
)
_EMPTY_STATEMENTS_RE = re.compile(r"(?:[ \t\n\r\f\v]*+;)++")
_IDENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$")


def _is_ident_char(char: str) -> bool:
    return char in _IDENT_CHARS or char >= "\x80"


def _defines_routine(sql: str, pos: int) -> bool:
    """Does the statement at `pos` start CREATE [OR REPLACE] FUNCTION|PROCEDURE?"""
    cursor = _Cursor(sql, pos)
    if not cursor.next_is("create"):
        return False
    if cursor.next_is("or"):
        cursor.next_is("replace")
    return cursor.next_is("function", "procedure")


def _skip_quoted(sql: str, at: int, mark: str) -> int:
    """Position after the string, identifier or comment opened by `mark` at `at` (or at + 1 if none)."""
    if mark == "'":
        if at > 0 and sql[at - 1] in "eE" and (at < 2 or not _is_ident_char(sql[at - 2])):
            return _escape_string_end(sql, at + 1)
        return _quoted_end(sql, at + 1, "'")
    if mark == '"':
        return _quoted_end(sql, at + 1, '"')
    if mark == "--":
        newline = sql.find("\n", at)
        return len(sql) if newline < 0 else newline + 1
    if mark == "/*":
        return _block_comment_end(sql, at)
    # '$': a dollar quote only when it does not continue an identifier ($ is an identifier character).
    if at == 0 or not _is_ident_char(sql[at - 1]):
        tag = _DOLLAR_TAG_RE.match(sql, at)
        if tag is not None:
            return _dollar_quoted_end(sql, tag.end(), tag.group())
    return at + 1


def split_statements(sql: str) -> list[str]:
    """Split on top-level ';' (not inside strings, comments, dollar quotes or BEGIN ATOMIC bodies).

    Empty statements are dropped; each piece keeps its own leading comments.
    """
    pieces: list[str] = []
    start = 0
    length = len(sql)
    while start < length:
        empty = _EMPTY_STATEMENTS_RE.match(sql, start)
        if empty is not None and empty.end() > start:
            start = empty.end()
            continue
        end = _statement_end(sql, start)
        if _skip_trivia(sql, start) < end:
            pieces.append(sql[start:end])
        start = end + 1
    return pieces


def _statement_end(sql: str, start: int) -> int:
    """Position of the ';' ending the statement that begins at `start` (or the end of the text)."""
    pattern = _SPLIT_MARK_WITH_WORDS_RE if _defines_routine(sql, start) else _SPLIT_MARK_RE
    pos = start
    paren_depth = 0
    block_depth = 0
    while True:
        mark = pattern.search(sql, pos)
        if mark is None:
            return len(sql)
        text = mark.group()
        at = mark.start()
        if text == ";":
            if block_depth == 0:
                return at
            pos = at + 1
        elif text in ("'", '"', "$", "--", "/*"):
            pos = _skip_quoted(sql, at, text)
        elif text == "(":
            paren_depth += 1
            pos = at + 1
        elif text == ")":
            paren_depth -= 1
            pos = at + 1
        else:
            pos = mark.end()
            if paren_depth == 0:
                block_depth = _atomic_depth(text.lower(), block_depth)


def _atomic_depth(word: str, depth: int) -> int:
    """Track BEGIN ... END nesting of a SQL-standard routine body; CASE ... END nests inside it."""
    if word == "begin":
        return depth + 1
    if word == "case" and depth > 0:
        return depth + 1
    if word == "end" and depth > 0:
        return depth - 1
    return depth
