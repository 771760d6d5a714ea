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
    UserConfig,
    check,
    load,
    parse,
    split_address,
)

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
    assert set(data) == {"general", "users", "databases", "jwt"}
    assert set(data["general"]) == field_names(GeneralConfig)
    assert set().union(*data["users"]) == field_names(UserConfig)
    assert set().union(*data["databases"]) == field_names(DatabaseConfig)
    assert set(data["jwt"]) == field_names(JwtConfig)


def test_example_comments_every_key_with_its_default() -> None:
    lines = EXAMPLE_PATH.read_text().splitlines()
    commented: set[str] = set()
    for previous, line in itertools.pairwise(lines):
        match = re.match(r"#?([a-z_]+) = ", line)
        if match and previous.startswith("# ") and "Default" in previous:
            commented.add(match.group(1))
    every_key = set().union(*map(field_names, (GeneralConfig, UserConfig, DatabaseConfig, JwtConfig)))
    assert every_key - {"name"} <= commented
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
    data["jwt"] = {"secret": "s", "audience": "shardgate", "claims": ["sub", 1]}
    assert problems_of(data) == [
        'jwt.audience: must be an array of strings (got string "shardgate")',
        "jwt.claims: must be an array of strings (got array)",
    ]


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
