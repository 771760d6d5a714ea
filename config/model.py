"""Typed configuration model: one frozen dataclass per TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field

POOL_MODES = ("session", "transaction", "statement")
AUTH_METHODS = ("scram-sha-256", "md5", "plain", "trust", "jwt")
SERVER_ROLES = ("primary", "replica", "auto")
READ_WRITE_SPLIT = ("include_primary", "exclude_primary")
LOAD_BALANCING = ("round_robin", "random", "least_connections")


@dataclass(frozen=True, slots=True)
class GeneralConfig:
    listen: str = "127.0.0.1:6432"
    admin_listen: str = "127.0.0.1:9930"
    pool_mode: str = "transaction"
    default_pool_size: int = 10
    min_pool_size: int = 0
    checkout_timeout_ms: int = 5000
    idle_timeout_s: float = 600.0
    server_lifetime_s: float = 3600.0
    max_client_connections: int = 10000
    healthcheck_idle_ms: int = 1000
    server_connect_timeout_ms: int = 5000
    server_reset_query: str = "DISCARD ALL"
    shutdown_timeout_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "text"
    # read/write splitting and cluster health (issue 4)
    read_write_split: str = "include_primary"
    load_balancing: str = "round_robin"
    healthcheck_interval_ms: int = 5000
    ban_timeout_s: float = 30.0
    max_replica_lag_ms: int = 0
    max_replica_lag_bytes: int = 0
    read_your_writes_ms: int = 0
    replica_stickiness: bool = False


@dataclass(frozen=True, slots=True)
class UserConfig:
    name: str
    password: str = ""
    auth: str = "scram-sha-256"
    server_user: str | None = None
    server_password: str | None = None
    pool_mode: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    required_scope: str | None = None

    @property
    def backend_user(self) -> str:
        return self.server_user or self.name

    @property
    def backend_password(self) -> str:
        return self.server_password if self.server_password is not None else self.password


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    database_name: str | None = None
    role: str = "primary"
    shard: int = 0

    @property
    def server_database(self) -> str:
        return self.database_name or self.name


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """[jwt] section; filled in by the JWT feature (see config/jwt.py when present)."""

    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = None
    secret_file: str | None = None
    public_keys: tuple[str, ...] = ()
    jwks_file: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    required_claims: tuple[str, ...] = ()
    leeway_s: float = 0.0
    max_token_bytes: int = 8192
    cache_size: int = 10000
    replay_protection: bool = False
    revoked_jti_file: str | None = None
    role_claim: str = "role"
    allowed_roles: tuple[str, ...] = ()
    tenant_claim: str | None = None
    claims: tuple[str, ...] = ("sub", "role", "email")
    switch_role: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    users: tuple[UserConfig, ...] = ()
    databases: tuple[DatabaseConfig, ...] = ()
    jwt: JwtConfig | None = None
    source_path: str | None = None

    def user(self, name: str) -> UserConfig | None:
        for user in self.users:
            if user.name == name:
                return user
        return None

    def servers_for(self, database: str) -> tuple[DatabaseConfig, ...]:
        return tuple(db for db in self.databases if db.name == database)
