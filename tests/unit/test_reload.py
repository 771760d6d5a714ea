"""App.reload without a socket: what it returns (problems with key paths, restart notes) and what it does to
the runtime's config, clusters and pools (no server is contacted: pools open servers only on checkout)."""

from __future__ import annotations

from pathlib import Path

from config.loader import load
from proxy.app import App

CONFIG = """
[general]
listen = "127.0.0.1:{listen}"
admin_listen = ""
default_pool_size = {size}
healthcheck_interval_ms = 0

[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"
host = "127.0.0.1"
port = {port}
{more}
"""


def _write(path: Path, listen: int = 16432, size: int = 5, port: int = 5432, more: str = "") -> None:
    path.write_text(CONFIG.format(listen=listen, size=size, port=port, more=more))


def _app(path: Path) -> App:
    _write(path)
    return App(load(str(path)))


def test_a_good_file_applies_and_the_listen_address_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "shardgate.toml"
    app = _app(path)
    _write(path, listen=16499, size=7)
    result = app.reload()
    assert result.ok and result.problems == []
    assert result.needs_restart == ['general.listen: "127.0.0.1:16499" needs a restart (running with "127.0.0.1:16432")']
    # the rest applies; the running address stays what the config says
    assert app.runtime.config.general.default_pool_size == 7
    assert app.runtime.config.general.listen == "127.0.0.1:16432"


def test_a_bad_file_is_rejected_with_every_key_path_and_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "shardgate.toml"
    app = _app(path)
    running = app.runtime.config
    path.write_text(CONFIG.format(listen=16432, size=0, port=70000, more="[jwt]\nsecrett = 1\n"))
    result = app.reload()
    assert not result.ok
    assert [problem.split(":")[0] for problem in result.problems] == [
        "general.default_pool_size", "jwt.secrett", "jwt", "databases[0].port"]
    assert app.runtime.config is running


def test_a_moved_database_retires_its_pool_and_resizes_the_others(tmp_path: Path) -> None:
    path = tmp_path / "shardgate.toml"
    app = _app(path)
    runtime = app.runtime
    user = runtime.config.users[0]
    old_pool = runtime.pool_for_server(user, runtime.config.databases[0])
    cluster = runtime.cluster_for("app")
    assert cluster is not None
    replica = '[[databases]]\nname = "app"\nport = 5440\nrole = "replica"\n'
    _write(path, size=3, port=5433, more=replica)
    result = app.reload()
    assert result.ok, result.problems
    assert old_pool.retired == "" and old_pool not in runtime.pools.values()
    assert runtime.cluster_for("app") is cluster  # updated in place: sessions holding it see the new servers
    assert [server.address for server in cluster.servers] == [("127.0.0.1", 5433), ("127.0.0.1", 5440)]
    new_pool = runtime.pool_for_server(user, runtime.config.databases[0])
    assert new_pool.address == ("127.0.0.1", 5433) and new_pool.settings.size == 3

    # the database removed altogether: its clients are told why at their next transaction
    path.write_text(path.read_text().replace('name = "app"\nhost', 'name = "other"\nhost').replace(
        'name = "app"\nport = 5440', 'name = "other"\nport = 5440'))
    result = app.reload()
    assert result.ok, result.problems
    assert runtime.cluster_for("app") is None and cluster.removed and cluster.servers == []
    assert new_pool.retired == 'database "app" was removed from the configuration'
