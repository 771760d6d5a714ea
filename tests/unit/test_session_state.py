"""Session-state tracking: which statements change state, and the SQL that replays it on another server."""

from __future__ import annotations

import pytest

from proxy.session_state import Effect, EffectScanner, SessionState, split_statements, sync_sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET search_path = a, b", [Effect("set", "search_path", "a, b")]),
        ("set search_path to 'x'", [Effect("set", "search_path", "'x'")]),
        ("SET SESSION statement_timeout = 5000", [Effect("set", "statement_timeout", "5000")]),
        ("SET LOCAL statement_timeout = 5000", []),
        ("SET TIME ZONE 'UTC'", [Effect("set", "timezone", "'UTC'")]),
        ("SET NAMES 'LATIN1'", [Effect("set", "client_encoding", "'LATIN1'")]),
        ("set work_mem = default", [Effect("reset", "work_mem")]),
        ("RESET work_mem", [Effect("reset", "work_mem")]),
        ("RESET ALL", [Effect("reset_all")]),
        ("DISCARD ALL", [Effect("discard_all")]),
        ("DISCARD PLANS", []),
        ("PREPARE q(int) AS SELECT $1", [Effect("prepare", "q", "PREPARE q(int) AS SELECT $1")]),
        ("PREPARE TRANSACTION 'gid'", [Effect("prepare_transaction")]),  # no state; refused when pooled
        ("DEALLOCATE q", [Effect("deallocate", "q")]),
        ("DEALLOCATE ALL", [Effect("deallocate", "")]),
        ("SELECT set_config('app.user', 'it''s', false)", [Effect("set", "app.user", "'it''s'")]),
        ("SELECT set_config('app.user', 'x', true)", []),
        # values the text does not spell out (bind parameters, columns): unknown effect, the client is pinned
        ("SELECT set_config('search_path', $1, false)", [Effect("pin", value="SET_CONFIG")]),
        ("select set_config(name, setting, false) from saved", [Effect("pin", value="SET_CONFIG")]),
        ("SELECT set_config($1, $2, true)", [Effect("pin", value="SET_CONFIG")]),
        ("SELECT set_config('a.b', 'c', false), set_config('d.e', 'f', true)", [Effect("set", "a.b", "'c'")]),
        # SET forms without `=` or TO
        ("SET ROLE Reader", [Effect("set", "role", "'reader'")]),
        ('SET SESSION ROLE "Mixed"', [Effect("set", "role", "'Mixed'")]),
        ("set role none", [Effect("set", "role", "'none'")]),
        ("SET LOCAL ROLE reader", []),
        ("RESET ROLE", [Effect("reset", "role")]),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", []),
        ("SET CONSTRAINTS ALL DEFERRED", []),
        ("SET SESSION AUTHORIZATION bob", [Effect("pin", value="SET")]),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", [Effect("pin", value="SET")]),
        ("SET XML OPTION DOCUMENT", [Effect("pin", value="SET")]),
        ("LISTEN chan", [Effect("listen", "chan")]),
        ('listen "Chan"; UNLISTEN Other', [Effect("listen", "Chan"), Effect("unlisten", "other")]),
        ("unlisten *", [Effect("unlisten_all")]),
        ('UNLISTEN "*"', [Effect("unlisten", "*")]),
        # a LISTEN the proxy does not read goes to the client's own server, which then stays with it
        ('LISTEN U&"d\\0061t"', [Effect("pin", value="LISTEN")]),
        ("UNLISTEN a b", []),
        ("select pg_advisory_lock(1)", [Effect("pin", value="SELECT")]),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", [Effect("pin", value="DECLARE")]),
        ("CREATE TEMP TABLE t (a int)", [Effect("pin", value="CREATE")]),
        ("select 1; set search_path = x", [Effect("set", "search_path", "x")]),
        ("/* hint */ SET search_path = y", [Effect("set", "search_path", "y")]),
        ("SELECT 'SET search_path = z'", []),
        ("UPDATE t SET a = 1", []),
        ("CREATE TABLE t (a int)", []),
        # the pre-check: any letter case, leading white space or comments, later statements, trailing ';'
        ("sEt search_path = m", [Effect("set", "search_path", "m")]),
        ("\n\t  Reset work_mem", [Effect("reset", "work_mem")]),
        ("-- why\nset search_path = c", [Effect("set", "search_path", "c")]),
        ("select 1;\n  LISTEN later", [Effect("listen", "later")]),
        ("  unlisten later", [Effect("unlisten", "later")]),
        ("SELECT 1;", []),
        ("SELECT 1;  \n", []),
        ("select PG_TRY_ADVISORY_LOCK(7)", [Effect("pin", value="SELECT")]),
        ("", []),
        # statements named by SQL: no change, but they may name a client's protocol-level statement
        ("EXECUTE foobar", [Effect("execute", "foobar")]),
        ("execute FooBar (1, 'x')", [Effect("execute", "foobar")]),
        ('EXECUTE "FooBar"(1)', [Effect("execute", "FooBar")]),
        ("EXPLAIN EXECUTE q(1)", [Effect("execute", "q")]),
        ("explain analyze verbose execute q", [Effect("execute", "q")]),
        ("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE q(2)", [Effect("execute", "q")]),
        ("EXPLAIN SELECT 1", []),
        ("DEALLOCATE PREPARE q", [Effect("deallocate", "q")]),
        ("DISCARD TEMP", []),
    ],
)
def test_effects(sql: str, expected: list[Effect]) -> None:
    assert list(EffectScanner().effects(sql.encode())) == expected


def test_split_respects_quotes_and_dollar_quotes() -> None:
    sql = "select ';'; do $x$ begin perform 1; end $x$; -- c;\n select \"a;b\" from t"
    assert split_statements(sql) == ["select ';'", "do $x$ begin perform 1; end $x$", 'select "a;b" from t']


def test_reset_returns_to_startup_value() -> None:
    state = SessionState.from_startup({"application_name": "psql", "datestyle": "ISO, MDY"})
    state.apply([Effect("set", "application_name", "'other'"), Effect("set", "work_mem", "'8MB'")])
    assert state.settings["application_name"] == "'other'"
    state.apply([Effect("reset", "application_name")])
    assert state.settings["application_name"] == "'psql'"
    state.apply([Effect("reset_all")])
    assert state.settings == {"application_name": "'psql'", "datestyle": "'ISO, MDY'"}


def test_pin_reported() -> None:
    state = SessionState.from_startup({})
    assert state.apply([Effect("pin", value="LISTEN")]) is True
    assert state.apply([Effect("set", "a.b", "1")]) is False


def test_sync_sql_diff() -> None:
    client = SessionState.from_startup({"application_name": "a"})
    client.apply([Effect("prepare", "q", "PREPARE q AS SELECT 1")])
    server = SessionState.from_startup({"work_mem": "1MB"})
    server.apply([Effect("prepare", "q", "PREPARE q AS SELECT 2"), Effect("prepare", "r", "PREPARE r AS SELECT 3")])
    sql = sync_sql(client.snapshot(), server.snapshot())
    assert sql.split(";") == [
        'RESET "work_mem"',
        "SET \"application_name\" = 'a'",
        'DEALLOCATE "q"',
        'DEALLOCATE "r"',
        "PREPARE q AS SELECT 1",
    ]
    assert sync_sql(client.snapshot(), client.snapshot()) == ""


@pytest.mark.parametrize(
    ("server_effects", "expected"),
    [
        # a server with the previous client's role: back to the login role before any SET, ours last
        ([Effect("set", "track_functions", "'all'"), Effect("set", "role", "'other'")],
         ["RESET role", "SET \"track_functions\" = 'pl'", "SET role = 'reader'"]),
        # a fresh server: the client's role still comes after the setting it made before SET ROLE
        ([], ["SET \"track_functions\" = 'pl'", "SET role = 'reader'"]),
        # the same role but a setting to change: the change is made as the login role, the role put back
        ([Effect("set", "track_functions", "'none'"), Effect("set", "role", "'reader'")],
         ["RESET role", "SET \"track_functions\" = 'pl'", "SET role = 'reader'"]),
        # only the role differs
        ([Effect("set", "track_functions", "'pl'"), Effect("set", "role", "'other'")],
         ["RESET role", "SET role = 'reader'"]),
    ],
)
def test_sync_sql_sets_the_role_after_the_settings(server_effects: list[Effect], expected: list[str]) -> None:
    # SET track_functions = 'pl'; SET ROLE reader: replayed role-first, the SET would run as `reader`,
    # which may not change a superuser-only setting.
    client = SessionState.from_startup({})
    client.apply([Effect("set", "track_functions", "'pl'"), Effect("set", "role", "'reader'")])
    server = SessionState.from_startup({})
    server.apply(server_effects)
    assert sync_sql(client.snapshot(), server.snapshot()).split(";") == expected


def test_sync_sql_resets_the_role_first() -> None:
    # the previous client's role must not be the one that resets the settings it leaves behind
    server = SessionState.from_startup({})
    server.apply([Effect("set", "track_functions", "'all'"), Effect("set", "role", "'reader'")])
    assert sync_sql(SessionState.from_startup({}).snapshot(), server.snapshot()).split(";") == [
        "RESET role", 'RESET "track_functions"']


def test_sync_sql_clears_the_previous_jwt_role_before_the_settings() -> None:
    # a server left by a JWT client (its claims switched the role) given to a password client, and back
    jwt_claims = ("SELECT set_config('request.jwt.claims', '{}', false); SET ROLE jwt_reader",
                  "SELECT set_config('request.jwt.claims', '', false); RESET ROLE")
    jwt_client = SessionState.from_startup({})
    jwt_client.claims = jwt_claims
    password_client = SessionState.from_startup({})
    password_client.apply([Effect("set", "track_functions", "'pl'")])
    assert sync_sql(password_client.snapshot(), jwt_client.snapshot()).split(";") == [
        "SELECT set_config('request.jwt.claims', '', false)", " RESET ROLE", "SET \"track_functions\" = 'pl'"]
    assert sync_sql(jwt_client.snapshot(), password_client.snapshot()).split(";") == [
        'RESET "track_functions"', "SELECT set_config('request.jwt.claims', '{}', false)", " SET ROLE jwt_reader"]


def test_scanner_caches_by_text() -> None:
    scanner = EffectScanner(cache_size=2)
    first = scanner.effects(b"SET a.b = 1")
    assert scanner.effects(b"SET a.b = 1") is first
    scanner.effects(b"SET a.c = 1")
    scanner.effects(b"SET a.d = 1")
    assert len(scanner._cache) == 2


def test_reset_takes_a_pooled_server_to_its_own_defaults() -> None:
    from proxy.session_state import server_state_after

    client = SessionState.from_startup({"application_name": "client-a"})
    server_before = client.snapshot()  # the checkout preamble made the server match the client
    effects = [Effect("set", "work_mem", "'8MB'"), Effect("reset_all")]
    client.apply(effects)
    server_after = server_state_after(server_before, effects)
    assert dict(server_after[0]) == {}  # RESET ALL on the server: back to the server's defaults
    assert dict(client.snapshot()[0]) == {"application_name": "'client-a'"}
    assert sync_sql(client.snapshot(), server_after) == "SET \"application_name\" = 'client-a'"
