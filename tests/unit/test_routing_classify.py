"""Keyword pre-classifier and statement splitter."""

from __future__ import annotations

import time

import pytest

from routing.classify import (
    BEGINS_TRANSACTION_KINDS,
    ENDS_TRANSACTION_KINDS,
    TRANSACTION_BOUNDARY_KINDS,
    StatementKind,
    classify,
    split_statements,
)
from routing.route import Role

K = StatementKind


@pytest.mark.parametrize(
    ("sql", "kind", "write"),
    [
        ("SELECT 1", K.QUERY, None),
        ("with x as (select 1) select * from x", K.QUERY, None),
        ("VALUES (1)", K.QUERY, None),
        ("TABLE t", K.QUERY, None),
        ("(SELECT 1)", K.QUERY, None),
        ("INSERT INTO t VALUES (1)", K.DML, True),
        ("update t set a = 1", K.DML, True),
        ("EXPLAIN SELECT 1", K.EXPLAIN, None),
        ("BEGIN", K.BEGIN, False),
        ("START TRANSACTION", K.BEGIN, False),
        ("COMMIT", K.COMMIT, False),
        ("END TRANSACTION", K.COMMIT, False),
        ("ROLLBACK WORK", K.ROLLBACK, False),
        ("ABORT", K.ROLLBACK, False),
        ("SAVEPOINT s1", K.SAVEPOINT, False),
        ("RELEASE s1", K.RELEASE_SAVEPOINT, False),
        ("RELEASE SAVEPOINT s1", K.RELEASE_SAVEPOINT, False),
        ("ROLLBACK TO s1", K.ROLLBACK_TO_SAVEPOINT, False),
        ("ROLLBACK TRANSACTION TO SAVEPOINT s1", K.ROLLBACK_TO_SAVEPOINT, False),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", K.SET_TRANSACTION, False),
        ("PREPARE TRANSACTION 'gid'", K.PREPARE_TRANSACTION, True),
        ("COMMIT PREPARED 'gid'", K.COMMIT_PREPARED, True),
        ("ROLLBACK PREPARED 'gid'", K.ROLLBACK_PREPARED, True),
        ("SET x = 1", K.SET, False),
        ("SHOW x", K.SHOW, False),
        ("RESET x", K.RESET, False),
        ("LISTEN c", K.LISTEN, True),
        ("UNLISTEN c", K.UNLISTEN, True),
        ("NOTIFY c", K.NOTIFY, True),
        ("DISCARD PLANS", K.DISCARD, False),
        ("DEALLOCATE PREPARE q", K.DEALLOCATE, True),
        ("PREPARE q AS SELECT 1", K.PREPARE, True),
        ("EXECUTE q", K.EXECUTE, True),
        ("COPY t FROM STDIN", K.COPY, True),
        ("COPY t TO STDOUT", K.COPY, False),
        ("COPY BINARY t TO STDOUT", K.COPY, False),
        ("COPY (SELECT 1) TO STDOUT", K.COPY, None),
        ("COPY (SELECT 1) FROM STDIN", K.COPY, True),  # not valid SQL: to be safe, a write
        ("VACUUM FULL t", K.MAINTENANCE, True),
        ("ANALYSE t", K.MAINTENANCE, True),
        ("LOCK t", K.LOCK, True),
        ("CREATE INDEX i ON t (a)", K.DDL, True),
        ("DO 'BEGIN END'", K.DO, True),
        ("CALL p()", K.CALL, True),
        ("", K.EMPTY, False),
        ("  /* nothing */ -- at all", K.EMPTY, False),
        (";", K.EMPTY, False),
        ("SELEC 1", K.UNKNOWN, True),
        ("START 1", K.UNKNOWN, True),
        ("42", K.UNKNOWN, True),
    ],
)
def test_kind_and_verdict(sql: str, kind: StatementKind, write: bool | None) -> None:
    classification = classify(sql)
    assert (classification.kind, classification.write) == (kind, write)


@pytest.mark.parametrize(
    ("sql", "read_only"),
    [
        ("BEGIN", False),
        ("BEGIN READ ONLY", True),
        ("begin transaction read only", True),
        ("BEGIN ISOLATION LEVEL READ COMMITTED", False),
        ("BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY", True),
        ("BEGIN READ ONLY, READ WRITE", False),
        ("START TRANSACTION READ ONLY, DEFERRABLE", True),
        ("/* c */ start /* c */ transaction\n read\tonly", True),
    ],
)
def test_begin_modes(sql: str, read_only: bool) -> None:
    classification = classify(sql)
    assert classification.begins_transaction
    assert classification.read_only_transaction is read_only


def test_set_transaction_read_only() -> None:
    assert classify("SET TRANSACTION READ ONLY").read_only_transaction
    assert not classify("SET TRANSACTION READ WRITE").read_only_transaction
    assert classify("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").kind is K.SET


def test_ends_and_chain() -> None:
    assert classify("COMMIT").ends_transaction
    assert classify("rollback").ends_transaction
    assert classify("COMMIT AND CHAIN").chain
    assert not classify("COMMIT AND NO CHAIN").chain
    assert not classify("ROLLBACK TO SAVEPOINT a").ends_transaction
    assert not classify("COMMIT PREPARED 'x'").ends_transaction
    prepared = classify("PREPARE TRANSACTION 'tx-1'")
    assert prepared.ends_transaction and prepared.name == "tx-1"


def test_boundary_kinds() -> None:
    assert {K.BEGIN} == BEGINS_TRANSACTION_KINDS
    assert {K.COMMIT, K.ROLLBACK, K.PREPARE_TRANSACTION} == ENDS_TRANSACTION_KINDS
    assert TRANSACTION_BOUNDARY_KINDS == BEGINS_TRANSACTION_KINDS | ENDS_TRANSACTION_KINDS
    for sql in [
        "BEGIN",
        "START TRANSACTION",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "PREPARE TRANSACTION 'g'",
    ]:
        classification = classify(sql)
        assert classification.kind in TRANSACTION_BOUNDARY_KINDS
        assert classification.begins_transaction or classification.ends_transaction


@pytest.mark.parametrize(
    ("sql", "name", "value"),
    [
        ("SET shardgate.role = 'primary'", "shardgate.role", "primary"),
        ("set SHARDGATE.ROLE to replica", "shardgate.role", "replica"),
        ("SET SESSION shardgate.role = 'auto'", "shardgate.role", "auto"),
        ("SET LOCAL statement_timeout TO 5000", "statement_timeout", "5000"),
        ('SET "shardgate"."role" = \'primary\'', "shardgate.role", "primary"),
        ("SET search_path TO DEFAULT", "search_path", "default"),
        ("SET TIME ZONE 'UTC'", "timezone", "UTC"),
        ("SET application_name = E'it\\'s'", "application_name", "it\\'s"),
        ("SET x = $$dollar$$", "x", "dollar"),
    ],
)
def test_set_name_and_value(sql: str, name: str, value: str) -> None:
    classification = classify(sql)
    assert (classification.name, classification.value) == (name, value)


def test_names() -> None:
    assert classify("SHOW shardgate.role").name == "shardgate.role"
    assert classify("RESET ALL").name == "all"
    assert classify("DISCARD ALL").name == "all"
    assert classify("PREPARE get_user (int) AS SELECT $1").name == "get_user"
    assert classify("EXECUTE get_user (1)").name == "get_user"
    assert classify("DEALLOCATE get_user").name == "get_user"
    assert classify("SAVEPOINT sp").name == "sp"
    assert classify("COPY public.t FROM STDIN").name == "public.t"
    assert classify('COPY "Odd Name" (a) TO STDOUT').name == "Odd Name"


def test_inner_sql() -> None:
    assert classify("EXPLAIN SELECT 1").inner_sql == "SELECT 1"
    assert classify("EXPLAIN ANALYZE VERBOSE DELETE FROM t").inner_sql == "DELETE FROM t"
    assert classify("EXPLAIN (ANALYZE, FORMAT JSON) SELECT 1").inner_sql == "SELECT 1"
    assert classify("COPY (SELECT ')' FROM t WHERE (a)) TO STDOUT").inner_sql == "SELECT ')' FROM t WHERE (a)"


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("/* shardgate: primary */ SELECT 1", Role.PRIMARY),
        ("/* shardgate: replica */ SELECT 1", Role.REPLICA),
        ("/*shardgate:replica*/SELECT 1", Role.REPLICA),
        ("/* SHARDGATE: PRIMARY */ SELECT 1", Role.PRIMARY),
        ("-- shardgate: replica\nSELECT 1", Role.REPLICA),
        ("/* app */ -- x\n /* shardgate: primary */ SELECT 1", Role.PRIMARY),
        ("/* shardgate: both */ SELECT 1", None),
        ("/* not a shardgate: primary hint */ SELECT 1", None),
        ("SELECT /* shardgate: primary */ 1", None),
        ("/* shardgate: primary */", Role.PRIMARY),
    ],
)
def test_comment_hints(sql: str, hint: Role | None) -> None:
    assert classify(sql).hint is hint


def test_keyword_is_upper_case() -> None:
    assert classify("  vacuum").keyword == "VACUUM"
    assert classify("/* x */ Insert into t values (1)").keyword == "INSERT"


@pytest.mark.parametrize(
    ("sql", "pieces"),
    [
        ("SELECT 1", ["SELECT 1"]),
        ("SELECT 1;", ["SELECT 1"]),
        ("SELECT 1;;  ; ", ["SELECT 1"]),
        ("SELECT 1; SELECT 2", ["SELECT 1", " SELECT 2"]),
        ("SELECT ';'; SELECT 2", ["SELECT ';'", " SELECT 2"]),
        ("SELECT 'it''s;'; SELECT 2", ["SELECT 'it''s;'", " SELECT 2"]),
        ("SELECT E'\\';'; SELECT 2", ["SELECT E'\\';'", " SELECT 2"]),
        ('SELECT 1 AS ";"; SELECT 2', ['SELECT 1 AS ";"', " SELECT 2"]),
        ("SELECT $$;$$; SELECT 2", ["SELECT $$;$$", " SELECT 2"]),
        ("SELECT $f$ $$; $f$; SELECT 2", ["SELECT $f$ $$; $f$", " SELECT 2"]),
        ("SELECT a$b; SELECT 2", ["SELECT a$b", " SELECT 2"]),
        ("SELECT $1; SELECT 2", ["SELECT $1", " SELECT 2"]),
        ("SELECT 1 -- ; not here\n; SELECT 2", ["SELECT 1 -- ; not here\n", " SELECT 2"]),
        ("SELECT /* ; /* ; */ ; */ 1; SELECT 2", ["SELECT /* ; /* ; */ ; */ 1", " SELECT 2"]),
        ("BEGIN; INSERT INTO t VALUES (1); COMMIT;", ["BEGIN", " INSERT INTO t VALUES (1)", " COMMIT"]),
        ("-- only a comment; really\n", []),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; "
            "SELECT CASE WHEN true THEN 1 END; END; COMMIT",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; "
                "SELECT CASE WHEN true THEN 1 END; END",
                " COMMIT",
            ],
        ),
        (
            "CREATE OR REPLACE PROCEDURE p() AS $$ BEGIN; END $$ LANGUAGE plpgsql; COMMIT",
            ["CREATE OR REPLACE PROCEDURE p() AS $$ BEGIN; END $$ LANGUAGE plpgsql", " COMMIT"],
        ),
    ],
)
def test_split_statements(sql: str, pieces: list[str]) -> None:
    assert split_statements(sql) == pieces


PATHOLOGICAL = [
    "SELECT " + "a, " * 200_000 + "1",
    "BEGIN " + "READ " * 200_000,
    "/*" * 100_000,
    "/* " + "x" * 1_000_000,
    "-" * 1_000_000,
    "'" * 1_000_001,
    "E'" + "\\'" * 300_000,
    "$a" * 300_000,
    "COPY (" + "(" * 100_000 + "SELECT 1" + ")" * 100_000 + ") TO STDOUT",
    "SET x = " + "'" + "y" * 1_000_000,
    " " * 1_000_000 + "SELECT 1",
    "SELECT 1" + ";" * 200_000,
]


@pytest.mark.parametrize("sql", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_long_or_hostile_text_is_linear(sql: str) -> None:
    # Linear work on ~1 MB takes well under a second; anything quadratic would take minutes.
    started = time.perf_counter()
    classify(sql)
    split_statements(sql)
    assert time.perf_counter() - started < 10.0


def _tokens_read(sql: str, monkeypatch: pytest.MonkeyPatch) -> int:
    import routing.classify as module

    calls = 0
    real = module._read_token

    def counting(text: str, pos: int) -> object:
        nonlocal calls
        calls += 1
        return real(text, pos)

    monkeypatch.setattr(module, "_read_token", counting)
    classify(sql)
    monkeypatch.setattr(module, "_read_token", real)
    return calls


@pytest.mark.parametrize(
    "head", ["BEGIN ISOLATION LEVEL SERIALIZABLE", "SELECT 1", "SET x = 1", "COPY t TO STDOUT"]
)
def test_classify_reads_only_the_first_tokens(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # counted, not timed: a 100,000-token tail must not make the classifier read more than its head needs
    tail = " x 'y' /* z */"
    short = _tokens_read(head + tail * 1_000, monkeypatch)
    assert _tokens_read(head + tail * 100_000, monkeypatch) == short  # the tail's length does not matter
    assert short < 64
