"""The poolers under test, PgBouncer and Shardgate, as child processes on free loopback ports.

Each one is started from a generated config in a scratch directory, waited for until it accepts
TCP, and stopped (SIGTERM, then SIGKILL) by `stop()`; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCALHOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
PG_OS_USER = "postgres"
PGBOUNCER_PREPARED_SINCE = (1, 21)
PGBOUNCER_PREPARED_STATEMENTS = 200

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 20


class ServiceError(RuntimeError):
    """A pooler could not be started or exited on its own."""


@dataclass(frozen=True, slots=True)
class Login:
    """The one login every target is benchmarked with."""

    user: str
    password: str
    database: str
    auth: str  # scram-sha-256 | md5
    # What the poolers store for the user: the server's SCRAM verifier, or the plain password.
    stored_secret: str


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Settings both poolers get, so they are compared like for like."""

    pool_size: int
    max_client_conn: int = 2000
    # PgBouncer's server_check_delay default (30 s) mirrored by Shardgate's healthcheck_idle_ms.
    healthcheck_idle_ms: int = 30_000


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without libpq variables that would override explicit arguments."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    """Resident set size of a process, kilobytes (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ServiceError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU clock ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time.
    total = sum(fields[:8])
    return total - idle, total


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in PGBOUNCER_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise ServiceError("pgbouncer not found; install it with `apt-get install -y pgbouncer`")


def _pgbouncer_version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.splitlines()[0].strip() if result.stdout else "PgBouncer (unknown version)"


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(text)


class Service:
    """A pooler child process: start, wait until it listens, measure, stop."""

    label = "service"

    def __init__(self, work_dir: Path, port: int) -> None:
        self.work_dir = work_dir
        self.host = LOCALHOST
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        # stdout and stderr together; PgBouncer and Shardgate both log to stderr.
        self.log_path = work_dir / f"{re.sub(r'[^a-z0-9]+', '-', self.label.lower()).strip('-')}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServiceError(f"{self.label} is not running")
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_options(self) -> dict[str, object]:
        return {}

    def child_env(self) -> dict[str, str]:
        return clean_env()

    def start(self) -> None:
        with open(self.log_path, "ab") as log, open(os.devnull, "rb") as stdin:
            self.process = subprocess.Popen(
                self.command(), stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                env=self.child_env(), **self.popen_options(),  # type: ignore[call-overload]
            )  # fmt: skip
        if not _wait_for_port(self.port, START_TIMEOUT_S, self.process):
            code = self.process.poll()
            self.stop()
            state = (
                f"exited with code {code}"
                if code is not None
                else f"not listening after {START_TIMEOUT_S:.0f}s"
            )
            raise ServiceError(f"{self.label} {state}; log {self.log_path}:\n{_tail(self.log_path)}")

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ServiceError(
                f"{self.label} exited (code {code}); log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


class PgBouncer(Service):
    """PgBouncer in transaction mode, unix sockets off, run as the postgres OS user when we are root."""

    label = "PgBouncer"

    def __init__(
        self, work_dir: Path, port: int, server_port: int, login: Login, settings: PoolSettings
    ) -> None:
        super().__init__(work_dir, port)
        self.binary = find_pgbouncer()
        self.version = _pgbouncer_version(self.binary)
        prepared = (
            f"max_prepared_statements = {PGBOUNCER_PREPARED_STATEMENTS}\n" if self.supports_prepared else ""
        )
        self.config_path = work_dir / "pgbouncer.ini"
        userlist = work_dir / "userlist.txt"
        userlist.write_text(f'"{login.user}" "{login.stored_secret}"\n')
        userlist.chmod(0o600)
        self.config_path.write_text(
            "[databases]\n"
            f"{login.database} = host={LOCALHOST} port={server_port} dbname={login.database}\n\n"
            "[pgbouncer]\n"
            f"listen_addr = {LOCALHOST}\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            f"auth_type = {login.auth}\n"
            f"auth_file = {userlist}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {settings.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {settings.max_client_conn}\n"
            f"server_check_delay = {settings.healthcheck_idle_ms // 1000}\n"
            # Shardgate logs nothing per connection either.
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "log_pooler_errors = 1\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"{prepared}"
        )
        if _running_as_root():
            # PgBouncer refuses to run as root.
            for path in (work_dir, userlist, self.config_path):
                shutil.chown(path, user=PG_OS_USER, group=PG_OS_USER)

    def command(self) -> list[str]:
        return [self.binary, str(self.config_path)]

    def popen_options(self) -> dict[str, object]:
        # Switch user directly (not through runuser) so that our child is PgBouncer itself.
        if _running_as_root():
            return {"user": PG_OS_USER, "group": PG_OS_USER, "extra_groups": []}
        return {}

    @property
    def supports_prepared(self) -> bool:
        """Protocol-level prepared statements in transaction mode arrived in PgBouncer 1.21."""
        return self.version_tuple >= PGBOUNCER_PREPARED_SINCE

    @property
    def version_tuple(self) -> tuple[int, ...]:
        match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", self.version)
        return tuple(int(part) for part in match.groups() if part is not None) if match else (0,)


class Shardgate(Service):
    """Shardgate (`python -m proxy -c shardgate.toml`) in transaction mode, admin listener off.

    `source_tree` runs the proxy from another checkout (a worktree of an older revision): cwd and
    PYTHONPATH point there, so it imports that tree's code rather than the current checkout's.
    """

    label = "Shardgate"

    def __init__(
        self, work_dir: Path, port: int, server_port: int, login: Login, settings: PoolSettings,
        server_password: str, log_level: str = "info", source_tree: Path | None = None,
        label: str | None = None,
    ) -> None:  # fmt: skip
        if label is not None:
            self.label = label
        super().__init__(work_dir, port)
        self.source_tree = (source_tree or REPO_ROOT).resolve()
        self.config_path = work_dir / "shardgate.toml"
        self.config_path.write_text(
            "[general]\n"
            f"listen = {_toml(f'{LOCALHOST}:{port}')}\n"
            'admin_listen = ""\n'
            'pool_mode = "transaction"\n'
            f"default_pool_size = {settings.pool_size}\n"
            "min_pool_size = 0\n"
            f"max_client_connections = {settings.max_client_conn}\n"
            f"healthcheck_idle_ms = {settings.healthcheck_idle_ms}\n"
            f"log_level = {_toml(log_level)}\n\n"
            "[[users]]\n"
            f"name = {_toml(login.user)}\n"
            f"password = {_toml(login.stored_secret)}\n"
            f"auth = {_toml(login.auth)}\n"
            f"server_user = {_toml(login.user)}\n"
            f"server_password = {_toml(server_password)}\n\n"
            "[[databases]]\n"
            f"name = {_toml(login.database)}\n"
            f"host = {_toml(LOCALHOST)}\n"
            f"port = {server_port}\n"
            f"database_name = {_toml(login.database)}\n"
            'role = "primary"\n'
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "proxy", "-c", str(self.config_path)]

    def popen_options(self) -> dict[str, object]:
        return {"cwd": str(self.source_tree)}

    def child_env(self) -> dict[str, str]:
        if self.source_tree == REPO_ROOT.resolve():
            return clean_env()
        return clean_env(PYTHONPATH=str(self.source_tree))

    def start(self) -> None:
        if self.source_tree != REPO_ROOT.resolve():
            self.check_imports_own_tree()
        super().start()

    def check_imports_own_tree(self) -> None:
        """Fail unless Python started like the proxy (same cwd and environment) imports `proxy` and
        `routing` from `source_tree`, not from the editable install of the current checkout."""
        probe = (
            "import pathlib, proxy, routing\n"
            "print(*{pathlib.Path(m.__file__).resolve().parent.parent for m in (proxy, routing)})"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=START_TIMEOUT_S,
            cwd=self.source_tree, env=self.child_env(),
        )  # fmt: skip
        found = result.stdout.strip()
        if result.returncode != 0 or found != str(self.source_tree):
            detail = result.stderr.strip()[-500:] or f"it imports from {found}"
            raise ServiceError(f"{self.label} in {self.source_tree} does not import its own code: {detail}")


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)
