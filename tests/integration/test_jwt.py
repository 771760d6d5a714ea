"""JWT logins through the proxy against real PostgreSQL: per-tenant row-level security through one pool,
forged claims refused, bad tokens refused at connect, session mode, and key rotation on reload.

The proxy logs in to PostgreSQL as `app`; a JWT client's claims become `request.jwt.claim.*` settings
and its `role` claim the current role (switch_role), which the policy on jwt_docs reads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt as pyjwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import RSAAlgorithm

from localpg import Topology
from tests.harness import ProxyFactory, ProxyProcess, database_entries, direct_mode

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(direct_mode(), reason="JWT logins need the proxy: PostgreSQL has no JWT auth"),
]

CLIENT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10
RELOAD_TIMEOUT_S = 10.0

TABLE = "jwt_docs"
TENANT_ROLE = "tenant_user"
ADMIN_ROLE = "jwt_admin"
SERVER_USER = "app"
JWT_USER = "api"

SECRET_A = "shardgate-jwt-test-secret-A-0123456789abcdefghijkl"
SECRET_B = "shardgate-jwt-test-secret-B-9876543210zyxwvutsrqpo"
UNKNOWN_SECRET = "shardgate-jwt-test-secret-X-not-configured-anywhere"
ISSUER = "https://auth.shardgate.test/"
AUDIENCE = "shardgate-tests"

INJECTION = "'); DROP TABLE jwt_docs; --"
FORGERY_MESSAGE = "a JWT session cannot change its claims or role"

SEED_ROWS = [("t1", "t1 first"), ("t1", "t1 second"), ("t2", "t2 first")]

APP_USER = {
    "name": SERVER_USER,
    "password": "app",
    "auth": "scram-sha-256",
    "server_user": SERVER_USER,
    "server_password": "app",
}
API_USER = {"name": JWT_USER, "auth": "jwt", "server_user": SERVER_USER, "server_password": "app"}

SETUP_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TENANT_ROLE}') THEN
        CREATE ROLE {TENANT_ROLE} NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ADMIN_ROLE}') THEN
        CREATE ROLE {ADMIN_ROLE} NOLOGIN BYPASSRLS;
    END IF;
END $$;
ALTER ROLE {ADMIN_ROLE} NOLOGIN BYPASSRLS;
GRANT {TENANT_ROLE}, {ADMIN_ROLE} TO {SERVER_USER};
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} (id serial PRIMARY KEY, tenant_id text NOT NULL, body text NOT NULL);
ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {TABLE} FORCE ROW LEVEL SECURITY;
CREATE POLICY {TABLE}_tenant ON {TABLE}
    USING (tenant_id = current_setting('request.jwt.claim.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('request.jwt.claim.tenant_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {TENANT_ROLE}, {ADMIN_ROLE};
GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {TENANT_ROLE}, {ADMIN_ROLE};
INSERT INTO {TABLE} (tenant_id, body) VALUES {", ".join(f"('{tenant}', '{body}')" for tenant, body in SEED_ROWS)};
"""

# One round trip that says who the server session thinks the client is.
WHO_SQL = (
    "SELECT pg_backend_pid(), current_user::text, current_setting('request.jwt.claim.tenant_id', true),"
    f" (SELECT coalesce(array_agg(DISTINCT tenant_id ORDER BY tenant_id), '{{}}') FROM {TABLE})"
)
CLAIMS_SQL = (
    "SELECT pg_backend_pid(), current_user::text, current_setting('request.jwt.claim.tenant_id', true),"
    " current_setting('request.jwt.claims', true)"
)


# -- tokens and config ---------------------------------------------------------------------------------


def make_token(
    tenant: str | None = "t1",
    *,
    role: str | None = TENANT_ROLE,
    key: Any = SECRET_A,
    algorithm: str = "HS256",
    lifetime_s: int = 600,
    audience: str = AUDIENCE,
    issuer: str = ISSUER,
    kid: str | None = None,
    **extra: Any,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": f"user-of-{tenant}",
        "iat": now - 5,
        "exp": now + lifetime_s,
    }
    if role is not None:
        claims["role"] = role
    if tenant is not None:
        claims["tenant_id"] = tenant
    claims.update(extra)
    headers = {"kid": kid} if kid is not None else None
    return pyjwt.encode(claims, key, algorithm=algorithm, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(claims: dict[str, Any]) -> str:
    """alg none, built by hand so that no library decides what "none" looks like."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hs256_token_with_key_bytes(claims: dict[str, Any], key: bytes) -> str:
    """HS256 signed with arbitrary bytes (PyJWT refuses a PEM public key as an HMAC secret)."""
    signing_input = (
        f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims).encode())}"
    )
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def valid_claims(tenant: str = "t1") -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-of-{tenant}", "role": TENANT_ROLE,
            "tenant_id": tenant, "iat": now - 5, "exp": now + 600}  # fmt: skip


def jwt_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "algorithms": ["HS256"],
        "secret": SECRET_A,
        "issuer": ISSUER,
        "audience": [AUDIENCE],
        "tenant_claim": "tenant_id",
        "role_claim": "role",
        "switch_role": True,
        "allowed_roles": [TENANT_ROLE, ADMIN_ROLE],
    }
    settings.update(overrides)
    return {key: value for key, value in settings.items() if value is not None}


def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_public_pem(path: Path, private_key: rsa.RSAPrivateKey) -> str:
    path.write_bytes(private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def write_jwks(path: Path, keys: dict[str, rsa.RSAPrivateKey]) -> str:
    entries = []
    for kid, private_key in keys.items():
        jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        jwk.update(kid=kid, use="sig", alg="RS256")
        entries.append(jwk)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"keys": entries}))
    temporary.replace(path)
    return str(path)


# -- clients -------------------------------------------------------------------------------------------

PsycopgConnection = psycopg.Connection[tuple[Any, ...]]


def connect_psycopg(proxy: ProxyProcess, password: str, user: str = JWT_USER) -> PsycopgConnection:
    return psycopg.connect(
        host=proxy.host,
        port=proxy.port,
        user=user,
        password=password,
        dbname="app",
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
    )


async def connect_asyncpg(proxy: ProxyProcess, password: str, user: str = JWT_USER) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=user,
        password=password,
        database="app",
        ssl=False,
        timeout=CONNECT_TIMEOUT_S,
    )


async def asyncpg_refusal(proxy: ProxyProcess, password: str) -> asyncpg.PostgresError:
    try:
        conn = await connect_asyncpg(proxy, password)
    except asyncpg.PostgresError as error:
        return error
    await conn.close()
    raise AssertionError("the proxy accepted the connection")


def run_async(coroutine: Coroutine[Any, Any, Any], timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def who(conn: PsycopgConnection) -> tuple[int, str, str | None, list[str]]:
    row = conn.execute(WHO_SQL).fetchone()
    assert row is not None
    return row[0], row[1], row[2], list(row[3])


async def who_asyncpg(conn: asyncpg.Connection) -> tuple[int, str, str | None, list[str]]:
    row = await conn.fetchrow(WHO_SQL)
    assert row is not None
    return row[0], row[1], row[2], list(row[3])


def claims_of(conn: PsycopgConnection) -> tuple[int, str, str | None, dict[str, Any] | None]:
    row = conn.execute(CLAIMS_SQL).fetchone()
    assert row is not None
    return row[0], row[1], row[2], json.loads(row[3]) if row[3] else None


def superuser(pg: Topology, sql: str) -> str:
    assert pg.primary is not None
    return pg.primary.psql(sql, user="postgres", db="app")


def reload_and_wait(proxy: ProxyProcess, **config: Any) -> None:
    """write_config(**config), SIGHUP, and wait until the proxy logs that it reloaded."""
    before = proxy.stderr_text().count("event=reloaded")
    failures_before = proxy.stderr_text().count("event=reload_failed")
    proxy.write_config(**config)
    proxy.reload()
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        text = proxy.stderr_text()
        if text.count("event=reload_failed") > failures_before:
            raise AssertionError(f"reload failed:\n{text[-4000:]}")
        if text.count("event=reloaded") > before:
            return
        time.sleep(0.05)
    raise AssertionError(f"no event=reloaded after {RELOAD_TIMEOUT_S}s:\n{proxy.stderr_text()[-4000:]}")


def assert_no_secrets_logged(proxy: ProxyProcess, *secrets: str) -> None:
    logged = proxy.stderr_text() + proxy.stdout_text()
    for secret in secrets:
        assert secret not in logged, "the proxy logged a token or a key"


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rls_table(pg: Topology) -> Iterator[None]:
    """Roles, the jwt_docs table with its tenant policy and seed rows; recreated on every run."""
    superuser(pg, SETUP_SQL)
    yield
    superuser(pg, f"DROP TABLE IF EXISTS {TABLE}")


def start_jwt_proxy(
    factory: ProxyFactory, pg: Topology, pool_mode: str = "transaction", **jwt_overrides: Any
) -> ProxyProcess:
    assert pg.primary is not None
    started = factory(
        pool_mode=pool_mode,
        pool_size=1,
        users=[APP_USER, API_USER],
        databases=database_entries(pg.primary),
        jwt=jwt_settings(**jwt_overrides),
        # these tests send many refused tokens on purpose: no auth-failure cool-off (tests/integration/test_limits.py)
        general={"auth_failure_limit": 0},
    )
    assert isinstance(started, ProxyProcess)
    return started


@pytest.fixture(scope="module")
def shared(pg: Topology, proxy_work_root: Path, rls_table: None) -> Iterator[ProxyProcess]:
    """One transaction-mode proxy, pool size 1, shared by the tests that do not reconfigure it."""
    factory = ProxyFactory(pg, proxy_work_root)
    try:
        yield start_jwt_proxy(factory, pg)
    finally:
        factory.close()


@pytest.fixture
def jwt_proxy(shared: ProxyProcess) -> Iterator[ProxyProcess]:
    assert shared.is_running(), shared.stderr_text()[-4000:]
    yield shared
    assert shared.is_running(), f"the proxy died:\n{shared.stderr_text()[-4000:]}"


# -- two tenants through one server --------------------------------------------------------------------


def test_two_tenants_interleaved_on_one_server_from_psycopg_and_asyncpg(
    jwt_proxy: ProxyProcess, pg: Topology
) -> None:
    with asyncio.Runner() as runner:
        p1 = connect_psycopg(jwt_proxy, make_token("t1"))
        p2 = connect_psycopg(jwt_proxy, make_token("t2"))
        a1 = runner.run(connect_asyncpg(jwt_proxy, make_token("t1")))
        a2 = runner.run(connect_asyncpg(jwt_proxy, make_token("t2")))
        try:
            pids = set()
            for _ in range(3):
                for tenant, observe in [
                    ("t1", lambda: who(p1)),
                    ("t2", lambda: runner.run(who_asyncpg(a2))),
                    ("t1", lambda: runner.run(who_asyncpg(a1))),
                    ("t2", lambda: who(p2)),
                ]:
                    pid, role, claim, visible = observe()
                    assert (role, claim, visible) == (TENANT_ROLE, tenant, [tenant])
                    pids.add(pid)
            assert len(pids) == 1, "pool_size 1: every client must have run on the same server"

            # Each tenant inserts its own rows; a row for the other tenant fails the policy.
            p1.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', 'psycopg t1 insert')")
            runner.run(
                a2.execute(
                    f"INSERT INTO {TABLE} (tenant_id, body) VALUES ($1, $2)", "t2", "asyncpg t2 insert"
                )
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                p1.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t2', 'smuggled by t1')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                runner.run(
                    a2.execute(
                        f"INSERT INTO {TABLE} (tenant_id, body) VALUES ($1, $2)", "t1", "smuggled by t2"
                    )
                )

            # Updates and deletes aimed at the other tenant touch nothing.
            updated = p2.execute(f"UPDATE {TABLE} SET body = 'defaced' WHERE tenant_id = 't1'").rowcount
            assert updated == 0
            deleted = runner.run(a1.execute(f"DELETE FROM {TABLE} WHERE tenant_id = 't2'"))
            assert deleted == "DELETE 0"

            bodies_t1 = [row[0] for row in p1.execute(f"SELECT body FROM {TABLE} ORDER BY id").fetchall()]
            bodies_t2 = [row["body"] for row in runner.run(a2.fetch(f"SELECT body FROM {TABLE} ORDER BY id"))]
            assert "psycopg t1 insert" in bodies_t1 and "asyncpg t2 insert" not in bodies_t1
            assert "asyncpg t2 insert" in bodies_t2 and "psycopg t1 insert" not in bodies_t2
            assert {"t1 first", "t1 second"} <= set(bodies_t1) and "t2 first" not in bodies_t1
        finally:
            p1.close()
            p2.close()
            runner.run(a1.close())
            runner.run(a2.close())

    stored = superuser(pg, f"SELECT tenant_id || ':' || body FROM {TABLE} ORDER BY id").splitlines()
    assert "t1:psycopg t1 insert" in stored and "t2:asyncpg t2 insert" in stored
    assert not any("smuggled" in line or "defaced" in line for line in stored)
    assert {"t1:t1 first", "t1:t1 second", "t2:t2 first"} <= set(stored)


def test_tenants_concurrently_through_one_server(jwt_proxy: ProxyProcess) -> None:
    rounds = 15

    async def psycopg_tenant(tenant: str) -> int:
        async with await psycopg.AsyncConnection.connect(
            host=jwt_proxy.host, port=jwt_proxy.port, user=JWT_USER, password=make_token(tenant),
            dbname="app", autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
        ) as conn:  # fmt: skip
            for index in range(rounds):
                if index % 3 == 0:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.005)")
                        row = await (await conn.execute(WHO_SQL)).fetchone()
                else:
                    row = await (await conn.execute(WHO_SQL)).fetchone()
                assert row is not None
                assert (row[1], row[2], list(row[3])) == (TENANT_ROLE, tenant, [tenant])
        return rounds

    async def asyncpg_tenant(tenant: str) -> int:
        conn = await connect_asyncpg(jwt_proxy, make_token(tenant))
        try:
            for index in range(rounds):
                if index % 3 == 1:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.005)")
                        observed = await who_asyncpg(conn)
                else:
                    observed = await who_asyncpg(conn)
                assert observed[1:] == (TENANT_ROLE, tenant, [tenant])
        finally:
            await conn.close()
        return rounds

    async def main() -> list[int]:
        return list(await asyncio.gather(
            psycopg_tenant("t1"), psycopg_tenant("t2"), asyncpg_tenant("t1"), asyncpg_tenant("t2")
        ))

    assert run_async(main()) == [rounds] * 4


def test_admin_role_bypasses_row_level_security(jwt_proxy: ProxyProcess, pg: Topology) -> None:
    total = int(superuser(pg, f"SELECT count(*) FROM {TABLE}"))
    with connect_psycopg(jwt_proxy, make_token(None, role=ADMIN_ROLE, sub="admin-1")) as conn:
        _pid, role, claim, visible = who(conn)
        assert role == ADMIN_ROLE
        assert claim in ("", None)
        assert {"t1", "t2"} <= set(visible)
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (total,)
    # and a tenant right after it on the same server is confined again
    with connect_psycopg(jwt_proxy, make_token("t2")) as conn:
        assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])


def test_password_client_after_a_jwt_client_sees_no_claims(jwt_proxy: ProxyProcess) -> None:
    """`app` logs in with a password to the same proxy and database right after a JWT client. Pools
    are per client user, so it has a server of its own; the next test puts a password client on the
    JWT client's very server."""
    with connect_psycopg(jwt_proxy, make_token("t1")) as tenant:
        assert who(tenant)[1:] == (TENANT_ROLE, "t1", ["t1"])
        with connect_psycopg(jwt_proxy, "app", user=SERVER_USER) as password_client:
            _pid, role, claim, claims = claims_of(password_client)
            assert role == SERVER_USER
            assert claim in ("", None)
            assert claims is None
            assert password_client.execute("SELECT session_user::text").fetchone() == (SERVER_USER,)
        assert who(tenant)[1:] == (TENANT_ROLE, "t1", ["t1"])


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_password_client_on_the_jwt_clients_server_gets_the_claims_cleared(
    pool_mode: str, proxy: ProxyFactory, pg: Topology, rls_table: None
) -> None:
    """Pools are per client user, so `app` never gets the `api` pool's server. Turning `api` into a
    password user with a reload puts a password client on the very server a JWT client used."""
    jwt_proxy = start_jwt_proxy(proxy, pg, pool_mode)
    with connect_psycopg(jwt_proxy, make_token("t1")) as tenant:
        jwt_pid = who(tenant)[0]
        assert who(tenant)[1:] == (TENANT_ROLE, "t1", ["t1"])
    plain_api = {**API_USER, "auth": "plain", "password": "api-password"}
    reload_and_wait(jwt_proxy, users=[APP_USER, plain_api])
    with connect_psycopg(jwt_proxy, "api-password") as password_client:
        pid, role, claim, claims = claims_of(password_client)
        assert pid == jwt_pid, "the password client must have landed on the JWT client's server"
        assert role == SERVER_USER
        assert claim in ("", None)
        assert claims is None
        # not refused: the forgery guard is for JWT sessions only
        password_client.execute("SET ROLE tenant_user")
        assert claims_of(password_client)[1] == TENANT_ROLE


# -- forging claims ------------------------------------------------------------------------------------

FORGERIES = [
    "SET request.jwt.claim.tenant_id = 't2'",
    'SET SESSION request.jwt.claims = \'{"tenant_id": "t2"}\'',
    "set \"request.jwt.claim.tenant_id\" to 't2'",
    "SELECT set_config('request.jwt.claim.tenant_id', 't2', false)",
    "select /* hidden */ SET_CONFIG('Request.JWT.Claim.Tenant_Id', 't2', false)",
    "RESET request.jwt.claim.tenant_id",
    "RESET ALL",
    "DISCARD ALL",
    "SET ROLE jwt_admin",
    "SET ROLE NONE",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION app",
    "SELECT 1; SET ROLE jwt_admin",
    "DO $$ BEGIN PERFORM set_config('request.jwt.claim.tenant_id', 't2', false); END $$",
    # no SET or set_config in the statement's own text: only the forgery check sees it
    "DO $$ BEGIN EXECUTE 'SET ROLE jwt_admin'; END $$",
]


@pytest.mark.parametrize("statement", FORGERIES)
def test_forgery_over_the_simple_protocol_is_refused_and_the_session_goes_on(
    statement: str, jwt_proxy: ProxyProcess
) -> None:
    with connect_psycopg(jwt_proxy, make_token("t1")) as conn:
        assert who(conn)[1:] == (TENANT_ROLE, "t1", ["t1"])
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute(statement)  # no parameters: psycopg sends a simple Query
        assert refused.value.sqlstate == "42501"
        assert FORGERY_MESSAGE in str(refused.value)
        assert not conn.closed
        assert who(conn)[1:] == (TENANT_ROLE, "t1", ["t1"])


def test_forgery_inside_a_transaction_aborts_it(jwt_proxy: ProxyProcess, pg: Topology) -> None:
    """Refused like outside one, and, as PostgreSQL does for any error in a transaction block, the
    transaction is failed: a client that ignores the error and sends COMMIT must not commit the
    statements before it."""
    body = "before a forged SET in a transaction"
    try:
        with connect_psycopg(jwt_proxy, make_token("t1")) as conn:
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', %s)", [body])
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=FORGERY_MESSAGE):
                conn.execute("SET LOCAL ROLE jwt_admin")
            status_after_refusal = conn.info.transaction_status
            commit_tag = conn.execute("COMMIT").statusmessage
            assert who(conn)[1:] == (TENANT_ROLE, "t1", ["t1"])
        committed = int(superuser(pg, f"SELECT count(*) FROM {TABLE} WHERE body = '{body}'"))
        assert (status_after_refusal.name, commit_tag, committed) == ("INERROR", "ROLLBACK", 0)
    finally:
        superuser(pg, f"DELETE FROM {TABLE} WHERE body = '{body}'")


@pytest.mark.parametrize(("statement", "params"), [
    ("SELECT set_config('request.jwt.claim.tenant_id', %s, false)", ["t2"]),
    # no SET or set_config in the statement's own text: only the forgery check sees it (binary results make
    # psycopg send even a statement without parameters as Parse/Bind/Execute)
    ("DO $$ BEGIN EXECUTE 'SET ROLE jwt_admin'; END $$", []),
])
def test_forgery_over_the_extended_protocol_from_psycopg_closes_the_connection(
    jwt_proxy: ProxyProcess, statement: str, params: list[str]
) -> None:
    """A forging Parse cannot be answered in order with the messages after it: the proxy ends the
    connection with FATAL 42501 instead; the server goes back to the pool clean."""
    with connect_psycopg(jwt_proxy, make_token("t1")) as conn:
        assert who(conn)[1:] == (TENANT_ROLE, "t1", ["t1"])
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute(statement, params, binary=True)
        assert refused.value.sqlstate == "42501"
        assert FORGERY_MESSAGE in str(refused.value)
        assert refused.value.diag.severity == "FATAL"
        assert conn.closed or conn.info.status == psycopg.pq.ConnStatus.BAD
    with connect_psycopg(jwt_proxy, make_token("t1")) as conn:
        assert who(conn)[1:] == (TENANT_ROLE, "t1", ["t1"])


def test_forgery_from_asyncpg(jwt_proxy: ProxyProcess) -> None:
    """asyncpg: execute() without arguments is a simple Query (refused with 42501, connection usable);
    fetch*() send Parse/Bind (refused with FATAL 42501 and the connection is closed)."""
    asyncpg_forgeries_refused(jwt_proxy)


def test_forgery_from_asyncpg_in_session_mode(proxy: ProxyFactory, pg: Topology, rls_table: None) -> None:
    """Session mode looks at fewer messages than the pooled modes: a JWT session's Query and Parse are
    still checked."""
    asyncpg_forgeries_refused(start_jwt_proxy(proxy, pg, "session"))


def asyncpg_forgeries_refused(jwt_proxy: ProxyProcess) -> None:
    async def scenario() -> None:
        conn = await connect_asyncpg(jwt_proxy, make_token("t1"))
        try:
            for statement in ("SET ROLE jwt_admin", "SET request.jwt.claim.tenant_id = 't2'", "RESET ALL"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                    await conn.execute(statement)
                assert refused.value.sqlstate == "42501"
                assert FORGERY_MESSAGE in str(refused.value)
                assert not conn.is_closed()
                assert (await who_asyncpg(conn))[1:] == (TENANT_ROLE, "t1", ["t1"])

            # The proxy answers the Parse with FATAL 42501 and closes the socket. asyncpg reads the
            # close as the error and reports its own 08003, with the proxy's message appended.
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as closed:
                await conn.fetchval("SELECT set_config('request.jwt.claim.tenant_id', $1, false)", "t2")
            assert closed.value.sqlstate == "08003"
            assert str(closed.value) == f"connection was closed in the middle of operation: {FORGERY_MESSAGE}"
            assert conn.is_closed()
        finally:
            conn.terminate()

        fresh = await connect_asyncpg(jwt_proxy, make_token("t1"))
        try:
            assert (await who_asyncpg(fresh))[1:] == (TENANT_ROLE, "t1", ["t1"])
        finally:
            await fresh.close()

    run_async(scenario())


# -- claims that look like SQL -------------------------------------------------------------------------


def test_sql_in_a_claim_is_stored_verbatim(jwt_proxy: ProxyProcess, pg: Topology) -> None:
    backslashed = "\\'); DROP TABLE jwt_docs; --"
    token = make_token(INJECTION, sub=backslashed, email="x'||(SELECT 1)||'@example.com")
    with connect_psycopg(jwt_proxy, token) as conn:
        _pid, role, claim, claims = claims_of(conn)
        assert role == TENANT_ROLE
        assert claim == INJECTION
        assert claims is not None and claims["tenant_id"] == INJECTION and claims["sub"] == backslashed
        settings = conn.execute(
            "SELECT current_setting('request.jwt.claim.sub'), current_setting('request.jwt.claim.email')"
        ).fetchone()
        assert settings == (backslashed, "x'||(SELECT 1)||'@example.com")
        assert who(conn)[3] == []  # no rows belong to that tenant
        conn.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES (%s, 'injected tenant row')", [INJECTION])
        assert conn.execute(f"SELECT tenant_id FROM {TABLE}").fetchall() == [(INJECTION,)]
    assert superuser(pg, f"SELECT to_regclass('{TABLE}') IS NOT NULL") == "t"
    assert int(superuser(pg, f"SELECT count(*) FROM {TABLE} WHERE tenant_id IN ('t1', 't2')")) >= len(
        SEED_ROWS
    )
    superuser(pg, f"DELETE FROM {TABLE} WHERE body = 'injected tenant row'")


# -- tokens refused at connect -------------------------------------------------------------------------

REFUSED_TOKENS: list[tuple[str, Callable[[], str], str, str]] = [
    ("expired", lambda: make_token("t1", lifetime_s=-60), "28000", "token expired"),
    ("wrong signature", lambda: make_token("t1", key=UNKNOWN_SECRET), "28P01", "invalid signature"),
    ("wrong audience", lambda: make_token("t1", audience="someone-else"), "28000", "audience mismatch"),
    ("wrong issuer", lambda: make_token("t1", issuer="https://evil.test/"), "28000", "issuer mismatch"),
    ("alg none", lambda: unsigned_token(valid_claims()), "28000", "algorithm none is not allowed"),
    ("role not allowed", lambda: make_token("t1", role="postgres"), "42501", "role postgres is not allowed"),
    ("no role", lambda: make_token("t1", role=None), "42501", "missing claim role"),
    ("malformed", lambda: "not-a-jwt", "28000", "malformed token"),
]


@pytest.mark.parametrize(
    ("make", "expected_sqlstate", "reason"),
    [case[1:] for case in REFUSED_TOKENS],
    ids=[case[0] for case in REFUSED_TOKENS],
)
def test_bad_token_is_refused_at_connect(
    make: Callable[[], str], expected_sqlstate: str, reason: str, jwt_proxy: ProxyProcess
) -> None:
    token = make()
    error = run_async(asyncpg_refusal(jwt_proxy, token))
    assert error.sqlstate == expected_sqlstate, f"{error.sqlstate}: {error}"
    assert reason in str(error)
    assert token not in str(error)
    with pytest.raises(psycopg.OperationalError, match=reason):
        connect_psycopg(jwt_proxy, token)
    assert_no_secrets_logged(jwt_proxy, token, SECRET_A)
    # the pool is not harmed by refused logins
    with connect_psycopg(jwt_proxy, make_token("t2")) as conn:
        assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])


# -- session mode --------------------------------------------------------------------------------------


def test_session_mode_claims_for_the_whole_session_and_gone_for_the_next_client(
    proxy: ProxyFactory, pg: Topology, rls_table: None
) -> None:
    session_proxy = start_jwt_proxy(proxy, pg, "session")
    with connect_psycopg(session_proxy, make_token("t1")) as conn:
        pid, role, claim, visible = who(conn)
        assert (role, claim, visible) == (TENANT_ROLE, "t1", ["t1"])
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', 'session mode, rolled back')")
        conn.execute("ROLLBACK")
        with conn.transaction():
            conn.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t1', 'session mode insert')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(f"INSERT INTO {TABLE} (tenant_id, body) VALUES ('t2', 'session mode smuggled')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=FORGERY_MESSAGE):
            conn.execute("SET ROLE jwt_admin")
        assert who(conn) == (pid, TENANT_ROLE, "t1", ["t1"])

    # The next client on that server (pool size 1): an admin token without a tenant claim.
    with connect_psycopg(session_proxy, make_token(None, role=ADMIN_ROLE, sub="admin-2")) as conn:
        next_pid, role, claim, claims = claims_of(conn)
        assert next_pid == pid, "pool_size 1 in session mode: the same server must serve the next client"
        assert role == ADMIN_ROLE
        assert claim in ("", None)
        assert claims is not None and claims["sub"] == "admin-2" and "tenant_id" not in claims

    async def tenant_two() -> tuple[int, str, str | None, list[str]]:
        conn = await connect_asyncpg(session_proxy, make_token("t2"))
        try:
            return await who_asyncpg(conn)
        finally:
            await conn.close()

    assert run_async(tenant_two()) == (pid, TENANT_ROLE, "t2", ["t2"])
    bodies = superuser(pg, f"SELECT body FROM {TABLE} WHERE tenant_id = 't1'").splitlines()
    assert "session mode insert" in bodies and "session mode, rolled back" not in bodies


# -- key rotation --------------------------------------------------------------------------------------


def test_hmac_key_rotation_keeps_connected_clients(
    proxy: ProxyFactory, pg: Topology, rls_table: None
) -> None:
    rotating = start_jwt_proxy(proxy, pg)
    token_a = make_token("t1", key=SECRET_A)
    with connect_psycopg(rotating, token_a) as connected:
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])

        reload_and_wait(rotating, jwt=jwt_settings(secret=SECRET_B))

        # the connected client keeps its identity, on fresh checkouts too
        for _ in range(3):
            assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])
        # the very token that is connected (and was cached) no longer logs in
        error = run_async(asyncpg_refusal(rotating, token_a))
        assert (error.sqlstate, "invalid signature" in str(error)) == ("28P01", True)
        with connect_psycopg(rotating, make_token("t2", key=SECRET_B)) as rotated:
            assert who(rotated)[1:] == (TENANT_ROLE, "t2", ["t2"])
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])
    assert_no_secrets_logged(rotating, token_a, SECRET_A, SECRET_B)


def test_rs256_public_keys_and_their_rotation(
    proxy: ProxyFactory, pg: Topology, rls_table: None, tmp_path: Path
) -> None:
    key_old, key_new = rsa_private_key(), rsa_private_key()
    pem_old = write_public_pem(tmp_path / "old.pem", key_old)
    pem_new = write_public_pem(tmp_path / "new.pem", key_new)
    rsa_proxy = start_jwt_proxy(proxy, pg, algorithms=["RS256"], secret=None, public_keys=[pem_old])

    old_token = make_token("t1", key=key_old, algorithm="RS256")
    with connect_psycopg(rsa_proxy, old_token) as connected:
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])
        # An HS256 token whose HMAC key is the public key PEM (RSA/HMAC key confusion).
        confused = hs256_token_with_key_bytes(valid_claims("t2"), Path(pem_old).read_bytes())
        error = run_async(asyncpg_refusal(rsa_proxy, confused))
        assert error.sqlstate == "28000" and "algorithm HS256 is not allowed" in str(error)

        # Both keys active during the rotation, then the old one is withdrawn.
        reload_and_wait(
            rsa_proxy, jwt=jwt_settings(algorithms=["RS256"], secret=None, public_keys=[pem_old, pem_new])
        )
        for key in (key_old, key_new):
            with connect_psycopg(rsa_proxy, make_token("t2", key=key, algorithm="RS256")) as conn:
                assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])
        reload_and_wait(rsa_proxy, jwt=jwt_settings(algorithms=["RS256"], secret=None, public_keys=[pem_new]))
        error = run_async(asyncpg_refusal(rsa_proxy, old_token))
        assert error.sqlstate == "28P01" and "invalid signature" in str(error)
        with connect_psycopg(rsa_proxy, make_token("t2", key=key_new, algorithm="RS256")) as conn:
            assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])


def test_jwks_kid_rotation(proxy: ProxyFactory, pg: Topology, rls_table: None, tmp_path: Path) -> None:
    key_one, key_two = rsa_private_key(), rsa_private_key()
    jwks = write_jwks(tmp_path / "jwks.json", {"k1": key_one})
    jwks_proxy = start_jwt_proxy(proxy, pg, algorithms=["RS256"], secret=None, jwks_file=jwks)

    token_one = make_token("t1", key=key_one, algorithm="RS256", kid="k1")
    with connect_psycopg(jwks_proxy, token_one) as connected:
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])
        token_two = make_token("t2", key=key_two, algorithm="RS256", kid="k2")
        error = run_async(asyncpg_refusal(jwks_proxy, token_two))
        assert error.sqlstate == "28000" and "unknown key id" in str(error)

        write_jwks(tmp_path / "jwks.json", {"k1": key_one, "k2": key_two})
        reload_and_wait(jwks_proxy)
        with connect_psycopg(jwks_proxy, token_two) as conn:
            assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])
        # a token naming k2 but signed with k1's key
        mislabelled = make_token("t2", key=key_one, algorithm="RS256", kid="k2")
        error = run_async(asyncpg_refusal(jwks_proxy, mislabelled))
        assert error.sqlstate == "28P01" and "invalid signature" in str(error)

        write_jwks(tmp_path / "jwks.json", {"k2": key_two})
        reload_and_wait(jwks_proxy)
        error = run_async(asyncpg_refusal(jwks_proxy, token_one))
        assert error.sqlstate == "28000" and "unknown key id" in str(error)
        with connect_psycopg(jwks_proxy, make_token("t2", key=key_two, algorithm="RS256", kid="k2")) as conn:
            assert who(conn)[1:] == (TENANT_ROLE, "t2", ["t2"])
        assert who(connected)[1:] == (TENANT_ROLE, "t1", ["t1"])
