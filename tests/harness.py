"""Test harness: real PostgreSQL topologies, the proxy as a subprocess, and compiled client programs.

Set SHARDGATE_TEST_DIRECT=1 to point every `proxy(...)` at the primary instead of a proxy: this
checks the tests themselves against plain PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from localpg import PgServer, Topology, free_port
from proxy.protocol.codec import PROTOCOL_V3
from proxy.protocol.codec import parse_error_fields as error_fields

REPO_ROOT = Path(__file__).resolve().parent.parent
PGX_SOURCE_DIR = REPO_ROOT / "tests" / "clients" / "pgx"

# Generous: on a loaded machine a Python start with its imports and first health probe can take long.
PROXY_START_TIMEOUT_S = 60.0
PROXY_STOP_TIMEOUT_S = 10.0
GO_BUILD_TIMEOUT_S = 300.0

# Credentials of the default users created by localpg.DEFAULT_USERS.
USER_PASSWORDS: dict[str, str] = {
    "app": "app",
    "md5user": "md5pw",
    "plainuser": "plainpw",
    "trustuser": "",
    "postgres": "postgres",
}


def direct_mode() -> bool:
    """True when SHARDGATE_TEST_DIRECT=1: tests talk to the primary, no proxy is started."""
    return os.environ.get("SHARDGATE_TEST_DIRECT", "") not in ("", "0", "false", "no")


# Tests kill servers (SIGKILL, as in a crash) and expect what was committed before to be there after the
# restart, as on any PostgreSQL with the default synchronous_commit. localpg's servers commit asynchronously:
# a commit younger than the WAL writer's next round (up to 3 x 200 ms) died with the process. With fsync off,
# a synchronous commit costs a write() into the page cache, which outlives the process; no disk wait.
TEST_SETTINGS: dict[str, str | int | float | bool] = {"synchronous_commit": True}


def create_topology(replicas: int = 2) -> Topology:
    """A topology in a fresh directory under the system temp dir (reachable by the postgres OS user)."""
    base_dir = Path(tempfile.mkdtemp(prefix="shardgate-pg-"))
    try:
        return Topology.create(base_dir, replicas=replicas, extra_conf=TEST_SETTINGS)
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


def create_tls_topology(cert: Path, key: Path, ca: Path | None = None) -> Topology:
    """A primary alone with `ssl = on` serving `cert` and `key`; with `ca`, it asks clients for a certificate
    (optional) and checks it against that CA. The files are copied where the postgres OS user may read them."""
    base_dir = Path(tempfile.mkdtemp(prefix="shardgate-pg-tls-"))
    try:
        ssl_dir = base_dir / "ssl"
        ssl_dir.mkdir()
        settings: dict[str, str | int | float | bool] = {**TEST_SETTINGS, "ssl": True}
        for setting, source in (("ssl_cert_file", cert), ("ssl_key_file", key), ("ssl_ca_file", ca)):
            if source is None:
                continue
            target = ssl_dir / source.name
            shutil.copyfile(source, target)
            target.chmod(0o600 if setting == "ssl_key_file" else 0o644)
            if os.geteuid() == 0:
                shutil.chown(target, user="postgres")  # PostgreSQL refuses a key its OS user does not own
            settings[setting] = str(target)
        return Topology.create(base_dir, replicas=0, extra_conf=settings)
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


def destroy_topology(topology: Topology) -> None:
    try:
        topology.remove()
    finally:
        shutil.rmtree(topology.base_dir, ignore_errors=True)


def make_dsn(
    host: str, port: int, user: str = "app", password: str | None = "app", dbname: str = "app", **params: Any
) -> str:
    """A libpq URL; extra keyword arguments become query parameters (e.g. sslmode="disable")."""
    credentials = quote(user, safe="")
    if password:
        credentials += ":" + quote(password, safe="")
    url = f"postgresql://{credentials}@{host}:{port}/{quote(dbname, safe='')}"
    if params:
        url += "?" + urlencode({key: str(value) for key, value in params.items()})
    return url


# -- config file -------------------------------------------------------------------------------------


def default_users() -> list[dict[str, Any]]:
    return [
        {
            "name": "app",
            "password": "app",
            "auth": "scram-sha-256",
            "server_user": "app",
            "server_password": "app",
        },
        {"name": "md5user", "password": "md5pw", "auth": "md5"},
        {"name": "plainuser", "password": "plainpw", "auth": "plain"},
        {"name": "trustuser", "password": "", "auth": "trust"},
    ]


def database_entries(
    primary: PgServer, replicas: Iterable[PgServer] = (), name: str = "app", shard: int | None = None
) -> list[dict[str, Any]]:
    """[[databases]] entries for one primary and its replicas serving the client database `name`."""
    entries = []
    for server, role in [(primary, "primary"), *((replica, "replica") for replica in replicas)]:
        entry: dict[str, Any] = {
            "name": name,
            "host": server.host,
            "port": server.port,
            "database_name": name,
            "role": role,
        }
        if shard is not None:
            entry["shard"] = shard
        entries.append(entry)
    return entries


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string for everything we write.
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _as_dict(item: Any) -> dict[str, Any]:
    """Accept a plain dict or a config.model dataclass; None values are left out."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        item = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}
    return {key: value for key, value in dict(item).items() if value is not None}


def _table(header: str, values: Mapping[str, Any]) -> str:
    lines = [header]
    lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None)
    return "\n".join(lines) + "\n"


def render_config(
    general: Mapping[str, Any],
    users: Iterable[Any],
    databases: Iterable[Any],
    jwt: Mapping[str, Any] | None = None,
    extra_toml: str = "",
) -> str:
    """A shardgate.toml. `extra_toml` is appended as is, so it must start with a table header."""
    parts = [_table("[general]", general)]
    parts.extend(_table("[[users]]", _as_dict(user)) for user in users)
    parts.extend(_table("[[databases]]", _as_dict(database)) for database in databases)
    if jwt is not None:
        parts.append(_table("[jwt]", _as_dict(jwt)))
    if extra_toml:
        parts.append(extra_toml.strip() + "\n")
    return "\n".join(parts)


# -- the proxy process -------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(poll_s)


def wait_for_port(host: str, port: int, timeout_s: float, alive: Any = None) -> bool:
    """Poll until host:port accepts TCP; stops early when `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class ProxyProcess:
    """Shardgate running as `python -m proxy -c <config>` in a subprocess."""

    direct = False

    def __init__(
        self,
        work_dir: Path,
        general: Mapping[str, Any],
        users: Sequence[Any],
        databases: Sequence[Any],
        jwt: Mapping[str, Any] | None = None,
        extra_toml: str = "",
    ) -> None:
        self.work_dir = work_dir
        self.host = "127.0.0.1"
        self.port = _port_of(general["listen"])
        self.admin_port = _port_of(general["admin_listen"])
        self.config_path = work_dir / "shardgate.toml"
        self.stdout_path = work_dir / "proxy.stdout"
        self.stderr_path = work_dir / "proxy.stderr"
        self.general = dict(general)
        self.users = list(users)
        self.databases = list(databases)
        self.jwt = dict(jwt) if jwt is not None else None
        self.extra_toml = extra_toml
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def dsn(self, user: str = "app", password: str | None = "app", dbname: str = "app", **params: Any) -> str:
        return make_dsn(self.host, self.port, user, password, dbname, **params)

    def write_config(
        self,
        general: Mapping[str, Any] | None = None,
        users: Sequence[Any] | None = None,
        databases: Sequence[Any] | None = None,
        jwt: Mapping[str, Any] | None = None,
        extra_toml: str | None = None,
    ) -> Path:
        """Rewrite the config file; given parts replace the current ones (general is merged, ports kept)."""
        if general is not None:
            self.general.update(general)
        self.general["listen"] = f"{self.host}:{self.port}"
        self.general["admin_listen"] = f"{self.host}:{self.admin_port}"
        if users is not None:
            self.users = list(users)
        if databases is not None:
            self.databases = list(databases)
        if jwt is not None:
            self.jwt = dict(jwt)
        if extra_toml is not None:
            self.extra_toml = extra_toml
        text = render_config(self.general, self.users, self.databases, self.jwt, self.extra_toml)
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.config_path)  # atomic: a reload never reads half a file
        return self.config_path

    def start(self, timeout_s: float = PROXY_START_TIMEOUT_S) -> None:
        if self.is_running():
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with self.stdout_path.open("ab") as stdout, self.stderr_path.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "-c", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        if not wait_for_port(self.host, self.port, timeout_s, alive=self.is_running):
            exit_code = self.process.poll()
            self.stop()
            state = (
                f"exited with code {exit_code}"
                if exit_code is not None
                else f"not listening after {timeout_s:.0f}s"
            )
            raise RuntimeError(
                f"shardgate {state} on {self.host}:{self.port} (config {self.config_path})\n"
                f"--- stderr ---\n{self.stderr_text()[-8000:]}"
            )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def reload(self) -> None:
        """SIGHUP: the proxy rereads its config file."""
        if self.process is None:
            raise RuntimeError("proxy is not started")
        self.process.send_signal(signal.SIGHUP)

    def stop(self, timeout_s: float = PROXY_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        return self.process.returncode

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""


class DirectProxy:
    """Stand-in for ProxyProcess under SHARDGATE_TEST_DIRECT=1: connections go straight to the primary."""

    direct = True

    def __init__(self, primary: PgServer) -> None:
        self.host = primary.host
        self.port = primary.port
        self.admin_port: int | None = None
        self.pid: int | None = None
        self.config_path: Path | None = None

    def dsn(self, user: str = "app", password: str | None = "app", dbname: str = "app", **params: Any) -> str:
        return make_dsn(self.host, self.port, user, password, dbname, **params)

    def write_config(self, *args: Any, **kwargs: Any) -> None:
        return None

    def start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def is_running(self) -> bool:
        return True

    def reload(self) -> None:
        return None

    def stop(self, *args: Any, **kwargs: Any) -> int | None:
        return None

    def stderr_text(self) -> str:
        return ""

    def stdout_text(self) -> str:
        return ""


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class ProxyFactory:
    """Starts proxies against a topology and stops them all at close(); usable from any fixture scope."""

    def __init__(self, topology: Topology, work_root: Path) -> None:
        self.topology = topology
        self.work_root = work_root
        self.started: list[ProxyProcess] = []

    def default_databases(self) -> list[dict[str, Any]]:
        assert self.topology.primary is not None
        return database_entries(self.topology.primary, self.topology.replicas)

    def __call__(
        self,
        pool_mode: str = "transaction",
        pool_size: int = 10,
        users: Sequence[Any] | None = None,
        databases: Sequence[Any] | None = None,
        general: Mapping[str, Any] | None = None,
        jwt: Mapping[str, Any] | None = None,
        extra_toml: str = "",
    ) -> ProxyProcess | DirectProxy:
        if direct_mode():
            assert self.topology.primary is not None
            return DirectProxy(self.topology.primary)
        settings: dict[str, Any] = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
        }
        settings.update(general or {})
        work_dir = Path(tempfile.mkdtemp(prefix="proxy-", dir=self.work_root))
        process = ProxyProcess(
            work_dir,
            settings,
            users if users is not None else default_users(),
            databases if databases is not None else self.default_databases(),
            jwt,
            extra_toml,
        )
        self.started.append(process)
        process.start()
        return process

    def close(self) -> None:
        for process in self.started:
            process.stop()
        self.started.clear()


# -- compiled clients ---------------------------------------------------------------------------------

GO_MISSING_MESSAGE = (
    "the pgx client test needs Go and pgx v4: apt-get install golang-go golang-github-jackc-pgx-v4-dev"
)
GOPATH_DIR = Path("/usr/share/gocode")


def build_pgx_client(out_dir: Path) -> Path:
    """Compile tests/clients/pgx offline in GOPATH mode; raises RuntimeError when Go or pgx is missing."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(GO_MISSING_MESSAGE)
    if not (GOPATH_DIR / "src" / "github.com" / "jackc" / "pgx" / "v4").is_dir():
        raise RuntimeError(f"pgx v4 source not found under {GOPATH_DIR}/src; {GO_MISSING_MESSAGE}")
    source_hash = hashlib.sha256((PGX_SOURCE_DIR / "main.go").read_bytes()).hexdigest()[:16]
    binary = out_dir / f"pgx-client-{source_hash}"
    if binary.exists():
        return binary
    # A per-user build cache in the temp dir makes rebuilds in later sessions take a second.
    cache_dir = Path(tempfile.gettempdir()) / f"shardgate-gocache-{os.getuid()}"
    env = dict(os.environ)
    env.update(GOPATH=str(GOPATH_DIR), GO111MODULE="off", GOFLAGS="", GOCACHE=str(cache_dir), CGO_ENABLED="0")
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=PGX_SOURCE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=GO_BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build of {PGX_SOURCE_DIR} failed:\n{result.stderr}\n{GO_MISSING_MESSAGE}")
    return binary


# -- replication -------------------------------------------------------------------------------------

WAL_TIMEOUT_S = 60.0
RECEIVED = "pg_last_wal_receive_lsn"
REPLAYED = "pg_last_wal_replay_lsn"


def written_lsn(primary: PgServer) -> str:
    """A WAL position covering everything the primary has written so far, flushed so replicas can have it.

    The insert position alone can sit past the flushed WAL for many seconds on an idle server with
    asynchronous commit, and the flushed position can end inside a record a replica cannot replay yet.
    So: the insert position, read in a transaction whose synchronous commit then flushes past it.
    """
    out = primary.psql("SET synchronous_commit = on; SELECT txid_current(); SELECT pg_current_wal_insert_lsn()")
    return out.splitlines()[-1]


def wait_wal(primary: PgServer, replicas: Iterable[PgServer], function: str = REPLAYED,
             timeout_s: float = WAL_TIMEOUT_S) -> None:
    """Wait until each replica's `function()` (RECEIVED or REPLAYED) reaches what the primary has written."""
    target = written_lsn(primary)
    deadline = time.monotonic() + timeout_s
    for replica in replicas:
        while replica.psql(f"SELECT {function}() >= '{target}'::pg_lsn") != "t":
            assert time.monotonic() < deadline, f"{replica.name}: {function} did not reach {target}"
            time.sleep(0.05)


# -- a raw PostgreSQL frontend over a socket, for the exact bytes of faults ---------------------------

RAW_READ_TIMEOUT_S = 5.0


def message(type_code: bytes, body: bytes = b"") -> bytes:
    """One frontend message: type byte, length (itself included), body."""
    return type_code + struct.pack("!I", len(body) + 4) + body

# trust on the proxy and on PostgreSQL: a raw client needs no authentication code.
RAW_USER = "trustuser"


class RawClient:
    """A PostgreSQL frontend over a plain socket, just enough to log in, query and watch faults."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=RAW_READ_TIMEOUT_S)
        self.buffer = bytearray()
        self.closed_by_peer = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_startup(self, user: str = RAW_USER, database: str = "app", protocol: int = PROTOCOL_V3,
                     extra: dict[str, str] | None = None) -> None:
        body = struct.pack("!i", protocol)
        body += b"".join(
            key.encode() + b"\x00" + value.encode() + b"\x00"
            for key, value in {"user": user, "database": database, **(extra or {})}.items()
        )
        body += b"\x00"
        self.send(struct.pack("!i", len(body) + 4) + body)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False once the peer closed (EOF or reset) or the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            self.closed_by_peer = True
            return False
        except TimeoutError:
            return False
        if not chunk:
            self.closed_by_peer = True
            return False
        self.buffer += chunk
        return True

    def read_message(self, timeout_s: float = RAW_READ_TIMEOUT_S) -> tuple[bytes, bytes] | None:
        """One backend message (type, body), or None when the connection closed or nothing came."""
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack_from("!I", self.buffer, 1)[0]
                if len(self.buffer) >= 1 + length:
                    type_code = bytes(self.buffer[:1])
                    body = bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return type_code, body
            if not self._fill(deadline):
                return None

    def read_until_closed(self, timeout_s: float = RAW_READ_TIMEOUT_S) -> list[tuple[bytes, bytes]]:
        """Every message until the peer closes; the caller checks `closed_by_peer`."""
        deadline = time.monotonic() + timeout_s
        messages = []
        while time.monotonic() < deadline:
            message = self.read_message(deadline - time.monotonic())
            if message is None:
                break
            messages.append(message)
        return messages

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        messages: list[tuple[bytes, bytes]] = []
        for _ in range(10_000):
            message = self.read_message()
            if message is None:
                raise AssertionError(f"connection closed or silent before ReadyForQuery: {messages}")
            messages.append(message)
            if message[0] == b"Z":
                return messages
        raise AssertionError("no ReadyForQuery in 10,000 messages")

    def login(self, user: str = RAW_USER) -> dict[str, str]:
        """Startup as a trust user; returns the ParameterStatus values."""
        self.send_startup(user)
        messages = self.read_until_ready()
        errors = [error_fields(body) for code, body in messages if code == b"E"]
        assert not errors, errors
        assert (b"R", struct.pack("!i", 0)) in messages  # AuthenticationOk
        assert any(code == b"K" for code, _ in messages)  # BackendKeyData
        return dict(_parameter(body) for code, body in messages if code == b"S")

    def query_status(self, sql: str) -> bytes:
        """Run a simple query; returns the transaction status of its ReadyForQuery (b"I", b"T", b"E")."""
        self.send(message(b"Q", sql.encode() + b"\x00"))
        return self.read_until_ready()[-1][1]

    def simple_query(self, sql: str) -> list[list[str | None]]:
        """Rows of a simple query as text; raises AssertionError on an ErrorResponse."""
        self.send(message(b"Q", sql.encode() + b"\x00"))
        rows = []
        for code, body in self.read_until_ready():
            if code == b"E":
                raise AssertionError(f"query {sql!r} failed: {error_fields(body)}")
            if code == b"D":
                rows.append(data_row(body))
        return rows


def _parameter(body: bytes) -> tuple[str, str]:
    name, value, _ = body.split(b"\x00", 2)
    return name.decode(), value.decode()


def data_row(body: bytes) -> list[str | None]:
    count = struct.unpack_from("!h", body, 0)[0]
    offset = 2
    values: list[str | None] = []
    for _ in range(count):
        length = struct.unpack_from("!i", body, offset)[0]
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[offset : offset + length].decode())
            offset += length
    return values


# -- fault injection: a server connection that dies with a request unanswered --------------------------

FORWARD_CHUNK_BYTES = 65536


class CuttingForwarder:
    """A TCP forwarder on loopback in front of a real server. Once armed with `cut_on(marker)`, the first
    connection that carries `marker` toward the server is closed on both sides instead (the bytes are not
    forwarded): to the proxy, its server died before answering. Every other byte passes untouched."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self.marker: bytes | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_on(self, marker: bytes) -> None:
        with self.lock:
            self.marker = marker

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                downstream.close()
                continue
            with self.lock:
                self.sockets += [downstream, upstream]  # closed by `close` (or by a pump, at its end)
            pair = (downstream, upstream)
            threading.Thread(target=self._pump, args=(downstream, upstream, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, pair, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, pair: tuple[socket.socket, socket.socket],
              toward_server: bool) -> None:
        try:
            while chunk := source.recv(FORWARD_CHUNK_BYTES):
                if toward_server:
                    with self.lock:
                        cut = self.marker is not None and self.marker in chunk
                        if cut:
                            self.marker = None
                            self.cuts += 1
                    if cut:
                        break
                target.sendall(chunk)
        except OSError:
            pass
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        """Stop accepting and end every connection (shutdown wakes the pumps blocked in recv; a bare close
        from another thread would leave the connection open until they return)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
