"""Loader: TOML file -> validated Config, with every problem named by its key path."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from config.model import (
    AUTH_METHODS,
    CLIENT_CERT_MODES,
    CLIENT_TLS_MODES,
    LOAD_BALANCING,
    POOL_MODES,
    READ_WRITE_SPLIT,
    SERVER_ROLES,
    SERVER_TLS_MODES,
    SHARD_KEY_TYPES,
    SHARDING_METHODS,
    TLS_VERSIONS,
    WILDCARD_DATABASE,
    Config,
    DatabaseConfig,
    GeneralConfig,
    HttpConfig,
    JwtConfig,
    OmnishardedTableConfig,
    ShardedTableConfig,
    ShardKeyValue,
    ShardRange,
    ShardValues,
    TlsConfig,
    TwoPhaseCommitConfig,
    UserConfig,
)
from config.passwords import is_md5_hash

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "ES256",
    "ES384",
    "EdDSA",
)
MIN_MESSAGE_BYTES = 1024
SCRAM_PREFIX = "SCRAM-SHA-256$"
SCRAM_KEY_BYTES = 32  # SHA-256 digest size: StoredKey and ServerKey

_SECTIONS = ("general", "users", "databases", "jwt", "sharded_tables", "omnisharded_tables",
             "two_phase_commit", "tls", "http")
# Inclusive bounds of the integer key types; a range's exclusive end may be one above the maximum.
_INTEGER_BOUNDS = {"bigint": (-(2**63), 2**63 - 1), "integer": (-(2**31), 2**31 - 1)}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists each reason, key path first.

    Array entries count from 0 (`users[1]` is the second [[users]]); secret values are
    never quoted in a problem.
    """

    def __init__(self, problems: Sequence[str], source_path: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source_path = source_path
        where = f" in {source_path}" if source_path else ""
        count = len(self.problems)
        header = f"{count} configuration problem{'s' if count != 1 else ''}{where}:"
        super().__init__("\n  ".join([header, *self.problems]))


def load(path: str) -> Config:
    """Read and validate a TOML file; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read file: {exc.strerror or exc}"], path)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 (byte offset {exc.start})"], path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_describe_syntax_error(path, text, exc)], path)
    return parse(data, source_path=path)


def check(path: str) -> list[str]:
    """Problems with the file at `path`, or [] if it loads cleanly."""
    try:
        load(path)
    except ConfigError as exc:
        return exc.problems
    return []


def parse(data: dict[str, Any], source_path: str | None = None) -> Config:
    """Validate already-decoded TOML; raise ConfigError listing every problem."""
    problems: list[str] = []
    _report_unknown_keys(data, _SECTIONS, "", problems)

    general = _parse_general(_table(data, "general", problems), problems)
    jwt_table = data.get("jwt")
    jwt = _parse_jwt(jwt_table, problems) if isinstance(jwt_table, dict) else None
    if "jwt" in data and not isinstance(jwt_table, dict):
        problems.append(f"jwt: must be a table ([jwt]) (got {_describe(jwt_table)})")

    users = _parse_users(data, general, has_jwt="jwt" in data, problems=problems)
    _check_admin_users(general, users, problems)
    databases = _parse_databases(data, problems)
    _check_passthrough(general, users, databases, problems)
    shards_of = _shards_by_database(data)
    sharded = _parse_sharded_tables(data, shards_of, problems)
    omnisharded = _parse_omnisharded_tables(data, shards_of, problems)
    two_phase = _parse_two_phase_commit(_table(data, "two_phase_commit", problems), data, problems)
    tls_table = _table(data, "tls", problems)
    tls = _parse_tls(tls_table, problems) if tls_table is not None else None
    http_table = _table(data, "http", problems)
    http = _parse_http(http_table, data, problems) if http_table is not None else None

    if problems:
        raise ConfigError(problems, source_path)
    assert general is not None  # only None when problems were recorded
    return Config(
        general=general,
        users=tuple(u for u in users if u is not None),
        databases=tuple(d for d in databases if d is not None),
        jwt=jwt,
        source_path=source_path,
        sharded_tables=tuple(t for t in sharded if t is not None),
        omnisharded_tables=tuple(t for t in omnisharded if t is not None),
        two_phase_commit=two_phase or TwoPhaseCommitConfig(),
        tls=tls or TlsConfig(),
        http=http or HttpConfig(),
    )


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port); ValueError says what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError('must be "host:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError('must be "host:port"')
    elif ":" in host:
        raise ValueError('an IPv6 host goes in brackets: "[::1]:port"')
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be an integer between 0 and 65535")
    return host, int(port_text)


# --- sections -------------------------------------------------------------------------------


def _parse_general(table: dict[str, Any] | None, problems: list[str]) -> GeneralConfig | None:
    if table is None:
        return None
    section = _Section(table, "general", GeneralConfig, problems)
    section.address("listen")
    section.address("admin_listen", allow_empty=True)
    section.choice("pool_mode", POOL_MODES)
    pool_size = section.integer("default_pool_size", minimum=1)
    min_size = section.integer("min_pool_size", minimum=0)
    section.integer("checkout_timeout_ms", minimum=0)
    section.seconds("idle_timeout_s")
    section.seconds("server_lifetime_s")
    section.integer("max_client_connections", minimum=1)
    section.integer("healthcheck_idle_ms", minimum=0)
    section.integer("server_connect_timeout_ms", minimum=0)
    section.string("server_reset_query")
    section.seconds("shutdown_timeout_s")
    section.integer("max_message_bytes", minimum=MIN_MESSAGE_BYTES)
    section.integer("client_to_server_buffer_bytes", minimum=0)
    section.choice("log_level", LOG_LEVELS)
    section.choice("log_format", LOG_FORMATS)
    section.choice("read_write_split", READ_WRITE_SPLIT)
    section.choice("load_balancing", LOAD_BALANCING)
    section.integer("healthcheck_interval_ms", minimum=0)
    section.seconds("ban_timeout_s")
    section.integer("max_replica_lag_ms", minimum=0)
    section.integer("max_replica_lag_bytes", minimum=0)
    section.integer("read_your_writes_ms", minimum=0)
    section.boolean("replica_stickiness")
    section.integer("primary_wait_timeout_ms", minimum=0)
    section.boolean("allow_cross_shard_writes")
    section.boolean("two_phase_commit")
    _read_admin_keys(section)
    section.boolean("watch_config")
    section.string("listen_user")
    _read_limit_keys(section)
    _read_passthrough_keys(section)
    section.finish()

    if min_size is not None and pool_size is not None and min_size > pool_size:
        problems.append(
            f"general.min_pool_size: must be <= general.default_pool_size {pool_size} (got {min_size})"
        )
    listen, admin = section.values.get("listen"), section.values.get("admin_listen")
    if listen and admin and _same_address(listen, admin):
        problems.append(f'general.admin_listen: must differ from general.listen (both "{listen}")')
    return section.build()


def _read_admin_keys(section: _Section) -> None:
    """[general] keys of the admin console and the HTTP admin listener."""
    section.strings("admin_users")
    section.strings("admin_jwt_roles")
    section.string("admin_token", secret=True)


def _read_limit_keys(section: _Section) -> None:
    """[general] keys of limits and timeouts (README "Limits and timeouts")."""
    section.integer("auth_failure_limit", minimum=0)
    section.seconds("auth_failure_window_s")
    section.seconds("auth_failure_cooloff_s")
    section.checked("auth_failure_exempt", _check_networks)
    section.integer("max_new_connections_per_s", minimum=0)
    section.integer("max_server_connects_in_flight", minimum=0)
    section.integer("query_timeout_ms", minimum=0)
    section.integer("idle_in_transaction_timeout_ms", minimum=0)
    section.seconds("client_idle_timeout_s")
    section.seconds("client_login_timeout_s")


def _read_passthrough_keys(section: _Section) -> None:
    """[general] keys of databases and users not in the config (README "Databases and users not in the
    config"); checked against [[users]] and [[databases]] by _check_passthrough."""
    section.seconds("autodb_idle_timeout_s")
    section.string("auth_user")
    section.string("auth_query", allow_empty=False)
    section.seconds("auth_query_cache_s")
    section.string("auth_dbname")


def _check_passthrough(general: GeneralConfig | None, users: list[UserConfig | None],
                       databases: list[DatabaseConfig | None], problems: list[str]) -> None:
    """auth_user is a [[users]] entry that can log in to PostgreSQL, auth_query takes the user name as $1,
    auth_dbname is a configured database."""
    if general is None:
        return
    if not general.auth_user:
        if general.auth_dbname:
            problems.append("general.auth_dbname: only used with general.auth_user (set it, or remove this key)")
        return
    known = {user.name: user for user in users if user is not None}
    auth_user = known.get(general.auth_user)
    if auth_user is None:
        problems.append(f'general.auth_user: no [[users]] entry is named "{general.auth_user}" (the proxy logs '
                        "in as it, with its password from the config, to run auth_query)")
    elif not auth_user.backend_password or auth_user.backend_password.startswith(SCRAM_PREFIX):
        problems.append(f'general.auth_user: user "{auth_user.name}" needs a password PostgreSQL accepts '
                        "(password or server_password; a SCRAM verifier cannot log in)")
    if "$1" not in general.auth_query:
        problems.append(f"general.auth_query: must take the user name as $1 (got {_describe(general.auth_query)})")
    names = {database.name for database in databases if database is not None}
    if general.auth_dbname and (general.auth_dbname not in names or general.auth_dbname == WILDCARD_DATABASE):
        problems.append(f'general.auth_dbname: no [[databases]] entry is named "{general.auth_dbname}"')


def _check_networks(raw: Any) -> tuple[Any, str | None]:
    """A list of addresses or CIDR networks ("127.0.0.1", "10.0.0.0/8", "::1")."""
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        return None, f"must be a list of addresses or networks (got {_describe(raw)})"
    for index, item in enumerate(raw):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return None, f'[{index}] "{item}" is not an address or a network such as "10.0.0.0/8"'
    return tuple(raw), None


def _check_admin_users(general: GeneralConfig | None, users: list[UserConfig | None], problems: list[str]) -> None:
    """Every name in general.admin_users and general.listen_user is a [[users]] entry (the console logs users
    in as any client; the notification hub logs in as that user)."""
    if general is None:
        return
    known = {user.name for user in users if user is not None}
    for index, name in enumerate(general.admin_users):
        if name not in known:
            problems.append(f'general.admin_users[{index}]: no [[users]] entry is named "{name}"')
    if general.listen_user and general.listen_user not in known:
        problems.append(f'general.listen_user: no [[users]] entry is named "{general.listen_user}"')
    if general.admin_token and len(general.admin_token) < 16:
        problems.append("general.admin_token: must be at least 16 characters (a bearer token guards the HTTP admin API)")


def _parse_users(
    data: dict[str, Any], general: GeneralConfig | None, *, has_jwt: bool, problems: list[str]
) -> list[UserConfig | None]:
    tables = _array_of_tables(data, "users", problems)
    defaults = general or GeneralConfig()
    users: list[UserConfig | None] = []
    first_index: dict[str, int] = {}
    for index, table in enumerate(tables):
        path = f"users[{index}]"
        if table is None:
            users.append(None)
            continue
        section = _Section(table, path, UserConfig, problems)
        name = section.string("name", required=True, allow_empty=False)
        password = section.string("password", secret=True)
        auth = section.choice("auth", AUTH_METHODS)
        section.string("server_user", allow_empty=False)
        server_password = section.string("server_password", secret=True)
        section.choice("pool_mode", POOL_MODES)
        pool_size = section.integer("pool_size", minimum=1)
        min_size = section.integer("min_pool_size", minimum=0)
        required_scope = section.string("required_scope", allow_empty=False)
        section.integer("max_connections", minimum=1)
        section.integer("query_timeout_ms", minimum=0)
        section.integer("idle_in_transaction_timeout_ms", minimum=0)
        section.seconds("client_idle_timeout_s")
        section.finish()

        if name is not None:
            if name in first_index:
                problems.append(f'{path}.name: duplicate user "{name}" (first in users[{first_index[name]}])')
            else:
                first_index[name] = index
        if auth == "jwt" and not has_jwt:
            problems.append(f'{path}.auth: "jwt" requires a [jwt] section')
        if required_scope is not None and auth is not None and auth != "jwt":
            problems.append(f'{path}.required_scope: only used with auth "jwt" (got auth "{auth}")')
        if password is not None and auth is not None:
            _check_password(path, password, auth, problems)
        if server_password is not None and server_password.startswith(SCRAM_PREFIX):
            problems.append(
                f"{path}.server_password: must be the password PostgreSQL expects, not a SCRAM verifier"
            )
        _check_user_pool_sizes(path, pool_size, min_size, defaults, section, problems)
        users.append(section.build())
    return users


def _check_password(path: str, password: str, auth: str, problems: list[str]) -> None:
    if password.startswith(SCRAM_PREFIX):
        reason = _scram_verifier_problem(password)
        if reason:
            problems.append(f"{path}.password: malformed SCRAM verifier: {reason}")
        if auth != "scram-sha-256":
            problems.append(
                f'{path}.password: a SCRAM verifier only works with auth "scram-sha-256" (got "{auth}")'
            )
    elif is_md5_hash(password) and auth != "md5":
        # PostgreSQL also treats "md5" + 32 hex digits as a stored hash, never as a plain password.
        problems.append(f'{path}.password: an md5 hash only works with auth "md5" (got "{auth}")')
    elif not password and auth in ("scram-sha-256", "md5", "plain"):
        problems.append(
            f'{path}.password: required for auth "{auth}" (use auth "trust" to allow no password)'
        )


def _scram_verifier_problem(verifier: str) -> str | None:
    """Why `verifier` is not SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>, or None."""
    body = verifier[len(SCRAM_PREFIX) :]
    head, sep, keys = body.partition("$")
    iterations, sep_salt, salt = head.partition(":")
    stored_key, sep_keys, server_key = keys.partition(":")
    if not (sep and sep_salt and sep_keys):
        return "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
    if not iterations.isascii() or not iterations.isdigit() or int(iterations) < 1:
        return f'iteration count must be a positive integer (got "{iterations}")'
    if not _decode_base64(salt):
        return "salt must be non-empty base64"
    for label, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        decoded = _decode_base64(key)
        if decoded is None or len(decoded) != SCRAM_KEY_BYTES:
            return f"{label} must be base64 of {SCRAM_KEY_BYTES} bytes"
    return None


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_user_pool_sizes(
    path: str,
    pool_size: int | None,
    min_size: int | None,
    general: GeneralConfig,
    section: _Section,
    problems: list[str],
) -> None:
    if section.failed("pool_size") or section.failed("min_pool_size"):
        return
    size = pool_size if pool_size is not None else general.default_pool_size
    size_from = f"{path}.pool_size" if pool_size is not None else "general.default_pool_size"
    if min_size is not None and min_size > size:
        problems.append(f"{path}.min_pool_size: must be <= {size_from} {size} (got {min_size})")
    elif min_size is None and general.min_pool_size > size:
        problems.append(
            f"{path}.pool_size: smaller than general.min_pool_size {general.min_pool_size};"
            f" set {path}.min_pool_size too"
        )


def _parse_databases(data: dict[str, Any], problems: list[str]) -> list[DatabaseConfig | None]:
    tables = _array_of_tables(data, "databases", problems)
    databases: list[DatabaseConfig | None] = []
    primaries: dict[tuple[str, int], int] = {}
    for index, table in enumerate(tables):
        path = f"databases[{index}]"
        if table is None:
            databases.append(None)
            continue
        section = _Section(table, path, DatabaseConfig, problems)
        name = section.string("name", required=True, allow_empty=False)
        section.string("host", allow_empty=False)
        section.integer("port", minimum=1, maximum=65535)
        section.string("database_name", allow_empty=False)
        role = section.choice("role", SERVER_ROLES)
        shard = section.integer("shard", minimum=0)
        section.integer("max_connections", minimum=1)
        section.finish()

        if name == WILDCARD_DATABASE:
            _check_wildcard(path, section, primaries, problems)
        if name is not None and role == "primary" and shard is not None:
            key = (name, shard)
            if key in primaries:
                problems.append(
                    f'{path}.role: database "{name}" shard {shard} already has a primary'
                    f" (databases[{primaries[key]}]); use role replica or auto"
                )
            else:
                primaries[key] = index
        databases.append(section.build())
    _check_shard_numbers(databases, problems)
    _check_database_limits(databases, problems)
    return databases


def _check_wildcard(path: str, section: _Section, primaries: dict[tuple[str, int], int],
                    problems: list[str]) -> None:
    """The wildcard entry names a server only: the database name is the client's, one primary, no shards."""
    table = section.table
    for key, why in (("database_name", "the server database is the name the client asks for"),
                     ("shard", "a database the wildcard serves has one shard"),
                     ("max_connections", "not built for the wildcard; give the database its own entry")):
        if key in table:
            problems.append(f'{path}.{key}: not allowed on the wildcard database "*" ({why})')
    if table.get("role", "primary") != "primary":
        problems.append(f'{path}.role: the wildcard database "*" has one server, role "primary" '
                        f'(got {_describe(table.get("role"))})')
    first = primaries.get((WILDCARD_DATABASE, 0))
    if first is not None:
        problems.append(f'{path}.name: only one wildcard database "*" (first in databases[{first}])')


def _check_database_limits(databases: list[DatabaseConfig | None], problems: list[str]) -> None:
    """max_connections belongs to the logical database: its entries (shards, replicas) agree on it."""
    first: dict[str, tuple[int, int]] = {}
    for index, database in enumerate(databases):
        if database is None or database.max_connections is None:
            continue
        seen = first.setdefault(database.name, (index, database.max_connections))
        if seen[1] != database.max_connections:
            problems.append(f'databases[{index}].max_connections: {database.max_connections} differs from '
                            f'databases[{seen[0]}].max_connections {seen[1]} for database "{database.name}" '
                            "(the limit is the logical database's: set it once, or the same everywhere)")


def _check_shard_numbers(databases: list[DatabaseConfig | None], problems: list[str]) -> None:
    """The shards of a database are numbered 0 to N-1: a gap would leave a shard number with no server."""
    shards: dict[str, dict[int, int]] = {}
    for index, database in enumerate(databases):
        if database is not None:
            shards.setdefault(database.name, {}).setdefault(database.shard, index)
    for name, found in shards.items():
        for shard in sorted(found):
            if shard and shard - 1 not in found:
                problems.append(
                    f'databases[{found[shard]}].shard: database "{name}" has shard {shard} but no shard {shard - 1}'
                    f" (shards are numbered from 0 without gaps)"
                )


# --- sharded and omnisharded tables ----------------------------------------------------------


def _shards_by_database(data: dict[str, Any]) -> dict[str, set[int]]:
    """Shard numbers per database name, read from the raw [[databases]] entries (even ones with other
    problems, so a typo there does not also make every sharded table's database unknown)."""
    shards: dict[str, set[int]] = {}
    entries = data.get("databases", [])
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            shard = entry.get("shard", 0)
            found = shards.setdefault(entry["name"], set())
            if _is_int(shard) and shard >= 0:
                found.add(shard)
    return shards


def _parse_sharded_tables(
    data: dict[str, Any], shards_of: dict[str, set[int]], problems: list[str]
) -> list[ShardedTableConfig | None]:
    tables = _array_of_tables(data, "sharded_tables", problems, required=False)
    entries: list[ShardedTableConfig | None] = []
    first_index: dict[tuple[str, str, str | None], int] = {}
    for index, table in enumerate(tables):
        path = f"sharded_tables[{index}]"
        if table is None:
            entries.append(None)
            continue
        section = _Section(table, path, ShardedTableConfig, problems)
        database = section.string("database", required=True, allow_empty=False)
        table_name = section.string("table", allow_empty=False)
        column = section.string("column", required=True, allow_empty=False)
        data_type = section.checked("data_type", _check_named_choice("data type", SHARD_KEY_TYPES), required=True)
        method = section.checked("method", _check_named_choice("method", SHARDING_METHODS))
        raw_ranges = section.raw("ranges")
        raw_values = section.raw("values")
        section.finish()

        shards = _database_shards(path, database, shards_of, problems)
        if method is not None:
            _check_method_keys(path, method, raw_ranges, raw_values, problems)
        if method == "range" and raw_ranges is not None and not section.failed("data_type"):
            section.set("ranges", _parse_ranges(f"{path}.ranges", raw_ranges, data_type, shards, database, problems))
        if method == "list" and raw_values is not None and not section.failed("data_type"):
            section.set("values", _parse_values(f"{path}.values", raw_values, data_type, shards, database, problems))

        if database is not None and column is not None and not section.failed("table"):
            # One entry per table, or one per column for "any table with the column".
            key = (database, table_name, None) if table_name is not None else (database, "", column)
            if key in first_index:
                first = f"sharded_tables[{first_index[key]}]"
                if table_name is not None:
                    problems.append(f'{path}.table: table "{table_name}" of database "{database}" is already'
                                    f" sharded by {first}")
                else:
                    problems.append(f'{path}.column: database "{database}" already shards every table with'
                                    f' column "{column}" ({first})')
            else:
                first_index[key] = index
        entries.append(section.build())
    return entries


def _database_shards(
    path: str, database: str | None, shards_of: dict[str, set[int]], problems: list[str]
) -> set[int] | None:
    """The shard numbers of a sharded table's database; None (and a problem) when it has no [[databases]]."""
    if database is None:
        return None
    shards = shards_of.get(database)
    if shards is None:
        known = ", ".join(f'"{name}"' for name in sorted(shards_of)) or "none"
        problems.append(f'{path}.database: no [[databases]] entry is named "{database}" (databases: {known})')
    return shards


def _check_method_keys(path: str, method: str, ranges: Any, values: Any, problems: list[str]) -> None:
    if ranges is not None and method != "range":
        problems.append(f'{path}.ranges: only used with method "range" (got method "{method}")')
    if values is not None and method != "list":
        problems.append(f'{path}.values: only used with method "list" (got method "{method}")')
    if ranges is None and method == "range":
        problems.append(f'{path}.ranges: required for method "range": [{{ shard = 0, start = ..., end = ... }}, ...]')
    if values is None and method == "list":
        problems.append(f'{path}.values: required for method "list": [{{ shard = 0, values = [...] }}, ...]')


def _entry_tables(path: str, raw: Any, shape: str, problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The tables of an inline array (ranges, values), each with its key path; problems for the rest."""
    if not isinstance(raw, list):
        problems.append(f"{path}: must be an array of tables like [{shape}] (got {_describe(raw)})")
        return []
    if not raw:
        problems.append(f"{path}: must not be empty")
    entries = []
    for index, item in enumerate(raw):
        if isinstance(item, dict):
            entries.append((f"{path}[{index}]", item))
        else:
            problems.append(f"{path}[{index}]: must be a table like {shape} (got {_describe(item)})")
    return entries


def _check_shard_exists(
    path: str, shard: int | None, shards: set[int] | None, database: str | None, problems: list[str]
) -> None:
    if shard is None or shards is None or shard in shards:
        return
    held = ", ".join(map(str, sorted(shards))) or "none"
    problems.append(f'{path}: database "{database}" has no shard {shard} (its [[databases]] entries hold'
                    f" shards {held}); add a [[databases]] entry with shard = {shard}")


def _parse_ranges(
    path: str, raw: Any, data_type: str, shards: set[int] | None, database: str | None, problems: list[str]
) -> tuple[ShardRange, ...]:
    ranges: list[tuple[str, ShardRange]] = []
    for entry_path, table in _entry_tables(path, raw, "{ shard = 0, start = 0, end = 1000 }", problems):
        section = _Section(table, entry_path, ShardRange, problems)
        shard = section.checked("shard", _check_integer(0, None), required=True)
        start = section.checked("start", _check_key(data_type, end=False))
        end = section.checked("end", _check_key(data_type, end=True))
        section.finish()
        _check_shard_exists(f"{entry_path}.shard", shard, shards, database, problems)
        if start is not None and end is not None and not _key_order(start) < _key_order(end):
            problems.append(f"{entry_path}.end: must be above start {_describe_value(start)}"
                            f" (got {_describe_value(end)}); the range [start, end) would hold no key")
            continue
        built = section.build()
        if built is not None:
            ranges.append((entry_path, built))
    # Sorted by start (an open start first), each range must start at or after every earlier range's end.
    ordered = sorted(ranges, key=lambda item: (item[1].start is not None, _key_order(item[1].start)))
    reach: tuple[str, ShardRange] | None = None  # the range reaching furthest so far
    for entry_path, entry in ordered:
        if reach is not None:
            reach_path, reach_range = reach
            if reach_range.end is None or entry.start is None or _key_order(entry.start) < _key_order(reach_range.end):
                problems.append(f"{entry_path}: {_describe_range(entry)} overlaps"
                                f" {reach_path.rpartition('.')[2]} {_describe_range(reach_range)}")
            if reach_range.end is None or (entry.end is not None and _key_order(entry.end) <= _key_order(reach_range.end)):
                continue
        reach = (entry_path, entry)
    return tuple(built for _, built in ranges)


def _parse_values(
    path: str, raw: Any, data_type: str, shards: set[int] | None, database: str | None, problems: list[str]
) -> tuple[ShardValues, ...]:
    entries: list[ShardValues] = []
    first_seen: dict[ShardKeyValue, tuple[int, str]] = {}
    check_value = _check_key(data_type, end=False)
    for entry_path, table in _entry_tables(path, raw, '{ shard = 0, values = ["eu", "uk"] }', problems):
        section = _Section(table, entry_path, ShardValues, problems)
        shard = section.checked("shard", _check_integer(0, None), required=True)
        raw_list = section.raw("values")
        section.finish()
        _check_shard_exists(f"{entry_path}.shard", shard, shards, database, problems)
        values: list[ShardKeyValue] = []
        if raw_list is None:
            problems.append(f"{entry_path}.values: required (the key values shard {shard} holds)")
        elif not isinstance(raw_list, list):
            problems.append(f"{entry_path}.values: must be an array (got {_describe(raw_list)})")
        elif not raw_list:
            problems.append(f"{entry_path}.values: must not be empty")
        else:
            for item_index, item in enumerate(raw_list):
                item_path = f"{entry_path}.values[{item_index}]"
                value, problem = check_value(item)
                if problem is not None:
                    problems.append(f"{item_path}: {problem}")
                    continue
                if value in first_seen:
                    other_shard, other_path = first_seen[value]
                    where = f"shard {other_shard}" if other_shard != shard else "this shard"
                    problems.append(f"{item_path}: {_describe_value(value)} is already listed for {where}"
                                    f" ({other_path}); a value belongs to one shard")
                    continue
                if shard is not None:
                    first_seen[value] = (shard, item_path)
                values.append(value)
        section.set("values", tuple(values))
        built = section.build()
        if built is not None:
            entries.append(built)
    return tuple(entries)


def _check_key(data_type: str, *, end: bool) -> Checker:
    """A configured key value of `data_type`: a range bound (an exclusive end may be one above the type's
    maximum) or a list value. Uuids are stored in canonical lowercase form."""

    kind = f"{'an' if data_type == 'integer' else 'a'} {data_type} key"

    def check(raw: Any) -> tuple[Any, str | None]:
        if data_type in _INTEGER_BOUNDS:
            low, high = _INTEGER_BOUNDS[data_type]
            high += 1 if end else 0
            if _is_int(raw) and low <= raw <= high:
                return raw, None
            return None, f"must be an integer between {low} and {high} for {kind} (got {_describe(raw)})"
        if not isinstance(raw, str):
            return None, f"must be a string for {kind} (got {_describe(raw)})"
        if data_type == "uuid":
            canonical = _canonical_uuid(raw)
            if canonical is None:
                return None, f'must be a uuid like "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" (got "{raw}")'
            return canonical, None
        return raw, None

    return check


def _canonical_uuid(text: str) -> str | None:
    """PostgreSQL's uuid input syntax (32 hex digits, optional braces, a hyphen allowed after any group
    of four) to the 8-4-4-4-12 lowercase form, or None."""
    body = text[1:-1] if text[:1] == "{" and text[-1:] == "}" else text
    groups: list[str] = []
    position = 0
    while len(groups) < 8:
        chunk = body[position : position + 4]
        if len(chunk) != 4 or not _HEX_DIGITS.issuperset(chunk):
            return None
        groups.append(chunk.lower())
        position += 4
        if len(groups) < 8 and body[position : position + 1] == "-":
            position += 1
    if position != len(body):
        return None
    digits = "".join(groups)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _key_order(value: ShardKeyValue | None) -> Any:
    """What range bounds compare: integers as numbers, text by UTF-8 bytes (as routing does), canonical
    uuids as text (the same order as their bytes)."""
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else value


def _describe_range(entry: ShardRange) -> str:
    start = "..." if entry.start is None else _describe_value(entry.start)
    end = "..." if entry.end is None else _describe_value(entry.end)
    return f"[{start}, {end}) of shard {entry.shard}"


def _parse_omnisharded_tables(
    data: dict[str, Any], shards_of: dict[str, set[int]], problems: list[str]
) -> list[OmnishardedTableConfig | None]:
    tables = _array_of_tables(data, "omnisharded_tables", problems, required=False)
    # From the raw [[sharded_tables]], so a sharded entry with another mistake still counts as sharded.
    raw_sharded = data.get("sharded_tables", [])
    sharded_index: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(raw_sharded if isinstance(raw_sharded, list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("database"), str) and isinstance(entry.get("table"), str):
            sharded_index.setdefault((entry["database"], entry["table"]), index)
    entries: list[OmnishardedTableConfig | None] = []
    first_index: dict[tuple[str, str], int] = {}
    for index, table in enumerate(tables):
        path = f"omnisharded_tables[{index}]"
        if table is None:
            entries.append(None)
            continue
        section = _Section(table, path, OmnishardedTableConfig, problems)
        database = section.string("database", required=True, allow_empty=False)
        name = section.string("table", required=True, allow_empty=False)
        section.finish()
        _database_shards(path, database, shards_of, problems)
        if database is not None and name is not None:
            key = (database, name)
            if key in sharded_index:
                problems.append(f'{path}.table: table "{name}" of database "{database}" is sharded'
                                f" (sharded_tables[{sharded_index[key]}]); a table is sharded or omnisharded")
            elif key in first_index:
                problems.append(f'{path}.table: table "{name}" of database "{database}" is already listed'
                                f" (omnisharded_tables[{first_index[key]}])")
            else:
                first_index[key] = index
        entries.append(section.build())
    return entries


def _parse_two_phase_commit(table: dict[str, Any] | None, data: dict[str, Any],
                            problems: list[str]) -> TwoPhaseCommitConfig | None:
    if table is None:
        return None
    section = _Section(table, "two_phase_commit", TwoPhaseCommitConfig, problems)
    log_database = section.string("log_database")
    log_user = section.string("log_user")
    section.seconds("recovery_interval_s")
    section.seconds("prepared_timeout_s")
    section.seconds("lease_s")
    section.seconds("commit_timeout_s")
    section.finish()
    databases = {entry.get("name") for entry in data.get("databases", []) if isinstance(entry, dict)}
    if log_database and log_database not in databases:
        problems.append(f'two_phase_commit.log_database: no [[databases]] entry is named "{log_database}"')
    users = {entry.get("name") for entry in data.get("users", []) if isinstance(entry, dict)}
    if log_user and log_user not in users:
        problems.append(f'two_phase_commit.log_user: no [[users]] entry is named "{log_user}"')
    return section.build()


def _parse_jwt(table: dict[str, Any], problems: list[str]) -> JwtConfig | None:
    section = _Section(table, "jwt", JwtConfig, problems)
    section.strings("algorithms", choices=JWT_ALGORITHMS, non_empty=True)
    secret = section.string("secret", allow_empty=False, secret=True)
    secret_file = section.string("secret_file", allow_empty=False)
    public_keys = section.strings("public_keys")
    jwks_file = section.string("jwks_file", allow_empty=False)
    section.string("issuer", allow_empty=False)
    section.checked("audience", _check_audience)
    section.strings("required_claims")
    section.seconds("leeway_s")
    section.integer("max_token_bytes", minimum=1)
    section.integer("cache_size", minimum=0)
    section.boolean("replay_protection")
    section.string("revoked_jti_file", allow_empty=False)
    section.string("role_claim", allow_empty=False)
    section.strings("allowed_roles")
    tenant_claim = section.string("tenant_claim", allow_empty=False)
    shard_by_tenant = section.boolean("shard_by_tenant_claim")
    section.strings("claims")
    section.boolean("switch_role")
    section.finish()

    if shard_by_tenant and tenant_claim is None and not section.failed("tenant_claim"):
        problems.append("jwt.shard_by_tenant_claim: needs jwt.tenant_claim, the claim whose value is the sharding key")
    key_sources = ("secret", "secret_file", "public_keys", "jwks_file")
    if not (secret or secret_file or public_keys or jwks_file) and not any(map(section.failed, key_sources)):
        problems.append("jwt: needs a key: set secret, secret_file, public_keys or jwks_file")
    return section.build()


def _parse_http(table: dict[str, Any], data: dict[str, Any], problems: list[str]) -> HttpConfig | None:
    """[http]: SQL over HTTP; with `listen` set it needs a JWT user, a database and a [jwt] section."""
    section = _Section(table, "http", HttpConfig, problems)
    listen = section.address("listen", allow_empty=True)
    user = section.string("user")
    database = section.string("database")
    section.integer("max_body_bytes", minimum=2)
    section.integer("max_statements", minimum=1)
    section.integer("max_result_rows", minimum=1)
    section.integer("max_connections", minimum=1)
    section.seconds("keep_alive_timeout_s")
    section.finish()
    if listen:
        users = {entry.get("name"): entry for entry in data.get("users", []) if isinstance(entry, dict)}
        if not user and not section.failed("user"):
            problems.append("http.user: required when http.listen is set: the [[users]] entry (auth = \"jwt\") "
                            "that HTTP requests log in as")
        elif user and user not in users:
            problems.append(f'http.user: no [[users]] entry is named "{user}"')
        elif user and users[user].get("auth") != "jwt":
            problems.append(f'http.user: [[users]] entry "{user}" must have auth = "jwt" (requests carry a JWT)')
        databases = {entry.get("name") for entry in data.get("databases", []) if isinstance(entry, dict)}
        if not database and not section.failed("database"):
            problems.append("http.database: required when http.listen is set: the [[databases]] name requests use")
        elif database and database not in databases:
            problems.append(f'http.database: no [[databases]] entry is named "{database}"')
        if "jwt" not in data:
            problems.append("http.listen: SQL over HTTP authenticates with JWTs: it needs a [jwt] section")
    return section.build()


def _parse_tls(table: dict[str, Any], problems: list[str]) -> TlsConfig | None:
    """[tls]: files are only named here; proxy/tls.py loads them (and names the key of one it cannot use)."""
    section = _Section(table, "tls", TlsConfig, problems)
    mode = section.choice("mode", CLIENT_TLS_MODES)
    cert_file = section.string("cert_file", allow_empty=False)
    key_file = section.string("key_file", allow_empty=False)
    if table.get("min_version") in ("1.0", "1.1"):
        section.known.append("min_version")
        section.invalid.add("min_version")
        problems.append(f'tls.min_version: TLS {table["min_version"]} is refused (insecure); use "1.2" or "1.3"')
    else:
        section.choice("min_version", TLS_VERSIONS)
    section.string("ciphers", allow_empty=False)
    client_ca_file = section.string("client_ca_file", allow_empty=False)
    client_cert = section.choice("client_cert", CLIENT_CERT_MODES)
    server_tls = section.choice("server_tls", SERVER_TLS_MODES)
    section.string("server_ca_file", allow_empty=False)
    server_cert_file = section.string("server_cert_file", allow_empty=False)
    server_key_file = section.string("server_key_file", allow_empty=False)
    section.finish()

    if mode in ("allow", "require"):
        for key, value in (("cert_file", cert_file), ("key_file", key_file)):
            if value is None and not section.failed(key):
                problems.append(f'tls.{key}: required when tls.mode is "{mode}"')
    if client_cert is not None and client_ca_file is None and not section.failed("client_ca_file"):
        problems.append("tls.client_cert: needs tls.client_ca_file, the CA that signs client certificates")
    if client_ca_file is not None and mode == "disable":
        problems.append('tls.client_ca_file: client certificates need TLS: set tls.mode to "allow" or "require"')
    if client_ca_file is not None and client_cert is None:
        section.set("client_cert", "verify-ca")
    if (server_cert_file is None) != (server_key_file is None):
        missing = "server_key_file" if server_key_file is None else "server_cert_file"
        if not section.failed(missing):
            problems.append(f"tls.{missing}: server_cert_file and server_key_file go together (a client certificate "
                            "toward PostgreSQL and its key)")
    if server_tls == "disable" and server_cert_file is not None:
        problems.append('tls.server_cert_file: unused while tls.server_tls is "disable"')
    return section.build()


# --- generic table reading ------------------------------------------------------------------

_MISSING: Any = object()

# A checker turns a raw TOML value into (model value, None) or (None, problem).
Checker = Callable[[Any], tuple[Any, str | None]]


class _Section:
    """Reads one TOML table into dataclass kwargs, recording problems under its key path.

    Each typed read declares the key (anything else is reported as unknown) and returns
    the value the model will hold: the parsed value, the model default when absent, or
    None when invalid or required and absent. Only parsed values are passed to the model.
    """

    def __init__(self, table: dict[str, Any], path: str, model: type, problems: list[str]) -> None:
        self.table = table
        self.path = path
        self.model = model
        self.problems = problems
        self.values: dict[str, Any] = {}
        self.known: list[str] = []
        self.invalid: set[str] = set()
        self._first_problem = len(problems)

    # typed reads

    def string(
        self, key: str, *, required: bool = False, allow_empty: bool = True, secret: bool = False
    ) -> str | None:
        return self._read(key, _check_string(allow_empty, secret), required=required)

    def choice(self, key: str, choices: Sequence[str]) -> str | None:
        return self._read(key, _check_choice(choices))

    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        return self._read(key, _check_integer(minimum, maximum))

    def seconds(self, key: str) -> float | None:
        return self._read(key, _check_seconds)

    def boolean(self, key: str) -> bool | None:
        return self._read(key, _check_boolean)

    def address(self, key: str, *, allow_empty: bool = False) -> str | None:
        return self._read(key, _check_address(allow_empty))

    def strings(
        self, key: str, *, choices: Sequence[str] | None = None, non_empty: bool = False
    ) -> tuple[str, ...] | None:
        return self._read(key, _check_strings(choices, non_empty))

    def checked(self, key: str, checker: Checker, *, required: bool = False) -> Any:
        """A key read with a checker of the caller's (see _check_named_choice)."""
        return self._read(key, checker, required=required)

    def raw(self, key: str) -> Any:
        """Declare a key the caller reads itself (nested tables): its raw value, or None when absent.
        The caller stores what it parsed with `set`."""
        self.known.append(key)
        return self.table.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    # bookkeeping

    def failed(self, key: str) -> bool:
        return key in self.invalid

    def finish(self) -> None:
        _report_unknown_keys(self.table, self.known, self.path, self.problems)

    def build(self) -> Any:
        """The dataclass, or None if this table recorded any problem."""
        if len(self.problems) > self._first_problem:
            return None
        return self.model(**self.values)

    def _read(self, key: str, checker: Checker, *, required: bool = False) -> Any:
        self.known.append(key)
        raw = self.table.get(key, _MISSING)
        if raw is _MISSING:
            if required:
                self.problems.append(f"{self.path}.{key}: required")
                self.invalid.add(key)
                return None
            return _model_default(self.model, key)
        value, problem = checker(raw)
        if problem is not None:
            self.problems.append(f"{self.path}.{key}: {problem}")
            self.invalid.add(key)
            return None
        self.values[key] = value
        return value


def _check_string(allow_empty: bool, secret: bool) -> Checker:
    def check(raw: Any) -> tuple[Any, str | None]:
        if not isinstance(raw, str):
            # Never echo a secret, even a mistyped one: these messages end up in logs.
            got = _toml_type(raw) if secret else _describe(raw)
            return None, f"must be a string (got {got})"
        if not allow_empty and not raw.strip():
            return None, "must not be empty"
        return raw, None

    return check


def _check_choice(choices: Sequence[str]) -> Checker:
    def check(raw: Any) -> tuple[Any, str | None]:
        if not isinstance(raw, str) or raw not in choices:
            return None, f"must be one of {', '.join(choices)} (got {_describe_value(raw)})"
        return raw, None

    return check


def _check_integer(minimum: int | None, maximum: int | None) -> Checker:
    def check(raw: Any) -> tuple[Any, str | None]:
        if _is_int(raw) and (minimum is None or raw >= minimum) and (maximum is None or raw <= maximum):
            return raw, None
        if minimum is not None and maximum is not None:
            expected = f"an integer between {minimum} and {maximum}"
        elif minimum is not None:
            expected = f"an integer >= {minimum}"
        else:
            expected = "an integer"
        return None, f"must be {expected} (got {_describe_value(raw)})"

    return check


def _check_named_choice(label: str, choices: Sequence[str]) -> Checker:
    """Like _check_choice, worded for a name the user picks from a short list: 'unknown data type "float"'."""

    def check(raw: Any) -> tuple[Any, str | None]:
        if not isinstance(raw, str):
            return None, f"must be one of {', '.join(choices)} (got {_describe(raw)})"
        if raw not in choices:
            return None, f'unknown {label} "{raw}" ({", ".join(choices)})'
        return raw, None

    return check


def _check_seconds(raw: Any) -> tuple[Any, str | None]:
    if (_is_int(raw) or isinstance(raw, float)) and math.isfinite(raw) and raw >= 0:
        return float(raw), None
    return None, f"must be a number of seconds >= 0 (got {_describe_value(raw)})"


def _check_boolean(raw: Any) -> tuple[Any, str | None]:
    if isinstance(raw, bool):
        return raw, None
    return None, f"must be true or false (got {_describe_value(raw)})"


def _check_address(allow_empty: bool) -> Checker:
    def check(raw: Any) -> tuple[Any, str | None]:
        if not isinstance(raw, str):
            return None, f"must be a string (got {_describe(raw)})"
        if allow_empty and raw == "":
            return raw, None
        try:
            split_address(raw)
        except ValueError as exc:
            disable = ', or "" to disable' if allow_empty else ""
            return None, f'{exc}{disable} (got "{raw}")'
        return raw, None

    return check


def _check_strings(choices: Sequence[str] | None, non_empty: bool) -> Checker:
    def check(raw: Any) -> tuple[Any, str | None]:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            return None, f"must be an array of strings (got {_describe(raw)})"
        if non_empty and not raw:
            return None, "must not be empty"
        if choices is not None:
            wrong = [item for item in raw if item not in choices]
            if wrong:
                got = ", ".join(f'"{item}"' for item in wrong)
                return None, f"each must be one of {', '.join(choices)} (got {got})"
        return tuple(raw), None

    return check


def _check_audience(raw: Any) -> tuple[Any, str | None]:
    """jwt.audience: one string or an array of them, as PostgREST's jwt-aud."""
    if isinstance(raw, str):
        if not raw.strip():
            return None, "must not be empty"
        return (raw,), None
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return tuple(raw), None
    return None, f"must be a string or an array of strings (got {_describe(raw)})"


# --- helpers --------------------------------------------------------------------------------


def _table(data: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any] | None:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a table ([{key}]) (got {_describe(value)})")
        return None
    return value


def _array_of_tables(
    data: dict[str, Any], key: str, problems: list[str], *, required: bool = True
) -> list[dict[str, Any] | None]:
    value = data.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{key}: must be an array of tables ([[{key}]]) (got {_describe(value)})")
        return []
    tables: list[dict[str, Any] | None] = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            tables.append(item)
        else:
            problems.append(f"{key}[{index}]: must be a table (got {_describe(item)})")
            tables.append(None)
    if not value and required:
        problems.append(f"{key}: at least one [[{key}]] entry is required")
    return tables


def _report_unknown_keys(table: dict[str, Any], known: Sequence[str], path: str, problems: list[str]) -> None:
    prefix = f"{path}." if path else ""
    for key in table:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        problems.append(f"{prefix}{key}: unknown key{hint}")


def _model_default(model: type, key: str) -> Any:
    for model_field in dataclasses.fields(model):
        if model_field.name == key:
            if model_field.default is not dataclasses.MISSING:
                return model_field.default
            if model_field.default_factory is not dataclasses.MISSING:
                return model_field.default_factory()
    return None


def _same_address(first: str, second: str) -> bool:
    try:
        first_host, first_port = split_address(first)
        second_host, second_port = split_address(second)
    except ValueError:
        return False
    return first_port != 0 and first_port == second_port and first_host == second_host


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """TOML type name, plus the value when it is short, for "got ..." in messages."""
    if isinstance(value, str | int | float):
        return f"{_toml_type(value)} {_describe_value(value)}"
    return _toml_type(value)


def _describe_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_type(value)


def _toml_type(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.date | datetime.time):
        return "date/time"
    return type(value).__name__


def _describe_syntax_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the position is only in the message.
    message = str(exc)
    match = _TOML_POSITION.search(message)
    if match is None:
        return f"{path}: invalid TOML: {message}"
    reason = message[: match.start()]
    if match.group(1) is None:
        last_line = len(text.splitlines()) or 1
        return f"{path}, line {last_line} (end of file): invalid TOML: {reason}"
    return f"{path}, line {match.group(1)}, column {match.group(2)}: invalid TOML: {reason}"
