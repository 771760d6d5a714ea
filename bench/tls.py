"""TLS handshake cost per connection: PostgreSQL direct, PgBouncer and Shardgate, each with and without TLS.

Every target serves the same certificate (ECDSA P-256, made here). pgbench opens a new connection per
transaction (`-C`, one `SELECT 1` each) with sslmode=disable, then sslmode=require; we report connections per
second and, for the poolers, the pooler's CPU time per connection. Each run is bounded (`-T`), loopback only.

    python3 -m bench.tls [--seconds 5] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.services import (
    LOCALHOST,
    Login,
    PgBouncer,
    PoolSettings,
    Service,
    Shardgate,
    cpu_seconds,
    free_port,
)
from localpg import Topology
from tests.harness import create_tls_topology, destroy_topology
from tests.tls_certs import CertificateAuthority

PGBENCH_TIMEOUT_MARGIN_S = 60
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_TPS = re.compile(r"tps = ([\d.]+)")


def _pgbench(port: int, sslmode: str, seconds: int, clients: int, script: Path) -> tuple[int, float]:
    """(connections made, connections per second) of one bounded `pgbench -C` run."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(PGPASSWORD="app", PGSSLMODE=sslmode)
    result = subprocess.run(
        ["pgbench", "-n", "-C", "-f", str(script), "-T", str(seconds), "-c", str(clients), "-j", "2",
         "-h", LOCALHOST, "-p", str(port), "-U", "app", "app"],
        capture_output=True, text=True, env=env, timeout=seconds + PGBENCH_TIMEOUT_MARGIN_S, check=False)
    processed, tps = _PROCESSED.search(result.stdout), _TPS.search(result.stdout)
    if result.returncode != 0 or processed is None or tps is None:
        raise RuntimeError(f"pgbench on port {port} sslmode={sslmode} failed:\n{result.stdout}\n{result.stderr}")
    return int(processed.group(1)), float(tps.group(1))


def _measure(label: str, port: int, pid: int | None, seconds: int, clients: int, script: Path) -> list[str]:
    rows = []
    for sslmode in ("disable", "require"):
        before = cpu_seconds(pid) if pid is not None else 0.0
        count, per_second = _pgbench(port, sslmode, seconds, clients, script)
        cpu_ms = (cpu_seconds(pid) - before) * 1000 / count if pid is not None and count else None
        cpu = f"{cpu_ms:.2f}" if cpu_ms is not None else "n/a"
        rows.append(f"| {label} | {'TLS' if sslmode == 'require' else 'plain'} | {per_second:,.0f} | {cpu} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each pgbench run (default 5)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients (default 4)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="shardgate-bench-tls-"))
    work.chmod(0o755)
    ca = CertificateAuthority.create(work / "ca")
    cert = ca.issue(work / "certs", "localhost", dns=("localhost",), ips=("127.0.0.1",))
    if os.geteuid() == 0:  # PgBouncer runs as the postgres OS user and reads these
        for path in (work / "certs", cert.cert, cert.key):
            shutil.chown(path, user="postgres")
    script = work / "select1.sql"
    script.write_text("SELECT 1;\n")
    topology: Topology | None = None
    services: list[Service] = []
    rows: list[str] = []
    try:
        topology = create_tls_topology(cert.cert, cert.key)
        assert topology.primary is not None
        server_port = topology.primary.port
        login = Login("app", "app", "app", "md5", "app")
        settings = PoolSettings(pool_size=8)
        rows += _measure("PostgreSQL direct", server_port, None, args.seconds, args.clients, script)
        try:
            (work / "pgbouncer").mkdir()
            bouncer = PgBouncer(work / "pgbouncer", free_port(), server_port, login, settings)
            with bouncer.config_path.open("a") as ini:
                ini.write(f"client_tls_sslmode = allow\nclient_tls_cert_file = {cert.cert}\n"
                          f"client_tls_key_file = {cert.key}\nserver_tls_sslmode = prefer\n")
            services.append(bouncer)
            bouncer.start()
            rows += _measure(f"PgBouncer {bouncer.version.split()[-1]}", bouncer.port, bouncer.pid,
                             args.seconds, args.clients, script)
        except Exception as exc:  # PgBouncer missing: the other rows still say something
            print(f"PgBouncer not measured: {exc}", file=sys.stderr)
        (work / "shardgate").mkdir()
        shardgate = Shardgate(work / "shardgate", free_port(), server_port, login, settings, "app",
                              log_level="warning")
        with shardgate.config_path.open("a") as toml:
            toml.write(f'\n[tls]\nmode = "allow"\ncert_file = "{cert.cert}"\nkey_file = "{cert.key}"\n')
        services.append(shardgate)
        shardgate.start()
        rows += _measure("Shardgate", shardgate.port, shardgate.pid, args.seconds, args.clients, script)
    finally:
        for service in services:
            service.stop()
        if topology is not None:
            destroy_topology(topology)
        shutil.rmtree(work, ignore_errors=True)
    print(f"pgbench -C (a new connection per `SELECT 1`), {args.clients} clients, {args.seconds} s per run, "
          "md5 client auth, ECDSA P-256 certificate\n")
    print("| target | client link | connections/s | pooler CPU ms per connection |")
    print("|---|---|--:|--:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
