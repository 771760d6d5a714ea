"""Throwaway local PostgreSQL servers (a primary, streaming replicas, extra shard primaries).

Used by `shardgate quickstart` and by the test harness. Plain subprocess management, no asyncio:
every wait is bounded and every failure names the server's log file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from localpg.binaries import BinariesNotFound, find_pg_bin
from proxy.protocol.sqltext import quote_ident, quote_literal

PG_OS_USER = "postgres"
SUPERUSER = "postgres"
HBA_METHODS = ("scram-sha-256", "md5", "password", "trust")
LOCALHOST = "127.0.0.1"

COMMAND_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
PSQL_TIMEOUT_S = 60.0
STREAMING_TIMEOUT_S = 60.0
PROMOTE_TIMEOUT_S = 60.0
KILL_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 30

# Tuned for throwaway servers: fast, not durable.
BASE_SETTINGS: dict[str, str | int | bool] = {
    "listen_addresses": LOCALHOST,
    "max_connections": 300,
    "max_prepared_transactions": 50,
    "shared_buffers": "32MB",
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "hot_standby": True,
    "hot_standby_feedback": True,
    "wal_receiver_status_interval": "1s",
    "lc_messages": "C",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_min_messages": "warning",
}


class TopologyError(RuntimeError):
    """A local PostgreSQL server could not be created, started, stopped or queried."""


@dataclass(frozen=True, slots=True)
class UserSpec:
    """A role on every server; `method` picks its pg_hba line for host 127.0.0.1/32."""

    name: str
    password: str | None
    method: str = "scram-sha-256"
    superuser: bool = False

    def __post_init__(self) -> None:
        if self.method not in HBA_METHODS:
            raise ValueError(f"user {self.name!r}: method must be one of {', '.join(HBA_METHODS)}")
        if self.method != "trust" and not self.password:
            raise ValueError(f"user {self.name!r}: method {self.method} needs a password")


DEFAULT_USERS: tuple[UserSpec, ...] = (
    UserSpec(SUPERUSER, "postgres", "scram-sha-256", superuser=True),
    UserSpec("app", "app", "scram-sha-256"),
    UserSpec("md5user", "md5pw", "md5"),
    UserSpec("plainuser", "plainpw", "password"),
    UserSpec("trustuser", None, "trust"),
)


_ports_handed_out: set[int] = set()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nothing listens on now, never the same one twice in this process."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise TopologyError(f"no free TCP port found on {host}")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus libpq/server variables that would override our explicit arguments."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra)
    return env


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    """Quote a value for a libpq keyword/value connection string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat[stat.rindex(")") + 2] != "Z"


def _child_pids(parent_pid: int) -> list[int]:
    children = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(parent_pid):
            children.append(int(stat_path.parent.name))
    return children


class PgServer:
    """One local PostgreSQL server (primary or streaming replica) listening on 127.0.0.1:port."""

    def __init__(
        self,
        name: str,
        datadir: Path,
        port: int,
        role: str,
        bin_dir: Path,
        passwords: dict[str, str | None],
        host: str = LOCALHOST,
    ) -> None:
        self.name = name
        self.datadir = datadir
        self.host = host
        self.port = port
        self.role = role
        self.bin_dir = bin_dir
        self.passwords = passwords

    def __repr__(self) -> str:
        return f"PgServer(name={self.name!r}, role={self.role!r}, port={self.port}, datadir={str(self.datadir)!r})"

    @property
    def socket_dir(self) -> Path:
        return self.datadir.parent

    @property
    def logfile(self) -> Path:
        return self.datadir / "server.log"

    def dsn(self, user: str = "app", password: str | None = None, dbname: str = "app") -> str:
        """A libpq keyword/value connection string for this server over TCP."""
        secret = password if password is not None else self.passwords.get(user)
        parts = [f"host={self.host}", f"port={self.port}", f"user={user}", f"dbname={dbname}"]
        if secret:
            parts.append("password=" + _conninfo_value(secret))
        return " ".join(parts)

    # -- process control -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        if self.is_running():
            return
        self._remove_stale_lock_files()
        self._pg_ctl(["start", "-l", str(self.logfile), "-t", str(START_TIMEOUT_S)], "start")
        self.role = "replica" if (self.datadir / "standby.signal").exists() else "primary"

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster (`smart`, `fast` or `immediate`); kill it if it will not stop."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if not self.is_running():
            return
        try:
            self._pg_ctl(["stop", "-m", mode, "-t", str(STOP_TIMEOUT_S)], "stop")
        except TopologyError:
            if self.is_running():
                self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster, as in a crash; waits until it and its children are gone."""
        pid = self.postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        children = _child_pids(pid)
        os.kill(pid, signal.SIGKILL)
        # Backends notice the postmaster's death and exit; a restart needs them gone
        # because they still hold the shared memory segment.
        deadline = time.monotonic() + KILL_TIMEOUT_S
        pending = [pid, *children]
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if _pid_alive(p)]
            if pending:
                time.sleep(0.05)
        for leftover in pending:
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def promote(self) -> None:
        """Promote a replica to primary and wait until it leaves recovery."""
        self._pg_ctl(["promote", "-t", str(PROMOTE_TIMEOUT_S)], "promote")
        deadline = time.monotonic() + PROMOTE_TIMEOUT_S
        while self.psql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise self._error(f"still in recovery {PROMOTE_TIMEOUT_S:.0f}s after promote")
            time.sleep(0.1)
        self.role = "primary"

    def postmaster_pid(self) -> int | None:
        try:
            first_line = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first_line) if first_line.strip().isdigit() else None

    def _remove_stale_lock_files(self) -> None:
        # A killed postmaster can linger for seconds as an unreaped zombie (PID 1 reaps it),
        # which PostgreSQL's lock-file check (kill(pid, 0)) takes for a live server.
        for lock_file in (self.datadir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock"):
            try:
                first_line = lock_file.read_text().split("\n", 1)[0].strip()
            except OSError:
                continue
            if first_line.lstrip("-").isdigit() and not _pid_alive(abs(int(first_line))):
                lock_file.unlink(missing_ok=True)

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _pid_alive(pid)

    # -- queries ---------------------------------------------------------------------------------

    def psql(
        self,
        sql: str,
        user: str = SUPERUSER,
        db: str = "postgres",
        password: str | None = None,
        timeout_s: float = PSQL_TIMEOUT_S,
    ) -> str:
        """Run `sql` with psql -X -At over TCP; returns stdout without the final newline."""
        secret = password if password is not None else self.passwords.get(user)
        env = _clean_env(PGCONNECT_TIMEOUT="10")
        if secret:
            env["PGPASSWORD"] = secret
        command = [
            str(self.bin_dir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", user, "-d", db, "-c", sql,
        ]  # fmt: skip
        return self._run_psql(command, env, timeout_s)

    def _psql_local(self, sql: str, db: str = "postgres") -> str:
        """psql as the bootstrap superuser over the unix socket (trust), before passwords exist."""
        command = [
            str(self.bin_dir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", db, "-c", sql,
        ]  # fmt: skip
        return self._run_psql(command, _clean_env(), PSQL_TIMEOUT_S)

    def _run_psql(self, command: list[str], env: dict[str, str], timeout_s: float) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise self._error(f"psql timed out after {timeout_s:.0f}s: {command[-1][:200]}")
        if result.returncode != 0:
            raise self._error(f"psql failed: {result.stderr.strip()} (sql: {command[-1][:200]})")
        return result.stdout.removesuffix("\n")

    # -- helpers ---------------------------------------------------------------------------------

    def _pg_ctl(self, args: list[str], action: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-w", *args]
        result = _run_as_postgres(command, cwd=self.socket_dir, timeout_s=COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise self._error(f"pg_ctl {action} failed (exit {result.returncode}): {output}")

    def _error(self, message: str) -> TopologyError:
        return TopologyError(
            f"{self.name} (port {self.port}): {message}; log file {self.logfile}{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return ("\n--- last lines of the log ---\n" + "\n".join(lines)) if lines else ""


def _run_as_postgres(
    command: Sequence[str], cwd: Path, timeout_s: float = COMMAND_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a server tool, as the postgres OS user when we are root (initdb and postgres refuse root)."""
    full = list(command)
    if _running_as_root():
        full = ["runuser", "-u", PG_OS_USER, "--", *full]
    try:
        # Output goes to files, not pipes: a postmaster started by pg_ctl must not hold our pipe open.
        with open(os.devnull, "rb") as stdin:
            result = subprocess.run(
                full,
                stdin=stdin,
                capture_output=True,
                text=True,
                cwd=cwd,
                env=env if env is not None else _clean_env(),
                timeout=timeout_s,
            )
    except subprocess.TimeoutExpired:
        raise TopologyError(f"{' '.join(command[:2])} timed out after {timeout_s:.0f}s")
    return result


def _chown_to_postgres(path: Path) -> None:
    if _running_as_root():
        shutil.chown(path, user=PG_OS_USER, group=None)


def _check_postgres_can_write(path: Path) -> None:
    if not _running_as_root():
        return
    try:
        import pwd

        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise TopologyError(
            f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL as; "
            "install the postgresql package or create the user"
        )
    result = _run_as_postgres(["test", "-w", str(path), "-a", "-x", str(path)], cwd=Path("/"), timeout_s=10)
    if result.returncode != 0:
        raise TopologyError(
            f"the {PG_OS_USER} OS user cannot write to {path}: a parent directory is not searchable "
            "by other users; use a base directory under /tmp"
        )


def _hba_lines(users: Iterable[UserSpec]) -> str:
    lines = [
        "# Written by shardgate topology: one line per user for 127.0.0.1/32.",
        f"local   all          {SUPERUSER}  trust",
        f"local   replication  {SUPERUSER}  trust",
        f"host    replication  {SUPERUSER}  127.0.0.1/32  scram-sha-256",
    ]
    lines.extend(f"host    all          {user.name}  127.0.0.1/32  {user.method}" for user in users)
    return "\n".join(lines) + "\n"


def _settings_text(settings: dict[str, str | int | float | bool]) -> str:
    body = "\n".join(f"{key} = {_conf_value(value)}" for key, value in settings.items())
    return f"\n# --- shardgate topology ---\n{body}\n"


class Topology:
    """A primary, its streaming replicas and any extra independent primaries under one directory."""

    def __init__(
        self,
        base_dir: Path,
        bin_dir: Path,
        users: Sequence[UserSpec],
        databases: Sequence[str],
        extra_conf: dict[str, str | int | float | bool],
        db_owner: str,
    ) -> None:
        self.base_dir = base_dir
        self.bin_dir = bin_dir
        self.users = tuple(users)
        self.databases = tuple(databases)
        self.extra_conf = dict(extra_conf)
        self.db_owner = db_owner
        self.passwords: dict[str, str | None] = {user.name: user.password for user in self.users}
        self.servers: list[PgServer] = []
        self.primary: PgServer | None = None
        self.replicas: list[PgServer] = []

    @classmethod
    def create(
        cls,
        base_dir: Path,
        replicas: int = 1,
        users: Sequence[UserSpec] | None = None,
        databases: Sequence[str] = ("app",),
        extra_conf: dict[str, str | int | float | bool] | None = None,
        db_owner: str | None = None,
    ) -> Topology:
        """Create and start a primary with `replicas` streaming replicas; returns once all stream."""
        chosen = list(users) if users is not None else list(DEFAULT_USERS)
        if SUPERUSER not in {user.name for user in chosen}:
            chosen.insert(0, DEFAULT_USERS[0])
        names = [user.name for user in chosen]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate user names in {names}")
        owner = db_owner or ("app" if "app" in names else SUPERUSER)
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_postgres(base_dir)
        _check_postgres_can_write(base_dir)
        try:
            bin_dir = find_pg_bin()
        except BinariesNotFound as exc:
            raise TopologyError(str(exc)) from None
        topology = cls(base_dir, bin_dir, chosen, databases, extra_conf or {}, owner)
        try:
            topology.primary = topology.add_server("primary")
            for index in range(1, replicas + 1):
                topology.add_replica(f"replica{index}")
        except BaseException:
            try:
                topology.stop_all()
            except Exception:
                pass  # the original failure is the one worth reporting
            raise
        return topology

    def add_server(self, name: str | None = None) -> PgServer:
        """Start an extra independent primary (e.g. a shard) with the same users and databases."""
        name = name or f"server{len(self.servers) + 1}"
        server = self._new_server(name, "primary")
        self._initdb(server)
        server.start()
        self._bootstrap_roles(server)
        return server

    def add_replica(self, name: str | None = None, primary: PgServer | None = None) -> PgServer:
        """Clone `primary` (default: the topology's) with pg_basebackup and start it streaming."""
        source = primary or self.primary
        if source is None:
            raise TopologyError("add_replica needs a running primary")
        name = name or f"replica{len(self.replicas) + 1}"
        slot = re.sub(r"[^a-z0-9_]", "_", name.lower())
        source.psql(f"SELECT pg_create_physical_replication_slot({quote_literal(slot)})")
        server = self._new_server(name, "replica")
        conninfo = (
            f"host={source.host} port={source.port} user={SUPERUSER} "
            f"password={_conninfo_value(self.passwords[SUPERUSER] or '')} application_name={slot}"
        )
        command = [
            str(self.bin_dir / "pg_basebackup"), "-D", str(server.datadir), "-R", "-X", "stream",
            "-S", slot, "-c", "fast", "--no-sync", "-d", conninfo,
        ]  # fmt: skip
        result = _run_as_postgres(command, cwd=server.socket_dir)
        if result.returncode != 0:
            raise TopologyError(
                f"pg_basebackup of {source.name} for {name} failed: {result.stderr.strip()}; "
                f"primary log file {source.logfile}"
            )
        # The clone carries the primary's log, port and socket directory: give it its own.
        server.logfile.unlink(missing_ok=True)
        with (server.datadir / "postgresql.conf").open("a") as conf:
            conf.write(_settings_text(self._own_settings(server)))
        server.start()
        self.replicas.append(server)
        self._wait_streaming(source, server, slot)
        return server

    def drop_replica(self, server: PgServer, primary: PgServer | None = None) -> None:
        """Stop a replica `add_replica` made and forget it (and its slot on `primary`, default the topology's),
        so what runs after sees the topology as it was."""
        server.stop()
        if server in self.replicas:
            self.replicas.remove(server)
        source = primary or self.primary
        if source is not None:
            slot = re.sub(r"[^a-z0-9_]", "_", server.name.lower())
            source.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        f"WHERE slot_name = {quote_literal(slot)}")

    def stop_all(self, mode: str = "fast") -> None:
        """Stop every server, replicas first; keeps going past failures and reports the first."""
        first_error: Exception | None = None
        for server in sorted(self.servers, key=lambda s: s.role != "replica"):
            try:
                server.stop(mode)
            except Exception as error:
                first_error = first_error or error
                server.kill()
        if first_error is not None:
            raise first_error

    def remove(self) -> None:
        """Stop everything and delete the servers' directories (and base_dir if left empty)."""
        try:
            self.stop_all()
        finally:
            for server in self.servers:
                shutil.rmtree(server.socket_dir, ignore_errors=True)
            try:
                self.base_dir.rmdir()
            except OSError:
                pass

    # -- internals -------------------------------------------------------------------------------

    def _new_server(self, name: str, role: str) -> PgServer:
        if any(server.name == name for server in self.servers):
            raise ValueError(f"a server named {name!r} already exists")
        server_dir = self.base_dir / name
        if server_dir.exists():
            raise TopologyError(f"{server_dir} already exists: remove it or choose another base directory")
        server_dir.mkdir()
        _chown_to_postgres(server_dir)
        server = PgServer(name, server_dir / "data", free_port(), role, self.bin_dir, self.passwords)
        self.servers.append(server)
        return server

    def _own_settings(self, server: PgServer) -> dict[str, str | int | float | bool]:
        return {
            "port": server.port,
            "unix_socket_directories": str(server.socket_dir),
            "cluster_name": server.name,
        }

    def _initdb(self, server: PgServer) -> None:
        command = [
            str(self.bin_dir / "initdb"), "-D", str(server.datadir), "-U", SUPERUSER,
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
        ]  # fmt: skip
        result = _run_as_postgres(command, cwd=server.socket_dir)
        if result.returncode != 0:
            raise TopologyError(
                f"initdb for {server.name} in {server.datadir} failed: {result.stderr.strip()}"
            )
        settings = {**BASE_SETTINGS, **self.extra_conf, **self._own_settings(server)}
        with (server.datadir / "postgresql.conf").open("a") as conf:
            conf.write(_settings_text(settings))
        with (server.datadir / "pg_hba.conf").open("w") as hba:
            hba.write(_hba_lines(self.users))

    def _bootstrap_roles(self, server: PgServer) -> None:
        statements = []
        for user in self.users:
            attributes = "LOGIN SUPERUSER" if user.superuser else "LOGIN CREATEDB"
            if user.name == SUPERUSER:
                statements.append("SET password_encryption = 'scram-sha-256'")
                statements.append(
                    f"ALTER ROLE {quote_ident(user.name)} PASSWORD {quote_literal(user.password or '')}"
                )
                continue
            encryption = "md5" if user.method == "md5" else "scram-sha-256"
            password = f"PASSWORD {quote_literal(user.password)}" if user.password else "PASSWORD NULL"
            statements.append(f"SET password_encryption = {quote_literal(encryption)}")
            statements.append(f"CREATE ROLE {quote_ident(user.name)} {attributes} {password}")
        server._psql_local("; ".join(statements))
        # CREATE DATABASE cannot run inside the implicit transaction of a multi-statement -c.
        for database in self.databases:
            server._psql_local(
                f"CREATE DATABASE {quote_ident(database)} OWNER {quote_ident(self.db_owner)}"
            )

    def _wait_streaming(self, primary: PgServer, replica: PgServer, slot: str) -> None:
        query = (
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid "
            f"WHERE s.slot_name = {quote_literal(slot)} AND r.state = 'streaming'"
        )
        deadline = time.monotonic() + STREAMING_TIMEOUT_S
        while primary.psql(query) != "1":
            if not replica.is_running():
                raise replica._error("replica exited before it started streaming")
            if time.monotonic() > deadline:
                raise replica._error(
                    f"not streaming from {primary.name} after {STREAMING_TIMEOUT_S:.0f}s "
                    f"(primary log file {primary.logfile})"
                )
            time.sleep(0.05)
