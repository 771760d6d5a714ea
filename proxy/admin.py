"""HTTP admin listener: Prometheus /metrics, /health (the process is up), /ready (it accepts clients), and the
admin views as JSON under /api/ (behind a bearer token when general.admin_token is set)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy import views
from proxy.errors import ProxyError
from proxy.limits import REFUSAL_REASONS, TIMEOUT_KINDS
from proxy.metrics import ROUTES, Histogram

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("shardgate.admin")

MAX_REQUEST_BYTES = 8192
# /api/<name>: the console's views as JSON ({"<name>": [row, ...]}); /api/shards keeps its own shape
API_VIEWS = ("pools", "clients", "servers", "stats", "databases", "users", "replication", "config", "version")
OPEN_PATHS = frozenset(("/health", "/ready"))  # orchestrators' probes need no token
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class RuntimeCollector:
    """Reads the runtime's counters at scrape time: nothing is counted twice or on the hot path."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        clients = GaugeMetricFamily("shardgate_clients", "Client connections open")
        clients.add_metric([], len(rt.clients))
        yield clients
        if not rt.role.single:
            forwarded = CounterMetricFamily("shardgate_cancels_forwarded", "CancelRequests received for a client "
                                            "of another worker and passed on to it")
            forwarded.add_metric([], rt.cancels_forwarded)
            yield forwarded
        yield _clients_by_state(rt)
        yield from _traffic_metrics(rt)

        servers = GaugeMetricFamily("shardgate_pool_servers", "Server connections by pool and state",
                                    labels=["pool", "state"])
        waiting = GaugeMetricFamily("shardgate_pool_waiting_clients", "Clients waiting for a server", labels=["pool"])
        checkouts = CounterMetricFamily("shardgate_pool_checkouts", "Server checkouts", labels=["pool"])
        created = CounterMetricFamily("shardgate_pool_servers_created", "Server logins", labels=["pool"])
        failed = CounterMetricFamily("shardgate_pool_servers_failed", "Failed server logins", labels=["pool"])
        wait_s = CounterMetricFamily("shardgate_pool_wait_seconds", "Time clients spent waiting", labels=["pool"])
        for pool in list(rt.pools.values()):
            stats = pool.stats()
            for state in ("idle", "active", "connecting"):
                servers.add_metric([pool.name, state], stats[state])
            waiting.add_metric([pool.name], stats["waiting"])
            checkouts.add_metric([pool.name], stats["checkouts"])
            created.add_metric([pool.name], stats["servers_created"])
            failed.add_metric([pool.name], stats["servers_failed"])
            wait_s.add_metric([pool.name], stats["wait_time_total_s"])
        yield from (servers, waiting, checkouts, created, failed, wait_s)

        hits = CounterMetricFamily("shardgate_router_cache_hits", "Routing decisions served from the cache")
        hits.add_metric([], rt.router.cache_hits)
        misses = CounterMetricFamily("shardgate_router_cache_misses", "Statements the router had to analyse")
        misses.add_metric([], rt.router.cache_misses)
        yield from (hits, misses)

        up = GaugeMetricFamily("shardgate_server_up", "1 when the server passed its last probe and is not banned",
                               labels=["database", "shard", "server", "role"])
        lag_bytes = GaugeMetricFamily("shardgate_server_lag_bytes", "Replay lag behind the primary",
                                      labels=["database", "shard", "server"])
        lag_s = GaugeMetricFamily("shardgate_server_lag_seconds", "Replay delay", labels=["database", "shard", "server"])
        primary_waits = CounterMetricFamily("shardgate_primary_waits", "Statements and logins that waited for a "
                                            "primary (primary_wait_timeout_ms)", labels=["database", "shard"])
        primary_wait_timeouts = CounterMetricFamily("shardgate_primary_wait_timeouts", "Waits for a primary "
                                                    "that ended without one", labels=["database", "shard"])
        waiting_now = GaugeMetricFamily("shardgate_primary_waiting", "Statements and logins waiting for a "
                                        "primary now", labels=["database", "shard"])
        for cluster in list(rt.clusters.values()):
            shard_labels = [cluster.name, str(cluster.shard)]
            primary_waits.add_metric(shard_labels, cluster.primary_waits)
            primary_wait_timeouts.add_metric(shard_labels, cluster.primary_wait_timeouts)
            waiting_now.add_metric(shard_labels, cluster.primary_waiting)
            for row in cluster.stats():
                server = f"{row['host']}:{row['port']}"
                labels = [str(row["database"]), str(row["shard"]), server]
                up.add_metric([*labels, str(row["role"])], 1 if row["healthy"] and not row["banned"] else 0)
                lag_bytes.add_metric(labels, float(row["lag_bytes"]))  # type: ignore[arg-type]
                lag_s.add_metric(labels, float(row["lag_ms"]) / 1000)  # type: ignore[arg-type]
        yield from (up, lag_bytes, lag_s, primary_waits, primary_wait_timeouts, waiting_now)

        statements = CounterMetricFamily("shardgate_shard_statements", "Statements of sharded databases by how "
                                         "many shards they went to (single, multi, all)", labels=["database", "kind"])
        for database, shard_router in list(rt.shard_routers.items()):
            if shard_router is not None:
                for kind, count in shard_router.decisions.items():
                    statements.add_metric([database, kind], count)
        yield statements

        yield from _two_phase_metrics(rt)
        yield from _limit_metrics(rt)
        yield from _listen_metrics(rt)
        yield from _passthrough_metrics(rt)

        jwt = rt.auth.jwt
        if jwt is not None:
            cache = jwt.cache
            for name, value, text in (
                ("shardgate_jwt_cache_hits", cache.hits, "Tokens served from the cache"),
                ("shardgate_jwt_cache_misses", cache.misses, "Tokens verified"),
                ("shardgate_jwt_cache_evictions", cache.evictions, "Tokens dropped to make room"),
            ):
                family = CounterMetricFamily(name, text)
                family.add_metric([], value)
                yield family
            rejections = CounterMetricFamily("shardgate_jwt_rejections", "Refused tokens by reason", labels=["reason"])
            for reason, count in jwt.validator.rejections.items():
                rejections.add_metric([reason], count)
            yield rejections


CLIENT_STATES = ("login", "idle", "idle_in_transaction", "running", "waiting", "console", "other")


def _clients_by_state(rt: Runtime) -> Metric:
    counts = dict.fromkeys(CLIENT_STATES, 0)
    for client in list(rt.clients):
        where = client.activity()[0]
        if not where:  # waiting for a server, in the admin console, closing
            where = client.info().state
        counts[where if where in counts else "other"] += 1
    family = GaugeMetricFamily("shardgate_clients_by_state", "Client connections by where they are: login, idle "
                               "(between transactions), idle_in_transaction, running (a statement in flight), "
                               "waiting (for a server), console", labels=["state"])
    for state, count in counts.items():
        family.add_metric([state], count)
    return family


def _histogram(name: str, text: str, histogram: Histogram) -> Metric:
    family = HistogramMetricFamily(name, text)
    family.add_metric([], histogram.cumulative(), sum_value=histogram.sum_s)
    return family


def _traffic_metrics(rt: Runtime) -> Iterator[Metric]:
    traffic = rt.traffic
    for name, counts, text in (
        ("shardgate_queries", traffic.queries, "Statements (a Query, or an extended batch up to its Sync) by route"),
        ("shardgate_transactions", traffic.transactions, "Transactions (autocommit statements included) by route"),
    ):
        family = CounterMetricFamily(name, text + ": primary, replica, shard (a sharded database's statement on "
                                     "one shard), multi_shard", labels=["route"])
        for route in ROUTES:
            family.add_metric([route], counts[route])
        yield family
    yield _histogram("shardgate_query_duration_seconds", "From a client's statement arriving to its server's "
                     "ReadyForQuery (several shards: to the merged answer)", traffic.query_duration)
    yield _histogram("shardgate_checkout_wait_seconds", "How long clients that went through a pool's queue waited "
                     "for a server (a server parked with the client, or idle, is taken without waiting)",
                     traffic.checkout_wait)
    received = CounterMetricFamily("shardgate_bytes", "Bytes received from clients and from servers (what servers "
                                   "send is relayed to clients but for replies the proxy hides)", labels=["direction"])
    received.add_metric(["from_clients"], traffic.client_bytes)
    received.add_metric(["from_servers"], traffic.server_bytes)
    yield received
    errors = CounterMetricFamily("shardgate_errors", "ErrorResponses sent to clients by SQLSTATE class and source "
                                 "(server: relayed from PostgreSQL; proxy: the proxy's own)", labels=["source", "class"])
    for (source, code_class), count in sorted(traffic.errors.items()):
        errors.add_metric([source, code_class], count)
    yield errors
    bans = CounterMetricFamily("shardgate_server_bans", "Replica bans started", labels=["database", "shard"])
    for cluster in list(rt.clusters.values()):
        bans.add_metric([cluster.name, str(cluster.shard)], cluster.bans)
    yield bans


def _limit_metrics(rt: Runtime) -> Iterator[Metric]:
    limits = rt.limits
    failures = CounterMetricFamily("shardgate_auth_failures", "Failed authentications by reason",
                                   labels=["reason"])
    for reason, count in sorted(limits.auth_failures.items()):
        failures.add_metric([reason], count)
    refused = CounterMetricFamily("shardgate_clients_refused", "Clients refused by a limit (auth_cooloff, "
                                  "max_connections_user, max_connections_database, accept_rate)", labels=["reason"])
    for reason in REFUSAL_REASONS:
        refused.add_metric([reason], limits.refused[reason])
    timeouts = CounterMetricFamily("shardgate_timeouts", "Timeouts enforced by kind (query: canceled; the others "
                                   "closed the client)", labels=["kind"])
    for kind in TIMEOUT_KINDS:
        timeouts.add_metric([kind], limits.timeouts[kind])
    yield from (failures, refused, timeouts)


def _listen_metrics(rt: Runtime) -> Iterator[Metric]:
    """LISTEN/NOTIFY in the pooled modes (proxy/notify.py): one hub per primary pool."""
    clients = GaugeMetricFamily("shardgate_listen_clients", "Clients listening through the proxy's notification hubs")
    clients.add_metric([], rt.notify.listening_clients())
    channels = GaugeMetricFamily("shardgate_listen_channels", "Channels a hub listens to for its clients",
                                 labels=["hub"])
    up = GaugeMetricFamily("shardgate_listen_connection_up", "1 while a hub's listening server connection is up",
                           labels=["hub"])
    delivered = CounterMetricFamily("shardgate_notifications_delivered", "Notifications passed to listening clients",
                                    labels=["hub"])
    reconnects = CounterMetricFamily("shardgate_listen_reconnects", "Listening server connections lost and opened "
                                     "again", labels=["hub"])
    for name, hub in list(rt.notify.hubs.items()):
        stats = hub.stats()
        channels.add_metric([name], stats["channels"])
        up.add_metric([name], stats["connected"])
        delivered.add_metric([name], stats["delivered"])
        reconnects.add_metric([name], stats["reconnects"])
    yield from (clients, channels, up, delivered, reconnects)


def _passthrough_metrics(rt: Runtime) -> Iterator[Metric]:
    """Databases the wildcard serves now and made so far; auth_query lookups, cache hits and failures."""
    autodb = rt.autodb
    open_now = GaugeMetricFamily("shardgate_autodb_databases", "Databases the wildcard entry serves now")
    open_now.add_metric([], len(autodb.names))
    yield open_now
    auth_query = rt.auth_query
    for name, value, text in (
        ("shardgate_autodb_created", autodb.created, "Databases the wildcard entry started serving"),
        ("shardgate_autodb_closed", autodb.closed, "Wildcard databases closed (idle, or a reload)"),
        ("shardgate_auth_query_lookups", auth_query.lookups, "auth_query runs (cache misses)"),
        ("shardgate_auth_query_cache_hits", auth_query.hits, "Users found in the auth_query cache"),
        ("shardgate_auth_query_failures", auth_query.failures, "auth_query lookups that could not run"),
    ):
        family = CounterMetricFamily(name, text)
        family.add_metric([], value)
        yield family


def _two_phase_metrics(rt: Runtime) -> Iterator[Metric]:
    tp = rt.twophase
    transactions = CounterMetricFamily("shardgate_2pc_transactions", "Commits of transactions over several shards "
                                       "by outcome (prepared: went through PREPARE TRANSACTION; one_phase: at most "
                                       "one shard wrote, or 2PC is off)", labels=["outcome"])
    for outcome in ("prepared", "committed", "rolled_back", "one_phase"):
        transactions.add_metric([outcome], tp.counts[outcome])
    recovered = CounterMetricFamily("shardgate_2pc_recovered", "Prepared parts finished by recovery",
                                    labels=["outcome"])
    recovered.add_metric(["committed"], tp.counts["recovered_committed"])
    recovered.add_metric(["rolled_back"], tp.counts["recovered_rolled_back"])
    in_doubt = GaugeMetricFamily("shardgate_2pc_in_doubt", "Prepared parts the last recovery pass left in doubt")
    in_doubt.add_metric([], tp.in_doubt)
    latency = HistogramMetricFamily("shardgate_2pc_commit_seconds", "Commit latency of two-phase commits, from "
                                    "the first PREPARE to the last COMMIT PREPARED")
    latency.add_metric([], tp.latency_buckets(), tp.latency_sum_s)
    yield from (transactions, recovered, in_doubt, latency)


def shards_report(runtime: Runtime) -> dict[str, object]:
    """/api/shards: every logical database's shards, their servers, and how its statements were routed."""
    databases: dict[str, object] = {}
    names = sorted({name for name, _ in runtime.clusters})
    for name in names:
        clusters = runtime.shards_of(name)
        shard_router = runtime.shard_router(name)
        databases[name] = {
            "shards": [{"shard": cluster.shard, "servers": [
                {"host": row["host"], "port": row["port"], "role": row["role"],
                 "healthy": bool(row["healthy"]) and not row["banned"]} for row in cluster.stats()]}
                for cluster in clusters],
            "sharded_tables": [{"table": table.table, "column": table.column, "data_type": table.data_type,
                                "method": table.method} for table in runtime.config.sharded_tables_for(name)],
            "omnisharded_tables": list(runtime.config.omnisharded_tables_for(name)),
            "statements": dict(shard_router.decisions) if shard_router is not None else {},
        }
    return {"databases": databases}


class AdminRequest(asyncio.Protocol):
    """One HTTP/1.x request per connection: GET or HEAD, the bearer token checked where asked, an answer,
    then close. Subclasses answer a path (`_answer`), knowing it is allowed."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.answering = False  # the request is read: what comes after it is not looked at

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answering:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST_BYTES:
                self._respond(431, "text/plain", b"request too large\n")
            return
        self.answering = True
        request = bytes(self.buffer)
        parts = request.split(b"\n", 1)[0].decode("latin-1").strip().split()
        if len(parts) < 2:
            self._respond(400, "text/plain", b"bad request\n")
            return
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(405, "text/plain", b"method not allowed\n")
        elif path not in OPEN_PATHS and not bearer_ok(request, self._admin_token()):
            self._respond(401, "text/plain", b"a bearer token is required (Authorization: Bearer <admin_token>)\n",
                          extra_headers="WWW-Authenticate: Bearer\r\n")
        else:
            self._answer(path, head=method == "HEAD")

    def _admin_token(self) -> str:
        raise NotImplementedError

    def _answer(self, path: str, *, head: bool) -> None:
        raise NotImplementedError

    def _respond(self, status: int, content_type: str, body: bytes, *, head: bool = False,
                 extra_headers: str = "") -> None:
        assert self.transport is not None
        self.transport.write(http_response(status, content_type, body, head=head, extra_headers=extra_headers))
        self.transport.close()


class AdminProtocol(AdminRequest):
    """The admin listener of one process: its metrics, views, health and readiness."""

    def __init__(self, runtime: Runtime, registry: CollectorRegistry) -> None:
        super().__init__()
        self.runtime = runtime
        self.registry = registry

    def _admin_token(self) -> str:
        return self.runtime.config.general.admin_token

    def _answer(self, path: str, *, head: bool) -> None:
        if path.startswith("/api/") and path[5:] in API_VIEWS:
            name = path[5:]
            body = json.dumps({name: views.VIEWS[name](self.runtime).records()}, indent=2).encode() + b"\n"
            self._respond(200, "application/json", body, head=head)
        elif path == "/metrics":
            self._respond(200, CONTENT_TYPE_METRICS, generate_latest(self.registry), head=head)
        elif path == "/api/prepared_transactions":
            asyncio.get_running_loop().create_task(self._prepared_transactions(head=head))
        elif path == "/api/shards":
            body = json.dumps(shards_report(self.runtime), indent=2).encode() + b"\n"
            self._respond(200, "application/json", body, head=head)
        elif path == "/health":
            self._respond(200, "text/plain", b"ok\n", head=head)
        elif path == "/ready":
            if self.runtime.shutting_down:
                self._respond(503, "text/plain", b"shutting down\n", head=head)
            else:
                self._respond(200, "text/plain", b"ready\n", head=head)
        else:
            self._respond(404, "text/plain", b"not found\n")

    async def _prepared_transactions(self, *, head: bool) -> None:
        """Every Shardgate prepared transaction part on every shard, with its age and logged decision."""
        try:
            table = await views.prepared_transactions(self.runtime)
        except ProxyError as exc:
            body = json.dumps({"error": exc.message}).encode() + b"\n"
            self._respond(503, "application/json", body, head=head)
            return
        body = json.dumps({"prepared_transactions": table.records()}, indent=2).encode() + b"\n"
        self._respond(200, "application/json", body, head=head)


def bearer_ok(request: bytes, token: str) -> bool:
    """No token configured, or the request's `Authorization: Bearer` header carries it."""
    if not token:
        return True
    for line in request.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return hmac.compare_digest(given.strip(), token.encode())
    return False


def http_response(status: int, content_type: str, body: bytes, *, head: bool = False, extra_headers: str = "") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
              431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
    header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{extra_headers}"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return header if head else header + body


def metrics_registry(runtime: Runtime) -> CollectorRegistry:
    """The registry /metrics is generated from (a worker's control socket serves the same)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))  # type: ignore[arg-type]
    return registry


async def start_admin(runtime: Runtime, host: str, port: int) -> asyncio.base_events.Server:
    registry = metrics_registry(runtime)
    loop = asyncio.get_running_loop()
    # SO_REUSEPORT: a new instance binds the admin port while the old one drains (rolling restart)
    server = await loop.create_server(lambda: AdminProtocol(runtime, registry), host, port, reuse_address=True,
                                      reuse_port=True)
    log.info("event=admin_listening address=%s:%s token=%s", host, port,
             "required" if runtime.config.general.admin_token else "none")
    if not runtime.config.general.admin_token and not _loopback(host):
        log.warning("event=admin_unprotected address=%s:%s hint=%r", host, port,
                    "set general.admin_token: the admin API lists clients and servers to anyone who can reach it")
    return server


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
