"""Large results stream through the proxy with backpressure: a client that reads slowly over a raw
socket gets every byte of a 100 MB result (and a 50 MB COPY TO STDOUT) while the proxy's resident
memory stays flat, so the result is never buffered whole.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.memory import RssSampler
from localpg import Topology
from tests.harness import DirectProxy, ProxyFactory, ProxyProcess, database_entries

pytestmark = pytest.mark.timeout(180)

PROTOCOL_V3 = 196608
RAW_USER = "trustuser"  # trust on the proxy and on PostgreSQL: no authentication code needed here
ROWS = 100_000
ROW_WIDTH = 1000
COPY_WIDTH = 490
MAX_RSS_GROWTH_BYTES = 30 * 1024 * 1024
CLIENT_RECEIVE_BUFFER_BYTES = 64 * 1024
# Reading pace: nothing at all at first (a proxy without backpressure would buffer everything the
# server sends meanwhile), then one receive buffer at a time with a short pause.
INITIAL_STALL_S = 1.0
PAUSE_PER_RECEIVE_S = 0.001
STREAM_TIMEOUT_S = 90.0


# -- a slow raw client ----------------------------------------------------------------------------------


class SlowClient:
    """Logs in over a socket with a small receive buffer and reads results at a bounded pace."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connect: a small window, so the kernel cannot absorb the result for us either.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER_BYTES)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.buffer = bytearray()
        self.offset = 0

    def close(self) -> None:
        self.sock.close()

    def login(self) -> None:
        startup = (
            struct.pack("!i", PROTOCOL_V3) + b"user\x00" + RAW_USER.encode() + b"\x00database\x00app\x00\x00"
        )
        self.sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
        for type_code, body in self.messages(time.monotonic() + 10, pace=False):
            if type_code == b"E":
                raise AssertionError(f"login failed: {bytes(body)!r}")
            if type_code == b"Z":
                return

    def query(self, sql: str) -> None:
        data = sql.encode() + b"\x00"
        self.sock.sendall(b"Q" + struct.pack("!I", len(data) + 4) + data)

    def messages(self, deadline: float, pace: bool) -> Iterator[tuple[bytes, memoryview]]:
        """Backend messages until the deadline; with `pace`, one bounded receive at a time."""
        while True:
            buffer = self.buffer
            while len(buffer) - self.offset >= 5:
                length = struct.unpack_from("!I", buffer, self.offset + 1)[0]
                end = self.offset + 1 + length
                if end > len(buffer):
                    break
                type_code = bytes(buffer[self.offset : self.offset + 1])
                start, self.offset = self.offset + 5, end  # consumed even if the caller stops here
                with memoryview(buffer) as view, view[start:end] as body:
                    yield type_code, body
            del buffer[: self.offset]
            self.offset = 0
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("result not complete before the deadline")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(CLIENT_RECEIVE_BUFFER_BYTES)
            if not chunk:
                raise AssertionError("the proxy closed the connection mid-result")
            buffer += chunk
            if pace:
                time.sleep(PAUSE_PER_RECEIVE_S)

    def simple_value(self, sql: str) -> str:
        self.query(sql)
        value = ""
        for type_code, body in self.messages(time.monotonic() + 10, pace=False):
            if type_code == b"E":
                raise AssertionError(f"{sql!r} failed: {bytes(body)!r}")
            if type_code == b"D":
                length = struct.unpack_from("!i", body, 2)[0]
                value = bytes(body[6 : 6 + length]).decode()
            if type_code == b"Z":
                return value
        raise AssertionError("unreachable")


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streaming_proxy(pg: Topology, proxy_work_root: Path) -> Iterator[Callable[[str], ProxyProcess]]:
    """streaming_proxy(pool_mode): one primary-only proxy per pool mode for this module."""
    factory = ProxyFactory(pg, proxy_work_root)
    proxies: dict[str, ProxyProcess] = {}

    def get(pool_mode: str) -> ProxyProcess:
        current = proxies.get(pool_mode)
        if current is None or not current.is_running():
            assert pg.primary is not None
            started = factory(pool_mode=pool_mode, pool_size=2, databases=database_entries(pg.primary))
            if isinstance(started, DirectProxy):
                pytest.skip("measures the proxy's memory: needs the proxy")
            current = proxies[pool_mode] = started
        return current

    yield get
    factory.close()


def _slow_client(proxy_process: ProxyProcess) -> SlowClient:
    client = SlowClient(proxy_process.host, proxy_process.port)
    client.login()
    # Warm up the server connection and the proxy's caches before the baseline is taken.
    assert client.simple_value("SELECT 'warm'") == "warm"
    return client


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_100mb_result_streams_with_flat_memory(
    pool_mode: str, streaming_proxy: Callable[[str], ProxyProcess]
) -> None:
    proxy_process = streaming_proxy(pool_mode)
    assert proxy_process.pid is not None
    client = _slow_client(proxy_process)
    try:
        rows = 0
        id_sum = 0
        value_bytes = 0
        ordered = True
        last_id = 0
        wrong_values = 0
        tag = b""
        expected_value = b"x" * ROW_WIDTH
        with RssSampler(proxy_process.pid) as rss:
            client.query(f"SELECT g, repeat('x', {ROW_WIDTH}) FROM generate_series(1, {ROWS}) AS g")
            time.sleep(INITIAL_STALL_S)
            for type_code, body in client.messages(time.monotonic() + STREAM_TIMEOUT_S, pace=True):
                if type_code == b"D":
                    # Two text columns: the id, then the repeated string.
                    id_length = struct.unpack_from("!i", body, 2)[0]
                    row_id = int(bytes(body[6 : 6 + id_length]))
                    value_at = 6 + id_length
                    value_length = struct.unpack_from("!i", body, value_at)[0]
                    if body[value_at + 4 : value_at + 4 + value_length] != expected_value:
                        wrong_values += 1
                    rows += 1
                    id_sum += row_id
                    value_bytes += value_length
                    ordered = ordered and row_id == last_id + 1
                    last_id = row_id
                elif type_code == b"C":
                    tag = bytes(body).rstrip(b"\x00")
                elif type_code == b"E":
                    raise AssertionError(f"query failed mid-stream: {bytes(body)!r}")
                elif type_code == b"Z":
                    break
        assert (rows, id_sum, value_bytes, wrong_values, ordered, tag) == (
            ROWS,
            ROWS * (ROWS + 1) // 2,
            ROWS * ROW_WIDTH,
            0,
            True,
            f"SELECT {ROWS}".encode(),
        )
        growth = (rss.peak_kb - rss.baseline_kb) * 1024
        assert growth < MAX_RSS_GROWTH_BYTES, f"proxy RSS grew by {growth / 2**20:.1f} MiB: {rss.report()}"
        # The session is still in step after 100 MB.
        assert client.simple_value("SELECT 'after'") == "after"
    finally:
        client.close()


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_50mb_copy_to_stdout_streams_with_flat_memory(
    pool_mode: str, streaming_proxy: Callable[[str], ProxyProcess]
) -> None:
    proxy_process = streaming_proxy(pool_mode)
    assert proxy_process.pid is not None
    client = _slow_client(proxy_process)
    try:
        lines = 0
        id_sum = 0
        copied_bytes = 0
        malformed = 0
        saw_copy_out = saw_copy_done = False
        tag = b""
        suffix = b"\t" + b"y" * COPY_WIDTH + b"\n"
        with RssSampler(proxy_process.pid) as rss:
            client.query(
                f"COPY (SELECT g, repeat('y', {COPY_WIDTH}) FROM generate_series(1, {ROWS}) AS g) TO STDOUT"
            )
            time.sleep(INITIAL_STALL_S)
            for type_code, body in client.messages(time.monotonic() + STREAM_TIMEOUT_S, pace=True):
                if type_code == b"d":
                    line = bytes(body)
                    copied_bytes += len(line)
                    lines += 1
                    row_id, _, _ = line.partition(b"\t")
                    id_sum += int(row_id)
                    if not line.endswith(suffix):
                        malformed += 1
                elif type_code == b"H":
                    saw_copy_out = True
                elif type_code == b"c":
                    saw_copy_done = True
                elif type_code == b"C":
                    tag = bytes(body).rstrip(b"\x00")
                elif type_code == b"E":
                    raise AssertionError(f"COPY failed mid-stream: {bytes(body)!r}")
                elif type_code == b"Z":
                    break
        expected_bytes = sum(len(str(g)) for g in range(1, ROWS + 1)) + ROWS * len(suffix)
        assert (lines, id_sum, copied_bytes, malformed, saw_copy_out, saw_copy_done, tag) == (
            ROWS,
            ROWS * (ROWS + 1) // 2,
            expected_bytes,
            0,
            True,
            True,
            f"COPY {ROWS}".encode(),
        )
        growth = (rss.peak_kb - rss.baseline_kb) * 1024
        assert growth < MAX_RSS_GROWTH_BYTES, f"proxy RSS grew by {growth / 2**20:.1f} MiB: {rss.report()}"
        assert client.simple_value("SELECT 'after copy'") == "after copy"
    finally:
        client.close()
