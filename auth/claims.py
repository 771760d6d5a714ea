"""JWT claims -> the SQL that sets them on a server session, and detection of clients trying to forge them.

The settings follow PostgREST: `request.jwt.claims` holds the whole claims JSON and
`request.jwt.claim.<name>` one claim each, read by row-level security policies with
`current_setting('request.jwt.claim.tenant_id', true)`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from auth.errors import AuthError
from auth.keys import JwtSetupError
from config.model import JwtConfig

CLAIMS_SETTING = "request.jwt.claims"
CLAIM_SETTING_PREFIX = "request.jwt.claim."
# PostgreSQL truncates longer identifiers, which could turn one role name into another.
MAX_IDENTIFIER_BYTES = 63
# Names PostgreSQL reserves: SET ROLE 'none' (even quoted) means RESET ROLE.
RESERVED_ROLE_NAMES = frozenset({"none", "public", "current_user", "session_user", "current_role"})

# valid_custom_variable_name: each dotted part is a simple identifier.
_SETTING_PART = r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*"
_CLAIM_NAME = re.compile(rf"{_SETTING_PART}(?:\.{_SETTING_PART})*")

_MISSING = object()


def claim_at(claims: dict[str, Any], name: str) -> Any:
    """A claim by name or dotted path (`app_metadata.tenant_id`); None when absent.

    A claim whose own name contains dots (`https://example.com/roles`) wins over the path reading.
    """
    value = claims.get(name, _MISSING)
    if value is not _MISSING:
        return value
    if "." not in name:
        return None
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
        if node is None:
            return None
    return node


def injected_claim_names(cfg: JwtConfig) -> tuple[str, ...]:
    """Claims set as `request.jwt.claim.<name>`: cfg.claims then the tenant claim, without repeats."""
    names = list(dict.fromkeys(cfg.claims))
    if cfg.tenant_claim and cfg.tenant_claim not in names:
        names.append(cfg.tenant_claim)
    return tuple(names)


def check_claim_names(cfg: JwtConfig) -> None:
    """Setup-time check that every injected claim name makes a valid PostgreSQL setting name."""
    for name in injected_claim_names(cfg):
        if not _CLAIM_NAME.fullmatch(name):
            raise JwtSetupError(
                f"jwt.claims: {name!r} cannot be a PostgreSQL setting name "
                "(dotted parts of letters, digits, _ and $, not starting with a digit)"
            )
    if cfg.switch_role:
        if not cfg.allowed_roles:
            raise JwtSetupError("jwt.switch_role needs jwt.allowed_roles: the roles a token may switch to")
        for role in cfg.allowed_roles:
            if role.lower() in RESERVED_ROLE_NAMES or "\x00" in role:
                raise JwtSetupError(f"jwt.allowed_roles: {role!r} is not a usable role name")
            if len(role.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
                raise JwtSetupError(
                    f"jwt.allowed_roles: {role!r} is longer than {MAX_IDENTIFIER_BYTES} bytes"
                )


def sql_literal(value: str) -> str:
    """A string literal that means `value` whatever standard_conforming_strings says.

    Quotes are doubled; backslashes are spliced in with chr(92) so that a client who turned
    standard_conforming_strings off on a pooled connection cannot make one escape our quote.
    """
    if "\x00" in value:
        raise ValueError("PostgreSQL text cannot contain NUL")
    quoted = "'" + value.replace("'", "''") + "'"
    if "\\" in value:
        quoted = quoted.replace("\\", "' || chr(92) || '")
    return quoted


def sql_identifier(name: str) -> str:
    if "\x00" in name:
        raise ValueError("PostgreSQL identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def claim_text(value: Any) -> str:
    """How a claim is stored in a setting: strings verbatim, anything else as JSON, absent as ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def session_settings(claims: dict[str, Any], cfg: JwtConfig, *, local: bool) -> str:
    """One SQL string that installs the claims (and role) on a server session.

    `local=True` scopes them to the current transaction (they only survive when this runs inside
    the client's transaction); `local=False` makes them session-level, cleared by reset_settings_sql.
    Every configured claim is set, to '' when absent, so nothing from an earlier client survives.
    """
    is_local = "true" if local else "false"
    calls = [_set_config(CLAIMS_SETTING, claim_text(claims), is_local)]
    for name in injected_claim_names(cfg):
        calls.append(_set_config(CLAIM_SETTING_PREFIX + name, claim_text(claim_at(claims, name)), is_local))
    sql = "SELECT " + ", ".join(calls)
    if cfg.switch_role:
        role = _role_to_switch(claims, cfg)
        sql += f"; SET {'LOCAL ' if local else ''}ROLE {sql_identifier(role)}"
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        raise AuthError("28000", "token claims contain invalid Unicode")
    return sql


def _set_config(setting: str, value: str, is_local: str) -> str:
    if "\x00" in value:
        # The setting name is config text; the claim name after the prefix says which one.
        raise AuthError(
            "28000", f"claim {setting.removeprefix(CLAIM_SETTING_PREFIX)} contains a NUL character"
        )
    return f"set_config({sql_literal(setting)}, {sql_literal(value)}, {is_local})"


def _role_to_switch(claims: dict[str, Any], cfg: JwtConfig) -> str:
    # The validator already refused such tokens; checked again because a wrong role here is a breach.
    role = claim_at(claims, cfg.role_claim)
    if not isinstance(role, str) or not role:
        raise AuthError("42501", f"missing claim {cfg.role_claim}")
    if role not in cfg.allowed_roles or role.lower() in RESERVED_ROLE_NAMES or "\x00" in role:
        raise AuthError("42501", f"role {printable(role)} is not allowed")
    if len(role.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise AuthError("42501", "role name is too long")
    return role


def reset_settings_sql(cfg: JwtConfig) -> str:
    """Clear, at session level, everything session_settings may have set (for when a client leaves)."""
    calls = [_set_config(CLAIMS_SETTING, "", "false")]
    calls.extend(_set_config(CLAIM_SETTING_PREFIX + name, "", "false") for name in injected_claim_names(cfg))
    sql = "SELECT " + ", ".join(calls)
    if cfg.switch_role:
        sql += "; RESET ROLE"
    return sql


def printable(value: Any, limit: int = 63) -> str:
    """A token-supplied value safe to echo in an error message: short, printable, else a placeholder."""
    if isinstance(value, str) and value.isprintable() and 0 < len(value) <= limit:
        return value
    return "(unprintable)"


# ---------------------------------------------------------------------------------------------
# Forgery detection. A small PostgreSQL lexer (strings, dollar quotes, quoted identifiers, nested
# comments, E'' and U&'' escapes) so that quoting, case, comments and whitespace cannot hide a
# statement; when the lexer is unsure (unterminated quote, UESCAPE, dynamic set_config name), it
# reports an attempt: refusing a rare legitimate statement beats letting a tenant act as another.
# ---------------------------------------------------------------------------------------------

# Every forging construct holds a verb (SET, RESET, set_config, pg_settings, DISCARD, EXECUTE, a
# procedural language's SPI, or U& / backslash escapes that could spell one) and a target (a role,
# request.jwt, session authorization, or again something that could hide one). Statements missing
# either (most, even UPDATE ... SET) skip the lexer; so do string literals nested inside statements.
_SQL_RUNNERS = ("query_to_xml", "ts_stat", "ts_rewrite")  # built-ins that run SQL text they are given
_PREFILTER_VERBS = ("set", "discard", "execute", "spi", "u&", "\\", *_SQL_RUNNERS)
_PREFILTER_TARGETS = (
    "role", "request", "authorization", "set_config", "reset", "discard", "pg_settings",
    "execute", "spi", "u&", "\\", *_SQL_RUNNERS,
)  # fmt: skip
# Argument position of the SQL text in functions that execute it in the current session.
_SQL_TEXT_ARGUMENT = {
    "query_to_xml": 0,
    "query_to_xmlschema": 0,
    "query_to_xml_and_xmlschema": 0,
    "ts_stat": 0,
    "ts_rewrite": 1,
}
# Lexing is Python code on the event loop: past this size a statement that passed the prefilter is
# refused rather than scanned (a JWT client can bind large values as parameters instead).
MAX_SCANNED_CHARS = 256 * 1024
_MAX_NESTING = 4

_IDENT = r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*"
_DOLLAR_TAG = r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*"  # no $ inside a tag
_COMMON = rf"""
    (?P<ws>\s+)
  | (?P<line_comment>--[^\n\r]*)
  | (?P<block_comment>/\*)
  | (?P<ustring>[uU]&'[^']*(?:''[^']*)*')
  | (?P<uident>[uU]&"[^"]*(?:""[^"]*)*")
  | (?P<estring>[eE]'[^'\\]*(?:(?:\\[\s\S]|'')[^'\\]*)*')
  | (?P<dollar>\$(?:{_DOLLAR_TAG})?\$)
  | (?P<param>\$\d+)
  | (?P<qident>"[^"]*(?:""[^"]*)*")
"""
_TAIL = rf"""
  | (?P<ident>{_IDENT})
  | (?P<number>(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
  | (?P<cast>::)
  | (?P<op>[\s\S])
"""
# standard_conforming_strings on: backslash is an ordinary character in '...'.
_LEXER_SCS_ON = re.compile(_COMMON + r"| (?P<string>[nNbBxX]?'[^']*(?:''[^']*)*')" + _TAIL, re.VERBOSE)
# standard_conforming_strings off (a client can set it): '...' behaves like E'...'.
_LEXER_SCS_OFF = re.compile(
    _COMMON + r"| (?P<bstring>[nNbBxX]?'[^'\\]*(?:(?:\\[\s\S]|'')[^'\\]*)*')" + _TAIL, re.VERBOSE
)

# One pass over '' and backslash escapes, as PostgreSQL reads them left to right.
_BACKSLASH_ESCAPE = re.compile(r"''|\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[\s\S])")
_UNICODE_ESCAPE = re.compile(r"\\(\\|[0-9A-Fa-f]{4}|\+[0-9A-Fa-f]{6})")
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _Unsure(Exception):
    """The lexer cannot tell what the server would see."""


def is_forgery_attempt(sql: str) -> bool:
    """True when a client statement could change the JWT claims or the role of the server session:
    SET/RESET request.jwt.*, set_config('request.jwt...'/'role'), SET/RESET ROLE, SET SESSION
    AUTHORIZATION, RESET ALL, DISCARD ALL, also inside DO blocks and function bodies."""
    return _scan(sql, depth=0, code=False)


def _scan(sql: str, *, depth: int, code: bool) -> bool:
    lowered = sql.lower()
    if not any(word in lowered for word in _PREFILTER_VERBS):
        return False
    if not any(word in lowered for word in _PREFILTER_TARGETS):
        return False
    if depth > _MAX_NESTING or len(sql) > MAX_SCANNED_CHARS:
        return True
    lexers = [_LEXER_SCS_ON, _LEXER_SCS_OFF] if "\\" in sql else [_LEXER_SCS_ON]
    try:
        return any(_flags_statements(_lex(sql, lexer), depth, code) for lexer in lexers)
    except _Unsure:
        return True


# A token is (kind, text): kind "word" (unquoted, lowercased), "name" (quoted identifier,
# lowercased because setting names are case-insensitive), "string" (decoded content), "op".
Token = tuple[str, str]


def _lex(sql: str, lexer: re.Pattern[str]) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    length = len(sql)
    while position < length:
        match = lexer.match(sql, position)
        if match is None:  # pragma: no cover - the last alternative matches any character
            raise _Unsure
        kind = match.lastgroup
        text = match.group()
        position = match.end()
        if kind in ("ws", "line_comment"):
            continue
        if kind == "block_comment":
            position = _skip_block_comment(sql, position)
        elif kind == "dollar":
            end = sql.find(text, position)
            if end < 0:
                raise _Unsure
            tokens.append(("string", sql[position:end]))
            position = end + len(text)
        elif kind == "ident":
            tokens.append(("word", text.lower()))
        elif kind == "qident":
            tokens.append(("name", text[1:-1].replace('""', '"').lower()))
        elif kind == "uident":
            tokens.append(("name", _unicode_unescape(text[3:-1].replace('""', '"')).lower()))
        elif kind == "string":
            tokens.append(("string", _string_body(text).replace("''", "'")))
        elif kind in ("estring", "bstring"):
            tokens.append(("string", _backslash_unescape(_string_body(text))))
        elif kind == "ustring":
            tokens.append(("string", _unicode_unescape(text[3:-1].replace("''", "'"))))
        elif kind == "op" and text in "'\"":
            raise _Unsure  # an unterminated quote
        else:
            tokens.append(("op", text))
    return tokens


def _string_body(text: str) -> str:
    return text[text.index("'") + 1 : -1]


def _skip_block_comment(sql: str, position: int) -> int:
    depth = 1
    while depth:
        close = sql.find("*/", position)
        if close < 0:
            raise _Unsure
        opening = sql.find("/*", position, close)
        if opening >= 0:
            depth += 1
            position = opening + 2
        else:
            depth -= 1
            position = close + 2
    return position


def _backslash_unescape(body: str) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape is None:
            return "'"
        if escape[0] in "xuU" and len(escape) > 1:
            return _chr(int(escape[1:], 16))
        if escape[0] in "01234567":
            return _chr(int(escape, 8))
        return _SIMPLE_ESCAPES.get(escape, escape)

    return _BACKSLASH_ESCAPE.sub(replace, body)


def _unicode_unescape(body: str) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape == "\\":
            return "\\"
        return _chr(int(escape.lstrip("+"), 16))

    return _UNICODE_ESCAPE.sub(replace, body)


def _chr(code: int) -> str:
    try:
        return chr(code)
    except ValueError:
        raise _Unsure


def _statements(tokens: list[Token]) -> list[list[Token]]:
    statements: list[list[Token]] = [[]]
    for token in tokens:
        if token == ("op", ";"):
            statements.append([])
        else:
            statements[-1].append(token)
    return [statement for statement in statements if statement]


def _flags_statements(tokens: list[Token], depth: int, code: bool) -> bool:
    return any(_flags_statement(statement, depth, code) for statement in _statements(tokens))


def _flags_statement(tokens: list[Token], depth: int, code: bool) -> bool:
    first = tokens[0][1] if tokens[0][0] == "word" else ""
    has_body = first == "do" or (
        first == "create" and any(t in (("word", "function"), ("word", "procedure")) for t in tokens)
    )
    # ALTER ROLE/DATABASE/FUNCTION ... SET role = x and CREATE FUNCTION ... SET role = x change the
    # role of later sessions or calls; inside code bodies any SET counts.
    set_role_anywhere = code or first in ("alter", "create")
    for index, (kind, text) in enumerate(tokens):
        if kind == "word" and _flags_word(tokens, index, code=code, set_role_anywhere=set_role_anywhere):
            return True
        if kind in ("word", "name") and text == "pg_settings" and ("word", "update") in tokens:
            return True  # UPDATE pg_settings SET setting = ... is set_config by another name
        if kind in ("word", "name") and _op(tokens, index + 1) == "(" and _flags_call(tokens, index):
            return True
        if kind == "string" and _scan(text, depth=depth + 1, code=has_body):
            return True
    return False


def _flags_word(tokens: list[Token], index: int, *, code: bool, set_role_anywhere: bool) -> bool:
    text = tokens[index][1]
    if text in ("set", "reset"):
        return _flags_set(tokens, index, statement_start=index == 0 or set_role_anywhere)
    if text == "discard":
        return (index == 0 or code) and _word(tokens, index + 1) == "all"
    if text == "uescape":
        raise _Unsure
    if not code:
        return False
    # plv8.execute, plpy.execute, PL/Tcl spi_exec, PL/Perl spi_exec_query, PL/R pg.spi.exec
    return (text == "execute" and _dynamic_execute(tokens, index)) or text == "spi" or text.startswith("spi_")


def _flags_set(tokens: list[Token], index: int, *, statement_start: bool) -> bool:
    """SET/RESET at `index`: request.jwt.* anywhere; role, session authorization, RESET ALL at a
    statement start (UPDATE t SET role = ... is a column, not the setting)."""
    verb = tokens[index][1]
    position = index + 1
    while True:  # SET [SESSION | LOCAL] ..., and SET SESSION SESSION AUTHORIZATION is valid too
        word = _word(tokens, position)
        if word == "session" and _word(tokens, position + 1) == "authorization":
            return statement_start
        if verb != "set" or word not in ("session", "local"):
            break
        position += 1
    name = _dotted_name(tokens, position)
    if _is_claims_setting(name):
        return True
    if not statement_start:
        return False
    return name in ("role", "session_authorization") or (verb == "reset" and name == "all")


def _flags_call(tokens: list[Token], index: int) -> bool:
    """set_config(name, ...): refused for a sensitive name, and for any name that is not a plain
    literal ($1, concatenation, a function call), since it could be anything. Functions that run
    SQL text (query_to_xml ...): refused unless that text is a literal, which is scanned itself."""
    function = tokens[index][1]
    if function == "set_config":
        name = _plain_literal(_argument(tokens, index + 2, 0))
        if name is None:
            return True
        name = name.strip().lower()
        return _is_claims_setting(name) or name in ("role", "session_authorization")
    position = _SQL_TEXT_ARGUMENT.get(function)
    return position is not None and _plain_literal(_argument(tokens, index + 2, position)) is None


def _argument(tokens: list[Token], start: int, wanted: int) -> list[Token]:
    """The tokens of argument number `wanted` of a call whose arguments start at `start`."""
    argument: list[Token] = []
    number = 0
    nesting = 0
    for token in tokens[start:]:
        if token[0] == "op" and token[1] in "([":
            nesting += 1
        elif token[0] == "op" and token[1] in ")]":
            if nesting == 0:
                break
            nesting -= 1
        elif token == ("op", ",") and nesting == 0:
            number += 1
            continue
        if number == wanted:
            argument.append(token)
    return argument


def _plain_literal(argument: list[Token]) -> str | None:
    """The text of an argument that is one string literal, optionally cast ('x'::text); else None."""
    if not argument or argument[0][0] != "string":
        return None
    rest = argument[1:]
    if rest and (len(rest) < 2 or rest[0] != ("op", "::") or any(kind != "word" for kind, _ in rest[1:])):
        return None
    return argument[0][1]


def _dynamic_execute(tokens: list[Token], index: int) -> bool:
    """In a PL/pgSQL body, EXECUTE of anything but one literal (whose text is scanned) is refused."""
    if index + 1 >= len(tokens) or tokens[index + 1][0] != "string":
        return True
    following = _word(tokens, index + 2)
    return index + 2 < len(tokens) and following not in ("using", "into")


def _is_claims_setting(name: str) -> bool:
    return "request.jwt" in name


def _word(tokens: list[Token], index: int) -> str:
    if index < len(tokens) and tokens[index][0] == "word":
        return tokens[index][1]
    return ""


def _op(tokens: list[Token], index: int) -> str:
    if index < len(tokens) and tokens[index][0] == "op":
        return tokens[index][1]
    return ""


def _dotted_name(tokens: list[Token], index: int) -> str:
    parts = []
    while index < len(tokens) and tokens[index][0] in ("word", "name"):
        parts.append(tokens[index][1])
        if _op(tokens, index + 1) != ".":
            break
        index += 2
    return ".".join(parts)
