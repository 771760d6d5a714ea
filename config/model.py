"""Typed configuration model: one frozen dataclass per TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field

POOL_MODES = ("session", "transaction", "statement")
AUTH_METHODS = ("scram-sha-256", "md5", "plain", "trust", "jwt")
SERVER_ROLES = ("primary", "replica", "auto")
READ_WRITE_SPLIT = ("include_primary", "exclude_primary")
LOAD_BALANCING = ("round_robin", "random", "least_connections")
# Sharding key types and placement methods (routing/shard.py implements them; config imports nothing of ours).
SHARD_KEY_TYPES = ("bigint", "integer", "text", "uuid")
SHARDING_METHODS = ("hash", "range", "list")
# TLS (issue 15): toward clients, toward PostgreSQL servers (libpq's sslmode names, PgBouncer's server_tls_sslmode)
CLIENT_TLS_MODES = ("disable", "allow", "require")
CLIENT_CERT_MODES = ("verify-ca", "verify-full")
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
TLS_VERSIONS = ("1.2", "1.3")
# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are all strong and not set by this string).
DEFAULT_TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
# Databases and users not in the config (issue 17): a [[databases]] entry of this name serves any database
# name no other entry has; auth_query looks users up in PostgreSQL (PgBouncer's defaults).
WILDCARD_DATABASE = "*"
DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"


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
    # back-pressure toward servers (issue 17): the kernel buffers of a client socket's receiving side and of
    # a server socket's sending side, so a client streaming to a slow server is held back as if connected
    # directly; 0 leaves them to the kernel's autotuning
    client_to_server_buffer_bytes: int = 128 * 1024
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
    # failover (issue 17): a write with no primary waits this long for one (PgBouncer's query_wait_timeout)
    primary_wait_timeout_ms: int = 10000
    # sharding (issue 13): may an UPDATE or DELETE without its sharding key run on every shard
    allow_cross_shard_writes: bool = False
    # two-phase commit (issue 14): a transaction that wrote on several shards commits everywhere or nowhere
    two_phase_commit: bool = True
    # admin console (issue 15): users who get the console on database "shardgate" or "pgbouncer", the JWT
    # role claims that make a JWT login an admin one, and the bearer token of the HTTP admin listener
    admin_users: tuple[str, ...] = ()
    admin_jwt_roles: tuple[str, ...] = ()
    admin_token: str = ""
    # hot reload (issue 15): poll the config file every second and reload it when it changes
    watch_config: bool = False
    # LISTEN/NOTIFY in the pooled modes (issue 17): the [[users]] entry whose server login the notification
    # hub listens as, one connection per database; "" listens as each client's own user
    listen_user: str = ""
    # limits and abuse protection (issue 16): auth-failure cool-offs, connection storms, timeouts; 0 = off
    auth_failure_limit: int = 10
    auth_failure_window_s: float = 60.0
    auth_failure_cooloff_s: float = 60.0
    # addresses or CIDR networks never cooled off; loopback by default (local tools and test suites fail
    # logins on purpose; an abusive client comes from elsewhere)
    auth_failure_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_new_connections_per_s: int = 0
    max_server_connects_in_flight: int = 0
    query_timeout_ms: int = 0
    idle_in_transaction_timeout_ms: int = 0
    client_idle_timeout_s: float = 0.0
    client_login_timeout_s: float = 60.0
    # databases and users not in the config (issue 17): pools of the wildcard database closed after this
    # much idleness; users looked up with auth_query, logged in as auth_user (a [[users]] entry), cached
    autodb_idle_timeout_s: float = 3600.0
    auth_user: str = ""
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_query_cache_s: float = 30.0
    auth_dbname: str = ""  # the [[databases]] name auth_query runs on ("": the database the client asks for)


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
    # limits (issue 16): client connections of this user, and its own timeouts over [general]'s
    max_connections: int | None = None
    query_timeout_ms: int | None = None
    idle_in_transaction_timeout_ms: int | None = None
    client_idle_timeout_s: float | None = None

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
    max_connections: int | None = None  # client connections to this logical database (limits, issue 16)

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
    # sharding (issue 13): the tenant claim's value is the sharding key of the JWT client's statements
    shard_by_tenant_claim: bool = False
    claims: tuple[str, ...] = ("sub", "role", "email")
    switch_role: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """[tls]: the listener's TLS (mode, certificate, mTLS) and TLS toward PostgreSQL (server_*)."""

    mode: str = "disable"
    cert_file: str | None = None
    key_file: str | None = None
    min_version: str = "1.2"
    ciphers: str = DEFAULT_TLS_CIPHERS
    client_ca_file: str | None = None
    client_cert: str | None = None  # verify-ca (the default once client_ca_file is set) or verify-full
    server_tls: str = "prefer"
    server_ca_file: str | None = None
    server_cert_file: str | None = None
    server_key_file: str | None = None


# A configured key value: int for bigint and integer keys, str for text and uuid keys (a uuid in its
# canonical lowercase 8-4-4-4-12 form).
ShardKeyValue = int | str


@dataclass(frozen=True, slots=True)
class ShardRange:
    """One entry of a range-sharded table's `ranges`: keys from start (inclusive) to end (exclusive).

    None for start or end leaves that side open (below every key, above every key).
    """

    shard: int
    start: ShardKeyValue | None = None
    end: ShardKeyValue | None = None


@dataclass(frozen=True, slots=True)
class ShardValues:
    """One entry of a list-sharded table's `values`: the key values shard `shard` holds."""

    shard: int
    values: tuple[ShardKeyValue, ...] = ()


@dataclass(frozen=True, slots=True)
class ShardedTableConfig:
    """[[sharded_tables]]: the column whose value picks a table's shard. `table` None: every table of the
    database that has the column."""

    database: str
    column: str
    data_type: str
    table: str | None = None
    method: str = "hash"
    ranges: tuple[ShardRange, ...] = ()
    values: tuple[ShardValues, ...] = ()


@dataclass(frozen=True, slots=True)
class OmnishardedTableConfig:
    """[[omnisharded_tables]]: a table with the same rows on every shard (reads from one, writes to all)."""

    database: str
    table: str


@dataclass(frozen=True, slots=True)
class TwoPhaseCommitConfig:
    """[two_phase_commit]: where the decision log lives and how recovery runs (general.two_phase_commit
    switches 2PC on and off)."""

    log_database: str = ""  # a [[databases]] name: its shard 0 primary holds the log ("": each database's own)
    log_user: str = ""  # the [[users]] entry whose server login writes the log and recovers ("": the first)
    recovery_interval_s: float = 10.0
    prepared_timeout_s: float = 30.0  # a prepared transaction without a decision older than this is rolled back
    lease_s: float = 15.0  # an instance whose heartbeat is older than this is dead
    commit_timeout_s: float = 10.0  # the longest one round of PREPARE or COMMIT PREPARED may take


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """[http]: SQL over HTTP (`POST /v1/query`), off unless `listen` is set; requests log in as `user`
    (a [[users]] entry with auth = "jwt") to `database` with the bearer token of each request."""

    listen: str = ""
    user: str = ""
    database: str = ""
    max_body_bytes: int = 1024 * 1024
    max_statements: int = 100
    max_result_rows: int = 10000
    max_connections: int = 1000
    keep_alive_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    users: tuple[UserConfig, ...] = ()
    databases: tuple[DatabaseConfig, ...] = ()
    jwt: JwtConfig | None = None
    source_path: str | None = None
    sharded_tables: tuple[ShardedTableConfig, ...] = ()
    omnisharded_tables: tuple[OmnishardedTableConfig, ...] = ()
    two_phase_commit: TwoPhaseCommitConfig = field(default_factory=TwoPhaseCommitConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def user(self, name: str) -> UserConfig | None:
        for user in self.users:
            if user.name == name:
                return user
        return None

    def wildcard(self) -> DatabaseConfig | None:
        """The `name = "*"` entry that serves database names no other entry has, if any."""
        for db in self.databases:
            if db.name == WILDCARD_DATABASE:
                return db
        return None

    def servers_for(self, database: str) -> tuple[DatabaseConfig, ...]:
        return tuple(db for db in self.databases if db.name == database)

    def shard_count(self, database: str) -> int:
        """How many shards a logical database has (its shards are numbered 0 to N-1); 0 if unknown."""
        return len({db.shard for db in self.databases if db.name == database})

    def sharded_tables_for(self, database: str) -> tuple[ShardedTableConfig, ...]:
        return tuple(table for table in self.sharded_tables if table.database == database)

    def omnisharded_tables_for(self, database: str) -> tuple[str, ...]:
        return tuple(entry.table for entry in self.omnisharded_tables if entry.database == database)
