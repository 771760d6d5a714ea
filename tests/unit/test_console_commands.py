"""Admin console command parsing and result encoding (pure logic; the wire is in tests/integration)."""

from __future__ import annotations

import struct

import pytest

from config.loader import ConfigError, parse
from proxy.console import Command, data_rows, parse_command, row_description, split_commands
from proxy.errors import ProxyError
from proxy.views import Table


@pytest.mark.parametrize(("text", "expected"), [
    ("SHOW POOLS", Command("SHOW", "pools")),
    ("show   clients", Command("SHOW", "clients")),
    ("Show Prepared_Transactions", Command("SHOW", "prepared_transactions")),
    ("pause", Command("PAUSE")),
    ("PAUSE app", Command("PAUSE", "app")),
    ('resume "app"', Command("RESUME", "app")),
    ("ban 127.0.0.1:5433", Command("BAN", "127.0.0.1:5433")),
    ("KILL 12", Command("KILL", "12")),
    ("kill_client 12", Command("KILL", "12")),
    ("reload", Command("RELOAD")),
])
def test_commands_are_case_insensitive(text: str, expected: Command) -> None:
    assert parse_command(text) == expected


@pytest.mark.parametrize(("text", "code"), [
    ("SHOW", "42601"), ("SHOW TABLES", "0A000"), ("SELECT 1", "42601"), ("PAUSE a b", "42601"),
    ("RELOAD now", "42601"), ("BAN", "42601"), ("KILL", "42601"),
])
def test_bad_commands_get_their_sqlstate(text: str, code: str) -> None:
    with pytest.raises(ProxyError) as refused:
        parse_command(text)
    assert refused.value.sqlstate == code


def test_trailing_semicolons_and_several_commands() -> None:
    assert split_commands("SHOW POOLS;") == ["SHOW POOLS"]
    assert split_commands(" show pools ; show clients;; ") == ["show pools", "show clients"]
    assert split_commands(" ; ") == []


def test_rows_in_text_and_binary() -> None:
    table = Table(("database", "cl_active", "lag_ms"), [("app", 3, 1.5), ("x", None, 0.0)])
    description = row_description(table.columns, [])
    assert description[:1] == b"T" and struct.unpack_from("!h", description, 5)[0] == 3
    text = data_rows(table, [])
    assert b"\x00\x00\x00\x013" in text and b"1.5" in text and b"\xff\xff\xff\xff" in text
    binary = data_rows(table, [0, 1, 1])
    assert struct.pack("!q", 3) in binary and struct.pack("!d", 1.5) in binary


def _config(general: dict[str, object]) -> dict[str, object]:
    return {"general": general, "users": [{"name": "ops", "password": "x", "auth": "plain"}],
            "databases": [{"name": "app"}]}


def test_admin_keys_are_checked() -> None:
    config = parse(_config({"admin_users": ["ops"], "admin_token": "0123456789abcdef", "admin_jwt_roles": ["ops"]}))
    assert config.general.admin_users == ("ops",)
    with pytest.raises(ConfigError) as unknown:
        parse(_config({"admin_users": ["ops", "ghost"]}))
    assert unknown.value.problems == ['general.admin_users[1]: no [[users]] entry is named "ghost"']
    with pytest.raises(ConfigError) as short:
        parse(_config({"admin_token": "short-secret"}))
    assert short.value.problems[0].startswith("general.admin_token: must be at least 16")
    assert "short-secret" not in str(short.value)
