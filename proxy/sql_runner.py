"""Runs the proxy's own statements on a checked-out server over the extended protocol (text results) and
collects their answers; names result types from pg_type, once per type and server database."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.errors import ProxyError, ServerLostError
from proxy.protocol import codec, sqlstate
from proxy.protocol.pgjson import TypeInfo
from proxy.server import ServerConnection

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_ROW_FIELD = struct.Struct("!ihihih")  # table oid, column number, type oid, type size, type modifier, format
_DESCRIBE_PORTAL = codec.message(b"D", b"P\x00")
_BIND_TAIL = b"\x00\x00"  # no result format codes: every column in text

Statement = tuple[str, Sequence[str | None]]  # SQL and its parameters as text (None: NULL)


@dataclass(slots=True)
class StatementResult:
    columns: list[tuple[str, int]] = field(default_factory=list)  # (name, type oid)
    rows: list[list[str | None]] = field(default_factory=list)
    command: str = ""
    suspended: bool = False  # more rows than the Execute asked for


class StatementError(Exception):
    """PostgreSQL refused statement `index` (its ErrorResponse fields: C, M, D, H, P, ...)."""

    def __init__(self, index: int, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "statement failed"))
        self.index = index
        self.fields = fields


def statement_messages(sql: str, params: Sequence[str | None], max_rows: int) -> bytes:
    """Parse, Bind, Describe and Execute of one unnamed statement, all parameters and results in text."""
    parse = codec.message(b"P", b"\x00" + codec.cstr(sql) + b"\x00\x00")
    values = [_I16.pack(0), _I16.pack(len(params))]
    for value in params:
        if value is None:
            values.append(_I32.pack(-1))
        else:
            data = value.encode("utf-8")
            values.append(_I32.pack(len(data)) + data)
    bind = codec.message(b"B", b"\x00\x00" + b"".join(values) + _BIND_TAIL)
    execute = codec.message(b"E", b"\x00" + _I32.pack(max_rows))
    return parse + bind + _DESCRIBE_PORTAL + execute


class ExtendedRun:
    """The sink and writer of a server while one batch runs: cuts its bytes into messages and files the
    answers of each Execute in `results`; `done` gets the transaction status at ReadyForQuery."""

    __slots__ = ("_done_count", "done", "error", "max_rows", "partial", "results")

    def __init__(self, count: int, max_rows: int) -> None:
        self.results = [StatementResult() for _ in range(count)]
        self.max_rows = max_rows
        self.error: StatementError | None = None
        self.partial = bytearray()
        self._done_count = 0  # Executes answered so far: the next answer belongs to the next statement
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        buffer = self.partial
        buffer += data
        size = len(buffer)
        pos = 0
        while size - pos >= 5:
            end = pos + 1 + _U32.unpack_from(buffer, pos + 1)[0]
            if end > size:
                break
            self._message(buffer[pos], bytes(buffer[pos + 5 : end]))
            pos = end
        if pos:
            del buffer[:pos]

    def _message(self, type_code: int, body: bytes) -> None:
        done = self._done_count
        if type_code == 0x44:  # DataRow
            if done < len(self.results):
                self.results[done].rows.append(_data_row(body))
        elif type_code == 0x54:  # RowDescription
            if done < len(self.results):
                self.results[done].columns = _row_description(body)
        elif type_code in (0x43, 0x49, 0x73):  # CommandComplete, EmptyQueryResponse, PortalSuspended
            if done < len(self.results):
                result = self.results[done]
                if type_code == 0x43:
                    result.command = body.rstrip(b"\x00").decode("utf-8", "replace")
                elif type_code == 0x73:
                    result.suspended = True
            self._done_count = done + 1
        elif type_code == 0x45 and self.error is None:  # ErrorResponse: the rest up to Sync is skipped
            self.error = StatementError(done, codec.parse_error_fields(body))

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        if not server.outstanding and not self.done.done():
            self.done.set_result(status)

    def on_server_lost(self, server: ServerConnection) -> None:
        if not self.done.done():
            self.done.set_exception(ServerLostError(sqlstate.CONNECTION_FAILURE,
                                                    "server connection lost while running the request"))

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def run_batch(server: ServerConnection, statements: Sequence[Statement], *, max_rows: int,
                    timeout_s: float | None) -> tuple[list[StatementResult], bytes]:
    """Send the statements in one round trip (one Sync) and collect their answers; returns them with the
    transaction status. Raises StatementError for the first statement PostgreSQL refused (the server then
    skipped the rest), ServerLostError when the server goes, TimeoutError after `timeout_s`."""
    run = ExtendedRun(len(statements), max_rows)
    batch = b"".join(statement_messages(sql, params, max_rows + 1 if max_rows else 0) for sql, params in statements)
    server.sink = run
    server.out = run
    server.relayed = server.saw_error = False
    server.outstanding += 1
    server.send(batch + codec.SYNC)
    try:
        status = await asyncio.wait_for(run.done, timeout_s)
    except TimeoutError:
        server.broken = True  # its answer may still come: nobody may use it after us
        raise
    finally:
        server.sink = server.out = None
    if run.error is not None:
        raise run.error
    return run.results, status


async def run_internal(server: ServerConnection, sql: str, timeout_s: float | None) -> None:
    """Proxy SQL (COMMIT, ROLLBACK) whose answer nobody sees; raises StatementError when it fails."""
    failed = await server.execute_internal(sql, timeout_s)
    if failed is not None:
        raise StatementError(-1, codec.parse_error_fields(failed[5:]))


def _row_description(body: bytes) -> list[tuple[str, int]]:
    count = _I16.unpack_from(body, 0)[0]
    pos = 2
    columns = []
    for _ in range(count):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode("utf-8", "replace")
        type_oid = _ROW_FIELD.unpack_from(body, end + 1)[2]
        columns.append((name, type_oid & 0xFFFFFFFF))
        pos = end + 1 + _ROW_FIELD.size
    return columns


def _data_row(body: bytes) -> list[str | None]:
    count = _I16.unpack_from(body, 0)[0]
    pos = 2
    values: list[str | None] = []
    unpack = _I32.unpack_from
    for _ in range(count):
        length = unpack(body, pos)[0]
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode("utf-8", "replace"))
            pos += length
    return values


class TypeNames:
    """pg_type rows by OID, per server database (user types have different OIDs in different databases)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, str], dict[int, TypeInfo]] = {}

    def of(self, server: ServerConnection) -> dict[int, TypeInfo]:
        key = (server.address[0], server.address[1], server.database)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = {}
        return known

    async def learn(self, server: ServerConnection, oids: set[int], timeout_s: float) -> dict[int, TypeInfo]:
        """The types of `oids` (and of their array elements) on `server`'s database, looked up when new."""
        known = self.of(server)
        missing = sorted(oid for oid in oids if oid not in known)
        if not missing:
            return known
        listed = ",".join(str(oid) for oid in missing)
        sql = (f"SELECT oid::int8, typname, typcategory, typelem::int8 FROM pg_catalog.pg_type WHERE oid IN ({listed})"
               f" OR oid IN (SELECT typelem FROM pg_catalog.pg_type WHERE oid IN ({listed}))")
        try:
            rows = await server.fetch_rows(sql, timeout_s)
        except (ProxyError, TimeoutError):
            server.broken = True  # its answer may still come: the pool closes it at checkin
            rows = []
        for found_oid, name, category, element in rows:
            if found_oid is not None and name is not None:
                known[int(found_oid)] = TypeInfo(name, category or "", int(element or 0))
        for oid in missing:
            known.setdefault(oid, TypeInfo(str(oid), "", 0))  # dropped meanwhile: its number, not again
        return known
