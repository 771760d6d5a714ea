"""Routing table (SQL text -> primary/replica), transaction routing, parse cache and the sqlglot bypass."""

from __future__ import annotations

import pytest

from routing.analyze import Analysis, analyze
from routing.errors import RoutingError
from routing.route import Role, Route
from routing.router import Router, TransactionRouting, TransactionState, literal_free_key

P = Role.PRIMARY
R = Role.REPLICA
A = Role.ANY

ROUTING_TABLE: list[tuple[str, Role]] = [
    # plain reads
    ("SELECT 1", R),
    ("select 1", R),
    ("SeLeCt 1", R),
    ("   SELECT 1", R),
    ("\n\t  select * from t", R),
    ("SELECT 1;", R),
    ("SELECT * FROM t WHERE id = $1", R),
    ("select * from t where x = $1 limit $2 offset $3", R),
    ("SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1 ORDER BY 2 DESC", R),
    ("SELECT * FROM a JOIN b ON a.id = b.a_id LEFT JOIN c USING (id)", R),
    ("SELECT 1 UNION SELECT 2", R),
    ("(SELECT 1) UNION ALL (SELECT 2)", R),
    ("SELECT 1 INTERSECT SELECT 1 EXCEPT SELECT 2", R),
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", R),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r", R),
    ("VALUES (1), (2)", R),
    ("TABLE t", R),
    ("SELECT now(), random(), lower(name) FROM users", R),
    ("SELECT * FROM t LEFT JOIN LATERAL (SELECT * FROM u WHERE u.t_id = t.id LIMIT 1) x ON true", R),
    ("SELECT * FROM generate_series(1, 3)", R),
    ("select * from t where note = 'FOR UPDATE'", R),  # the trap is inside a string
    ("select * from update_log", R),  # a table named like a keyword
    ("SELECT $$;DELETE FROM t$$", R),  # a ';' inside a dollar quote does not split
    ("SELECT ';'; SELECT 2", R),
    ("SELECT 1; SELECT 2", R),
    ("-- comment\nSELECT 1", R),
    ("/* a comment */ SELECT 1", R),
    ("/* outer /* nested */ still comment */ SELECT 1", R),
    ("SELECT 1 -- shardgate: primary", R),  # a hint counts only in the leading comments
    # SHOW, EXPLAIN of a read, COPY TO
    ("SHOW search_path", R),
    ("show transaction isolation level", R),
    ("SHOW ALL", R),
    ("EXPLAIN SELECT 1", R),
    ("explain analyze select * from t", R),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R),
    ("COPY t TO STDOUT", R),
    ("copy public.t (a, b) to stdout with (format csv)", R),
    ("COPY (select 1) TO STDOUT", R),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH CSV HEADER", R),
    # transactions that go to a replica
    ("BEGIN READ ONLY", R),
    ("begin read only", R),
    ("START TRANSACTION READ ONLY", R),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R),
    ("BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", R),
    # comment hints
    ("/* shardgate: replica */ INSERT INTO t VALUES (1)", R),
    ("/*shardgate:replica*/ SELECT nextval('s')", R),
    ("/* shardgate: primary */ SELECT 1", P),
    ("-- shardgate: primary\nSELECT 1", P),
    ("/* app=web */ /* shardgate: primary */ SELECT 1", P),
    ("/* shardgate: replica */ BEGIN", R),
    # DML
    ("INSERT INTO t VALUES (1)", P),
    ("insert into t (a) select a from u returning id", P),
    ("UPDATE t SET a = 1 WHERE id = $1", P),
    ("DELETE FROM t", P),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a", P),
    ("WITH x AS (SELECT 1 AS a) INSERT INTO t SELECT a FROM x", P),
    # writing queries
    ("SELECT * FROM t FOR UPDATE", P),
    ("select * from t for share", P),
    ("SELECT * FROM t FOR NO KEY UPDATE", P),
    ("SELECT * FROM t FOR KEY SHARE", P),
    ("SELECT id FROM t ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED", P),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", P),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", P),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", P),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", P),
    ("select * into newtab from t", P),
    ("SELECT * INTO TEMP newtab FROM t", P),
    ("SELECT 1; DELETE FROM t", P),
    ("SELECT 1; INSERT INTO t VALUES (1)", P),
    # volatile functions
    ("select nextval('s')", P),
    ("SELECT NEXTVAL('s')", P),
    ("SELECT pg_catalog.nextval('s')", P),
    ("SELECT setval('s', 10)", P),
    ("SELECT set_config('a.b','c',false)", P),
    ("SELECT pg_advisory_lock(1)", P),
    ("SELECT pg_advisory_xact_lock(1)", P),
    ("SELECT pg_try_advisory_lock(1)", P),
    ("SELECT pg_notify('ch', 'x')", P),
    ("SELECT lo_create(0)", P),
    ("SELECT txid_current()", P),
    ("SELECT pg_current_xact_id()", P),
    ("SELECT pg_switch_wal()", P),
    ("SELECT pg_terminate_backend(123)", P),
    ("SELECT pg_cancel_backend(123)", P),
    ("SELECT 1 UNION SELECT nextval('s')", P),
    ("SELECT * FROM t WHERE id IN (SELECT nextval('s'))", P),
    # EXPLAIN of a write, COPY FROM, COPY of a writing query
    ("EXPLAIN ANALYZE DELETE FROM t", P),
    ("EXPLAIN (ANALYZE) INSERT INTO t VALUES (1)", P),
    ("explain analyze select nextval('s')", P),
    ("COPY t FROM STDIN", P),
    ("copy t (a, b) from stdin with (format csv)", P),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", P),
    ("COPY (SELECT nextval('s')) TO STDOUT", P),
    # transactions that go to the primary
    ("BEGIN", P),
    ("begin", P),
    ("  BEGIN WORK", P),
    ("START TRANSACTION", P),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", P),
    ("BEGIN READ WRITE", P),
    ("PREPARE TRANSACTION 'x'", P),
    ("COMMIT PREPARED 'x'", P),
    ("ROLLBACK PREPARED 'x'", P),
    # session commands that only the primary accepts or that must meet there
    ("LISTEN ch", P),
    ("UNLISTEN *", P),
    ("NOTIFY ch, 'x'", P),
    ("PREPARE q (int) AS SELECT $1", P),
    ("EXECUTE q (1)", P),
    ("DEALLOCATE q", P),
    # maintenance, DDL, procedural
    ("VACUUM", P),
    ("vacuum analyze t", P),
    ("ANALYZE t", P),
    ("CLUSTER t", P),
    ("REINDEX TABLE t", P),
    ("CHECKPOINT", P),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", P),
    ("TRUNCATE t", P),
    ("GRANT SELECT ON t TO app", P),
    ("REVOKE SELECT ON t FROM app", P),
    ("CREATE TABLE t (id int)", P),
    ("CREATE TABLE x AS SELECT 1", P),
    ("ALTER TABLE t ADD COLUMN b int", P),
    ("DROP TABLE t", P),
    ("COMMENT ON TABLE t IS 'x'", P),
    ("REFRESH MATERIALIZED VIEW v", P),
    ("DO $$ BEGIN PERFORM 1; END $$", P),
    ("CALL p(1)", P),
    # anything we cannot understand goes to the primary
    ("SELEC 1", P),
    ("SELECT * FROM", P),
    ("SELECT 1 +", P),
    ("FETCH 10 FROM c", P),
    ("EXPLAIN " * 50 + "SELECT 1", P),
]

# Statements that touch no data: they go wherever the client's transaction (or the proxy) puts them.
ANY_ROLE_TABLE = [
    "SET search_path TO public",
    "set statement_timeout = 1000",
    "RESET ALL",
    "DISCARD ALL",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT a",
    "RELEASE SAVEPOINT a",
    "ROLLBACK TO SAVEPOINT a",
    "SET TRANSACTION READ ONLY",
    "",
    "  -- only a comment",
]


def test_routing_table_is_large() -> None:
    assert len(ROUTING_TABLE) >= 70
    assert len({sql for sql, _ in ROUTING_TABLE}) == len(ROUTING_TABLE)


@pytest.mark.parametrize(("sql", "role"), ROUTING_TABLE, ids=[sql[:50] for sql, _ in ROUTING_TABLE])
def test_routing_table(sql: str, role: Role) -> None:
    assert Router().route_statement(sql).role is role


@pytest.mark.parametrize("sql", ANY_ROLE_TABLE)
def test_statements_without_data_go_anywhere(sql: str) -> None:
    route = Router().route_statement(sql)
    assert route.role is Role.ANY
    assert not route.write


def test_hint_keeps_parser_verdict_in_write_flag() -> None:
    route = Router().route_statement("/* shardgate: replica */ DELETE FROM t")
    assert route.role is Role.REPLICA
    assert route.write
    assert route.hint is Role.REPLICA


def test_configured_volatile_functions() -> None:
    default = Router()
    configured = Router(volatile_functions=["My_Audit", "app.next_id"])
    assert default.route_statement("SELECT my_audit()").role is Role.REPLICA
    assert configured.route_statement("SELECT my_audit()").role is Role.PRIMARY
    assert configured.route_statement("SELECT app.next_id()").role is Role.PRIMARY
    assert configured.route_statement("SELECT other.next_id()").role is Role.REPLICA
    assert configured.route_statement("SELECT nextval('s')").role is Role.PRIMARY  # defaults stay


def test_transaction_flags_on_routes() -> None:
    router = Router()
    begin = router.route_statement("BEGIN")
    assert begin.begins_transaction and begin.role_pending
    assert not router.route_statement("BEGIN READ ONLY").role_pending
    assert router.route_statement("COMMIT").ends_transaction
    assert router.route_statement("PREPARE TRANSACTION 'gid'").ends_transaction
    assert not router.route_statement("ROLLBACK TO SAVEPOINT a").ends_transaction
    both = router.route_statement("BEGIN; INSERT INTO t VALUES (1); COMMIT")
    assert both.role is Role.PRIMARY and both.begins_transaction and both.ends_transaction


def test_session_role_statements_are_local() -> None:
    router = Router()
    route = router.route_statement("SET shardgate.role = 'primary'")
    assert route == Route(Role.ANY, write=False, reason="session role", local=True, hint=Role.PRIMARY)
    assert router.route_statement("set shardgate.role to replica").hint is Role.REPLICA
    assert router.route_statement("SET SESSION shardgate.role = 'auto'").hint is Role.ANY
    assert router.route_statement("RESET shardgate.role").hint is Role.ANY
    assert router.route_statement("SHOW shardgate.role").local
    with pytest.raises(RoutingError) as error:
        router.route_statement("SET shardgate.role = 'leader'")
    assert error.value.sqlstate == "22023"
    assert "leader" in str(error.value)


def test_statement_decision_exposes_analysis() -> None:
    decision = Router().decide("SELECT * FROM users u JOIN s.orders o ON o.uid = u.id WHERE u.id = $2")
    (statement,) = decision.statements
    assert statement.analysis is not None
    assert statement.analysis.tables == ("users", "s.orders")
    assert statement.analysis.parameters == (2,)
    assert Router().decide("BEGIN").statements[0].analysis is None


# --- parse cache -----------------------------------------------------------------------------------


def test_cache_counts_hits_and_misses() -> None:
    router = Router()
    assert (router.cache_hits, router.cache_misses) == (0, 0)
    first = router.route_statement("SELECT * FROM t WHERE id = $1")
    assert (router.cache_hits, router.cache_misses) == (0, 1)
    second = router.route_statement("SELECT * FROM t WHERE id = $1")
    assert second is first
    assert (router.cache_hits, router.cache_misses) == (1, 1)
    router.route_statement("select * from t where id = $1")  # keyed by exact text
    assert (router.cache_hits, router.cache_misses) == (1, 2)
    router.route_statement("BEGIN")
    router.route_statement("BEGIN")
    assert (router.cache_hits, router.cache_misses) == (2, 3)


def test_cache_evicts_least_recently_used() -> None:
    router = Router(cache_size=2)
    first, second, third = "SELECT a FROM t1", "SELECT b FROM t2", "SELECT c FROM t3"
    router.route_statement(first)
    router.route_statement(second)
    router.route_statement(first)  # hit: the second is now the oldest
    router.route_statement(third)  # evicts the second
    assert router.cache_entries == 2
    router.route_statement(first)
    assert router.cache_hits == 2
    router.route_statement(second)
    assert router.cache_misses == 4


def test_long_statements_bypass_the_cache() -> None:
    router = Router(max_cached_sql_length=100)
    long_insert = "INSERT INTO t VALUES " + ", ".join(f"({n})" for n in range(100))
    router.route_statement(long_insert)
    router.route_statement(long_insert)
    assert (router.cache_hits, router.cache_misses, router.cache_entries) == (0, 2, 0)


def test_clear_cache() -> None:
    router = Router()
    router.route_statement("SELECT 1")
    router.route_statement("SELECT 1")
    router.clear_cache()
    assert (router.cache_hits, router.cache_misses, router.cache_entries) == (0, 0, 0)


# --- the keyword classifier keeps sqlglot out --------------------------------------------------------


class CountingAnalyzer:
    """Wraps the real sqlglot analysis and counts the texts it is asked about."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, sql: str, volatile_functions: frozenset[str]) -> Analysis:
        self.texts.append(sql)
        return analyze(sql, volatile_functions)


KEYWORD_ONLY = [
    "BEGIN",
    "BEGIN READ ONLY",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT a",
    "ROLLBACK TO SAVEPOINT a",
    "SET search_path TO public",
    "SET shardgate.role = 'replica'",
    "SET TRANSACTION READ ONLY",
    "SHOW search_path",
    "RESET ALL",
    "LISTEN ch",
    "NOTIFY ch",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    "PREPARE TRANSACTION 'gid'",
    "COMMIT PREPARED 'gid'",
    "COPY t FROM STDIN",
    "COPY t TO STDOUT",
    "VACUUM",
    "CREATE TABLE t (id int)",
    "INSERT INTO t VALUES (1)",
    "DO $$ BEGIN END $$",
    "BEGIN; INSERT INTO t VALUES (1); COMMIT",
]


def test_keyword_statements_never_reach_sqlglot() -> None:
    analyzer = CountingAnalyzer()
    router = Router(analyzer=analyzer)
    sessions = TransactionRouting(router)
    for sql in KEYWORD_ONLY:
        router.route_statement(sql)
        sessions.on_statement(sql)
        sessions.on_transaction_end()
    assert analyzer.texts == []
    router.route_statement("SELECT 1")
    router.route_statement("SELECT 1")
    router.route_statement("EXPLAIN SELECT 2")
    assert analyzer.texts == ["SELECT 1", "SELECT 2"]


# --- transaction routing ----------------------------------------------------------------------------


def roles(sessions: TransactionRouting, *statements: str) -> list[Role]:
    return [sessions.on_statement(sql).role for sql in statements]


@pytest.fixture
def sessions() -> TransactionRouting:
    return TransactionRouting(Router())


def test_outside_a_transaction_each_statement_is_routed_alone(sessions: TransactionRouting) -> None:
    for sql, role in [("SELECT 1", R), ("INSERT INTO t VALUES (1)", P), ("SELECT 2", R)]:
        assert sessions.on_statement(sql).role is role
        sessions.on_transaction_end()  # ReadyForQuery idle after each simple query
    assert sessions.state is TransactionState.IDLE


def test_begin_pins_the_transaction_to_the_primary(sessions: TransactionRouting) -> None:
    begin = sessions.on_statement("BEGIN")
    assert begin.role is Role.PRIMARY and begin.role_pending and begin.begins_transaction
    assert roles(sessions, "SELECT 1", "INSERT INTO t VALUES (1)", "SELECT 2") == [P, P, P]
    assert sessions.in_transaction
    commit = sessions.on_statement("COMMIT")
    assert commit.role is Role.PRIMARY and commit.ends_transaction
    assert not sessions.in_transaction
    assert roles(sessions, "SELECT 1") == [R]


def test_read_only_transaction_stays_on_the_replica(sessions: TransactionRouting) -> None:
    assert roles(sessions, "BEGIN READ ONLY", "SELECT 1", "SELECT nextval('s')", "COMMIT") == [R, R, R, R]
    assert sessions.state is TransactionState.IDLE
    assert roles(sessions, "START TRANSACTION READ ONLY", "INSERT INTO t VALUES (1)", "ROLLBACK") == [R, R, R]


def test_set_transaction_read_only_as_first_statement(sessions: TransactionRouting) -> None:
    assert sessions.on_statement("BEGIN").role_pending
    route = sessions.on_statement("SET TRANSACTION READ ONLY")
    assert route.role is Role.REPLICA and not route.role_pending
    assert roles(sessions, "SELECT 1", "COMMIT") == [R, R]


def test_isolation_level_before_read_only_keeps_the_begin_pending(sessions: TransactionRouting) -> None:
    sessions.on_statement("BEGIN")
    assert sessions.on_statement("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").role_pending
    assert roles(sessions, "SET TRANSACTION READ ONLY", "SELECT 1") == [R, R]


def test_set_transaction_read_only_later_does_not_move(sessions: TransactionRouting) -> None:
    assert roles(sessions, "BEGIN", "SELECT 1", "SET TRANSACTION READ ONLY", "SELECT 2") == [P, P, P, P]


def test_set_transaction_outside_a_transaction_changes_nothing(sessions: TransactionRouting) -> None:
    assert roles(sessions, "SET TRANSACTION READ ONLY", "SELECT 1") == [A, R]
    assert sessions.state is TransactionState.IDLE


def test_write_in_an_implicit_transaction_moves_it_to_the_primary(sessions: TransactionRouting) -> None:
    # An extended-protocol pipeline: no BEGIN, no ReadyForQuery between the statements.
    assert roles(sessions, "SELECT 1", "UPDATE t SET a = 1", "SELECT 2") == [R, P, P]
    assert sessions.state is TransactionState.IMPLICIT_PRIMARY
    assert not sessions.in_transaction
    sessions.on_transaction_end()
    assert roles(sessions, "SELECT 3") == [R]


def test_begin_after_an_implicit_write_stays_on_the_primary(sessions: TransactionRouting) -> None:
    assert roles(sessions, "INSERT INTO t VALUES (1)", "BEGIN READ ONLY", "SELECT 1") == [P, P, P]
    assert sessions.state is TransactionState.PRIMARY


def test_rollback_to_savepoint_keeps_the_transaction(sessions: TransactionRouting) -> None:
    roles(sessions, "BEGIN", "SAVEPOINT a", "INSERT INTO t VALUES (1)", "ROLLBACK TO SAVEPOINT a")
    assert sessions.state is TransactionState.PRIMARY
    sessions.on_statement("ROLLBACK")
    assert sessions.state is TransactionState.IDLE


def test_commit_and_chain_keeps_the_server(sessions: TransactionRouting) -> None:
    roles(sessions, "BEGIN READ ONLY", "SELECT 1", "COMMIT AND CHAIN")
    assert sessions.state is TransactionState.REPLICA
    roles(sessions, "COMMIT AND NO CHAIN")
    assert sessions.state is TransactionState.IDLE


def test_prepare_transaction_ends_the_transaction(sessions: TransactionRouting) -> None:
    assert roles(sessions, "BEGIN", "INSERT INTO t VALUES (1)", "PREPARE TRANSACTION 'g1'") == [P, P, P]
    assert sessions.state is TransactionState.IDLE
    assert roles(sessions, "COMMIT PREPARED 'g1'") == [P]


def test_transaction_end_reported_by_the_server_resets(sessions: TransactionRouting) -> None:
    roles(sessions, "BEGIN", "SELECT 1")
    sessions.on_transaction_end()  # e.g. the server connection was lost
    assert roles(sessions, "SELECT 1") == [R]


def test_session_hint_overrides_the_parser(sessions: TransactionRouting) -> None:
    route = sessions.on_statement("SET shardgate.role = 'primary'")
    assert route.local and route.hint is Role.PRIMARY
    assert sessions.session_role is Role.PRIMARY
    assert roles(sessions, "SELECT 1", "SHOW search_path") == [P, P]
    assert roles(sessions, "SET search_path TO public") == [A]
    shown = sessions.on_statement("SHOW shardgate.role")
    assert shown.local and shown.hint is Role.PRIMARY
    sessions.on_statement("SET shardgate.role = 'replica'")
    assert roles(sessions, "SELECT 1", "INSERT INTO t VALUES (1)") == [R, R]
    assert roles(sessions, "BEGIN", "SET TRANSACTION READ ONLY", "COMMIT") == [R, R, R]
    sessions.on_statement("SET shardgate.role = 'auto'")
    assert roles(sessions, "SELECT 1", "INSERT INTO t VALUES (1)") == [R, P]


def test_session_primary_begin_is_not_pending(sessions: TransactionRouting) -> None:
    sessions.on_statement("SET shardgate.role TO 'primary'")
    begin = sessions.on_statement("BEGIN")
    assert begin.role is Role.PRIMARY and not begin.role_pending
    assert roles(sessions, "SET TRANSACTION READ ONLY", "SELECT 1") == [P, P]


def test_reset_clears_the_session_hint(sessions: TransactionRouting) -> None:
    sessions.on_statement("SET shardgate.role = 'primary'")
    assert sessions.on_statement("RESET shardgate.role").local
    assert roles(sessions, "SELECT 1") == [R]
    sessions.on_statement("SET shardgate.role = 'primary'")
    assert roles(sessions, "DISCARD ALL", "SELECT 1") == [A, R]


def test_invalid_session_hint_is_an_error(sessions: TransactionRouting) -> None:
    with pytest.raises(RoutingError):
        sessions.on_statement("SET shardgate.role = 'both'")
    assert sessions.session_role is Role.ANY


def test_comment_hint_beats_the_session_hint(sessions: TransactionRouting) -> None:
    sessions.on_statement("SET shardgate.role = 'primary'")
    assert roles(sessions, "/* shardgate: replica */ SELECT 1", "SELECT 1") == [R, P]


def test_comment_hint_on_the_first_statement_chooses_the_transaction(sessions: TransactionRouting) -> None:
    assert roles(sessions, "BEGIN", "/* shardgate: replica */ SELECT 1", "SELECT 2") == [P, R, R]
    assert sessions.state is TransactionState.REPLICA


def test_comment_hint_cannot_move_a_running_transaction(sessions: TransactionRouting) -> None:
    assert roles(sessions, "BEGIN", "SELECT 1", "/* shardgate: replica */ SELECT 2") == [P, P, P]


def test_multi_statement_text_is_one_route(sessions: TransactionRouting) -> None:
    route = sessions.on_statement("BEGIN; INSERT INTO t VALUES (1); COMMIT")
    assert route.role is Role.PRIMARY and route.begins_transaction and route.ends_transaction
    assert sessions.state is TransactionState.IMPLICIT_PRIMARY or sessions.state is TransactionState.IDLE
    sessions.on_transaction_end()
    route = sessions.on_statement("BEGIN; SET TRANSACTION READ ONLY; SELECT 1")
    assert route.role is Role.REPLICA and not route.role_pending
    assert sessions.state is TransactionState.REPLICA
    sessions.on_statement("COMMIT")
    route = sessions.on_statement("SELECT 1; BEGIN")
    assert route.role is Role.PRIMARY and not route.role_pending  # the BEGIN cannot be held back
    assert sessions.state is TransactionState.PRIMARY


def test_set_session_hint_inside_a_multi_statement_text(sessions: TransactionRouting) -> None:
    route = sessions.on_statement("SET shardgate.role = 'primary'; SELECT 1")
    assert route.role is Role.PRIMARY and not route.local
    assert sessions.session_role is Role.PRIMARY


def test_read_write_split_does_not_change_routes() -> None:
    router = Router()
    include = TransactionRouting(router)
    exclude = TransactionRouting(router, read_write_split="exclude_primary")
    assert exclude.read_write_split == "exclude_primary"
    for sql in ["SELECT 1", "INSERT INTO t VALUES (1)", "BEGIN READ ONLY", "SELECT 2", "COMMIT"]:
        assert include.on_statement(sql) == exclude.on_statement(sql)
    with pytest.raises(ValueError, match="read_write_split"):
        TransactionRouting(router, read_write_split="replicas_only")


def test_statements_differing_only_in_literals_are_parsed_once() -> None:
    calls: list[str] = []

    def counting(sql: str, volatile: frozenset[str] = frozenset()) -> Analysis:
        calls.append(sql)
        return analyze(sql, volatile) if volatile else analyze(sql)

    router = Router(analyzer=counting)  # type: ignore[arg-type]
    for aid in (1, 22, 333):
        route = router.route_statement(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
        assert route.role is Role.REPLICA
    for name in ("x", "it''s", "z"):
        assert router.route_statement(f"SELECT * FROM users WHERE name = '{name}' AND age > 1.5e3").role is Role.REPLICA
    assert len(calls) == 2
    assert (router.cache_hits, router.cache_misses) == (4, 2)


def test_literal_blanking_never_merges_different_statements() -> None:
    router = Router()
    assert router.route_statement("SELECT nextval('seq_1')").role is Role.PRIMARY
    assert router.route_statement("SELECT currval('seq_1')").role is Role.REPLICA
    assert router.route_statement('SELECT "it\'s" FROM t WHERE a = 1').role is Role.REPLICA
    assert router.route_statement("SELECT * FROM t FOR UPDATE").role is Role.PRIMARY
    assert router.route_statement("SELECT * FROM t WHERE a = 2 FOR UPDATE").role is Role.PRIMARY


@pytest.mark.parametrize(
    "sql",
    [
        "SET shardgate.role = 'primary'",  # a SET's value is its meaning
        "INSERT INTO t VALUES (1)",  # decided by keywords, nothing to save
        "SELECT E'\\'' ; DELETE FROM t; SELECT 'x'",  # backslash: quotes cannot be paired safely
        "SELECT $$a'b$$",
        "/* it's */ SELECT 1",
        "-- it's\nSELECT 1",
    ],
)
def test_literal_free_key_is_not_used_where_unsafe(sql: str) -> None:
    assert literal_free_key(sql) is None


def test_literal_free_key_keeps_identifiers() -> None:
    assert literal_free_key('SELECT "a""b", t1.c2 FROM t1 WHERE x = \'q\' AND y = 10') == (
        '\x00SELECT "a""b", t1.c2 FROM t1 WHERE x = ? AND y = ?'
    )
