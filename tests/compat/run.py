"""Other people's test suites (pgx v4's own; node-postgres and JDBC smoke tests) directly and through Shardgate.

    PYTHONPATH=. python3 tests/compat/run.py [--modes direct,session,transaction]
                                             [--suites pgx,pgxpool,node-pg,jdbc,pg_regress] [--run REGEX]
                                             [--timeout-s 300] [--regress-dir SRC/src/test/regress]

Starts a throwaway PostgreSQL 15 (localpg) and one proxy per pool mode on loopback, compiles each Go test
package offline from Debian's /usr/share/gocode (node-pg: `npm install pg pg-copy-streams` into a
directory under the system temp dir, once; jdbc: Debian's libpostgresql-jdbc-java jar; pg_regress:
PostgreSQL's own regression suite from a source tree given with --regress-dir, its regress.so built with
PGXS), runs each against every target, bounded, and prints
passed/failed/skipped per target, then the tests that fail through a proxy but not directly. Exit status 1
when a test fails in session mode that passes directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from localpg import PgServer, Topology
from proxy.protocol.sqltext import quote_literal
from tests.harness import (
    GO_BUILD_TIMEOUT_S,
    GO_MISSING_MESSAGE,
    GOPATH_DIR,
    ProxyFactory,
    create_topology,
    database_entries,
    default_users,
    destroy_topology,
    make_dsn,
)

PGX_PACKAGE = "github.com/jackc/pgx/v4"
# Test packages of pgx v4 that compile offline from Debian's GOPATH (stdlib's tests need
# github.com/Masterminds/semver, which Debian does not ship).
SUITES: dict[str, str] = {"pgx": PGX_PACKAGE, "pgxpool": PGX_PACKAGE + "/pgxpool"}
NODE_SUITE = "node-pg"
NODE_SMOKE_SCRIPT = Path(__file__).resolve().parent / "node_pg_smoke.js"
NODE_PACKAGES = ("pg", "pg-copy-streams")
NPM_INSTALL_TIMEOUT_S = 300
JDBC_SUITE = "jdbc"
JDBC_SMOKE_SOURCE = Path(__file__).resolve().parent / "JdbcSmoke.java"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
REGRESS_SUITE = "pg_regress"
REGRESS_DATABASE = "regression"
REGRESS_BUILD_TIMEOUT_S = 300
# The C functions the suite loads besides its own regress.so (contrib/spi, shipped by Debian's server).
REGRESS_SPI_LIBRARIES = ("autoinc", "refint")
# What pg_regress sets on the database it creates; with --use-existing it is up to us.
REGRESS_DATABASE_SETTINGS = {"lc_messages": "C", "lc_monetary": "C", "lc_numeric": "C", "lc_time": "C",
                             "bytea_output": "hex", "timezone_abbreviations": "Default"}  # fmt: skip
REGRESS_LINE = re.compile(r"^(?:test |     )(\S+)\s+\.\.\. (ok|FAILED|failed \(ignored\))")
SUPERUSER_ENTRY = {"name": "postgres", "password": "postgres", "auth": "scram-sha-256",
                   "server_user": "postgres", "server_password": "postgres"}  # fmt: skip
MODES: tuple[str, ...] = ("direct", "session", "transaction")
SUITE_TIMEOUT_S = 300
# Over go test's own timeout: the binary prints the test that hung before it exits.
SUITE_KILL_GRACE_S = 30
# What pgx's CI creates before its tests (ci/setup_test.bash): hstore, and a domain conn_test reads.
SETUP_SQL = "CREATE EXTENSION IF NOT EXISTS hstore; CREATE DOMAIN uint64 AS numeric(20,0);"
# Session mode holds a server per client; pgxpool tests open pools of up to ~20 connections.
PROXY_POOL_SIZE = 60

RESULT_LINE = re.compile(r"^--- (PASS|FAIL|SKIP): (\S+) ")
RUN_LINE = re.compile(r"^=== RUN   (\S+)$")


@dataclasses.dataclass
class SuiteResult:
    """Top-level test outcomes of one `go test` run (subtests are part of their parent's outcome)."""

    passed: set[str] = dataclasses.field(default_factory=set)
    failed: set[str] = dataclasses.field(default_factory=set)
    skipped: set[str] = dataclasses.field(default_factory=set)
    output: str = ""
    exit_code: int | None = None
    duration_s: float = 0.0

    def counts(self) -> str:
        return f"{len(self.passed)}/{len(self.failed)}/{len(self.skipped)}"

    def failure_text(self, test: str, max_chars: int = 3000) -> str:
        """The log lines of `test`: those after its `=== RUN`/`=== CONT` headers up to the next header, and
        its result line (a parallel test's lines are interleaved with others')."""
        kept: list[str] = []
        mine = False
        for line in self.output.splitlines():
            if line.startswith(("=== ", "--- ")):
                mine = line.split()[-1] == test or line.startswith(f"--- FAIL: {test} ")
                if mine and line.startswith("--- FAIL"):
                    kept.append(line)
                continue
            if mine:
                kept.append(line)
        if not kept:  # pg_regress: the test's diff
            start = self.output.find(f"/expected/{test}.out ")
            if start >= 0:
                end = self.output.find("\ndiff -U3 ", start)
                return self.output[start : end if end >= 0 else None][:max_chars]
        return "\n".join(kept)[-max_chars:]


def parse_go_test(output: str) -> SuiteResult:
    """Outcomes from `go test -v` output; a top-level test that started but never reported (a panic, the
    timeout) counts as failed."""
    result = SuiteResult(output=output)
    started: list[str] = []
    for line in output.splitlines():
        if match := RESULT_LINE.match(line):
            outcome, name = match.groups()
            {"PASS": result.passed, "FAIL": result.failed, "SKIP": result.skipped}[outcome].add(name)
        elif (match := RUN_LINE.match(line)) and "/" not in match.group(1):
            started.append(match.group(1))
    reported = result.passed | result.failed | result.skipped
    result.failed.update(name for name in started if name not in reported)
    return result


def _go_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOPATH=str(GOPATH_DIR), GO111MODULE="off", GOFLAGS="", GOCACHE=str(cache_dir), CGO_ENABLED="0",
               GOPROXY="off")  # fmt: skip
    return env


def build_suite(package: str, out_dir: Path) -> Path:
    """`go test -c` of `package` offline in GOPATH mode; raises RuntimeError when Go or pgx is missing."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(GO_MISSING_MESSAGE)
    source_dir = GOPATH_DIR / "src" / package
    if not source_dir.is_dir():
        raise RuntimeError(f"{package} not found under {GOPATH_DIR}/src; {GO_MISSING_MESSAGE}")
    digest = hashlib.sha256(package.encode())
    for path in sorted(source_dir.glob("*.go")):  # a package upgrade gives a new binary
        digest.update(path.name.encode() + str(path.stat().st_mtime_ns).encode())
    binary = out_dir / f"{package.rsplit('/', 1)[-1]}-{digest.hexdigest()[:16]}.test"
    if binary.exists():
        return binary
    cache_dir = Path(tempfile.gettempdir()) / f"shardgate-gocache-{os.getuid()}"
    result = subprocess.run(
        [go, "test", "-c", "-o", str(binary), "."],
        cwd=source_dir,
        env=_go_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=GO_BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"go test -c of {package} failed:\n{result.stderr}\n{GO_MISSING_MESSAGE}")
    return binary


def run_suite(binary: Path, dsn: str, run_regex: str | None = None,
              timeout_s: int = SUITE_TIMEOUT_S) -> SuiteResult:  # fmt: skip
    """Run a compiled pgx test binary against `dsn` (also its pgbouncer tests' target), bounded."""
    env = dict(os.environ)
    env["PGX_TEST_DATABASE"] = dsn
    # pgx's tests of a connection pooler (statement cache in describe mode, simple protocol) run too.
    env["PGX_TEST_PGBOUNCER_CONN_STRING"] = dsn
    command = [str(binary), "-test.v", "-test.count=1", f"-test.timeout={timeout_s}s"]
    if run_regex:
        command.append(f"-test.run={run_regex}")
    return run_command(command, env, binary.parent, timeout_s + SUITE_KILL_GRACE_S)


def install_node_packages(target_dir: Path) -> Path:
    """`npm install` of NODE_PACKAGES into `target_dir` (outside the repository) once; its node_modules."""
    modules = target_dir / "node_modules"
    if all((modules / name / "package.json").is_file() for name in NODE_PACKAGES):
        return modules
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("the node-pg suite needs Node.js and npm: apt-get install nodejs npm")
    target_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(target_dir), *NODE_PACKAGES],
                            capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(NODE_PACKAGES)} failed:\n{result.stderr[-4000:]}")
    return modules


def run_node_smoke(node_modules: Path, dsn: str, timeout_s: int = SUITE_TIMEOUT_S) -> SuiteResult:
    """tests/compat/node_pg_smoke.js against `dsn`, bounded (each of its checks has its own timeout too)."""
    env = dict(os.environ)
    env.update(DATABASE_URL=dsn, NODE_PATH=str(node_modules), NODE_NO_WARNINGS="1")
    node = shutil.which("node") or "node"
    return run_command([node, str(NODE_SMOKE_SCRIPT)], env, NODE_SMOKE_SCRIPT.parent, timeout_s)


def run_jdbc_smoke(dsn: str, timeout_s: int = SUITE_TIMEOUT_S) -> SuiteResult:
    """tests/compat/JdbcSmoke.java (run as a source file) against `dsn`, bounded."""
    java = shutil.which("java")
    if java is None or not JDBC_JAR.is_file():
        raise RuntimeError(f"the jdbc suite needs Java and {JDBC_JAR}: apt-get install default-jdk-headless "
                           "libpostgresql-jdbc-java")  # fmt: skip
    parts = urlsplit(dsn)
    jdbc_url = f"jdbc:postgresql://{parts.hostname}:{parts.port}{parts.path}"
    command = [java, "-cp", str(JDBC_JAR), str(JDBC_SMOKE_SOURCE), jdbc_url,
               unquote(parts.username or ""), unquote(parts.password or "")]  # fmt: skip
    return run_command(command, dict(os.environ), JDBC_SMOKE_SOURCE.parent, timeout_s)


def pg_config_value(option: str) -> str:
    return subprocess.run(["pg_config", option], capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def build_regress_library(regress_dir: Path, out_dir: Path) -> Path:
    """regress.c of the source tree built with PGXS, beside links to the contrib/spi libraries: pg_regress's
    --dlpath. Needs the server headers of the installed PostgreSQL (postgresql-server-dev-15)."""
    lib_dir = out_dir / "regresslib"
    library = lib_dir / "regress.so"
    if library.exists() and library.stat().st_mtime >= (regress_dir / "regress.c").stat().st_mtime:
        return lib_dir
    lib_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(regress_dir / "regress.c", lib_dir / "regress.c")
    (lib_dir / "Makefile").write_text("MODULES = regress\nPGXS := $(shell pg_config --pgxs)\ninclude $(PGXS)\n")
    result = subprocess.run(["make", "-C", str(lib_dir)], capture_output=True, text=True,
                            timeout=REGRESS_BUILD_TIMEOUT_S)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"building regress.so failed (apt-get install postgresql-server-dev-15?):\n"
                           f"{result.stderr[-4000:]}")  # fmt: skip
    pkglib = Path(pg_config_value("--pkglibdir"))
    for name in REGRESS_SPI_LIBRARIES:
        link = lib_dir / f"{name}.so"
        if not link.exists():
            link.symlink_to(pkglib / f"{name}.so")
    return lib_dir


def reset_regress_database(primary: PgServer) -> None:
    """A fresh `regression` database made as pg_regress makes its own (a proxy's pooled servers on the
    old one are ended by FORCE)."""
    settings = "; ".join(f"ALTER DATABASE {REGRESS_DATABASE} SET {name} TO '{value}'"
                         for name, value in REGRESS_DATABASE_SETTINGS.items())  # fmt: skip
    exists = primary.psql(f"SELECT 1 FROM pg_database WHERE datname = '{REGRESS_DATABASE}'") == "1"
    # A transaction a test left prepared (through a pooler, see README) would keep the database.
    gids = primary.psql(f"SELECT gid FROM pg_prepared_xacts WHERE database = '{REGRESS_DATABASE}'")
    for gid in filter(None, gids.splitlines()):
        primary.psql(f"ROLLBACK PREPARED {quote_literal(gid)}", db=REGRESS_DATABASE)
    if exists:
        primary.psql(f"DROP DATABASE {REGRESS_DATABASE} WITH (FORCE)")
    primary.psql(f"CREATE DATABASE {REGRESS_DATABASE} TEMPLATE template0")
    primary.psql(settings)


def run_pg_regress(regress_dir: Path, lib_dir: Path, dsn: str, out_dir: Path,
                   timeout_s: int = SUITE_TIMEOUT_S) -> SuiteResult:  # fmt: skip
    """The parallel schedule against `dsn`'s host and port as the superuser, on an existing database."""
    parts = urlsplit(dsn)
    out_dir.mkdir(parents=True, exist_ok=True)
    for directory in (out_dir.parent, out_dir):
        directory.chmod(0o755)  # the server's OS user reads and writes files under results/
    results = out_dir / "results"
    results.mkdir(exist_ok=True)
    results.chmod(0o777)  # COPY TO a file there runs as the server's OS user
    pg_regress = Path(pg_config_value("--pgxs")).parent.parent / "test" / "regress" / "pg_regress"
    command = [str(pg_regress), f"--inputdir={regress_dir}", f"--outputdir={out_dir}",
               f"--bindir={pg_config_value('--bindir')}", f"--dlpath={lib_dir}", f"--host={parts.hostname}",
               f"--port={parts.port}", "--user=postgres", "--use-existing", f"--dbname={REGRESS_DATABASE}",
               f"--schedule={regress_dir / 'parallel_schedule'}"]  # fmt: skip
    env = dict(os.environ)
    env["PGPASSWORD"] = str(SUPERUSER_ENTRY["password"])
    result = run_command(command, env, out_dir, timeout_s)
    result.passed.clear()
    result.failed.clear()
    for line in result.output.splitlines():
        if match := REGRESS_LINE.match(line):
            name, outcome = match.groups()
            {"ok": result.passed, "FAILED": result.failed}.get(outcome, result.skipped).add(name)
    diffs = out_dir / "regression.diffs"
    if diffs.exists():
        result.output += "\n" + diffs.read_text(errors="replace")
    return result


def run_command(command: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> SuiteResult:
    """Run a suite that reports as `go test -v` does; killed after `timeout_s`."""
    started_s = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=timeout_s)  # fmt: skip
        output, exit_code = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr) + "\n(killed: suite timeout)\n"
        exit_code = None
    result = parse_go_test(output)
    result.exit_code = exit_code
    result.duration_s = time.monotonic() - started_s
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def prepare_database(primary: PgServer) -> None:
    """Create what pgx's tests expect in database `app`, the same for every target."""
    primary.psql(SETUP_SQL, db="app")


@contextmanager
def targets(modes: Sequence[str], topology_out: list[Topology] | None = None) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL and a proxy per pooled mode; yields {mode: connection string}. Each proxy
    also serves the superuser and database `regression` (for pg_regress)."""
    work_root = Path(tempfile.mkdtemp(prefix="shardgate-compat-"))
    topology: Topology = create_topology(replicas=0)
    factory = ProxyFactory(topology, work_root)
    try:
        primary = topology.primary
        assert primary is not None
        prepare_database(primary)
        if topology_out is not None:
            topology_out.append(topology)
        databases = database_entries(primary) + database_entries(primary, name=REGRESS_DATABASE)
        dsns: dict[str, str] = {}
        for mode in modes:
            if mode == "direct":
                dsns[mode] = make_dsn(primary.host, primary.port)
            else:
                proxy = factory(pool_mode=mode, pool_size=PROXY_POOL_SIZE, databases=databases,
                                users=[*default_users(), SUPERUSER_ENTRY])  # fmt: skip
                dsns[mode] = proxy.dsn()
        yield dsns
    finally:
        factory.close()
        destroy_topology(topology)
        shutil.rmtree(work_root, ignore_errors=True)


def regressions(direct: SuiteResult, through: SuiteResult) -> list[str]:
    """Tests that fail through the proxy but pass directly."""
    return sorted(through.failed & direct.passed)


def report(results: dict[str, dict[str, SuiteResult]], modes: Sequence[str]) -> str:
    """The side-by-side table (passed/failed/skipped) and the names of proxy-only failures."""
    lines = ["suite      " + "".join(f"{mode:>16}" for mode in modes) + "   (passed/failed/skipped)"]
    for suite, by_mode in results.items():
        lines.append(f"{suite:<11}" + "".join(f"{by_mode[mode].counts():>16}" for mode in modes))
    for suite, by_mode in results.items():
        if "direct" not in by_mode:
            continue
        for mode in modes:
            if mode == "direct":
                continue
            names = regressions(by_mode["direct"], by_mode[mode])
            if names:
                lines.append(f"{suite} fails in {mode} mode only: {', '.join(names)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: direct,session,transaction")
    every_suite = [*SUITES, NODE_SUITE, JDBC_SUITE, REGRESS_SUITE]
    parser.add_argument("--suites", default=",".join(every_suite), help="comma-separated: " + ",".join(every_suite))
    parser.add_argument("--run", default=None, help="go test -run regex (default: every test)")
    parser.add_argument("--timeout-s", type=int, default=SUITE_TIMEOUT_S, help="per suite and target")
    parser.add_argument("--regress-dir", type=Path, default=None,
                        help="src/test/regress of PostgreSQL's source (apt-get source postgresql-15)")
    parser.add_argument("--show-failures", action="store_true", help="print the output of proxy-only failures")
    args = parser.parse_args(argv)
    modes = [mode for mode in args.modes.split(",") if mode]
    suites = [suite for suite in args.suites.split(",") if suite]
    if REGRESS_SUITE in suites and args.regress_dir is None:
        print("pg_regress: skipped (no --regress-dir)", flush=True)
        suites.remove(REGRESS_SUITE)
    for name in modes:
        if name not in MODES:
            parser.error(f"unknown mode {name!r}")
    for name in suites:
        if name not in every_suite:
            parser.error(f"unknown suite {name!r}")
    build_dir = Path(tempfile.gettempdir()) / f"shardgate-compat-bin-{os.getuid()}"
    build_dir.mkdir(exist_ok=True)
    binaries = {suite: build_suite(SUITES[suite], build_dir) for suite in suites if suite in SUITES}
    node_modules = install_node_packages(build_dir / "node") if NODE_SUITE in suites else None
    regress_lib = build_regress_library(args.regress_dir, build_dir) if REGRESS_SUITE in suites else None
    results: dict[str, dict[str, SuiteResult]] = {suite: {} for suite in suites}
    topologies: list[Topology] = []
    regress_out = Path(tempfile.mkdtemp(prefix="shardgate-compat-regress-"))
    with targets(modes, topologies) as dsns:
        for suite in suites:
            for mode in modes:
                if suite == NODE_SUITE:
                    assert node_modules is not None
                    result = run_node_smoke(node_modules, dsns[mode], args.timeout_s)
                elif suite == JDBC_SUITE:
                    result = run_jdbc_smoke(dsns[mode], args.timeout_s)
                elif suite == REGRESS_SUITE:
                    assert regress_lib is not None and topologies[0].primary is not None
                    reset_regress_database(topologies[0].primary)
                    result = run_pg_regress(args.regress_dir, regress_lib, dsns[mode], regress_out / mode,
                                            args.timeout_s)  # fmt: skip
                else:
                    result = run_suite(binaries[suite], dsns[mode], args.run, args.timeout_s)
                results[suite][mode] = result
                print(f"{suite} {mode}: {result.counts()} in {result.duration_s:.1f}s", flush=True)
    print(report(results, modes))
    if REGRESS_SUITE in suites:
        print(f"pg_regress output and diffs per target: {regress_out}")
    if args.show_failures:
        for suite, by_mode in results.items():
            for mode in modes:
                if mode == "direct" or "direct" not in by_mode:
                    continue
                for name in regressions(by_mode["direct"], by_mode[mode]):
                    print(f"\n== {suite} {mode} {name}\n{by_mode[mode].failure_text(name)}")
    session_broken = any(
        "direct" in by_mode and "session" in by_mode and regressions(by_mode["direct"], by_mode["session"])
        for by_mode in results.values()
    )
    return 1 if session_broken else 0


if __name__ == "__main__":
    sys.exit(main())
