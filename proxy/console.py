"""Admin console: a client logged in to database `shardgate` (or `pgbouncer`) as an admin user gets SHOW
views and commands (PAUSE, RESUME, RECONNECT, BAN, KILL, RELOAD, SHUTDOWN) answered as result sets."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from auth.errors import AuthError
from auth.identity import Identity
from config.loader import split_address
from config.model import Config
from proxy import views
from proxy.cluster import REPLICA, Cluster, ClusterServer
from proxy.errors import ProxyError
from proxy.protocol import codec, sqlstate
from proxy.protocol.codec import ProtocolError
from proxy.runtime import Runtime

log = logging.getLogger("shardgate.console")

CONSOLE_DATABASES = frozenset(("shardgate", "pgbouncer"))
MAX_CONSOLE_MESSAGE_BYTES = 1 << 20
PAUSE_POLL_S = 0.02
KILL_MESSAGE = "terminating connection due to administrator command"
COMMANDS_HINT = ("SHOW POOLS | CLIENTS | SERVERS | STATS | DATABASES | USERS | CONFIG | SHARDS | REPLICATION | "
                 "PREPARED_TRANSACTIONS | VERSION, RELOAD, PAUSE [db], RESUME [db], RECONNECT [db], "
                 "BAN host:port, UNBAN host:port, KILL client_id, SHUTDOWN")
SHOW_NAMES = frozenset(views.COLUMNS)

# Column types as the console describes them; every other column is text.
_INT8, _FLOAT8, _TEXT = 20, 701, 25
_INT_COLUMNS = frozenset((
    "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login", "port", "shard",
    "paused", "pool_size", "local_port", "prepared_statements", "id", "server_pid", "close_needed", "link",
    "remote_pid", "total_server_assignment_count", "total_wait_time", "servers_created", "servers_failed",
    "statements_single_shard", "statements_multi_shard", "statements_all_shards", "min_pool_size",
    "current_connections", "current_client_connections", "disabled", "admin", "healthy", "banned", "lag_bytes",
))
_FLOAT_COLUMNS = frozenset(("server_lifetime", "lag_ms", "age_s"))
_INT8_BINARY = struct.Struct("!q").pack
_FLOAT8_BINARY = struct.Struct("!d").pack
_I16, _I32 = struct.Struct("!h"), struct.Struct("!i")

# parameters a console login reports (psql and psycopg read server_version and client_encoding)
LOGIN_PARAMETERS = {"server_version": "15.0", "server_encoding": "UTF8", "client_encoding": "UTF8",
                    "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
                    "TimeZone": "UTC", "IntervalStyle": "postgres", "is_superuser": "off"}


def column_type(name: str) -> int:
    return _INT8 if name in _INT_COLUMNS else _FLOAT8 if name in _FLOAT_COLUMNS else _TEXT


# ---------------------------------------------------------------- who may enter


def refusal() -> AuthError:
    """The one answer to anyone the console refuses: the same whether the user exists or not."""
    return AuthError(sqlstate.INVALID_AUTHORIZATION, "access to the admin console denied")


def may_enter(config: Config, user_name: str) -> bool:
    """Before authentication: only the users listed in general.admin_users are asked for credentials."""
    return user_name in config.general.admin_users


def may_enter_as(config: Config, identity: Identity) -> bool:
    """After authentication: an admin user; a JWT login also needs a role claim in admin_jwt_roles."""
    if not may_enter(config, identity.user):
        return False
    return not identity.is_jwt or (identity.role is not None and identity.role in config.general.admin_jwt_roles)


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # SHOW, RELOAD, PAUSE, RESUME, RECONNECT, BAN, UNBAN, KILL, SHUTDOWN
    argument: str = ""  # the view of SHOW, a database, a server, a client id


_TAKES_DATABASE = frozenset(("PAUSE", "RESUME", "RECONNECT"))
_TAKES_ONE = {"BAN": "a server as host:port", "UNBAN": "a server as host:port",
              "KILL": "a client id (the id column of SHOW CLIENTS)", "KILL_CLIENT": "a client id"}
_NO_ARGUMENT = frozenset(("RELOAD", "SHUTDOWN"))


def parse_command(text: str) -> Command:
    """One console command (case-insensitive, an optional trailing semicolon already split off). Raises
    ProxyError 42601 for a malformed command, 0A000 for one the console does not have."""
    words = text.split()
    verb = words[0].upper()
    rest = words[1:]
    if verb == "SHOW":
        if len(rest) != 1:
            raise ProxyError(sqlstate.SYNTAX_ERROR, "SHOW takes one view name", detail=f"views: {COMMANDS_HINT}")
        name = rest[0].lower()
        if name not in SHOW_NAMES:
            raise ProxyError(sqlstate.FEATURE_NOT_SUPPORTED, f'SHOW {rest[0]} is not an admin console view',
                             detail=f"console commands: {COMMANDS_HINT}")
        return Command("SHOW", name)
    if verb in _NO_ARGUMENT:
        if rest:
            raise ProxyError(sqlstate.SYNTAX_ERROR, f"{verb} takes no argument")
        return Command(verb)
    if verb in _TAKES_DATABASE:
        if len(rest) > 1:
            raise ProxyError(sqlstate.SYNTAX_ERROR, f"{verb} takes at most one database name")
        return Command(verb, _unquote(rest[0]) if rest else "")
    if verb in _TAKES_ONE:
        if len(rest) != 1:
            raise ProxyError(sqlstate.SYNTAX_ERROR, f"{verb} takes {_TAKES_ONE[verb]}")
        return Command("KILL" if verb == "KILL_CLIENT" else verb, _unquote(rest[0]))
    raise ProxyError(sqlstate.SYNTAX_ERROR, f'unknown admin console command "{words[0]}"',
                     detail=f"console commands: {COMMANDS_HINT}")


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1]
    return word


def split_commands(sql: str) -> list[str]:
    """The commands of one Query: split on semicolons (console commands hold no quoted semicolons)."""
    return [part.strip() for part in sql.split(";") if part.strip()]


# ---------------------------------------------------------------- encoding


def row_description(columns: tuple[str, ...], formats: list[int]) -> bytes:
    body = _I16.pack(len(columns))
    for index, name in enumerate(columns):
        type_oid = column_type(name)
        size = 8 if type_oid != _TEXT else -1
        body += codec.cstr(name) + struct.pack("!ihihih", 0, 0, type_oid, size, -1, _format(formats, index))
    return codec.message(b"T", body)


def _format(formats: list[int], index: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[index] if index < len(formats) else 0


def data_rows(table: views.Table, formats: list[int]) -> bytes:
    types = [column_type(name) for name in table.columns]
    binary = [_format(formats, index) == 1 for index in range(len(table.columns))]
    out = bytearray()
    for row in table.rows:
        body = bytearray(_I16.pack(len(row)))
        for index, value in enumerate(row):
            if value is None:
                body += _I32.pack(-1)
                continue
            encoded = _encode(value, types[index], binary[index])
            body += _I32.pack(len(encoded)) + encoded
        out += codec.message(b"D", bytes(body))
    return bytes(out)


def _encode(value: int | float | str, type_oid: int, binary: bool) -> bytes:
    if binary and type_oid == _INT8:
        return _INT8_BINARY(int(value))
    if binary and type_oid == _FLOAT8:
        return _FLOAT8_BINARY(float(value))
    if type_oid == _FLOAT8:
        return repr(float(value)).encode()
    return str(value).encode()


# ---------------------------------------------------------------- the console of one client


class ConsoleHost(Protocol):
    """The client session a console answers (proxy/client.py)."""

    client_id: int

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def fatal(self, code: str, text: str) -> None: ...

    def disconnect(self) -> None: ...


@dataclass(slots=True)
class _Portal:
    sql: str
    formats: list[int]


class Console:
    """Answers one admin client: simple queries, and the extended protocol without parameters. Messages are
    handled in order by one task, so a PAUSE that waits for running transactions holds back what follows."""

    def __init__(self, runtime: Runtime, host: ConsoleHost, user: str) -> None:
        self.rt = runtime
        self.host = host
        self.user = user
        self.queue: deque[tuple[int, bytes]] = deque()
        self.statements: dict[str, str] = {}
        self.portals: dict[str, _Portal] = {}
        self.skipping = False  # an extended-protocol error: skip to the next Sync
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def login_messages(self, cancel_key: tuple[int, int]) -> bytes:
        params = b"".join(codec.parameter_status(name, value) for name, value in LOGIN_PARAMETERS.items())
        return (codec.AUTH_OK + params + codec.parameter_status("application_name", "")
                + codec.backend_key_data(*cancel_key) + codec.ready_for_query(b"I"))

    def feed(self, buffer: bytearray) -> None:
        """Take the whole messages `buffer` holds; raises ProtocolError (08P01) for a malformed one."""
        while len(buffer) >= 5:
            type_code, length = codec.unpack_header(buffer, 0)
            if length < 4 or length > MAX_CONSOLE_MESSAGE_BYTES:
                raise ProtocolError(f"invalid message length {length} for message type {chr(type_code)!r}")
            if len(buffer) < length + 1:
                return
            self.queue.append((type_code, bytes(buffer[5 : length + 1])))
            del buffer[: length + 1]
        if self.queue and (self._task is None or self._task.done()):
            self._task = self.rt.spawn(self._drain())

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _drain(self) -> None:
        while self.queue and not self.closed:
            type_code, body = self.queue.popleft()
            try:
                await self._message(type_code, body)
            except ProtocolError as exc:
                self.host.fatal(exc.sqlstate, exc.message)
                self.close()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=console_internal_error user=%s", self.user)
                self.host.fatal(sqlstate.INTERNAL_ERROR, "internal error in the admin console")
                self.close()

    async def _message(self, type_code: int, body: bytes) -> None:
        kind = chr(type_code)
        if kind == "Q":
            await self._simple_query(body.rstrip(b"\x00").decode("utf-8", "replace"))
        elif kind == "X":
            self.close()
            self.host.disconnect()
        elif kind == "S":
            self.skipping = False
            self.host.write(codec.ready_for_query(b"I"))
        elif kind in "PBDECH":
            if not self.skipping:
                try:
                    await self._extended(kind, body)
                except ProxyError as exc:
                    self.skipping = True
                    self.host.write(codec.error_response(exc.sqlstate, exc.message, detail=exc.detail))
        else:
            raise ProtocolError(f"unexpected message type {kind!r} on the admin console")

    # ------------------------------------------------------------ simple protocol

    async def _simple_query(self, sql: str) -> None:
        parts = split_commands(sql)
        out = self.host.write
        if not parts:
            out(codec.message(b"I") + codec.ready_for_query(b"I"))
            return
        for text in parts:
            try:
                table, tag = await self.run(parse_command(text))
            except ProxyError as exc:
                out(codec.error_response(exc.sqlstate, exc.message, detail=exc.detail))
                break
            if table is not None:
                out(row_description(table.columns, []) + data_rows(table, []))
            out(codec.command_complete(tag))
        if not self.closed:
            out(codec.ready_for_query(b"I"))

    # ------------------------------------------------------------ extended protocol (no parameters)

    async def _extended(self, kind: str, body: bytes) -> None:
        out = self.host.write
        try:
            if kind == "P":
                name, sql, param_types = codec.parse_parse(body)
                if param_types[:2] not in (b"", b"\x00\x00") or "$1" in sql:
                    raise ProxyError(sqlstate.FEATURE_NOT_SUPPORTED, "admin console commands take no parameters")
                parts = split_commands(sql)
                if len(parts) > 1:
                    raise ProxyError(sqlstate.SYNTAX_ERROR, "one admin console command per statement")
                if parts:
                    parse_command(parts[0])  # a malformed command fails at Parse, as PostgreSQL's would
                self.statements[name] = parts[0] if parts else ""
                out(codec.PARSE_COMPLETE)
            elif kind == "B":
                portal_name, statement, rest = codec.split_bind(body)
                sql = self._statement(statement.decode())
                self.portals[portal_name.decode()] = _Portal(sql, _result_formats(rest))
                out(codec.BIND_COMPLETE)
            elif kind == "D":
                what, name = body[:1], body[1:].rstrip(b"\x00").decode()
                if what == b"S":
                    columns = self._columns(self._statement(name))
                    out(codec.message(b"t", b"\x00\x00"))
                    out(row_description(columns, []) if columns else codec.NO_DATA)
                else:
                    bound = self._portal(name)
                    columns = self._columns(bound.sql)
                    out(row_description(columns, bound.formats) if columns else codec.NO_DATA)
            elif kind == "E":
                bound = self._portal(codec.read_cstring(body, 0)[0])
                if not bound.sql:
                    out(codec.message(b"I"))
                    return
                table, tag = await self.run(parse_command(bound.sql))
                if table is not None:
                    out(data_rows(table, bound.formats))
                out(codec.command_complete(tag))
            elif kind == "C":
                what, name = body[:1], body[1:].rstrip(b"\x00").decode()
                (self.statements if what == b"S" else self.portals).pop(name, None)
                out(codec.message(b"3"))
            # Flush: everything is written as it is answered
        except (ValueError, IndexError, struct.error):
            raise ProtocolError(f"malformed {kind} message")

    def _statement(self, name: str) -> str:
        if name not in self.statements:
            raise ProxyError("26000", f'prepared statement "{name}" does not exist')
        return self.statements[name]

    def _portal(self, name: str) -> _Portal:
        if name not in self.portals:
            raise ProxyError("34000", f'portal "{name}" does not exist')
        return self.portals[name]

    @staticmethod
    def _columns(sql: str) -> tuple[str, ...] | None:
        if not sql:
            return None
        command = parse_command(sql)
        return views.COLUMNS[command.argument] if command.verb == "SHOW" else None

    # ------------------------------------------------------------ the commands

    async def run(self, command: Command) -> tuple[views.Table | None, str]:
        """(rows or None, command tag); raises ProxyError with the SQLSTATE a person can act on."""
        verb, argument = command.verb, command.argument
        if verb == "SHOW":
            if argument == "prepared_transactions":
                return await views.prepared_transactions(self.rt), "SHOW"
            return views.VIEWS[argument](self.rt), "SHOW"
        log.info("event=console_command user=%s command=%s argument=%s", self.user, verb, argument or "-")
        handler: Callable[[str], None] | None = {
            "RESUME": self._resume, "RECONNECT": self._reconnect, "BAN": self._ban, "UNBAN": self._unban,
            "KILL": self._kill, "RELOAD": self._reload, "SHUTDOWN": self._shutdown,
        }.get(verb)
        if verb == "PAUSE":
            await self._pause(argument)
        elif handler is not None:
            handler(argument)
        return None, verb

    def _database(self, name: str) -> str | None:
        """A database argument: None for every database; ProxyError 3D000 for one the config lacks."""
        if not name:
            return None
        if self.rt.cluster_for(name) is None:
            raise ProxyError(sqlstate.INVALID_CATALOG_NAME, f'database "{name}" does not exist')
        return name

    async def _pause(self, argument: str) -> None:
        """New transactions wait; returns once the running ones have finished (or a RESUME came)."""
        database = self._database(argument)
        self.rt.pause(database)
        while not self.closed and any(pool.busy for pool in self.rt.pools_of(database)):
            if not (self.rt.paused_all or (database is not None and database in self.rt.paused_databases)):
                return  # resumed meanwhile from another console
            await asyncio.sleep(PAUSE_POLL_S)

    def _resume(self, argument: str) -> None:
        database = self._database(argument)
        if database is not None and self.rt.paused_all:
            raise ProxyError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                             "every database is paused: RESUME without a database name resumes them")
        if database is None and not (self.rt.paused_all or self.rt.paused_databases):
            raise ProxyError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "no database is paused")
        if database is not None and database not in self.rt.paused_databases:
            raise ProxyError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, f"database {database} is not paused")
        self.rt.resume(database)

    def _reconnect(self, argument: str) -> None:
        for pool in self.rt.pools_of(self._database(argument)):
            pool.reconnect()

    def _servers(self, argument: str) -> list[tuple[Cluster, ClusterServer]]:
        """The configured server at host:port, in every logical database it serves."""
        try:
            address = split_address(argument)
        except ValueError as exc:
            raise ProxyError(sqlstate.SYNTAX_ERROR, f'server "{argument}": {exc} (as in SHOW DATABASES)')
        found = [(cluster, server) for cluster in self.rt.clusters.values()
                 for server in cluster.servers if server.address == address]
        if not found:
            raise ProxyError(sqlstate.UNDEFINED_OBJECT, f'no configured server is "{argument}" (see SHOW DATABASES)')
        return found

    def _ban(self, argument: str) -> None:
        for cluster, server in self._servers(argument):
            if server.role != REPLICA:
                raise ProxyError(sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                                 f"server {server.name} is the {server.role} of database {cluster.name} shard "
                                 f"{cluster.shard}: only replicas can be banned (writes have nowhere else to go)")
        for cluster, server in self._servers(argument):
            cluster.ban_until_unbanned(server)

    def _unban(self, argument: str) -> None:
        for cluster, server in self._servers(argument):
            cluster.unban(server)

    def _kill(self, argument: str) -> None:
        if not argument.isdigit():
            raise ProxyError(sqlstate.SYNTAX_ERROR, f'KILL takes a client id (the id column of SHOW CLIENTS), '
                             f'not "{argument}"')
        client_id = int(argument)
        for client in list(self.rt.clients):
            if client.client_id == client_id:
                client.fatal(sqlstate.ADMIN_SHUTDOWN, KILL_MESSAGE)
                return
        raise ProxyError(sqlstate.UNDEFINED_OBJECT, f"no client has id {client_id} (see SHOW CLIENTS)")

    def _reload(self, argument: str) -> None:
        del argument
        reload = self.rt.reload_config
        if reload is None:
            raise ProxyError(sqlstate.FEATURE_NOT_SUPPORTED, "this proxy cannot reload its configuration")
        problems = reload()
        if problems is not None:
            raise ProxyError(sqlstate.CONFIG_FILE_ERROR, "configuration not reloaded; the old one stays in use",
                             detail=problems)

    def _shutdown(self, argument: str) -> None:
        del argument
        stop = self.rt.request_shutdown
        if stop is None:
            raise ProxyError(sqlstate.FEATURE_NOT_SUPPORTED, "this proxy cannot be shut down from the console")
        stop()


def _result_formats(rest: bytes) -> list[int]:
    """The result-column format codes at the end of a Bind body (after its parameters)."""
    offset = 0
    count = _I16.unpack_from(rest, offset)[0]
    offset += 2 + 2 * count
    params = _I16.unpack_from(rest, offset)[0]
    offset += 2
    if params:
        raise ProxyError(sqlstate.FEATURE_NOT_SUPPORTED, "admin console commands take no parameters")
    results = _I16.unpack_from(rest, offset)[0]
    offset += 2
    return [_I16.unpack_from(rest, offset + 2 * index)[0] for index in range(results)]
