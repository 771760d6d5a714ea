"""A client's named prepared statements in a pooled mode: renamed to proxy-wide names, prepared on demand."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container

from proxy.pool import Pool
from proxy.protocol import codec
from proxy.server import (
    DUPLICATE_PROBE,
    EXPECT_CLOSE,
    EXPECT_CLOSE_DROP,
    EXPECT_DUPLICATE,
    EXPECT_PARSE,
    EXPECT_PARSE_DROP,
    EXPECT_SYNC_DROP,
    NOOP_CLOSE,
    ServerConnection,
)
from proxy.session_state import DEALLOCATE_NAME, EXECUTE_NAME, Effect, normalise_name, split_statements

_P, _B, _C = ord("P"), ord("B"), ord("C")
# A Bind the server fails with 26000 (the name is never prepared), sent for a client Parse of a name the
# client has: the server then skips to the client's Sync, and the client is answered 42P05 instead.
_DUPLICATE_BIND = codec.build_bind(b"", DUPLICATE_PROBE.encode(), b"\x00\x00\x00\x00\x00\x00")
_SYNC = codec.message(b"S")
# an empty statement the server has while a client's DEALLOCATE of a renamed statement runs in its place
_NOOP_DEALLOCATE = "sg_deallocate_noop_%d"


def _close_message(global_name: str) -> bytes:
    return codec.message(b"C", b"S" + global_name.encode() + b"\x00")


def prepare_on(server: ServerConnection, global_name: str, parse_message: bytes, kind: int,
               fresh: bool = False) -> bytes:
    """The Parse of `global_name` to send `server` (`kind`: its ParseComplete forwarded or dropped),
    preceded by a Close whose answer is dropped when the server may have one already (`fresh`: when it
    has one, as a client's Parse replaces it)."""
    stale = global_name in server.stale or (fresh and global_name in server.prepared)
    Pool.mark_prepared(server, global_name)
    if stale:
        server.expect_rewrite(EXPECT_CLOSE_DROP)
        server.expect_rewrite(kind, global_name)
        return _close_message(global_name) + parse_message
    server.expect_rewrite(kind, global_name)
    return parse_message


def statement_global_name(query_text: bytes, param_types: bytes, settings_key: bytes) -> str:
    """Proxy-wide name of a prepared statement: the same text, parsed under the same settings (DateStyle,
    search_path... change what a text means), prepares once per server."""
    digest = hashlib.blake2b(query_text + b"\x00" + param_types + b"\x00" + settings_key, digest_size=10)
    return "sg_" + digest.hexdigest()


class PreparedStatements:
    """The client's statement names -> (proxy-wide name, the Parse that prepares it). Each server of the
    client's link set learns a statement the first time a message of the client's names it."""

    __slots__ = ("client_texts", "dropped", "known")

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, bytes]] = {}
        # names a SQL DEALLOCATE dropped in the batch running now: a Parse of the same DEALLOCATE again
        # (a driver that describes before it executes) acts as the first did
        self.dropped: set[str] = set()
        # the client's own text of a statement prepared rewritten (a cross-shard merge's shard SQL)
        self.client_texts: dict[str, bytes] = {}

    def clear(self) -> None:
        self.known.clear()
        self.client_texts.clear()
        self.dropped.clear()

    def text_of(self, name: str) -> bytes | None:
        """The statement text the client prepared as `name`, or None."""
        text = self.client_texts.get(name)
        if text is not None:
            return text
        known = self.known.get(name)
        return codec.split_parse(known[1][5:])[1] if known is not None else None

    def parse(self, server: ServerConnection, name: str, query_text: bytes, param_types: bytes,
              settings_key: bytes, taken: bool = False) -> bytes:
        """A client Parse of `name`: what to send `server` instead, the renamed Parse. It is parsed afresh
        even when the server has the statement (from this client or another): a Parse after a schema
        change sees the new schema, as on PostgreSQL. A name the client has (`taken`: not closed, or
        prepared by SQL) gets PostgreSQL's 42P05, in its place among the answers."""
        if taken:
            server.expect_rewrite(EXPECT_DUPLICATE, name)
            return _DUPLICATE_BIND
        global_name = statement_global_name(query_text, param_types, settings_key)
        parse_message = codec.build_parse(global_name, query_text, param_types)
        self.known[name] = (global_name, parse_message)
        self.client_texts.pop(name, None)
        return prepare_on(server, global_name, parse_message, EXPECT_PARSE, fresh=True)

    def forget_failed(self, failed: list[str]) -> None:
        """The client's Parses of these global names failed (or were skipped after an error): as in
        PostgreSQL, the names they gave are free again."""
        gone = set(failed)
        for name in [name for name, (global_name, _) in self.known.items() if global_name in gone]:
            del self.known[name]
            self.client_texts.pop(name, None)

    def forget(self, name: str) -> None:
        self.known.pop(name, None)
        self.client_texts.pop(name, None)
        self.dropped.discard(name)

    def in_sql(self, server: ServerConnection, sql: bytes, effects: tuple[Effect, ...],
               sql_prepared: Container[str], sync: bool) -> tuple[bytes, bytes] | None:
        """SQL that names the client's protocol-level statements (EXECUTE, EXPLAIN EXECUTE, DEALLOCATE):
        (what to send `server` first, the SQL naming them as the server has them), or None when it names
        none. A statement `server` lacks is prepared first (with a Sync of its own before a Query: `sync`).
        A DEALLOCATE of one drops the client's name only, the server's statement stays for other clients:
        it runs on an empty statement prepared for the purpose."""
        known, dropped = self.known, self.dropped
        if not any(e.kind in ("execute", "deallocate") and e.name not in sql_prepared
                   and (e.name in known or (e.kind == "deallocate" and e.name in dropped)) for e in effects):
            return None
        before: list[bytes] = []
        statements: list[str] = []
        for statement in split_statements(sql.decode("utf-8", "replace")):
            named = EXECUTE_NAME.match(statement) or DEALLOCATE_NAME.match(statement)
            name = normalise_name(named.group(1)) if named else ""
            deallocate = named is not None and named.re is DEALLOCATE_NAME
            if (not named or name in sql_prepared or name == "all"
                    or not (name in known or (deallocate and name in dropped))):
                statements.append(statement)
                continue
            if not deallocate:
                global_name, parse_message = self.known[name]
                if global_name not in server.prepared:
                    before.append(prepare_on(server, global_name, parse_message, EXPECT_PARSE_DROP))
            else:
                global_name = _NOOP_DEALLOCATE % len(before)
                server.expect_rewrite(EXPECT_CLOSE_DROP)
                server.expect_rewrite(EXPECT_PARSE_DROP)
                before.append(_close_message(global_name) + codec.build_parse(global_name, b"", b"\x00\x00"))
                self.forget(name)
                dropped.add(name)
            statements.append(statement[: named.start(1)] + global_name + statement[named.end(1) :])
        if before and sync:
            server.expect_rewrite(EXPECT_SYNC_DROP)
            server.outstanding += 1
            before.append(_SYNC)
        return b"".join(before), ";\n".join(statements).encode()

    def prepare_as(self, server: ServerConnection, name: str, query_text: bytes, settings_key: bytes) -> bytes:
        """The client's statement `name` from now on means `query_text` (the SQL a cross-shard merge runs
        for it, same parameters): what to send `server` before a message naming it (b"" when it has it;
        else a Parse whose ParseComplete the client does not see). The client's own text stays its text."""
        known = self.known.get(name)
        if known is None:
            return b""
        _, client_text, param_types = codec.split_parse(known[1][5:])
        if name not in self.client_texts:
            if client_text == query_text:
                return b""
            self.client_texts[name] = client_text
        global_name = statement_global_name(query_text, param_types, settings_key)
        self.known[name] = (global_name, codec.build_parse(global_name, query_text, param_types))
        if global_name in server.prepared:
            return b""
        return prepare_on(server, global_name, self.known[name][1], EXPECT_PARSE_DROP)

    def rename(self, server: ServerConnection, type_code: int, data: bytes, pos: int, end: int) -> bytes | None:
        """A Bind, Describe or Close at `pos` naming a client statement: its renamed form for `server`
        (preceded by the Parse when `server` lacks the statement); None keeps the message as it is.
        Raises ValueError for a name without its terminator or not text."""
        body_start = pos + 5
        if type_code == _B:
            portal, statement, rest = codec.split_bind(data[body_start:end])
            if not statement:
                return None
            return self._with_statement(server, statement.decode(),
                                        lambda g: codec.build_bind(portal, g.encode(), rest))
        if data[end - 1] != 0:
            raise ValueError("name not terminated")
        kind = data[body_start]
        name = data[body_start + 1 : end - 1].decode()
        if kind != ord("S") or not name:
            if type_code == _C:
                server.expect_rewrite(EXPECT_CLOSE)
            return None
        if type_code == _C:
            self.forget(name)
            server.expect_rewrite(EXPECT_CLOSE)
            return NOOP_CLOSE
        return self._with_statement(server, name, lambda g: codec.message(b"D", b"S" + g.encode() + b"\x00"))

    def _with_statement(self, server: ServerConnection, name: str, build: Callable[[str], bytes]) -> bytes | None:
        known = self.known.get(name)
        if known is None:
            return None
        global_name, parse_message = known
        message = build(global_name)
        if global_name in server.prepared:
            return message
        return prepare_on(server, global_name, parse_message, EXPECT_PARSE_DROP) + message


class NamedBind:
    """How the lane renames a Bind of the client's named statement to the proxy-wide name its server has
    it under: the Bind's body starts with `client_prefix` (unnamed portal, client's name) and is sent
    starting with `server_prefix` instead."""

    __slots__ = ("client_prefix", "known", "name", "server_prefix")

    def __init__(self, name: str, known: tuple[str, bytes], client_prefix: bytes) -> None:
        self.name = name
        self.known = known  # the client's entry the renaming was made from
        self.client_prefix = client_prefix
        self.server_prefix = b"\x00" + known[0].encode() + b"\x00"

    @classmethod
    def of(cls, statements: PreparedStatements, server: ServerConnection, data: bytes, pos: int,
           end: int) -> NamedBind | None:
        """The renaming of the Bind at `pos` (unnamed portal, named statement), or None when the statement
        is unknown, not prepared on `server`, or its name malformed (all left to the general path)."""
        name_end = data.find(b"\x00", pos + 6, end)
        if name_end == -1:
            return None
        try:
            name = data[pos + 6 : name_end].decode()
        except UnicodeDecodeError:
            return None
        known = statements.known.get(name)
        if known is None or known[0] not in server.prepared:
            return None
        return cls(name, known, data[pos + 5 : name_end + 1])

    def usable(self, statements: PreparedStatements, server: ServerConnection) -> bool:
        """Still the client's statement of that name (not closed and parsed again), prepared on `server`."""
        return statements.known.get(self.name) is self.known and self.known[0] in server.prepared

    def renamed(self, data: bytes, bind: int, bind_end: int) -> bytes:
        """`data` with its Bind at `bind` naming the server's statement."""
        body_start = bind + 5 + len(self.client_prefix)
        length = 4 + len(self.server_prefix) + bind_end - body_start
        return b"".join((data[:bind], b"B", codec.pack_u32(length), self.server_prefix,
                         memoryview(data)[body_start:bind_end], data[bind_end:]))
