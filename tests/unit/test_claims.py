"""Claims -> session settings SQL (parsed back to prove quoting), and forgery detection."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from auth.claims import (
    check_claim_names,
    claim_at,
    is_forgery_attempt,
    reset_settings_sql,
    session_settings,
    sql_literal,
)
from auth.errors import AuthError
from auth.keys import JwtSetupError
from config.model import JwtConfig

INJECTION = "'); DROP TABLE users; --"


def cfg(**overrides: Any) -> JwtConfig:
    return replace(JwtConfig(secret="x" * 32), **overrides)


# -- an independent reader for the SQL we produce -----------------------------------------------------
# Grammar: SELECT call (, call)* [; SET [LOCAL] ROLE "ident" | ; RESET ROLE]
#          call    = set_config(literal, literal, true|false)
#          literal = '...' ( || chr(92) || '...' )*   with '' meaning one quote


class SqlReader:
    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.position = 0

    def expect(self, text: str) -> None:
        assert self.sql.startswith(text, self.position), (text, self.sql[self.position :])
        self.position += len(text)

    def at(self, text: str) -> bool:
        return self.sql.startswith(text, self.position)

    def quoted(self, quote: str) -> str:
        self.expect(quote)
        value = []
        while True:
            end = self.sql.index(quote, self.position)
            value.append(self.sql[self.position : end])
            self.position = end + 1
            if not self.at(quote):
                return "".join(value)
            value.append(quote)
            self.position += 1

    def literal(self) -> str:
        value = self.quoted("'")
        while self.at(" || chr(92) || "):
            self.expect(" || chr(92) || ")
            value += "\\" + self.quoted("'")
        return value

    def read(self) -> tuple[list[tuple[str, str, bool]], str | None]:
        calls = []
        self.expect("SELECT ")
        while True:
            self.expect("set_config(")
            name = self.literal()
            self.expect(", ")
            value = self.literal()
            self.expect(", ")
            is_local = self.at("true")
            self.expect("true" if is_local else "false")
            self.expect(")")
            calls.append((name, value, is_local))
            if not self.at(", "):
                break
            self.expect(", ")
        tail = None
        if self.position < len(self.sql):
            self.expect("; ")
            if self.at("RESET ROLE"):
                self.expect("RESET ROLE")
                tail = "RESET ROLE"
            else:
                self.expect("SET ")
                local = "LOCAL " if self.at("LOCAL ") else ""
                self.expect(local + "ROLE ")
                tail = f"SET {local}ROLE {self.quoted(chr(34))}"
        assert self.position == len(self.sql), "trailing SQL after the settings"
        return calls, tail


def settings(sql: str) -> dict[str, str]:
    calls, _ = SqlReader(sql).read()
    return {name: value for name, value, _ in calls}


# -- session_settings ---------------------------------------------------------------------------------


def test_settings_hold_the_claims_json_and_each_named_claim() -> None:
    token_claims = {
        "sub": "u1",
        "role": "authenticated",
        "email": "u1@example.com",
        "tenant_id": "t1",
        "exp": 1,
    }
    sql = session_settings(token_claims, cfg(tenant_claim="tenant_id"), local=True)
    calls, tail = SqlReader(sql).read()
    assert tail is None
    assert all(is_local for _, _, is_local in calls)
    values = {name: value for name, value, _ in calls}
    assert json.loads(values["request.jwt.claims"]) == token_claims
    assert values == {
        "request.jwt.claims": values["request.jwt.claims"],
        "request.jwt.claim.sub": "u1",
        "request.jwt.claim.role": "authenticated",
        "request.jwt.claim.email": "u1@example.com",
        "request.jwt.claim.tenant_id": "t1",
    }


def test_session_level_settings() -> None:
    calls, _ = SqlReader(session_settings({"sub": "u"}, cfg(), local=False)).read()
    assert not any(is_local for _, _, is_local in calls)


@pytest.mark.parametrize(
    "value",
    [
        INJECTION,
        "O'Reilly",
        "''",
        "back\\slash",
        "\\'); DROP TABLE users; --",
        "\\",
        "ends with \\",
        "'; SET ROLE postgres; --",
        '"double" $$dollar$$ /* comment */ -- dash',
        "ünïcødé ✓ 日本",
        "line\nbreak\ttab",
    ],
)
def test_claim_values_round_trip_verbatim(value: str) -> None:
    token_claims = {"sub": value, "nested": {"deep": value}}
    values = settings(session_settings(token_claims, cfg(claims=("sub", "nested.deep")), local=True))
    assert values["request.jwt.claim.sub"] == value
    assert values["request.jwt.claim.nested.deep"] == value
    assert json.loads(values["request.jwt.claims"]) == token_claims


def test_literal_never_uses_escape_string_syntax() -> None:
    sql = session_settings({"sub": "a\\b'c"}, cfg(), local=True)
    assert "E'" not in sql and "\\" not in sql


def test_injection_claim_stays_inside_its_literal() -> None:
    sql = session_settings({"sub": INJECTION, "email": INJECTION}, cfg(), local=True)
    # Everything outside literals is ours: removing the literals leaves only the expected skeleton.
    skeleton = re.sub(r"'(?:[^']|'')*'", "L", sql)
    assert skeleton == "SELECT " + ", ".join(["set_config(L, L, true)"] * 4)


def test_nested_claims_by_dotted_path() -> None:
    token_claims = {"app_metadata": {"tenant_id": "t9", "plan": {"tier": 2}}}
    values = settings(
        session_settings(token_claims, cfg(claims=(), tenant_claim="app_metadata.tenant_id"), local=True)
    )
    assert values["request.jwt.claim.app_metadata.tenant_id"] == "t9"
    values = settings(session_settings(token_claims, cfg(claims=("app_metadata.plan",)), local=True))
    assert values["request.jwt.claim.app_metadata.plan"] == '{"tier":2}'


def test_missing_claims_are_set_to_empty_so_nothing_leaks_from_a_previous_client() -> None:
    values = settings(session_settings({"sub": "u"}, cfg(tenant_claim="tenant_id"), local=False))
    assert values["request.jwt.claim.email"] == ""
    assert values["request.jwt.claim.tenant_id"] == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (None, ""),
        (["a", "b"], '["a","b"]'),
        ({"k": "'"}, '{"k":"\'"}'),
    ],
)
def test_non_string_values_are_json(value: Any, text: str) -> None:
    assert settings(session_settings({"sub": value}, cfg(), local=True))["request.jwt.claim.sub"] == text


def test_nul_in_an_injected_claim_is_refused() -> None:
    with pytest.raises(AuthError) as info:
        session_settings({"sub": "a\x00b"}, cfg(), local=True)
    assert (info.value.sqlstate, info.value.message) == ("28000", "claim sub contains a NUL character")


def test_nul_elsewhere_is_escaped_by_json() -> None:
    values = settings(session_settings({"sub": "u", "note": "a\x00b"}, cfg(), local=True))
    assert json.loads(values["request.jwt.claims"])["note"] == "a\x00b"
    assert "\x00" not in values["request.jwt.claims"]


def test_invalid_unicode_is_refused() -> None:
    with pytest.raises(AuthError, match="invalid Unicode"):
        session_settings({"sub": "\ud800"}, cfg(), local=True)


def test_sql_literal_rejects_nul() -> None:
    with pytest.raises(ValueError):
        sql_literal("a\x00")


# -- role switching -----------------------------------------------------------------------------------


def role_cfg(**overrides: Any) -> JwtConfig:
    return cfg(switch_role=True, allowed_roles=("authenticated", 'we"ird', "Anon"), **overrides)


def test_set_local_role_for_an_allowed_role() -> None:
    _, tail = SqlReader(session_settings({"role": "authenticated"}, role_cfg(), local=True)).read()
    assert tail == "SET LOCAL ROLE authenticated"
    sql = session_settings({"role": "Anon"}, role_cfg(), local=False)
    assert sql.endswith('; SET ROLE "Anon"')


def test_role_identifier_is_quoted() -> None:
    sql = session_settings({"role": 'we"ird'}, role_cfg(), local=True)
    assert sql.endswith('; SET LOCAL ROLE "we""ird"')
    assert SqlReader(sql).read()[1] == 'SET LOCAL ROLE we"ird'


@pytest.mark.parametrize("role", ["postgres", "none", "authenticated; DROP", None, 5, ""])
def test_role_not_allowed_is_refused(role: Any) -> None:
    with pytest.raises(AuthError) as info:
        session_settings({"role": role}, role_cfg(), local=True)
    assert info.value.sqlstate == "42501"


def test_no_role_statement_without_switch_role() -> None:
    assert "ROLE" not in session_settings({"role": "postgres"}, cfg(), local=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"switch_role": True}, "needs jwt.allowed_roles"),
        ({"switch_role": True, "allowed_roles": ("NONE",)}, "not a usable role name"),
        ({"switch_role": True, "allowed_roles": ("r" * 64,)}, "longer than 63 bytes"),
        ({"claims": ("https://example.com/roles",)}, "cannot be a PostgreSQL setting name"),
        ({"tenant_claim": "tenant-id"}, "cannot be a PostgreSQL setting name"),
        ({"claims": ("1st",)}, "cannot be a PostgreSQL setting name"),
    ],
)
def test_setup_checks(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(JwtSetupError, match=match):
        check_claim_names(cfg(**overrides))


def test_reset_clears_everything_at_session_level() -> None:
    calls, tail = SqlReader(reset_settings_sql(role_cfg(tenant_claim="org.id"))).read()
    assert [name for name, _, _ in calls] == [
        "request.jwt.claims",
        "request.jwt.claim.sub",
        "request.jwt.claim.role",
        "request.jwt.claim.email",
        "request.jwt.claim.org.id",
    ]
    assert all(value == "" and not is_local for _, value, is_local in calls)
    assert tail == "RESET ROLE"
    assert "ROLE" not in reset_settings_sql(cfg())


def test_claim_at_prefers_a_literal_dotted_name() -> None:
    token_claims = {"a.b": "literal", "a": {"b": "nested"}, "x": {"y": None}}
    assert claim_at(token_claims, "a.b") == "literal"
    assert claim_at({"a": {"b": "nested"}}, "a.b") == "nested"
    assert claim_at(token_claims, "x.y.z") is None
    assert claim_at({"a": "string"}, "a.b") is None


# -- forgery detection --------------------------------------------------------------------------------

FORGERIES = [
    "SET request.jwt.claim.sub = 'someone-else'",
    "set request.jwt.claims to '{}'",
    "SET LOCAL request.jwt.claim.tenant_id = 't2'",
    "SET SESSION request.jwt.claim.tenant_id = 't2'",
    'SET "request.jwt.claim.tenant_id" = 1',
    'SET "request"."jwt".claims = 1',
    "SET request . jwt . claims = 1",
    "/* hi */ SET /* there */ request.jwt.claims = 1",
    "SELECT 1; SET request.jwt.claims = '{}'",
    "SELECT set_config('request.jwt.claim.sub', 'x', false)",
    "select  SET_CONFIG ( 'REQUEST.JWT.CLAIMS' , 'x', true)",
    "SELECT pg_catalog.set_config('request.jwt.claim.tenant_id', 't2', true), 1",
    "SELECT \"set_config\"('request.jwt.claims', '{}', false)",
    "SELECT count(*) FROM t WHERE set_config('request.jwt.claim.sub', 'x', true) IS NOT NULL",
    "SELECT set_config($1, $2, false)",
    "SELECT set_config('request.' || 'jwt.claims', '{}', false)",
    "SELECT set_config(concat('request', '.jwt.claims'), '{}', false)",
    "SELECT set_config(E'\\x72equest.jwt.claims', '{}', false)",
    "SELECT set_config(U&'\\0072equest.jwt.claims', '{}', false)",
    "SELECT set_config('request\\.jwt.claims', '{}', false)",  # if standard_conforming_strings is off
    "SELECT set_config($q$request.jwt.claims$q$, '{}', false)",
    "SELECT set_config('role', 'admin', false)",
    "SELECT set_config('session_authorization', 'admin', false)",
    "RESET ALL",
    "reset request.jwt.claim.sub",
    "DISCARD ALL",
    "discard   all",
    "SET ROLE admin",
    "set local role admin",
    "SET SESSION ROLE admin",
    "set role = 'admin'",
    'SET "ROLE" TO admin',
    "SELECT 1;\n  set\n\trole\nadmin",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION bob",
    "SET LOCAL SESSION AUTHORIZATION DEFAULT",
    "RESET SESSION AUTHORIZATION",
    "DO $$ BEGIN PERFORM set_config('request.jwt.claims', '{}', false); END $$",
    "DO $body$ BEGIN SET ROLE admin; END $body$",
    "DO $$ BEGIN EXECUTE 'SET ROLE admin'; END $$",
    "DO $$ BEGIN EXECUTE 'SE' || 'T ROLE admin'; END $$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'SELECT set_config(''role'', ''x'', false)'",
    "ALTER ROLE app SET request.jwt.claims = '{}'",
    "ALTER ROLE app SET role = admin",
    "UPDATE pg_settings SET setting = '{}' WHERE name = 'request.jwt.claims'",
    "SELECT '--', set_config('request.jwt.claim.sub', 'x', false)",
    "SELECT 1 --'\n, set_config('request.jwt.claim.sub', 'x', false)",
    "SELECT 'it''s', set_config('request.jwt.claim.sub', 'x', false)",
    "SELECT set_config(U&'!0072ole' UESCAPE '!', 'x', false)",
    "SET ROLE admin /* unterminated",
    "SELECT $$ RESET ALL $$",
    "SELECT 1; --a comment that PostgreSQL ends at a carriage return\rSET ROLE admin",
    'SET U&"\\0072ole" = admin',
    "SELECT 1.set_config('request.jwt.claims', '{}', false)",
    "SELECT set_config('request.jwt'\n'.claims', '{}', false)",  # adjacent literals are one string
    "DO $$ BEGIN EXECUTE format('SET %s', 'ROLE admin'); END $$",
    "DO E'BEGIN \\x53ET \\x52OLE admin; END'",  # escapes hide every keyword
    'DO LANGUAGE pltcl $$ spi_exec "SE[string cat T] R[string cat OLE] admin" $$',
    "DO LANGUAGE plv8 $$ plv8.execute(['SE', 'T R', 'OLE admin'].join('')) $$",
    "SELECT query_to_xml('SELECT set_config(''request.jwt.claims'', ''{}'', false)', true, true, '')",
    "SELECT query_to_xml(chr(83) || chr(69), true, true, '')",
    "SELECT ts_stat(convert_from(decode('53454c454354', 'hex'), 'UTF8'))",
    "SELECT ts_rewrite('a'::tsquery, 'SELECT 1' || $1)",
    "SELECT 1, " + "'reset', " * 30_000 + "2",  # too large to scan once it passes the prefilter
]

NOT_FORGERIES = [
    "SELECT current_setting('request.jwt.claim.sub', true)",
    "SELECT current_setting('request.jwt.claims', true)::json->>'email'",
    "SET search_path = x",
    "SET LOCAL statement_timeout = '5s'",
    "SET TIME ZONE 'UTC'",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "RESET search_path",
    "DISCARD PLANS",
    "SELECT set_config('search_path', 'app', false)",
    "SELECT set_config('application_name'::text, 'x', true)",
    "UPDATE users SET role = 'admin' WHERE id = 1",
    "INSERT INTO t (role) VALUES ('x') ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role",
    "ALTER TABLE users ALTER COLUMN role SET DEFAULT 'member'",
    "SELECT * FROM settings OFFSET 10",
    "SELECT 'user ran SET ROLE admin' AS note",
    "SELECT role FROM users WHERE role = 'admin'",
    "SELECT set_config FROM weird_table",
    "BEGIN; SELECT 1; COMMIT",
    "EXECUTE my_prepared_statement(1)",
    "SELECT 'request.jwt.claims'",
    "SELECT query_to_xml('SELECT * FROM orders', true, false, '')",
    "SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)",
    "SELECT 1, " + "'role', " * 30_000 + "2",  # large, but no verb: never lexed
]


@pytest.mark.parametrize("sql", FORGERIES)
def test_forgery_is_detected(sql: str) -> None:
    assert is_forgery_attempt(sql)


@pytest.mark.parametrize("sql", NOT_FORGERIES)
def test_ordinary_statements_are_not_flagged(sql: str) -> None:
    assert not is_forgery_attempt(sql)


def test_our_own_settings_sql_would_be_flagged_coming_from_a_client() -> None:
    assert is_forgery_attempt(session_settings({"sub": "u"}, cfg(), local=True))
    assert is_forgery_attempt(reset_settings_sql(cfg()))


def test_large_statements_without_keywords_skip_the_lexer() -> None:
    big = "SELECT " + ", ".join(f"'{n}'" for n in range(50_000))
    assert not is_forgery_attempt(big)
