"""Malformed and unusual input over raw sockets: each fault closes only the client that sent it,
with an ErrorResponse carrying SQLSTATE 08P01; SSL/GSS requests are refused with 'N'; failed logins
carry 28P01 / 28000 and never put the password in the log.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from localpg import Topology
from tests.harness import (
    RAW_READ_TIMEOUT_S,
    RAW_USER,
    DirectProxy,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    database_entries,
    error_fields,
    message,
)

pytestmark = pytest.mark.timeout(120)

PROTOCOL_V3 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
MAX_MESSAGE_BYTES = 4096
# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_factory(pg: Topology, proxy_work_root: Path) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(pg, proxy_work_root)
    yield factory
    factory.close()


@pytest.fixture
def faulty(faulty_factory: ProxyFactory, pg: Topology) -> ProxyProcess:
    """One transaction-mode proxy on the primary (small max_message_bytes) that every fault here hits
    in turn; restarted only if a previous test killed it."""
    assert pg.primary is not None
    running = [started for started in faulty_factory.started if started.is_running()]
    if running:
        return running[-1]
    started = faulty_factory(
        pool_mode="transaction",
        pool_size=4,
        databases=database_entries(pg.primary),
        general={"max_message_bytes": MAX_MESSAGE_BYTES},
    )
    if isinstance(started, DirectProxy):
        pytest.skip("needs the proxy: PostgreSQL itself answers some faults differently")
    return started


@pytest.fixture
def bystander(faulty: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """A client logged in before the fault; it must not notice it."""
    with psycopg.connect(faulty.dsn(connect_timeout=10), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        yield conn


def assert_unharmed(faulty: ProxyProcess, bystander: psycopg.Connection[Any]) -> None:
    assert faulty.is_running(), faulty.stderr_text()[-4000:]
    assert bystander.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    fresh = RawClient(faulty.host, faulty.port)
    try:
        fresh.login()
        assert fresh.simple_query("SELECT 'fresh'") == [["fresh"]]
    finally:
        fresh.close()


def assert_protocol_violation(client: RawClient) -> dict[str, str]:
    """The proxy answered with exactly one FATAL 08P01 ErrorResponse and closed the connection."""
    messages = client.read_until_closed()
    assert client.closed_by_peer, f"connection still open after {RAW_READ_TIMEOUT_S}s; got {messages}"
    errors = [error_fields(body) for code, body in messages if code == b"E"]
    assert len(errors) == 1, messages
    fields = errors[0]
    assert fields.get("C") == "08P01", fields
    assert fields.get("S") == "FATAL", fields
    assert fields.get("M"), fields
    return fields


# -- faults before login -----------------------------------------------------------------------------

GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: shardgate\r\n\r\n", id="http-request"),
    pytest.param(struct.pack("!i", 4) + b"\x00\x00\x00\x00", id="length-too-small"),
    pytest.param(struct.pack("!i", 1 << 30) + b"\x00\x03\x00\x00", id="length-too-large"),
    pytest.param(struct.pack("!ii", 16, PROTOCOL_V3) + b"user\x00app\x00", id="startup-without-terminator"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_before_startup(
    garbage: bytes, faulty: ProxyProcess, bystander: psycopg.Connection[Any]
) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        client.send(garbage)
        assert_protocol_violation(client)
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


def test_truncated_startup_then_close(faulty: ProxyProcess, bystander: psycopg.Connection[Any]) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        # Announces 60 bytes, sends 17, then closes its side.
        client.send(struct.pack("!ii", 60, PROTOCOL_V3) + b"user\x00tru")
        client.sock.shutdown(socket.SHUT_WR)
        messages = client.read_until_closed()
        assert client.closed_by_peer, f"connection still open after {RAW_READ_TIMEOUT_S}s"
        # Nothing to answer to a client that left; if the proxy does answer, it is a protocol violation.
        assert all(code == b"E" and error_fields(body).get("C") == "08P01" for code, body in messages), (
            messages
        )
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


# -- faults after login ------------------------------------------------------------------------------

AFTER_LOGIN = [
    pytest.param(b"Q" + struct.pack("!I", 2), id="length-below-4"),
    pytest.param(message(b"\x01"), id="unknown-type-0x01"),
    pytest.param(message(b"Z", b"I"), id="backend-only-type-Z"),
    # a password message outside authentication: PostgreSQL would end its own connection over it
    pytest.param(message(b"p", b"secret\x00"), id="password-after-login"),
    # Too short to hold the names the proxy renames in transaction mode, or holding no terminator for them
    pytest.param(message(b"B"), id="bind-empty"),
    pytest.param(message(b"D", b"S"), id="describe-without-name"),
    pytest.param(message(b"C"), id="close-empty"),
    pytest.param(message(b"P", b"x") + message(b"S"), id="parse-name-unterminated"),
    pytest.param(message(b"B", b"\x00stmt") + message(b"S"), id="bind-statement-unterminated"),
    pytest.param(message(b"D", b"Sname") + message(b"S"), id="describe-name-unterminated"),
]


@pytest.mark.parametrize("fault", AFTER_LOGIN)
def test_malformed_message_after_login(
    fault: bytes, faulty: ProxyProcess, bystander: psycopg.Connection[Any]
) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        client.login()
        assert client.simple_query("SELECT 1") == [["1"]]
        client.send(fault)
        assert_protocol_violation(client)
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


def test_message_larger_than_max_message_bytes(
    faulty: ProxyProcess, bystander: psycopg.Connection[Any]
) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        client.login()
        # Within the limit: a query of about 3 KB passes.
        sql = "SELECT length('" + "y" * 3000 + "')"
        assert client.simple_query(sql) == [["3000"]]
        # Beyond it: the header announces 100 KB; the proxy must not wait for (or buffer) the rest.
        client.send(b"Q" + struct.pack("!I", 100_000) + b"SELECT '" + b"x" * 1000)
        fields = assert_protocol_violation(client)
        assert str(MAX_MESSAGE_BYTES) in fields["M"] or "length" in fields["M"].lower(), fields
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


def test_whole_message_larger_than_max_message_bytes_in_one_write(
    faulty: ProxyProcess, bystander: psycopg.Connection[Any]
) -> None:
    # The whole oversized Query arrives in one write, so the proxy reads it complete: it is refused all
    # the same, not relayed.
    client = RawClient(faulty.host, faulty.port)
    try:
        client.login()
        assert client.simple_query("SELECT 7") == [["7"]]
        big = b"SELECT '" + b"x" * (2 * MAX_MESSAGE_BYTES) + b"'\x00"
        client.send(message(b"Q", big))
        fields = assert_protocol_violation(client)
        assert str(MAX_MESSAGE_BYTES) in fields["M"], fields
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


# -- encryption requests -----------------------------------------------------------------------------


def test_ssl_request_refused_then_plain_startup(faulty: ProxyProcess) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        client.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert client.sock.recv(1) == b"N"
        parameters = client.login()
        assert parameters.get("server_encoding") == "UTF8"
        assert client.simple_query("SELECT 6 * 7, current_user") == [["42", RAW_USER]]
    finally:
        client.close()


def test_gssenc_then_ssl_request_refused_then_plain_startup(faulty: ProxyProcess) -> None:
    # libpq's order with gssencmode=prefer and sslmode=prefer: GSSENCRequest, then SSLRequest.
    client = RawClient(faulty.host, faulty.port)
    try:
        client.send(struct.pack("!ii", 8, GSSENC_REQUEST_CODE))
        assert client.sock.recv(1) == b"N"
        client.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert client.sock.recv(1) == b"N"
        client.login()
        assert client.simple_query("SELECT 'after both'") == [["after both"]]
    finally:
        client.close()


def test_psycopg_sslmode_prefer_falls_back_to_plain(faulty: ProxyProcess) -> None:
    with psycopg.connect(faulty.dsn(sslmode="prefer", connect_timeout=10), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use is False
        assert conn.execute("SELECT 'plain'").fetchone() == ("plain",)


# -- protocol version negotiation --------------------------------------------------------------------


@pytest.mark.parametrize(("minor", "options"), [(2, {"_pq_.compression": "on"}), (1, {}), (0, {"_pq_.x": "1"})])
def test_newer_protocol_and_its_options_are_negotiated_down_to_3_0(
    faulty: ProxyProcess, minor: int, options: dict[str, str]
) -> None:
    # As PostgreSQL 15 answers a 3.x request (x > 0) or `_pq_.` options: NegotiateProtocolVersion naming
    # 3.0 and the options it does not know, then the login goes on in 3.0 without them.
    client = RawClient(faulty.host, faulty.port)
    try:
        client.send_startup(protocol=PROTOCOL_V3 | minor, extra=options)
        first = client.read_message()
        assert first is not None and first[0] == b"v", first
        newest_version, count = struct.unpack_from("!ii", first[1])
        names = first[1][8:].split(b"\x00")[:count]
        # the whole version number, 3.0 (196608), as PostgreSQL sends it; libpq 18 refuses a bare minor
        assert (newest_version, [name.decode() for name in names]) == (PROTOCOL_V3, list(options))
        messages = client.read_until_ready()
        assert not [body for code, body in messages if code == b"E"], messages
        assert client.simple_query("SELECT 6 * 7") == [["42"]]
        for name in options:
            assert client.simple_query(f"SELECT current_setting('{name}', true)") == [[None]]
    finally:
        client.close()


def test_sasl_initial_response_longer_than_its_message(
    faulty: ProxyProcess, bystander: psycopg.Connection[Any]
) -> None:
    client = RawClient(faulty.host, faulty.port)
    try:
        client.send_startup("app")
        request = client.read_message()
        assert request is not None and request[0] == b"R", request  # AuthenticationSASL
        claimed = b"n,,n=,r=0123456789ab"
        client.send(message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", 500) + claimed))
        assert "SASL" in assert_protocol_violation(client)["M"]
    finally:
        client.close()
    assert_unharmed(faulty, bystander)


# -- failed logins -----------------------------------------------------------------------------------

WRONG_SECRET = "wrong-secret-7f3a9c"

LOGIN_FAILURES = [
    pytest.param("app", WRONG_SECRET, "28P01", id="scram-wrong-password"),
    pytest.param("md5user", WRONG_SECRET, "28P01", id="md5-wrong-password"),
    pytest.param("plainuser", WRONG_SECRET, "28P01", id="plain-wrong-password"),
    pytest.param("nosuchuser", WRONG_SECRET, "28000", id="unknown-user"),
]


@pytest.mark.parametrize(("user", "password", "expected_sqlstate"), LOGIN_FAILURES)
def test_failed_login(
    user: str,
    password: str,
    expected_sqlstate: str,
    faulty: ProxyProcess,
    bystander: psycopg.Connection[Any],
) -> None:
    async def attempt() -> tuple[str, str]:
        try:
            conn = await asyncpg.connect(faulty.dsn(user=user, password=password), timeout=10)
        except asyncpg.PostgresError as error:
            return str(error.sqlstate), str(error)
        await conn.close()
        return "", "logged in"

    sqlstate, text = asyncio.run(asyncio.wait_for(attempt(), 30))
    assert sqlstate == expected_sqlstate, text
    assert ("password authentication failed" if expected_sqlstate == "28P01" else "does not exist") in text
    assert_unharmed(faulty, bystander)
    assert WRONG_SECRET not in faulty.stderr_text()


def test_failed_logins_do_not_disturb_each_other(faulty: ProxyProcess) -> None:
    # Right and wrong passwords for every method at once: each attempt gets its own answer.
    cases: list[tuple[str, str, str]] = [
        ("app", "app", ""),
        ("app", WRONG_SECRET, "28P01"),
        ("md5user", "md5pw", ""),
        ("md5user", WRONG_SECRET, "28P01"),
        ("plainuser", "plainpw", ""),
        ("plainuser", WRONG_SECRET, "28P01"),
        ("ghost", WRONG_SECRET, "28000"),
    ] * 5

    async def attempt(user: str, password: str) -> str:
        try:
            conn = await asyncpg.connect(faulty.dsn(user=user, password=password), timeout=10)
        except asyncpg.PostgresError as error:
            return str(error.sqlstate)
        try:
            assert await conn.fetchval("SELECT current_user") == user
        finally:
            await conn.close()
        return ""

    async def all_attempts() -> list[str]:
        return list(await asyncio.gather(*(attempt(user, password) for user, password, _ in cases)))

    assert asyncio.run(asyncio.wait_for(all_attempts(), 60)) == [expected for _, _, expected in cases]
