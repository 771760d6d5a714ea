"""Config of databases and users not in the config: the wildcard entry, auth_user, auth_query, auth_dbname."""

from __future__ import annotations

from typing import Any

import pytest

from config.loader import ConfigError, parse
from config.model import DEFAULT_AUTH_QUERY, WILDCARD_DATABASE


def config(general: dict[str, Any] | None = None, databases: list[dict[str, Any]] | None = None,
           users: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "general": general or {},
        "users": users if users is not None else [{"name": "app", "password": "secret"},
                                                  {"name": "lookup", "password": "lookup-pw"}],
        "databases": databases if databases is not None else [{"name": "app"}, {"name": "*", "port": 5433}],
    }


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def test_defaults() -> None:
    general = parse(config()).general
    assert general.auth_user == "" and general.auth_dbname == ""
    assert general.auth_query == DEFAULT_AUTH_QUERY == "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    assert general.auth_query_cache_s == 30.0
    assert general.autodb_idle_timeout_s == 3600.0


def test_the_wildcard_entry() -> None:
    loaded = parse(config(general={"autodb_idle_timeout_s": 5}))
    wildcard = loaded.wildcard()
    assert wildcard is not None and wildcard.name == WILDCARD_DATABASE and wildcard.port == 5433
    assert parse(config(databases=[{"name": "app"}])).wildcard() is None
    assert loaded.general.autodb_idle_timeout_s == 5.0


@pytest.mark.parametrize(("entry", "problem"), [
    ({"database_name": "x"}, 'databases[1].database_name: not allowed on the wildcard database "*"'),
    ({"shard": 1}, 'databases[1].shard: not allowed on the wildcard database "*"'),
    ({"max_connections": 5}, 'databases[1].max_connections: not allowed on the wildcard database "*"'),
    ({"role": "replica"}, 'databases[1].role: the wildcard database "*" has one server, role "primary"'),
    ({"role": "auto"}, 'databases[1].role: the wildcard database "*" has one server, role "primary"'),
])
def test_what_the_wildcard_may_not_have(entry: dict[str, Any], problem: str) -> None:
    found = problems_of(config(databases=[{"name": "app"}, {"name": "*", **entry}]))
    assert any(text.startswith(problem) for text in found), found


def test_one_wildcard_only() -> None:
    found = problems_of(config(databases=[{"name": "*"}, {"name": "*", "port": 5433}]))
    assert any(text.startswith('databases[1].name: only one wildcard database "*" (first in databases[0])')
               for text in found), found


def test_auth_user_is_a_configured_user_with_a_usable_password() -> None:
    assert parse(config(general={"auth_user": "lookup"})).general.auth_user == "lookup"
    assert problems_of(config(general={"auth_user": "ghost"})) == [
        'general.auth_user: no [[users]] entry is named "ghost" (the proxy logs in as it, with its password '
        "from the config, to run auth_query)"]
    verifier = ("SCRAM-SHA-256$4096:c2hhcmRnYXRlLWV4YW1wbA==$4EaxN2llwxL/pFskzbAFwm5ZSYEw6monH3lGWuXQH94=:"
                "Ik6qXM6a0XYSQak/uE6zT0WnEuExJrgxlr/aKH4ZTB4=")
    found = problems_of(config(general={"auth_user": "lookup"},
                               users=[{"name": "lookup", "password": verifier}]))
    assert found == ['general.auth_user: user "lookup" needs a password PostgreSQL accepts (password or '
                     "server_password; a SCRAM verifier cannot log in)"]
    # with a server_password the verifier is only what its own clients are checked against
    parse(config(general={"auth_user": "lookup"},
                 users=[{"name": "lookup", "password": verifier, "server_password": "pw"}]))
    trust = [{"name": "lookup", "auth": "trust"}]
    assert problems_of(config(general={"auth_user": "lookup"}, users=trust))[0].startswith(
        'general.auth_user: user "lookup" needs a password')


def test_auth_query_takes_the_user_as_dollar_one() -> None:
    assert problems_of(config(general={"auth_user": "lookup", "auth_query": "SELECT usename FROM pg_shadow"})) == [
        'general.auth_query: must take the user name as $1 (got string "SELECT usename FROM pg_shadow")']
    assert problems_of(config(general={"auth_query": ""}))[0].startswith("general.auth_query:")
    query = "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 AND rolcanlogin"
    assert parse(config(general={"auth_user": "lookup", "auth_query": query})).general.auth_query == query


def test_auth_dbname() -> None:
    assert parse(config(general={"auth_user": "lookup", "auth_dbname": "app"})).general.auth_dbname == "app"
    assert problems_of(config(general={"auth_user": "lookup", "auth_dbname": "nope"})) == [
        'general.auth_dbname: no [[databases]] entry is named "nope"']
    assert problems_of(config(general={"auth_user": "lookup", "auth_dbname": "*"})) == [
        'general.auth_dbname: no [[databases]] entry is named "*"']
    assert problems_of(config(general={"auth_dbname": "app"})) == [
        "general.auth_dbname: only used with general.auth_user (set it, or remove this key)"]


@pytest.mark.parametrize("key", ["auth_query_cache_s", "autodb_idle_timeout_s"])
def test_seconds_keys(key: str) -> None:
    assert problems_of(config(general={key: "soon"}))[0].startswith(f"general.{key}:")
    assert problems_of(config(general={key: -1}))[0].startswith(f"general.{key}:")
