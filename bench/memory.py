"""Memory per client in both directions: the proxy's RSS while a client is faster or slower than its server.

Three clients, one at a time, over raw sockets (trust login) on loopback: a COPY FROM into a table whose
trigger makes the server slow (the client is faster than the server), a client pipelining Executes that
never reads a result (the server is faster than the client, and the client keeps sending), and a large
result read slowly. For each the proxy's VmRSS is sampled; what matters is its growth over the baseline.

    python -m bench.memory --quick          # 50 MB COPY, 100,000 Executes, 200 MB result (about 40 s)
    python -m bench.memory                  # 200 MB COPY, 100,000 Executes, 1 GB result (a few minutes)

tests/integration/test_memory_bounds.py runs the first two, smaller, and asserts the bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from localpg import Topology, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_V3 = 196608
TRUST_USER = "trustuser"  # trust on the proxy and on localpg's PostgreSQL: no authentication code here
RSS_SAMPLE_INTERVAL_S = 0.02
SEND_CHUNK_BYTES = 64 * 1024
SOCKET_TIMEOUT_S = 0.5  # a blocked send is retried until the scenario's deadline
PROXY_START_TIMEOUT_S = 60.0


# -- the proxy's memory -------------------------------------------------------------------------------


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class RssSampler:
    """Samples a process's VmRSS in a thread; the peak also takes VmHWM into account when it could be
    reset at the start (Linux: 5 written to clear_refs), which catches spikes between samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline_kb = max(status_kb(pid, "VmRSS") for _ in range(5))
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.samples_kb: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples_kb) < 1_000_000:
            self.samples_kb.append(status_kb(self.pid, "VmRSS"))
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_kb(self) -> int:
        peak = max(self.samples_kb, default=0)
        if self.hwm_reset:
            peak = max(peak, status_kb(self.pid, "VmHWM"))
        return peak

    @property
    def growth_bytes(self) -> int:
        return max(self.peak_kb - self.baseline_kb, 0) * 1024

    def report(self) -> str:
        return (f"RSS baseline {self.baseline_kb / 1024:.1f} MiB, peak {self.peak_kb / 1024:.1f} MiB, growth "
                f"{self.growth_bytes / 2**20:.1f} MiB ({len(self.samples_kb)} samples, VmHWM reset: {self.hwm_reset})")


# -- a raw frontend -----------------------------------------------------------------------------------


def message(type_code: bytes, body: bytes = b"") -> bytes:
    return type_code + struct.pack("!I", len(body) + 4) + body


class RawSession:
    """A PostgreSQL frontend over a plain socket: trust login, whole messages, sends bounded in time."""

    def __init__(self, host: str, port: int, receive_buffer_bytes: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes:  # before connect: the window the kernel offers stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def login(self, database: str = "app") -> None:
        body = struct.pack("!i", PROTOCOL_V3) + b"user\x00" + TRUST_USER.encode() + b"\x00database\x00"
        body += database.encode() + b"\x00\x00"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        for type_code, payload in self.until_ready(10):
            if type_code == b"E":
                raise RuntimeError(f"login failed: {payload!r}")

    def read_message(self, deadline: float) -> tuple[bytes, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack_from("!I", self.buffer, 1)[0]
                if len(self.buffer) >= 1 + length:
                    type_code, body = bytes(self.buffer[:1]), bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return type_code, body
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            self.buffer += chunk

    def until_ready(self, timeout_s: float) -> list[tuple[bytes, bytes]]:
        deadline = time.monotonic() + timeout_s
        messages = []
        while True:
            found = self.read_message(deadline)
            messages.append(found)
            if found[0] == b"Z":
                return messages

    def query(self, sql: str, timeout_s: float = 30) -> list[tuple[bytes, bytes]]:
        self.sock.sendall(message(b"Q", sql.encode() + b"\x00"))
        return self.until_ready(timeout_s)

    def send_until(self, data: bytes | memoryview, deadline: float) -> int:
        """Send as much of `data` as the peer takes before `deadline`; returns the bytes sent."""
        view = memoryview(data)
        sent = 0
        self.sock.settimeout(SOCKET_TIMEOUT_S)
        while sent < len(view) and time.monotonic() < deadline:
            try:
                sent += self.sock.send(view[sent : sent + SEND_CHUNK_BYTES])
            except TimeoutError:
                continue
        return sent


# -- the scenarios ------------------------------------------------------------------------------------


def slow_table_sql(table: str, sleep_per_row_s: float) -> str:
    """A table whose every insert sleeps: the server takes a COPY at a few MB/s."""
    return (f"CREATE TABLE {table} (id int, filler text);"
            f"CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_sleep({sleep_per_row_s}); RETURN NEW; END $$;"
            f"CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
            f"GRANT ALL ON {table} TO PUBLIC")


@dataclass
class Outcome:
    scenario: str
    client_bytes: int  # what the client sent (COPY, pipeline) or read (slow reader)
    seconds: float
    detail: str
    rss: RssSampler


def copy_into_slow_table(host: str, port: int, pid: int, table: str, total_bytes: int, row_bytes: int,
                         timeout_s: float) -> Outcome:
    """COPY `total_bytes` of rows into `table` (slow to insert into) as fast as the proxy takes them."""
    session = RawSession(host, port)
    try:
        session.login()
        session.sock.sendall(message(b"Q", f"COPY {table} (id, filler) FROM STDIN\x00".encode()))
        type_code, body = session.read_message(time.monotonic() + 10)
        if type_code != b"G":
            raise RuntimeError(f"COPY did not start: {type_code!r} {body[:300]!r}")
        rows_per_chunk = max(SEND_CHUNK_BYTES // (row_bytes + 8), 1)
        filler = b"x" * row_bytes
        started = time.monotonic()
        deadline = started + timeout_s
        sent = 0
        row = 0
        with RssSampler(pid) as rss:
            while sent < total_bytes and time.monotonic() < deadline:
                lines = b"".join(b"%d\t%s\n" % (row + i, filler) for i in range(rows_per_chunk))
                row += rows_per_chunk
                chunk = message(b"d", lines)
                done = session.send_until(chunk, deadline)
                sent += done
                if done < len(chunk):
                    break
            if sent >= total_bytes:
                session.send_until(message(b"c"), deadline)
                answer = session.until_ready(max(deadline - time.monotonic(), 1))
                tags = [body.rstrip(b"\x00").decode() for code, body in answer if code == b"C"]
                errors = [body for code, body in answer if code == b"E"]
                detail = ", ".join(tags) if not errors else f"error {errors[0][:200]!r}"
            else:
                detail = f"stopped at the {timeout_s:.0f} s deadline"
        return Outcome("COPY FROM into a slow table", sent, time.monotonic() - started, detail, rss)
    finally:
        session.close()


def pipeline_without_reading(host: str, port: int, pid: int, executes: int, row_bytes: int,
                             hold_s: float) -> Outcome:
    """One Parse, `executes` Bind/Execute pairs and a Sync, sent for `hold_s` while nothing is read: each
    Execute's row waits for the client, which never takes it."""
    session = RawSession(host, port, receive_buffer_bytes=64 * 1024)
    try:
        session.login()
        # each Bind carries a 100-byte text parameter, repeated into a row of `row_bytes`: the pipeline is
        # larger than the kernel's socket buffers, so what the proxy holds back shows
        parse = message(b"P", b"\x00" + f"SELECT repeat($1::text, {max(row_bytes // 100, 1)})".encode()
                        + b"\x00\x00\x00")
        parameter = b"y" * 100
        bind_execute = message(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x01" + struct.pack("!i", len(parameter))
                               + parameter + b"\x00\x00") + message(b"E", b"\x00" + b"\x00\x00\x00\x00")
        pipeline = parse + bind_execute * executes + message(b"S")
        started = time.monotonic()
        with RssSampler(pid) as rss:
            sent = session.send_until(pipeline, started + hold_s)
            time.sleep(max(started + hold_s - time.monotonic(), 0))
        sent_executes = max(sent - len(parse), 0) // len(bind_execute)
        detail = f"{sent_executes:,} of {executes:,} Executes sent in {hold_s:.0f} s"
        if sent_executes < executes:
            detail += " (then the proxy stopped reading)"
        return Outcome("pipelined Executes, results never read", sent, time.monotonic() - started, detail, rss)
    finally:
        session.close()


def slow_read(host: str, port: int, pid: int, result_bytes: int, row_bytes: int, pause_s: float,
              timeout_s: float) -> Outcome:
    """A result of `result_bytes` read 64 KB at a time with a pause after each read."""
    session = RawSession(host, port, receive_buffer_bytes=64 * 1024)
    try:
        session.login()
        rows = result_bytes // row_bytes
        session.sock.sendall(message(b"Q", f"SELECT repeat('x', {row_bytes}) FROM generate_series(1, {rows})\x00"
                                     .encode()))
        started = time.monotonic()
        deadline = started + timeout_s
        received = 0
        ended = False
        with RssSampler(pid) as rss:
            session.sock.settimeout(SOCKET_TIMEOUT_S)
            while time.monotonic() < deadline and not ended:
                try:
                    chunk = session.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                received += len(chunk)
                ended = chunk.endswith(b"Z\x00\x00\x00\x05I")
                time.sleep(pause_s)
        detail = "whole result read" if ended else f"stopped at the {timeout_s:.0f} s deadline"
        return Outcome("large result read slowly", received, time.monotonic() - started, detail, rss)
    finally:
        session.close()


# -- running it ---------------------------------------------------------------------------------------


def start_proxy(work_dir: Path, server_port: int, extra_general: str = "") -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = work_dir / "shardgate.toml"
    config.write_text(
        "[general]\n"
        f'listen = "127.0.0.1:{port}"\nadmin_listen = ""\npool_mode = "transaction"\nlog_level = "warning"\n'
        f"{extra_general}\n"
        f'[[users]]\nname = "{TRUST_USER}"\npassword = ""\nauth = "trust"\n\n'
        f'[[databases]]\nname = "app"\nhost = "127.0.0.1"\nport = {server_port}\ndatabase_name = "app"\n'
    )
    log = (work_dir / "shardgate.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "-c", str(config)], cwd=REPO_ROOT,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + PROXY_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited; see {work_dir / 'shardgate.log'}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the proxy did not listen in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 40 s in all")
    parser.add_argument("--copy-mb", type=int, default=None, help="COPY size (default 200, quick 50)")
    parser.add_argument("--executes", type=int, default=100_000)
    parser.add_argument("--result-mb", type=int, default=None, help="slowly read result (default 1000, quick 200)")
    args = parser.parse_args(argv)
    copy_mb = args.copy_mb or (50 if args.quick else 200)
    result_mb = args.result_mb or (200 if args.quick else 1000)
    base_dir = Path(tempfile.mkdtemp(prefix="shardgate-bench-memory-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="shardgate-bench-memory-pg-"))  # the postgres OS user writes here
    topology = Topology.create(pg_dir, replicas=0)
    process: subprocess.Popen[bytes] | None = None
    try:
        assert topology.primary is not None
        process, port = start_proxy(base_dir, topology.primary.port)
        topology.primary.psql(slow_table_sql("slow_copy", 0.001), user="app", db="app")
        outcomes = [
            copy_into_slow_table("127.0.0.1", port, process.pid, "slow_copy", copy_mb << 20, 16 * 1024,
                                 timeout_s=copy_mb * 0.5 + 30),
            pipeline_without_reading("127.0.0.1", port, process.pid, args.executes, 1000, hold_s=5),
            slow_read("127.0.0.1", port, process.pid, result_mb << 20, 1000, pause_s=0.002,
                      timeout_s=result_mb * 0.2 + 30),
        ]
        print("| scenario | client bytes | seconds | outcome | proxy RSS baseline | peak | growth |")
        print("|---|---|---|---|---|---|---|")
        for outcome in outcomes:
            rss = outcome.rss
            print(f"| {outcome.scenario} | {outcome.client_bytes / 2**20:.1f} MiB | {outcome.seconds:.1f} | "
                  f"{outcome.detail} | {rss.baseline_kb / 1024:.1f} MiB | {rss.peak_kb / 1024:.1f} MiB | "
                  f"{rss.growth_bytes / 2**20:.1f} MiB |")
        return 0
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        topology.remove()
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
