"""Config loader: the example loads, and every kind of mistake is named by its key path."""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import config
from config import (
    Config,
    ConfigError,
    DatabaseConfig,
    GeneralConfig,
    JwtConfig,
    OmnishardedTableConfig,
    ShardedTableConfig,
    ShardRange,
    ShardValues,
    TwoPhaseCommitConfig,
    UserConfig,
    check,
    load,
    parse,
    split_address,
)
from config.model import HttpConfig, TlsConfig

EXAMPLE_PATH = Path(config.__file__).parent / "example.toml"
# Password "app-secret", salt "shardgate-exampl", 4096 iterations (same as the example file).
SCRAM_VERIFIER = (
    "SCRAM-SHA-256$4096:c2hhcmRnYXRlLWV4YW1wbA==$4EaxN2llwxL/pFskzbAFwm5ZSYEw6monH3lGWuXQH94="
    ":Ik6qXM6a0XYSQak/uE6zT0WnEuExJrgxlr/aKH4ZTB4="
)
MD5_HASH = "md570524efaa0d382b945bf2253d81ff390"


def minimal() -> dict[str, Any]:
    return {
        "users": [{"name": "app", "password": "secret"}],
        "databases": [{"name": "app"}],
    }


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def only_problem(data: dict[str, Any]) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def example_with_optional_sections_enabled() -> str:
    """The example with every "#key = value" / "#[section]" line switched on."""
    return re.sub(r"(?m)^#(?=[\[a-z])", "", EXAMPLE_PATH.read_text())


def field_names(model: type) -> set[str]:
    return {f.name for f in dataclasses.fields(model)}


# --- the example file -----------------------------------------------------------------------


def test_example_loads_cleanly() -> None:
    loaded = load(str(EXAMPLE_PATH))
    assert check(str(EXAMPLE_PATH)) == []
    assert loaded.source_path == str(EXAMPLE_PATH)
    assert loaded.jwt is None
    assert {u.auth for u in loaded.users} == {"scram-sha-256", "md5", "trust"}
    roles = sorted((db.name, db.role) for db in loaded.databases)
    assert roles == [("app", "primary"), ("app", "replica")]


def test_example_with_jwt_enabled_loads() -> None:
    loaded = parse(tomllib.loads(example_with_optional_sections_enabled()))
    assert isinstance(loaded.jwt, JwtConfig)
    assert isinstance(loaded.jwt.audience, tuple)
    jwt_user = loaded.user("api")
    assert jwt_user is not None and jwt_user.auth == "jwt"
    assert jwt_user.required_scope == "db:app"


def test_example_sets_every_key_of_every_section() -> None:
    data = tomllib.loads(example_with_optional_sections_enabled())
    assert set(data) == {"general", "users", "databases", "jwt", "sharded_tables", "omnisharded_tables",
                         "two_phase_commit", "tls", "http"}
    assert set(data["tls"]) == field_names(TlsConfig)
    assert set(data["http"]) == field_names(HttpConfig)
    assert set(data["general"]) == field_names(GeneralConfig)
    assert set().union(*data["users"]) == field_names(UserConfig)
    assert set().union(*data["databases"]) == field_names(DatabaseConfig)
    assert set(data["jwt"]) == field_names(JwtConfig)
    assert set().union(*data["sharded_tables"]) == field_names(ShardedTableConfig)
    ranges = [entry for table in data["sharded_tables"] for entry in table.get("ranges", [])]
    values = [entry for table in data["sharded_tables"] for entry in table.get("values", [])]
    assert set().union(*ranges) == field_names(ShardRange)
    assert set().union(*values) == field_names(ShardValues)
    assert set().union(*data["omnisharded_tables"]) == field_names(OmnishardedTableConfig)
    assert set(data["two_phase_commit"]) == field_names(TwoPhaseCommitConfig)


def test_example_comments_every_key_with_its_default() -> None:
    lines = EXAMPLE_PATH.read_text().splitlines()
    commented: set[str] = set()
    required: set[str] = set()
    for previous, line in itertools.pairwise(lines):
        # `key = value`, or `[[section.key]]` for an array of tables inside an entry (ranges, values)
        match = re.match(r"#?([a-z_]+) = ", line) or re.match(r"#?\[\[[a-z_]+\.([a-z_]+)\]\]$", line)
        if match and previous.startswith("# ") and "Default" in previous:
            commented.add(match.group(1))
        if match and previous.startswith("# ") and "required" in previous:
            required.add(match.group(1))
    models = (GeneralConfig, UserConfig, DatabaseConfig, JwtConfig, ShardedTableConfig, ShardRange, ShardValues,
              OmnishardedTableConfig, TwoPhaseCommitConfig, TlsConfig)
    every_key = set().union(*map(field_names, models))
    required_keys = {"name", "database", "column", "data_type", "shard", "ranges", "values", "table"}
    assert every_key - required_keys <= commented
    assert required_keys <= commented | required
    assert {"database", "column", "data_type", "shard", "ranges", "values"} <= required
    assert "# Login name" in EXAMPLE_PATH.read_text() and "# Database name" in EXAMPLE_PATH.read_text()


# --- defaults -------------------------------------------------------------------------------


def test_defaults_come_from_the_model() -> None:
    loaded = parse(minimal(), source_path="x.toml")
    assert loaded == Config(
        general=GeneralConfig(),
        users=(UserConfig(name="app", password="secret"),),
        databases=(DatabaseConfig(name="app"),),
        jwt=None,
        source_path="x.toml",
    )
    user = loaded.users[0]
    assert user.auth == "scram-sha-256" and user.pool_mode is None and user.pool_size is None
    assert loaded.databases[0].port == 5432 and loaded.databases[0].server_database == "app"


def test_seconds_accept_integers_and_store_floats() -> None:
    data = minimal()
    data["general"] = {"idle_timeout_s": 5, "shutdown_timeout_s": 0.5}
    general = parse(data).general
    assert general.idle_timeout_s == 5.0 and isinstance(general.idle_timeout_s, float)
    assert general.shutdown_timeout_s == 0.5


def test_jwt_lists_become_tuples_and_defaults_apply() -> None:
    data = minimal()
    data["jwt"] = {"secret": "s", "algorithms": ["HS256", "HS512"], "audience": ["a", "b"]}
    jwt = parse(data).jwt
    assert jwt == JwtConfig(secret="s", algorithms=("HS256", "HS512"), audience=("a", "b"))


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_in_general_suggests_the_close_one() -> None:
    data = minimal()
    data["general"] = {"pool_mod": "session"}
    assert only_problem(data) == 'general.pool_mod: unknown key (did you mean "pool_mode"?)'


@pytest.mark.parametrize(
    ("section", "index", "expected"),
    [
        ("users", 0, "users[0].pasword: unknown key"),
        ("databases", 0, "databases[0].pasword: unknown key"),
    ],
)
def test_unknown_key_in_array_entries(section: str, index: int, expected: str) -> None:
    data = minimal()
    data[section][index]["pasword"] = "x"
    assert only_problem(data).startswith(expected)


def test_unknown_key_names_the_right_array_index() -> None:
    data = minimal()
    data["users"].append({"name": "other", "password": "x", "colour": "blue"})
    assert only_problem(data) == "users[1].colour: unknown key"


def test_unknown_section_and_unknown_jwt_key() -> None:
    data = minimal()
    data["genral"] = {}
    data["jwt"] = {"secret": "s", "issuer_url": "x"}
    problems = problems_of(data)
    assert problems[0] == 'genral: unknown key (did you mean "general"?)'
    assert problems[1].startswith("jwt.issuer_url: unknown key")
    assert len(problems) == 2


# --- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("users", 0, "name", 5), "users[0].name: must be a string (got integer 5)"),
        (
            ("general", None, "default_pool_size", "10"),
            'general.default_pool_size: must be an integer >= 1 (got "10")',
        ),
        (
            ("general", None, "default_pool_size", True),
            "general.default_pool_size: must be an integer >= 1 (got true)",
        ),
        (
            ("general", None, "checkout_timeout_ms", 1.5),
            "general.checkout_timeout_ms: must be an integer >= 0 (got 1.5)",
        ),
        (
            ("general", None, "idle_timeout_s", "10"),
            'general.idle_timeout_s: must be a number of seconds >= 0 (got "10")',
        ),
        (
            ("general", None, "idle_timeout_s", False),
            "general.idle_timeout_s: must be a number of seconds >= 0 (got false)",
        ),
        (
            ("general", None, "replica_stickiness", 1),
            "general.replica_stickiness: must be true or false (got 1)",
        ),
        (
            ("databases", 0, "port", "5432"),
            'databases[0].port: must be an integer between 1 and 65535 (got "5432")',
        ),
        (("databases", 0, "host", ["a"]), "databases[0].host: must be a string (got array)"),
        (("users", 0, "server_user", {"a": 1}), "users[0].server_user: must be a string (got table)"),
    ],
)
def test_wrong_types(edit: tuple[str, int | None, str, Any], expected: str) -> None:
    data = minimal()
    section, index, key, value = edit
    if index is None:
        data.setdefault(section, {})[key] = value
    else:
        data[section][index][key] = value
    assert only_problem(data) == expected


def test_sections_of_the_wrong_shape() -> None:
    problems = problems_of({"general": 1, "users": {"name": "app"}, "databases": [1]})
    assert problems == [
        "general: must be a table ([general]) (got integer 1)",
        "users: must be an array of tables ([[users]]) (got table)",
        "databases[0]: must be a table (got integer 1)",
    ]


def test_secrets_are_never_quoted_in_problems() -> None:
    data = minimal()
    data["users"][0].update(password=123456, server_password=654321)
    data["jwt"] = {"secret": 987654}
    problems = problems_of(data)
    assert problems == [
        "jwt.secret: must be a string (got integer)",
        "users[0].password: must be a string (got integer)",
        "users[0].server_password: must be a string (got integer)",
    ]


def test_jwt_lists_must_be_arrays_of_strings() -> None:
    data = minimal()
    data["jwt"] = {"secret": "s", "audience": 7, "claims": ["sub", 1]}
    assert problems_of(data) == [
        "jwt.audience: must be a string or an array of strings (got integer 7)",
        "jwt.claims: must be an array of strings (got array)",
    ]


def test_jwt_audience_may_be_one_string_as_postgrest_jwt_aud() -> None:
    data = minimal()
    data["jwt"] = {"secret": "s", "audience": "shardgate"}
    jwt = parse(data).jwt
    assert jwt is not None and jwt.audience == ("shardgate",)
    data["jwt"] = {"secret": "s", "audience": " "}
    assert problems_of(data) == ["jwt.audience: must not be empty"]
    data["jwt"] = {"secret": "s", "audience": ["a", 2]}
    assert problems_of(data) == ["jwt.audience: must be a string or an array of strings (got array)"]


def test_listen_user_names_a_user() -> None:
    data = minimal()
    assert parse(data).general.listen_user == ""
    data["general"] = {"listen_user": "app"}
    assert parse(data).general.listen_user == "app"
    data["general"] = {"listen_user": "nobody"}
    assert only_problem(data) == 'general.listen_user: no [[users]] entry is named "nobody"'


def test_watch_config_is_a_boolean() -> None:
    data = minimal()
    assert parse(data).general.watch_config is False
    data["general"] = {"watch_config": True}
    assert parse(data).general.watch_config is True
    data["general"] = {"watch_config": "yes"}
    assert problems_of(data) == ['general.watch_config: must be true or false (got "yes")']


# --- allowed values -------------------------------------------------------------------------


def test_pool_mode_typo_lists_the_choices() -> None:
    data = minimal()
    data["general"] = {"pool_mode": "sesion"}
    assert (
        only_problem(data)
        == 'general.pool_mode: must be one of session, transaction, statement (got "sesion")'
    )


@pytest.mark.parametrize(
    ("section", "index", "key", "choices"),
    [
        ("general", None, "log_format", "text, json"),
        ("general", None, "log_level", "debug, info, warning, error, critical"),
        ("general", None, "read_write_split", "include_primary, exclude_primary"),
        ("general", None, "load_balancing", "round_robin, random, least_connections"),
        ("users", 0, "auth", "scram-sha-256, md5, plain, trust, jwt"),
        ("users", 0, "pool_mode", "session, transaction, statement"),
        ("databases", 0, "role", "primary, replica, auto"),
    ],
)
def test_enum_values(section: str, index: int | None, key: str, choices: str) -> None:
    data = minimal()
    table = data.setdefault(section, {}) if index is None else data[section][index]
    table[key] = "bogus"
    path = section if index is None else f"{section}[{index}]"
    assert only_problem(data) == f'{path}.{key}: must be one of {choices} (got "bogus")'


def test_enum_in_second_user_names_its_index() -> None:
    data = minimal()
    data["users"].append({"name": "b", "password": "x", "auth": "password"})
    assert only_problem(data).startswith(
        'users[1].auth: must be one of scram-sha-256, md5, plain, trust, jwt (got "password")'
    )


def test_jwt_algorithms_are_checked() -> None:
    data = minimal()
    data["jwt"] = {"secret": "s", "algorithms": ["HS256", "none", "RS1"]}
    assert only_problem(data).startswith("jwt.algorithms: each must be one of HS256, ")
    assert only_problem(data).endswith('(got "none", "RS1")')
    data["jwt"] = {"secret": "s", "algorithms": []}
    assert only_problem(data) == "jwt.algorithms: must not be empty"


def test_jwt_needs_a_key_source() -> None:
    data = minimal()
    data["jwt"] = {"issuer": "me"}
    assert only_problem(data) == "jwt: needs a key: set secret, secret_file, public_keys or jwks_file"
    for key, value in [("secret_file", "/s"), ("public_keys", ["/k.pem"]), ("jwks_file", "/j.json")]:
        data["jwt"] = {key: value}
        assert parse(data).jwt is not None


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("general", "default_pool_size", 0, "general.default_pool_size: must be an integer >= 1 (got 0)"),
        ("general", "min_pool_size", -1, "general.min_pool_size: must be an integer >= 0 (got -1)"),
        (
            "general",
            "max_client_connections",
            0,
            "general.max_client_connections: must be an integer >= 1 (got 0)",
        ),
        (
            "general",
            "max_message_bytes",
            1023,
            "general.max_message_bytes: must be an integer >= 1024 (got 1023)",
        ),
        ("users", "pool_size", 0, "users[0].pool_size: must be an integer >= 1 (got 0)"),
        ("users", "min_pool_size", -2, "users[0].min_pool_size: must be an integer >= 0 (got -2)"),
        ("databases", "port", 0, "databases[0].port: must be an integer between 1 and 65535 (got 0)"),
        ("databases", "port", 65536, "databases[0].port: must be an integer between 1 and 65535 (got 65536)"),
        ("databases", "shard", -1, "databases[0].shard: must be an integer >= 0 (got -1)"),
    ],
)
def test_ranges(section: str, key: str, value: int, expected: str) -> None:
    data = minimal()
    table = data.setdefault(section, {}) if section == "general" else data[section][0]
    table[key] = value
    assert only_problem(data) == expected


@pytest.mark.parametrize(
    "key",
    [
        "checkout_timeout_ms",
        "idle_timeout_s",
        "server_lifetime_s",
        "healthcheck_idle_ms",
        "server_connect_timeout_ms",
        "shutdown_timeout_s",
        "healthcheck_interval_ms",
        "ban_timeout_s",
        "max_replica_lag_ms",
        "max_replica_lag_bytes",
        "read_your_writes_ms",
    ],
)
def test_timeouts_and_limits_must_not_be_negative(key: str) -> None:
    data = minimal()
    data["general"] = {key: -1}
    assert only_problem(data).startswith(f"general.{key}: must be ")
    data["general"] = {key: 0}
    assert getattr(parse(data).general, key) == 0


def test_seconds_must_be_finite() -> None:
    data = minimal()
    data["general"] = {"ban_timeout_s": float("nan"), "idle_timeout_s": float("inf")}
    assert problems_of(data) == [
        "general.idle_timeout_s: must be a number of seconds >= 0 (got inf)",
        "general.ban_timeout_s: must be a number of seconds >= 0 (got nan)",
    ]


def test_min_pool_size_must_fit_in_the_pool() -> None:
    data = minimal()
    data["general"] = {"default_pool_size": 5, "min_pool_size": 6}
    assert only_problem(data) == "general.min_pool_size: must be <= general.default_pool_size 5 (got 6)"

    data = minimal()
    data["users"][0].update(pool_size=3, min_pool_size=4)
    assert only_problem(data) == "users[0].min_pool_size: must be <= users[0].pool_size 3 (got 4)"

    data = minimal()
    data["general"] = {"default_pool_size": 3}
    data["users"][0]["min_pool_size"] = 4
    assert only_problem(data) == "users[0].min_pool_size: must be <= general.default_pool_size 3 (got 4)"

    data = minimal()
    data["general"] = {"min_pool_size": 4}
    data["users"][0]["pool_size"] = 2
    assert only_problem(data).startswith("users[0].pool_size: smaller than general.min_pool_size 4")
    data["users"][0]["min_pool_size"] = 1
    assert parse(data).users[0].min_pool_size == 1


# --- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("listen", "0.0.0.0:6432"), ("listen", "[::1]:6432"), ("listen", "localhost:0"), ("admin_listen", "")],
)
def test_good_addresses(key: str, value: str) -> None:
    data = minimal()
    data["general"] = {key: value}
    assert getattr(parse(data).general, key) == value


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("listen", "6432", 'must be "host:port"'),
        ("listen", "", 'must be "host:port"'),
        ("listen", ":6432", 'must be "host:port"'),
        ("listen", "::1:6432", 'an IPv6 host goes in brackets: "[::1]:port"'),
        ("listen", "host:65536", "port must be an integer between 0 and 65535"),
        ("listen", "host:http", "port must be an integer between 0 and 65535"),
        ("admin_listen", "9930", 'must be "host:port", or "" to disable'),
    ],
)
def test_bad_addresses(key: str, value: str, reason: str) -> None:
    data = minimal()
    data["general"] = {key: value}
    assert only_problem(data) == f'general.{key}: {reason} (got "{value}")'


def test_admin_listen_must_differ_from_listen() -> None:
    data = minimal()
    data["general"] = {"listen": "127.0.0.1:7000", "admin_listen": "127.0.0.1:7000"}
    assert (
        only_problem(data) == 'general.admin_listen: must differ from general.listen (both "127.0.0.1:7000")'
    )


def test_split_address() -> None:
    assert split_address("127.0.0.1:6432") == ("127.0.0.1", 6432)
    assert split_address("[::]:5432") == ("::", 5432)
    with pytest.raises(ValueError):
        split_address("nohost")


# --- users ----------------------------------------------------------------------------------


def test_duplicate_user_names() -> None:
    data = minimal()
    data["users"] += [{"name": "other", "password": "x"}, {"name": "app", "password": "y"}]
    assert only_problem(data) == 'users[2].name: duplicate user "app" (first in users[0])'


def test_user_name_is_required_and_not_empty() -> None:
    data = minimal()
    data["users"] = [{"password": "x"}, {"name": " ", "password": "x"}]
    assert problems_of(data) == ["users[0].name: required", "users[1].name: must not be empty"]


def test_jwt_user_requires_jwt_section() -> None:
    data = minimal()
    data["users"].append({"name": "api", "auth": "jwt"})
    assert only_problem(data) == 'users[1].auth: "jwt" requires a [jwt] section'
    data["jwt"] = {"secret": "s"}
    assert parse(data).users[1].auth == "jwt"


@pytest.mark.parametrize("auth", ["scram-sha-256", "md5", "plain", "trust", "jwt"])
def test_plain_passwords_work_with_every_method(auth: str) -> None:
    data = minimal()
    data["users"][0]["auth"] = auth
    data["jwt"] = {"secret": "s"}
    assert parse(data).users[0].password == "secret"


@pytest.mark.parametrize("auth", ["scram-sha-256", "md5", "plain"])
def test_password_methods_need_a_password(auth: str) -> None:
    data = minimal()
    data["users"][0] = {"name": "app", "auth": auth}
    assert only_problem(data).startswith(f'users[0].password: required for auth "{auth}"')


def test_trust_needs_no_password() -> None:
    data = minimal()
    data["users"][0] = {"name": "app", "auth": "trust"}
    assert parse(data).users[0].password == ""


def test_scram_verifier_is_accepted_with_scram_only() -> None:
    data = minimal()
    data["users"][0]["password"] = SCRAM_VERIFIER
    assert parse(data).users[0].password == SCRAM_VERIFIER
    data["users"][0]["auth"] = "md5"
    assert (
        only_problem(data)
        == 'users[0].password: a SCRAM verifier only works with auth "scram-sha-256" (got "md5")'
    )


@pytest.mark.parametrize(
    ("verifier", "reason"),
    [
        ("SCRAM-SHA-256$4096:c2FsdA==", "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"),
        (SCRAM_VERIFIER.replace("$4096:", "$0:"), 'iteration count must be a positive integer (got "0")'),
        (
            SCRAM_VERIFIER.replace("$4096:", "$many:"),
            'iteration count must be a positive integer (got "many")',
        ),
        (SCRAM_VERIFIER.replace("c2hhcmRnYXRlLWV4YW1wbA==", "not*base64"), "salt must be non-empty base64"),
        (SCRAM_VERIFIER.replace("c2hhcmRnYXRlLWV4YW1wbA==", ""), "salt must be non-empty base64"),
        (SCRAM_VERIFIER.replace("4EaxN2llwxL/", "4Eax"), "StoredKey must be base64 of 32 bytes"),
        (SCRAM_VERIFIER[:-4] + "!!!=", "ServerKey must be base64 of 32 bytes"),
        (SCRAM_VERIFIER + ":extra", "ServerKey must be base64 of 32 bytes"),
    ],
)
def test_malformed_scram_verifier(verifier: str, reason: str) -> None:
    data = minimal()
    data["users"][0]["password"] = verifier
    assert only_problem(data) == f"users[0].password: malformed SCRAM verifier: {reason}"


def test_md5_hash_is_accepted_with_md5_only() -> None:
    data = minimal()
    data["users"][0].update(password=MD5_HASH, auth="md5")
    assert parse(data).users[0].password == MD5_HASH
    data["users"][0]["auth"] = "scram-sha-256"
    assert (
        only_problem(data)
        == 'users[0].password: an md5 hash only works with auth "md5" (got "scram-sha-256")'
    )
    # Not 32 hex digits: just a plain password that happens to start with "md5".
    data["users"][0]["password"] = "md5-is-not-a-hash"
    assert parse(data).users[0].password == "md5-is-not-a-hash"


def test_server_password_must_not_be_a_verifier() -> None:
    data = minimal()
    data["users"][0]["server_password"] = SCRAM_VERIFIER
    assert only_problem(data).startswith("users[0].server_password: must be the password PostgreSQL expects")


def test_required_scope_only_for_jwt_users() -> None:
    data = minimal()
    data["users"][0]["required_scope"] = "db:app"
    assert (
        only_problem(data) == 'users[0].required_scope: only used with auth "jwt" (got auth "scram-sha-256")'
    )


# --- databases ------------------------------------------------------------------------------


def test_at_least_one_user_and_one_database() -> None:
    assert problems_of({}) == [
        "users: at least one [[users]] entry is required",
        "databases: at least one [[databases]] entry is required",
    ]
    assert problems_of({"users": [], "databases": []}) == problems_of({})


def test_one_primary_per_database_and_shard() -> None:
    data = minimal()
    data["databases"] = [
        {"name": "app", "port": 5432},
        {"name": "app", "port": 5433, "role": "replica"},
        {"name": "app", "port": 5434},
    ]
    assert only_problem(data) == (
        'databases[2].role: database "app" shard 0 already has a primary (databases[0]); use role replica or auto'
    )


def test_primaries_on_other_shards_or_databases_and_auto_roles_are_fine() -> None:
    data = minimal()
    data["databases"] = [
        {"name": "app", "port": 5432, "shard": 0},
        {"name": "app", "port": 5433, "shard": 1},
        {"name": "other", "port": 5434, "shard": 0},
        {"name": "app", "port": 5435, "shard": 0, "role": "auto"},
        {"name": "app", "port": 5436, "shard": 0, "role": "auto"},
    ]
    assert len(parse(data).servers_for("app")) == 4


def test_database_name_is_required() -> None:
    data = minimal()
    data["databases"] = [{"host": "db"}]
    assert only_problem(data) == "databases[0].name: required"


# --- several problems, files, syntax errors -------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "general": {"pool_mode": "sesion", "pool_mod": "x", "default_pool_size": 0, "listen": "6432"},
        "users": [
            {"name": "app", "password": "x", "auth": "kerberos"},
            {"name": "app", "password": "y"},
            {"name": "api", "auth": "jwt"},
        ],
        "databases": [{"name": "app", "port": 70000}, {"name": "app", "shard": -1}],
    }
    with pytest.raises(ConfigError) as info:
        parse(data, source_path="bad.toml")
    paths = [problem.split(":")[0] for problem in info.value.problems]
    assert paths == [
        "general.listen",
        "general.pool_mode",
        "general.default_pool_size",
        "general.pool_mod",
        "users[0].auth",
        "users[1].name",
        "users[2].auth",
        "databases[0].port",
        "databases[1].shard",
    ]
    message = str(info.value)
    assert message.startswith("9 configuration problems in bad.toml:")
    assert all(problem in message for problem in info.value.problems)


def test_load_reports_file_problems(tmp_path: Path) -> None:
    path = tmp_path / "shardgate.toml"
    path.write_text('[general]\npool_mode = "sesion"\n[[users]]\nname = "app"\npassword = "x"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.source_path == str(path)
    assert info.value.problems == [
        'general.pool_mode: must be one of session, transaction, statement (got "sesion")',
        "databases: at least one [[databases]] entry is required",
    ]
    assert check(str(path)) == info.value.problems


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[general]\npool_mode = "session"\nlisten = 127.0.0.1:6432\n')
    problems = check(str(path))
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}, line 3, column ")
    assert "invalid TOML" in problems[0]


def test_toml_syntax_error_at_end_of_file_names_last_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[general]\nlisten = "127.0.0.1:6432"\nadmin_listen = [\n')
    assert check(str(path))[0].startswith(f"{path}, line 3 (end of file): invalid TOML")


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text('[general]\npool_mode = "session"\npool_mode = "statement"\n')
    assert check(str(path))[0].startswith(f"{path}, line 3, ")


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert check(str(missing)) == [f"{missing}: cannot read file: No such file or directory"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'name = "\xff"\n')
    assert check(str(binary)) == [f"{binary}: not valid UTF-8 (byte offset 8)"]


def test_shard_numbers_without_gaps() -> None:
    from config.loader import ConfigError, parse

    text = """
[[users]]
name = "app"
password = "x"

[[databases]]
name = "app"
shard = 0

[[databases]]
name = "app"
shard = 2
port = 5433
"""
    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(text))
    assert any(p.startswith("databases[1].shard:") and "no shard 1" in p for p in caught.value.problems)
    assert len(parse(tomllib.loads(text.replace("shard = 2", "shard = 1"))).databases) == 2


# --- sharded and omnisharded tables ---------------------------------------------------------


def two_shards(*sharded: dict[str, Any], omnisharded: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Database "app" with shards 0 and 1, and the given [[sharded_tables]] / [[omnisharded_tables]]."""
    data = minimal()
    data["databases"] = [{"name": "app", "shard": 0}, {"name": "app", "port": 5433, "shard": 1}]
    data["sharded_tables"] = list(sharded)
    if omnisharded is not None:
        data["omnisharded_tables"] = omnisharded
    return data


def orders(**overrides: Any) -> dict[str, Any]:
    entry = {"database": "app", "table": "orders", "column": "tenant_id", "data_type": "bigint"}
    entry.update(overrides)
    return {key: value for key, value in entry.items() if value is not None}


def test_sharded_tables_are_optional_and_default_to_hash() -> None:
    assert parse(minimal()).sharded_tables == () and parse(minimal()).omnisharded_tables == ()
    loaded = parse(two_shards(orders(), omnisharded=[{"database": "app", "table": "countries"}]))
    assert loaded.sharded_tables == (ShardedTableConfig("app", "tenant_id", "bigint", table="orders"),)
    assert loaded.sharded_tables[0].method == "hash"
    assert loaded.omnisharded_tables == (OmnishardedTableConfig("app", "countries"),)
    assert loaded.shard_count("app") == 2 and loaded.shard_count("nope") == 0
    assert loaded.sharded_tables_for("app") == loaded.sharded_tables and loaded.sharded_tables_for("x") == ()
    assert loaded.omnisharded_tables_for("app") == ("countries",)
    assert loaded.general.allow_cross_shard_writes is False


def test_table_may_be_omitted_for_every_table_with_the_column() -> None:
    loaded = parse(two_shards(orders(table=None, data_type="uuid")))
    assert loaded.sharded_tables[0].table is None


def test_range_and_list_tables_load() -> None:
    ranges = [{"shard": 1, "start": 1000}, {"shard": 0, "start": -5, "end": 1000}]
    values = [{"shard": 0, "values": ["eu", "uk"]}, {"shard": 1, "values": ["us"]}]
    uuids = [{"shard": 1, "values": ["{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}"]}]
    loaded = parse(two_shards(
        orders(method="range", ranges=ranges),
        orders(table="customers", column="region", data_type="text", method="list", values=values),
        orders(table="devices", column="id", data_type="uuid", method="list", values=uuids),
        orders(table="events", column="n", data_type="integer", method="range",
               ranges=[{"shard": 0, "end": 2**31}]),
    ))
    assert loaded.sharded_tables[0].ranges == (ShardRange(1, start=1000), ShardRange(0, start=-5, end=1000))
    assert loaded.sharded_tables[1].values == (ShardValues(0, ("eu", "uk")), ShardValues(1, ("us",)))
    assert loaded.sharded_tables[2].values == (ShardValues(1, ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",)),)
    assert loaded.sharded_tables[3].ranges == (ShardRange(0, end=2**31),)


def test_allow_cross_shard_writes_is_a_boolean() -> None:
    data = minimal()
    data["general"] = {"allow_cross_shard_writes": True}
    assert parse(data).general.allow_cross_shard_writes is True
    data["general"] = {"allow_cross_shard_writes": "yes"}
    assert only_problem(data) == 'general.allow_cross_shard_writes: must be true or false (got "yes")'


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (orders(data_type="float"),
         'sharded_tables[0].data_type: unknown data type "float" (bigint, integer, text, uuid)'),
        (orders(data_type=5), "sharded_tables[0].data_type: must be one of bigint, integer, text, uuid (got integer 5)"),
        (orders(data_type=None), "sharded_tables[0].data_type: required"),
        (orders(method="modulo"), 'sharded_tables[0].method: unknown method "modulo" (hash, range, list)'),
        (orders(column=None), "sharded_tables[0].column: required"),
        (orders(column=""), "sharded_tables[0].column: must not be empty"),
        (orders(database=None), "sharded_tables[0].database: required"),
        (orders(table=""), "sharded_tables[0].table: must not be empty"),
        (orders(database="ap"),
         'sharded_tables[0].database: no [[databases]] entry is named "ap" (databases: "app")'),
        (orders(colum="x"), 'sharded_tables[0].colum: unknown key (did you mean "column"?)'),
        (orders(ranges=[{"shard": 0}]),
         'sharded_tables[0].ranges: only used with method "range" (got method "hash")'),
        (orders(values=[{"shard": 0, "values": [1]}]),
         'sharded_tables[0].values: only used with method "list" (got method "hash")'),
        (orders(method="range", values=[{"shard": 0, "values": [1]}], ranges=[{"shard": 0}]),
         'sharded_tables[0].values: only used with method "list" (got method "range")'),
        (orders(method="list", ranges=[{"shard": 0}], values=[{"shard": 0, "values": [1]}]),
         'sharded_tables[0].ranges: only used with method "range" (got method "list")'),
        (orders(method="range"),
         'sharded_tables[0].ranges: required for method "range": [{ shard = 0, start = ..., end = ... }, ...]'),
        (orders(method="list"),
         'sharded_tables[0].values: required for method "list": [{ shard = 0, values = [...] }, ...]'),
    ],
)
def test_sharded_table_mistakes(entry: dict[str, Any], expected: str) -> None:
    assert only_problem(two_shards(entry)) == expected


@pytest.mark.parametrize(
    ("data_type", "ranges", "expected"),
    [
        ("bigint", [], "sharded_tables[0].ranges: must not be empty"),
        ("bigint", {"shard": 0}, "sharded_tables[0].ranges: must be an array of tables like"
                                 " [{ shard = 0, start = 0, end = 1000 }] (got table)"),
        ("bigint", [5], "sharded_tables[0].ranges[0]: must be a table like { shard = 0, start = 0, end = 1000 }"
                        " (got integer 5)"),
        ("bigint", [{"start": 0}], "sharded_tables[0].ranges[0].shard: required"),
        ("bigint", [{"shard": -1}], "sharded_tables[0].ranges[0].shard: must be an integer >= 0 (got -1)"),
        ("bigint", [{"shard": 0, "end": 10}, {"shard": 3, "start": 10}],
         'sharded_tables[0].ranges[1].shard: database "app" has no shard 3 (its [[databases]] entries hold'
         " shards 0, 1); add a [[databases]] entry with shard = 3"),
        ("bigint", [{"shard": 0, "start": 10, "end": 10}],
         "sharded_tables[0].ranges[0].end: must be above start 10 (got 10); the range [start, end) would hold no key"),
        ("bigint", [{"shard": 0, "start": 10, "end": 5}],
         "sharded_tables[0].ranges[0].end: must be above start 10 (got 5); the range [start, end) would hold no key"),
        ("text", [{"shard": 0, "start": "m", "end": "b"}],
         'sharded_tables[0].ranges[0].end: must be above start "m" (got "b"); the range [start, end) would hold no key'),
        ("bigint", [{"shard": 0, "start": 0, "end": 100}, {"shard": 1, "start": 50, "end": 150}],
         "sharded_tables[0].ranges[1]: [50, 150) of shard 1 overlaps ranges[0] [0, 100) of shard 0"),
        ("bigint", [{"shard": 0}, {"shard": 1, "start": 5}],
         "sharded_tables[0].ranges[1]: [5, ...) of shard 1 overlaps ranges[0] [..., ...) of shard 0"),
        ("bigint", [{"shard": 1, "start": 5}, {"shard": 0, "end": 6}],
         "sharded_tables[0].ranges[0]: [5, ...) of shard 1 overlaps ranges[1] [..., 6) of shard 0"),
        ("bigint", [{"shard": 0, "start": "0"}],
         "sharded_tables[0].ranges[0].start: must be an integer between -9223372036854775808 and"
         ' 9223372036854775807 for a bigint key (got string "0")'),
        ("integer", [{"shard": 0, "start": 2**31}],
         "sharded_tables[0].ranges[0].start: must be an integer between -2147483648 and 2147483647"
         " for an integer key (got integer 2147483648)"),
        ("integer", [{"shard": 0, "end": 2**31 + 1}],
         "sharded_tables[0].ranges[0].end: must be an integer between -2147483648 and 2147483648"
         " for an integer key (got integer 2147483649)"),
        ("text", [{"shard": 0, "end": 5}], "sharded_tables[0].ranges[0].end: must be a string for a text key (got integer 5)"),
        ("uuid", [{"shard": 0, "end": "not-a-uuid"}],
         'sharded_tables[0].ranges[0].end: must be a uuid like "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'
         ' (got "not-a-uuid")'),
        ("bigint", [{"shard": 0, "strat": 5}], 'sharded_tables[0].ranges[0].strat: unknown key (did you mean "start"?)'),
    ],
)
def test_range_mistakes(data_type: str, ranges: Any, expected: str) -> None:
    assert only_problem(two_shards(orders(data_type=data_type, method="range", ranges=ranges))) == expected


def test_a_wide_range_overlaps_every_range_inside_it() -> None:
    ranges = [{"shard": 0, "start": 0, "end": 100}, {"shard": 1, "start": 10, "end": 20},
              {"shard": 1, "start": 30, "end": 40}, {"shard": 1, "start": 100, "end": 200}]
    assert problems_of(two_shards(orders(method="range", ranges=ranges))) == [
        "sharded_tables[0].ranges[1]: [10, 20) of shard 1 overlaps ranges[0] [0, 100) of shard 0",
        "sharded_tables[0].ranges[2]: [30, 40) of shard 1 overlaps ranges[0] [0, 100) of shard 0",
    ]


def test_adjacent_and_gapped_ranges_are_fine() -> None:
    ranges = [{"shard": 0, "end": 0}, {"shard": 1, "start": 0, "end": 10}, {"shard": 0, "start": 20}]
    assert len(parse(two_shards(orders(method="range", ranges=ranges))).sharded_tables[0].ranges) == 3


@pytest.mark.parametrize(
    ("data_type", "values", "expected"),
    [
        ("text", [], "sharded_tables[0].values: must not be empty"),
        ("text", [{"values": ["eu"]}], "sharded_tables[0].values[0].shard: required"),
        ("text", [{"shard": 0}], "sharded_tables[0].values[0].values: required (the key values shard 0 holds)"),
        ("text", [{"shard": 0, "values": []}], "sharded_tables[0].values[0].values: must not be empty"),
        ("text", [{"shard": 0, "values": "eu"}],
         'sharded_tables[0].values[0].values: must be an array (got string "eu")'),
        ("text", [{"shard": 0, "values": ["eu", 5]}],
         "sharded_tables[0].values[0].values[1]: must be a string for a text key (got integer 5)"),
        ("bigint", [{"shard": 0, "values": [1, "2"]}],
         "sharded_tables[0].values[0].values[1]: must be an integer between -9223372036854775808 and"
         ' 9223372036854775807 for a bigint key (got string "2")'),
        ("uuid", [{"shard": 0, "values": ["a0eebc99"]}],
         'sharded_tables[0].values[0].values[0]: must be a uuid like "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'
         ' (got "a0eebc99")'),
        ("text", [{"shard": 0, "values": ["eu", "uk"]}, {"shard": 1, "values": ["us", "eu"]}],
         'sharded_tables[0].values[1].values[1]: "eu" is already listed for shard 0'
         " (sharded_tables[0].values[0].values[0]); a value belongs to one shard"),
        ("text", [{"shard": 0, "values": ["eu", "eu"]}],
         'sharded_tables[0].values[0].values[1]: "eu" is already listed for this shard'
         " (sharded_tables[0].values[0].values[0]); a value belongs to one shard"),
        ("uuid", [{"shard": 0, "values": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]},
                  {"shard": 1, "values": ["A0EEBC999C0B4EF8BB6D6BB9BD380A11"]}],
         'sharded_tables[0].values[1].values[0]: "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" is already listed for'
         " shard 0 (sharded_tables[0].values[0].values[0]); a value belongs to one shard"),
        ("text", [{"shard": 2, "values": ["eu"]}],
         'sharded_tables[0].values[0].shard: database "app" has no shard 2 (its [[databases]] entries hold'
         " shards 0, 1); add a [[databases]] entry with shard = 2"),
    ],
)
def test_list_mistakes(data_type: str, values: Any, expected: str) -> None:
    assert only_problem(two_shards(orders(data_type=data_type, method="list", values=values))) == expected


def test_a_table_is_sharded_once() -> None:
    data = two_shards(orders(), orders(column="customer_id"))
    assert only_problem(data) == (
        'sharded_tables[1].table: table "orders" of database "app" is already sharded by sharded_tables[0]')
    data = two_shards(orders(table=None), orders(table=None, data_type="text"))
    assert only_problem(data) == (
        'sharded_tables[1].column: database "app" already shards every table with column "tenant_id"'
        " (sharded_tables[0])")
    # The same table name in two databases, and a named table next to an any-table column, are fine.
    data = two_shards(orders(), orders(table=None), orders(table=None, column="account_id"))
    data["databases"].append({"name": "logs", "port": 5434})
    data["sharded_tables"].append(orders(database="logs"))
    assert len(parse(data).sharded_tables) == 4


def test_sharded_tables_must_be_tables() -> None:
    data = two_shards()
    data["sharded_tables"] = {"database": "app"}
    assert only_problem(data) == "sharded_tables: must be an array of tables ([[sharded_tables]]) (got table)"
    data["sharded_tables"] = ["orders"]
    assert only_problem(data) == 'sharded_tables[0]: must be a table (got string "orders")'


def test_a_broken_databases_entry_does_not_also_unknown_the_database() -> None:
    data = two_shards(orders(method="range", ranges=[{"shard": 1, "start": 0}]))
    data["databases"][1]["port"] = "5433"
    assert only_problem(data).startswith("databases[1].port: must be an integer")


@pytest.mark.parametrize(
    ("omnisharded", "expected"),
    [
        ([{"table": "countries"}], "omnisharded_tables[0].database: required"),
        ([{"database": "app"}], "omnisharded_tables[0].table: required"),
        ([{"database": "app", "table": ""}], "omnisharded_tables[0].table: must not be empty"),
        ([{"database": "nope", "table": "countries"}],
         'omnisharded_tables[0].database: no [[databases]] entry is named "nope" (databases: "app")'),
        ([{"database": "app", "table": "countries"}, {"database": "app", "table": "countries"}],
         'omnisharded_tables[1].table: table "countries" of database "app" is already listed (omnisharded_tables[0])'),
        ([{"database": "app", "table": "orders"}],
         'omnisharded_tables[0].table: table "orders" of database "app" is sharded (sharded_tables[0]);'
         " a table is sharded or omnisharded"),
        ([{"database": "app", "table": "countries", "column": "x"}], "omnisharded_tables[0].column: unknown key"),
    ],
)
def test_omnisharded_mistakes(omnisharded: list[dict[str, Any]], expected: str) -> None:
    assert only_problem(two_shards(orders(), omnisharded=omnisharded)) == expected


def test_every_sharding_problem_is_reported_at_once() -> None:
    data = two_shards(
        orders(data_type="float", database="nope"),
        orders(table="t2", method="list", values=[{"shard": 5, "values": ["a", "a"]}], data_type="text"),
        omnisharded=[{"database": "app", "table": "t2"}],
    )
    paths = [problem.split(":")[0] for problem in problems_of(data)]
    assert paths == [
        "sharded_tables[0].data_type",
        "sharded_tables[0].database",
        "sharded_tables[1].values[0].shard",
        "sharded_tables[1].values[0].values[1]",
        "omnisharded_tables[0].table",
    ]


def test_config_and_routing_agree_on_names() -> None:
    from config.model import SHARD_KEY_TYPES, SHARDING_METHODS
    from routing.shard import DATA_TYPES, METHODS

    assert (SHARD_KEY_TYPES, SHARDING_METHODS) == (DATA_TYPES, METHODS)


def test_shard_by_tenant_claim_needs_the_tenant_claim() -> None:
    data = minimal()
    data["jwt"] = {"secret": "s" * 32, "shard_by_tenant_claim": True}
    assert only_problem(data) == (
        "jwt.shard_by_tenant_claim: needs jwt.tenant_claim, the claim whose value is the sharding key")
    data["jwt"]["tenant_claim"] = "tenant_id"
    jwt = parse(data).jwt
    assert jwt is not None and jwt.shard_by_tenant_claim is True
    data["jwt"]["shard_by_tenant_claim"] = 1
    assert only_problem(data) == "jwt.shard_by_tenant_claim: must be true or false (got 1)"
