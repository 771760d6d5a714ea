"""`shardgate quickstart`: a throwaway primary + streaming replica behind the proxy, removed on Ctrl-C."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from config.loader import ConfigError, load

if TYPE_CHECKING:
    from localpg import Topology

QUICKSTART_USER = "app"
QUICKSTART_PASSWORD = "app"
QUICKSTART_DATABASE = "app"


def write_config(path: Path, port: int, pool_mode: str, primary: tuple[str, int],
                 replicas: list[tuple[str, int]]) -> None:
    lines = [
        "# Written by `shardgate quickstart`; removed with the throwaway servers.",
        "[general]",
        f'listen = "127.0.0.1:{port}"',
        'admin_listen = ""',
        f'pool_mode = "{pool_mode}"',
        "default_pool_size = 10",
        "",
        "[[users]]",
        f'name = "{QUICKSTART_USER}"',
        f'password = "{QUICKSTART_PASSWORD}"',
        'auth = "scram-sha-256"',
        "",
        "[[databases]]",
        f'name = "{QUICKSTART_DATABASE}"',
        f'host = "{primary[0]}"',
        f"port = {primary[1]}",
        'role = "primary"',
    ]
    for host, replica_port in replicas:
        lines += ["", "[[databases]]", f'name = "{QUICKSTART_DATABASE}"', f'host = "{host}"',
                  f"port = {replica_port}", 'role = "replica"']
    path.write_text("\n".join(lines) + "\n")


def make_replicas_synchronous(topology: Topology) -> None:
    """Commits wait until the replica has applied them, so a read routed to the replica right after a write
    (another psql, another connection) sees it. Set once the replica streams: earlier it would block the
    primary's own bootstrap."""
    primary = topology.primary
    assert primary is not None
    for statement in ("ALTER SYSTEM SET synchronous_standby_names = '*'",
                      "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
                      "SELECT pg_reload_conf()"):
        primary.psql(statement, user="postgres", db="postgres")


def quickstart(port: int, base_dir: str | None, pool_mode: str) -> int:
    from localpg import Topology, TopologyError
    from proxy.app import serve
    from proxy.process import install_event_loop, setup_logging

    workdir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="shardgate-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # as root the servers run as the postgres OS user, who must reach the data dir
    print(f"starting a throwaway PostgreSQL primary and replica in {workdir} ...", file=sys.stderr)
    topology = None
    try:
        topology = Topology.create(workdir / "pg", replicas=1)
        make_replicas_synchronous(topology)
        config_path = workdir / "shardgate.toml"
        primary = topology.primary
        assert primary is not None
        write_config(config_path, port, pool_mode, (primary.host, primary.port),
                     [(r.host, r.port) for r in topology.replicas])
        config = load(str(config_path))
        setup_logging(config.general.log_level, config.general.log_format)
        install_event_loop()

        psql = "psql" if shutil.which("psql") else str(topology.bin_dir / "psql")

        def announce() -> None:
            print(f"config: {config_path}\nready, connect with:\n"
                  f'  {psql} "postgresql://{QUICKSTART_USER}:{QUICKSTART_PASSWORD}@127.0.0.1:{port}/{QUICKSTART_DATABASE}"\n'
                  "Ctrl-C stops the proxy and removes the servers.", file=sys.stderr, flush=True)

        asyncio.run(serve(config, announce))
        return 0
    except (TopologyError, ConfigError, OSError) as exc:
        print(f"quickstart failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if topology is not None:
            topology.remove()
        if not base_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        print("throwaway servers removed", file=sys.stderr)
