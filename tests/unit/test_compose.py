"""docker-compose.test.yml: the services a Docker user gets (primary, replica, a second shard, Shardgate, a
test runner), wired to each other as the config Shardgate mounts says, and that config is valid."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from config.loader import check, load

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE = ROOT / "docker-compose.test.yml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def test_the_services_a_docker_user_gets() -> None:
    services = _compose()["services"]
    assert {"primary", "replica", "shard1", "shardgate", "tests"} <= set(services)
    for name in ("primary", "replica", "shard1"):
        assert services[name]["image"].startswith("postgres:15")
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "pg_basebackup -h primary" in " ".join(services["replica"]["command"])
    assert services["replica"]["depends_on"]["primary"]["condition"] == "service_healthy"
    assert services["tests"]["command"] == ["bash", "tests/run.sh"]
    for name in ("primary", "shard1"):  # two-phase commit needs prepared transactions on every shard
        assert "max_prepared_transactions=50" in services[name]["command"]


def test_shardgate_mounts_a_valid_config_naming_the_compose_servers() -> None:
    services = _compose()["services"]
    shardgate = services["shardgate"]
    command = " ".join(shardgate["command"])
    target = re.search(r"shardgate -c (\S+)", command)
    assert target is not None
    config_path = _mounted(shardgate, target.group(1))
    assert check(str(config_path)) == []
    config = load(str(config_path))
    hosts = {entry.host for entry in config.databases}
    assert hosts == {"primary", "replica", "shard1"}
    assert hosts <= set(shardgate["depends_on"])
    assert config.shard_count("app") == 2
    assert {(e.host, e.role) for e in config.databases if e.shard == 0} == {("primary", "primary"), ("replica", "replica")}
    listen_port = int(config.general.listen.rsplit(":", 1)[1])
    assert any(str(port).endswith(f":{listen_port}") for port in shardgate["ports"])


def test_the_databases_and_users_the_config_needs_are_created_at_first_start() -> None:
    primary = _compose()["services"]["primary"]
    init = _mounted(primary, "/docker-entrypoint-initdb.d/init.sh").read_text()
    config = load(str(ROOT / "tests" / "docker" / "shardgate.toml"))
    for user in config.users:
        assert f"CREATE ROLE {user.backend_user} LOGIN PASSWORD '{user.backend_password}'" in init
    for entry in config.databases:
        assert f"CREATE DATABASE {entry.server_database}" in init
    assert "host replication" in init
