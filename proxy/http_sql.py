"""SQL over HTTP ([http]): `POST /v1/query` with a JSON statement (or a list: one transaction), a bearer JWT
checked like a JWT login, routed like a wire statement, run on the shared server pools; JSON answers."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from auth.claims import is_forgery_attempt
from auth.errors import AuthError
from config.loader import split_address
from config.model import HttpConfig, UserConfig
from proxy.cluster import Cluster
from proxy.errors import ProxyError, ServerLostError
from proxy.guard import FORGERY
from proxy.protocol import http, sqlstate
from proxy.protocol.pgjson import converter_for, param_text
from proxy.runtime import Runtime
from proxy.server import ServerConnection
from proxy.session_state import ServerState, SessionState
from proxy.sql_runner import Statement, StatementError, StatementResult, TypeNames, run_batch, run_internal
from routing.route import Role
from routing.sharding import ShardSession

log = logging.getLogger("shardgate.http")

QUERY_PATH = "/v1/query"
PROBLEM_LINGER_S = 5.0  # after a refused request: how long its announced body is read and dropped
# what a request's server session is set to: UTF-8 text and ISO dates whatever the previous client chose
HTTP_SETTINGS = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY"}
# SQLSTATE classes of a server that cannot serve now (connection, resources, operator intervention)
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_BEARER = "bearer "


class RequestRefused(Exception):
    """A request answered with an error: HTTP status, SQLSTATE, message (and more JSON fields)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": {"sqlstate": code, "message": message, **extra}},
                      ensure_ascii=False).encode("utf-8")


def _refused_answer(exc: RequestRefused) -> Answer:
    headers: tuple[tuple[str, str], ...] = ()
    if exc.status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="shardgate"'),)
    elif exc.status == 405:
        headers = (("Allow", "POST"),)
    return Answer(exc.status, error_body(exc.code, exc.message, **exc.extra), headers)


def parse_body(body: bytes, max_statements: int) -> tuple[list[tuple[str, list[Any]]], bool]:
    """The statements of a request body and whether it was a list (one transaction). Raises
    RequestRefused (400) saying what is wrong with it."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION, f"the request body is not valid JSON: {exc}")
    batch = isinstance(document, list)
    items = document if batch else [document]
    if batch and not items:
        raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION, "an empty list of statements")
    if len(items) > max_statements:
        raise RequestRefused(400, sqlstate.PROGRAM_LIMIT_EXCEEDED,
                             f"{len(items)} statements in one request; http.max_statements is {max_statements}")
    statements = []
    for index, item in enumerate(items):
        where = f"statement {index}: " if batch else ""
        if not isinstance(item, dict) or not isinstance(item.get("query"), str):
            raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION,
                                 f'{where}expected an object {{"query": "...", "params": [...]}}')
        unknown = sorted(set(item) - {"query", "params"})
        if unknown:
            raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION, f'{where}unknown key "{unknown[0]}"')
        params = item.get("params", [])
        if not isinstance(params, list):
            raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION, f'{where}"params" must be a list')
        if not item["query"].strip():
            raise RequestRefused(400, sqlstate.PROTOCOL_VIOLATION, f"{where}the query is empty")
        statements.append((item["query"], params))
    return statements, batch


def result_json(result: StatementResult, types: dict[int, Any]) -> dict[str, Any]:
    columns = result.columns
    converters = [converter_for(oid, types) for _, oid in columns]
    rows = [[None if value is None else convert(value) for convert, value in zip(converters, row, strict=True)]
            for row in result.rows]
    described = []
    for name, oid in columns:
        info = types.get(oid)
        described.append({"name": name, "type": info.name if info is not None else str(oid)})
    return {"columns": described, "rows": rows, "command": result.command}


class HttpSql:
    """The [http] listener: its connections, token checks, routing and the runs on the shared pools."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.types = TypeNames()
        self.connections: set[HttpConnection] = set()
        self.server: asyncio.base_events.Server | None = None
        self._wanted: dict[tuple[str, str], ServerState] = {}  # claims SQL -> the session state it needs
        self.requests = 0
        self.errors = 0

    @property
    def config(self) -> HttpConfig:
        return self.rt.config.http  # read per request: a reload's limits apply to the next one

    async def start(self) -> None:
        host, port = split_address(self.config.listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: HttpConnection(self), host, port, reuse_address=True,
                                               reuse_port=True, backlog=1024)
        log.info("event=http_listening address=%s:%s database=%s user=%s", host, port, self.config.database,
                 self.config.user)

    def close(self) -> None:
        """Stop accepting; idle connections close now, a request running gets its answer, then the close."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()

    # ------------------------------------------------------------ one request

    async def answer(self, request: http.Request) -> Answer:
        self.requests += 1
        try:
            return await self._answer(request)
        except RequestRefused as exc:
            self.errors += 1
            return _refused_answer(exc)
        except Exception:  # a bug: the client gets a 500 with a SQLSTATE, the proxy goes on
            self.errors += 1
            log.exception("event=http_request_error")
            return Answer(500, error_body(sqlstate.INTERNAL_ERROR, "internal error in the proxy (see its log)"))

    async def _answer(self, request: http.Request) -> Answer:
        path = request.target.partition("?")[0]
        if path != QUERY_PATH:
            raise RequestRefused(404, sqlstate.FEATURE_NOT_SUPPORTED, f"no such path: POST {QUERY_PATH} runs SQL")
        if request.method != "POST":
            raise RequestRefused(405, sqlstate.FEATURE_NOT_SUPPORTED, f"{QUERY_PATH} takes POST")
        config = self.config
        if self.rt.shutting_down:
            raise RequestRefused(503, sqlstate.CANNOT_CONNECT_NOW, "the proxy is shutting down")
        user = self.rt.config.user(config.user)
        if user is None:
            raise RequestRefused(503, sqlstate.INVALID_AUTHORIZATION, f'http.user "{config.user}" is not configured')
        claims_sql, tenant = self._authenticate(request, user, config.database)
        statements, batch = parse_body(request.body, config.max_statements)
        texts = [self._checked(sql, index if batch else None) for index, (sql, _) in enumerate(statements)]
        params = [[param_text(value) for value in values] for _, values in statements]
        cluster, role = self._route(config.database, texts, params, tenant, batch)
        results = await self._run(user, cluster, role, claims_sql, list(zip(texts, params, strict=True)), batch)
        if batch:
            document: dict[str, Any] = {"results": results}
        else:
            document = results[0]
        return Answer(200, json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))

    def _authenticate(self, request: http.Request, user: UserConfig, database: str) -> tuple[tuple[str, str], str | None]:
        header = request.headers.get("authorization", "")
        if not header[: len(_BEARER)].lower() == _BEARER or not header[len(_BEARER):].strip():
            raise RequestRefused(401, sqlstate.INVALID_AUTHORIZATION,
                                 "missing bearer token: send Authorization: Bearer <JWT>")
        token = header[len(_BEARER):].strip()
        auth = self.rt.auth
        try:
            identity = auth.authenticate_jwt(user, database, token)
            claims_sql = auth.claims_sql(identity)
            tenant = auth.tenant_of(identity)
        except AuthError as exc:
            status = 403 if exc.sqlstate == sqlstate.INSUFFICIENT_PRIVILEGE else 401
            raise RequestRefused(status, exc.sqlstate, exc.message)
        return claims_sql, tenant

    def _checked(self, sql: str, index: int | None) -> str:
        """A statement the request may run: no claim forgery, no transaction control, no session state."""
        where = {"statement": index} if index is not None else {}
        if is_forgery_attempt(sql):
            code, message, hint = FORGERY
            raise RequestRefused(403, code, message, hint=hint, **where)
        route = self.rt.router.route_statement(sql)
        if route.begins_transaction or route.ends_transaction:
            raise RequestRefused(400, sqlstate.FEATURE_NOT_SUPPORTED,
                                 "transaction control is not available over HTTP",
                                 hint="send a JSON list of statements: it runs as one transaction", **where)
        encoded = sql.encode("utf-8")
        if self.rt.effects.effects(encoded) or self.rt.effects.parsed_effects(encoded):
            raise RequestRefused(400, sqlstate.FEATURE_NOT_SUPPORTED,
                                 "a statement that changes session state (SET, PREPARE, LISTEN, advisory locks, ...) "
                                 "is not kept between HTTP requests",
                                 hint="use SET LOCAL or set_config(..., true) inside a list of statements", **where)
        return sql

    def _route(self, database: str, texts: list[str], params: list[list[str | None]], tenant: str | None,
               batch: bool) -> tuple[Cluster, Role]:
        """The shard and the role (primary or replica) of the request's statements, as a wire session's
        transaction would have them; several shards are refused."""
        router = self.rt.router
        routes = [router.route_statement(text) for text in texts]
        role = Role.REPLICA if (any(r.role is Role.REPLICA for r in routes)
                                and not any(r.role is Role.PRIMARY for r in routes)) else Role.PRIMARY
        shard_count = len(self.rt.shards_of(database))
        shard = 0
        if shard_count > 1:
            shard = self._shard(database, shard_count, texts, params, routes, tenant, batch)
        cluster = self.rt.cluster_for(database, shard)
        if cluster is None:
            raise RequestRefused(503, sqlstate.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
        if role is Role.REPLICA and not self.rt.splits_reads(cluster):
            role = Role.PRIMARY
        return cluster, role

    def _shard(self, database: str, shard_count: int, texts: list[str], params: list[list[str | None]],
               routes: list[Any], tenant: str | None, batch: bool) -> int:
        shard_router = self.rt.shard_router(database)
        chosen: set[int] = set()
        for index, (text, values, route) in enumerate(zip(texts, params, routes, strict=True)):
            where = {"statement": index} if batch else {}
            if shard_router is not None:
                bound = [(0, None if value is None else value.encode("utf-8")) for value in values]
                decision = shard_router.decide(text, bound, ShardSession(tenant=tenant))
                if decision.refusal is not None:
                    raise RequestRefused(422, decision.refusal[0], decision.refusal[1], **where)
                if decision.anywhere:
                    continue
                shards: tuple[int, ...] = decision.shards if not decision.inserts else tuple(
                    part.shard for part in decision.inserts)
            else:
                shards = route.shards if route.shards is not None else tuple(range(shard_count))
            unknown = [shard for shard in shards if shard >= shard_count]
            if unknown:
                raise RequestRefused(422, sqlstate.INVALID_PARAMETER_VALUE,
                                     f'database "{database}" has shards 0 to {shard_count - 1}, not {unknown[0]}',
                                     **where)
            chosen.update(shards)
            if len(shards) > 1 or len(chosen) > 1:
                raise RequestRefused(422, sqlstate.FEATURE_NOT_SUPPORTED,
                                     "over HTTP a request runs on one shard, and this one needs several "
                                     f"({', '.join(map(str, sorted(chosen | set(shards))))})",
                                     hint="name the sharding key in each statement, or use a /* shard: N */ hint; "
                                          "statements for several shards need the PostgreSQL protocol", **where)
        return chosen.pop() if chosen else 0

    async def _run(self, user: UserConfig, cluster: Cluster, role: Role, claims_sql: tuple[str, str],
                   statements: list[Statement], batch: bool) -> list[dict[str, Any]]:
        config = self.config
        general = self.rt.config.general
        timeout_s = general.server_connect_timeout_ms / 1000
        try:
            target = cluster.pick_read() if role is Role.REPLICA else cluster.primary()
            pool = self.rt.pool_for_server(user, target.config)
            server = await pool.checkout()
        except ProxyError as exc:
            raise RequestRefused(503, exc.sqlstate, exc.message)
        try:
            try:
                await pool.restore(server, self._wanted_state(claims_sql))
            except ServerLostError as exc:
                raise RequestRefused(503, exc.sqlstate, exc.message)
            except ProxyError as exc:  # the token's role or claims cannot be set on the server
                status = 503 if exc.sqlstate.startswith(_UNAVAILABLE_CLASSES) else 403
                raise RequestRefused(status, exc.sqlstate, exc.message)
            results = await self._execute(server, statements, batch, config.max_result_rows, timeout_s)
            oids = {oid for result in results for _, oid in result.columns}
            types = await self.types.learn(server, oids, timeout_s) if oids else self.types.of(server)
        except ServerLostError as exc:
            raise RequestRefused(503, exc.sqlstate, exc.message)
        finally:
            pool.checkin(server)  # rolls back a transaction left open; closes a broken server
        return [result_json(result, types) for result in results]

    async def _execute(self, server: ServerConnection, statements: list[Statement], batch: bool, max_rows: int,
                       timeout_s: float) -> list[StatementResult]:
        sent = [("BEGIN", []), *statements] if batch else statements
        try:
            results, status = await run_batch(server, sent, max_rows=max_rows, timeout_s=None)
        except StatementError as exc:
            index = exc.index - 1 if batch else exc.index
            if server.txn_status != b"I":
                await self._rollback(server, timeout_s)
            raise self._sql_error(exc.fields, index if batch else None)
        if batch:
            results = results[1:]
        for index, result in enumerate(results):
            if result.suspended or len(result.rows) > max_rows:
                if status != b"I":
                    await self._rollback(server, timeout_s)
                where = {"statement": index} if batch else {}
                raise RequestRefused(422, sqlstate.PROGRAM_LIMIT_EXCEEDED,
                                     f"the result has more than http.max_result_rows ({max_rows}) rows",
                                     hint="add a LIMIT, or page through the rows", **where)
        if batch:
            try:
                await run_internal(server, "COMMIT", None)
            except StatementError as exc:  # a deferred constraint, a serialization failure: rolled back
                raise self._sql_error(exc.fields, None)
        return results

    async def _rollback(self, server: ServerConnection, timeout_s: float) -> None:
        try:
            await run_internal(server, "ROLLBACK", timeout_s)
        except (StatementError, TimeoutError, ProxyError):
            server.broken = True  # the pool closes it at checkin

    @staticmethod
    def _sql_error(fields: dict[str, str], index: int | None) -> RequestRefused:
        code = fields.get("C", sqlstate.INTERNAL_ERROR)
        extra: dict[str, Any] = {}
        for key, name in (("D", "detail"), ("H", "hint"), ("P", "position")):
            if key in fields:
                extra[name] = int(fields[key]) if key == "P" and fields[key].isdigit() else fields[key]
        if index is not None:
            extra["statement"] = index
        status = 503 if code.startswith(_UNAVAILABLE_CLASSES) else 422
        return RequestRefused(status, code, fields.get("M", "statement failed"), **extra)

    def _wanted_state(self, claims_sql: tuple[str, str]) -> ServerState:
        wanted = self._wanted.get(claims_sql)
        if wanted is None:
            state = SessionState.from_startup(HTTP_SETTINGS)
            state.claims = claims_sql
            wanted = state.snapshot()
            if len(self._wanted) > 10000:
                self._wanted.clear()
            self._wanted[claims_sql] = wanted
        return wanted


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 client connection: requests answered one at a time, in order (keep-alive, pipelining)."""

    def __init__(self, owner: HttpSql) -> None:
        self.owner = owner
        self.parser = http.RequestParser(owner.config.max_body_bytes)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.continued = False
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        owner = self.owner
        if len(owner.connections) >= owner.config.max_connections:
            log.warning("event=http_connection_refused reason=max_connections limit=%d", owner.config.max_connections)
            self._write(http.response(503, error_body(sqlstate.TOO_MANY_CONNECTIONS,
                                                      "too many HTTP connections (http.max_connections)"),
                                      keep_alive=False))
            self.close()
            return
        owner.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        if parser.failed:
            if not parser.discarding:
                self.close()
            return
        if not self.busy:
            self._next()

    def _next(self) -> None:
        item = self.parser.next()
        if item is None:
            if self.parser.wants_continue and not self.continued:
                self.continued = True
                self._write(http.CONTINUE)
            return
        self.continued = False
        if isinstance(item, http.HttpProblem):
            self._refuse(item)
            return
        self.busy = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.transport is not None:
            self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.owner.answer(item))
        task.add_done_callback(lambda done: self._answered(item, done))

    def _answered(self, request: http.Request, task: asyncio.Task[Answer]) -> None:
        self.busy = False
        if self.closed:
            return
        if task.cancelled():
            self.close()
            return
        answer = task.result()
        keep_alive = request.keep_alive and not self.owner.rt.shutting_down
        self._write(http.response(answer.status, answer.body, keep_alive=keep_alive, extra=answer.headers))
        if not keep_alive:
            self.close()
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self._arm_idle_timer()
        self._next()

    def _refuse(self, problem: http.HttpProblem) -> None:
        """A request that cannot be read: answered, then the connection closes once its body was read."""
        code = sqlstate.PROGRAM_LIMIT_EXCEEDED if problem.status in (413, 431) else sqlstate.PROTOCOL_VIOLATION
        self._write(http.response(problem.status, error_body(code, problem.message), keep_alive=False))
        transport = self.transport
        if not problem.discard or transport is None:
            self.close()
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(PROBLEM_LINGER_S, self.close)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        timeout_s = self.owner.config.keep_alive_timeout_s
        if timeout_s > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if not self.busy:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._forget()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def _forget(self) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.owner.connections.discard(self)
