"""auth_query: the stored password verifier of a user the config does not list, read from PostgreSQL as
auth_user and cached for auth_query_cache_s."""

from __future__ import annotations

import asyncio
import logging
import time

from config.model import Config
from proxy.errors import ProxyError
from proxy.pool import Pool
from proxy.protocol import sqlstate
from proxy.session_state import EMPTY_SERVER_STATE

log = logging.getLogger("shardgate.auth_query")

MAX_CACHED_USERS = 10_000  # users cycling names cannot grow the cache without bound

# (server host, server port, user name): pg_authid belongs to a PostgreSQL instance, not to one database
CacheKey = tuple[str, int, str]


class AuthQuery:
    """Looks users up with auth_query on a server checked out of auth_user's pool. Only found users are
    cached (a role created a moment ago can log in at once); a failed lookup is logged with the reason and
    refused with 28000 (08006 when the server cannot be reached, 3D000 for a database it does not have)."""

    def __init__(self, config: Config) -> None:
        self.lookups = 0  # queries run
        self.hits = 0  # answered from the cache
        self.failures = 0  # lookups that could not run (auth_user refused, bad query, server down)
        self._cache: dict[CacheKey, tuple[str, float]] = {}  # -> (stored secret, expiry, monotonic)
        self.configure(config)

    def configure(self, config: Config) -> None:
        general = config.general
        changed = (getattr(self, "query", None), getattr(self, "user", None)) != (general.auth_query, general.auth_user)
        self.user = general.auth_user
        self.query = general.auth_query
        self.cache_s = general.auth_query_cache_s
        self.timeout_s = max(general.server_connect_timeout_ms / 1000, 1.0)
        if changed:
            self._cache.clear()

    @property
    def enabled(self) -> bool:
        return bool(self.user)

    async def lookup(self, pool: Pool, user_name: str) -> str | None:
        """The stored secret of `user_name` (a SCRAM verifier, an md5 hash, or for an old server the plain
        password), or None when PostgreSQL has no such login role or it has no password."""
        key = (pool.address[0], pool.address[1], user_name)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            self.hits += 1
            return cached[0]
        self.lookups += 1
        try:
            server = await pool.checkout()
        except ProxyError as exc:
            raise self.failed(pool.name, user_name, exc) from None
        try:
            async with asyncio.timeout(self.timeout_s):
                # as the server logged in: a setting or role a client of auth_user left on it does not apply
                await pool.restore(server, EMPTY_SERVER_STATE)
                rows = await server.fetch_rows(self.query, self.timeout_s, (user_name,))
        except asyncio.CancelledError:
            server.broken = True  # the client left mid-query: its answer must not reach the next borrower
            raise
        except TimeoutError:
            server.broken = True
            raise self.failed(pool.name, user_name, ProxyError(sqlstate.CONNECTION_FAILURE,
                                                           f"auth_query took over {self.timeout_s:g} s")) from None
        except ProxyError as exc:
            raise self.failed(pool.name, user_name, exc) from None
        finally:
            pool.checkin(server)
        secret = _secret_of(rows)
        if secret is not None and self.cache_s > 0:
            if len(self._cache) >= MAX_CACHED_USERS:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= MAX_CACHED_USERS:
                    self._cache.clear()
            self._cache[key] = (secret, now + self.cache_s)
        return secret

    def failed(self, where: str, user_name: str, exc: ProxyError) -> ProxyError:
        """Log why a lookup could not run (`where`: the pool, or the database with no server to run it on)
        and say to the client what a person can act on."""
        if exc.sqlstate == sqlstate.INVALID_CATALOG_NAME:  # the client's mistake, not the lookup's
            log.info("event=auth_query_no_database where=%s user=%r error=%r", where, user_name, exc.message)
            return ProxyError(exc.sqlstate, exc.message, fatal=True)  # PostgreSQL's own: no such database
        self.failures += 1
        log.error("event=auth_query_failed auth_user=%r pool=%s user=%r sqlstate=%s error=%r", self.user, where,
                  user_name, exc.sqlstate, exc.message)
        if exc.sqlstate == sqlstate.CONNECTION_FAILURE:
            return ProxyError(exc.sqlstate, f'cannot look up user "{user_name}": {exc.message}', fatal=True)
        return ProxyError(sqlstate.INVALID_AUTHORIZATION,
                          f'cannot look up user "{user_name}": the proxy\'s auth_query as auth_user "{self.user}" '
                          "failed (the proxy log says why)", fatal=True)


def _secret_of(rows: list[list[str | None]]) -> str | None:
    """The second column of the first row (PgBouncer's convention: name, password), or the only one."""
    if not rows or not rows[0]:
        return None
    row = rows[0]
    secret = row[1] if len(row) > 1 else row[0]
    return secret or None
