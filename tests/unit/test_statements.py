"""A client's prepared statements as the proxy sends them: renamed Parses, SQL naming them, and the replies the
server connection matches up (fed byte strings, no socket)."""

from __future__ import annotations

from typing import Any

from proxy.protocol import codec
from proxy.server import ServerConnection
from proxy.session_state import EffectScanner
from proxy.statements import PreparedStatements, statement_global_name


class Collect:
    """Where a server connection writes the client's replies, and its events."""

    def __init__(self) -> None:
        self.data = b""
        self.ready: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += bytes(data)

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        self.ready.append(status)

    def on_server_lost(self, server: ServerConnection) -> None:
        raise AssertionError("lost")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def linked_server() -> tuple[ServerConnection, Collect]:
    server = ServerConnection(None, ("127.0.0.1", 1), "u", "", "d")  # type: ignore[arg-type]
    sink = Collect()
    server.sink = sink
    server.out = sink
    return server, sink


def split(messages: bytes) -> list[tuple[str, bytes]]:
    found, pos = [], 0
    while pos < len(messages):
        end = pos + 1 + codec.unpack_u32(messages, pos + 1)[0]
        found.append((chr(messages[pos]), messages[pos + 5 : end]))
        pos = end
    return found


def types(messages: bytes) -> list[str]:
    return [kind for kind, _ in split(messages)]


def effects(sql: bytes) -> Any:
    return EffectScanner().effects(sql)


SELECT = b"SELECT $1::int + 1"
NO_TYPES = b"\x00\x00"


def test_a_client_parse_is_renamed_and_parsed_afresh_when_the_server_has_it() -> None:
    server, _ = linked_server()
    statements = PreparedStatements()
    first = statements.parse(server, "foobar", SELECT, NO_TYPES, b"k")
    global_name = statement_global_name(SELECT, NO_TYPES, b"k")
    assert types(first) == ["P"] and global_name.encode() in first
    again = PreparedStatements().parse(server, "other", SELECT, NO_TYPES, b"k")
    assert types(again) == ["C", "P"]  # a Close first: the Parse would fail with 42P05 otherwise
    assert statements.parse(server, "foobar", SELECT, NO_TYPES, b"k", taken=True).find(b"sg_no_such") != -1


def test_execute_of_a_protocol_statement_is_renamed_and_prepared_first() -> None:
    server, _ = linked_server()
    statements = PreparedStatements()
    statements.known["foobar"] = ("sg_x", codec.build_parse("sg_x", SELECT, NO_TYPES))
    sql = b"EXPLAIN (COSTS OFF) EXECUTE FooBar(41)"
    before, renamed = statements.in_sql(server, sql, effects(sql), (), True)  # type: ignore[misc]
    assert renamed == b"EXPLAIN (COSTS OFF) EXECUTE sg_x(41)"
    assert types(before) == ["P", "S"]  # prepared, with a Sync of its own before the Query
    assert server.outstanding == 1
    before, renamed = statements.in_sql(server, b"EXECUTE foobar", effects(b"EXECUTE foobar"), (), True)  # type: ignore[misc]
    assert (before, renamed) == (b"", b"EXECUTE sg_x")  # the server has it now
    # a SQL-prepared statement of that name, or no statement of the client's: left alone
    assert statements.in_sql(server, b"EXECUTE foobar", effects(b"EXECUTE foobar"), {"foobar"}, True) is None
    assert statements.in_sql(server, b"EXECUTE other", effects(b"EXECUTE other"), (), True) is None


def test_deallocate_of_a_protocol_statement_drops_the_clients_name_only() -> None:
    server, _ = linked_server()
    statements = PreparedStatements()
    statements.known["foobar"] = ("sg_x", codec.build_parse("sg_x", SELECT, NO_TYPES))
    server.prepared.add("sg_x")
    sql = b"DEALLOCATE PREPARE foobar"
    before, renamed = statements.in_sql(server, sql, effects(sql), (), False)  # type: ignore[misc]
    assert renamed == b"DEALLOCATE PREPARE sg_deallocate_noop_0"
    assert types(before) == ["C", "P"]  # an empty statement of that name, no Sync in an extended batch
    assert "foobar" not in statements.known and "sg_x" in server.prepared
    # the same DEALLOCATE parsed again in that batch acts the same
    assert statements.in_sql(server, sql, effects(sql), (), False) is not None


def test_replies_to_injected_messages_are_hidden_and_a_duplicate_gets_42p05() -> None:
    server, sink = linked_server()
    statements = PreparedStatements()
    statements.known["foobar"] = ("sg_x", codec.build_parse("sg_x", SELECT, NO_TYPES))
    sql = b"EXECUTE foobar(1)"
    statements.in_sql(server, sql, effects(sql), (), True)
    server.outstanding += 1  # the client's Query
    duplicate_batch = statements.parse(server, "foobar", b"SELECT 2", NO_TYPES, b"k", taken=True)
    assert types(duplicate_batch) == ["B"]
    server.outstanding += 1  # the client's Sync after it
    replies = (codec.PARSE_COMPLETE + codec.ready_for_query(b"I")  # the injected Parse and Sync
               + codec.message(b"D", b"\x00\x01\x00\x00\x00\x012") + codec.command_complete("SELECT 1")
               + codec.ready_for_query(b"I")
               + codec.error_response("26000", 'prepared statement "sg_no_such_statement" does not exist')
               + codec.ready_for_query(b"I"))
    server.data_received(replies)
    assert sink.ready == [b"I", b"I"]  # the client's Query and Sync, not the injected Sync
    assert types(sink.data) == ["D", "C", "Z", "E", "Z"]
    error = codec.parse_error_fields(next(body for kind, body in split(sink.data) if kind == "E"))
    assert (error["C"], error["M"]) == ("42P05", 'prepared statement "foobar" already exists')
    assert server.outstanding == 0 and not server.expect


def test_a_failed_client_parse_frees_its_name() -> None:
    server, _ = linked_server()
    statements = PreparedStatements()
    statements.parse(server, "bad", b"SELEC 1", NO_TYPES, b"k")
    server.outstanding += 1
    server.data_received(codec.error_response("42601", "syntax error") + codec.ready_for_query(b"I"))
    statements.forget_failed(server.failed_parses)
    assert "bad" not in statements.known
    assert statement_global_name(b"SELEC 1", NO_TYPES, b"k") not in server.prepared
