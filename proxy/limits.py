"""Limits and abuse protection: auth-failure cool-offs, the accept pace, client counts per user and
database, and the janitor's sweep for query, idle-in-transaction, idle and login timeouts."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from config.model import Config, UserConfig
from proxy.errors import ProxyError
from proxy.protocol import sqlstate

log = logging.getLogger("shardgate.limits")

# a burst over max_new_connections_per_s waits unread at most this long for its turn, else it is refused
ACCEPT_MAX_WAIT_S = 1.0
# failure records kept per kind (addresses, user names): an attacker cycling names cannot grow memory
MAX_TRACKED_KEYS = 100_000

# where a client is, as `Sweepable.activity` reports it
RUNNING = "running"  # a statement (or a fan-out) is in flight on its servers
IDLE_IN_TRANSACTION = "idle_in_transaction"  # inside a transaction, nothing in flight
IDLE = "idle"  # between transactions
LOGGING_IN = "login"  # before its login finished (startup packet, authentication)
OTHER = ""  # waiting for a server, the admin console, closing: no timeout applies

TIMEOUT_KINDS = ("query", "idle_in_transaction", "client_idle", "login")
REFUSAL_REASONS = ("auth_cooloff", "max_connections_user", "max_connections_database", "accept_rate")


class Sweepable(Protocol):
    """What the sweep needs of a client session (the session module is not imported here)."""

    def activity(self) -> tuple[str, int, str]:
        """(where the client is, a counter that moves whenever it makes progress, its user name)."""
        ...

    def timed_out(self, kind: str, limit: str) -> None:
        """Act on a timeout of `kind` ("query" cancels the statement; the others close the client)."""
        ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The timeouts of one user (its own keys over [general]), in seconds; 0 = off."""

    query_s: float
    idle_in_transaction_s: float
    client_idle_s: float

    @staticmethod
    def of(config: Config, user: UserConfig | None) -> Timeouts:
        general = config.general

        def pick(own: float | None, default: float) -> float:
            return own if own is not None else default

        return Timeouts(
            query_s=pick(user.query_timeout_ms if user else None, general.query_timeout_ms) / 1000,
            idle_in_transaction_s=pick(user.idle_in_transaction_timeout_ms if user else None,
                                       general.idle_in_transaction_timeout_ms) / 1000,
            client_idle_s=pick(user.client_idle_timeout_s if user else None, general.client_idle_timeout_s))


class _FailureLog:
    """Recent auth failures of one key (an address or a user name) and its cool-off."""

    __slots__ = ("blocked_until", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.blocked_until = 0.0


class Limits:
    """One per runtime; `configure` takes a new config (start and reload). Everything here is per login or
    per janitor tick, never per message."""

    def __init__(self, config: Config) -> None:
        self.auth_failures: Counter[str] = Counter()  # reason -> count
        self.refused: Counter[str] = Counter()  # reason -> count
        self.timeouts: Counter[str] = Counter()  # kind -> count
        self._by_address: dict[str, _FailureLog] = {}
        self._by_user: dict[str, _FailureLog] = {}
        self._per_user: Counter[str] = Counter()  # user -> logged-in clients
        self._per_database: Counter[str] = Counter()
        self._accept_at = 0.0  # GCRA: when the next connection is due at the configured pace
        self._seen: dict[Sweepable, tuple[str, int, float]] = {}  # client -> (where, progress, since)
        self.configure(config)

    def configure(self, config: Config) -> None:
        general = config.general
        self.config = config
        self.failure_limit = general.auth_failure_limit
        self.failure_window_s = general.auth_failure_window_s
        self.cooloff_s = general.auth_failure_cooloff_s
        self.exempt = tuple(ipaddress.ip_network(text, strict=False) for text in general.auth_failure_exempt)
        self.accept_rate = general.max_new_connections_per_s
        self.login_timeout_s = general.client_login_timeout_s
        self.user_limits = {user.name: user.max_connections for user in config.users if user.max_connections}
        self.database_limits = {db.name: db.max_connections for db in config.databases if db.max_connections}
        self._timeouts: dict[str, Timeouts] = {}
        self._default_timeouts = Timeouts.of(config, None)
        self.sweeping = self.login_timeout_s > 0 or any(
            value > 0 for user in [None, *config.users] for value in _fields(Timeouts.of(config, user)))

    # ------------------------------------------------------------ authentication failures

    def check_auth(self, host: str, user_name: str) -> None:
        """Before any credential is asked for: raises ProxyError 53300 (FATAL) while the client's address
        or the user name is cooling off. Both get the same answer whether the user exists or not."""
        if self.failure_limit <= 0:
            return
        now = time.monotonic()
        for table, key, what in ((self._by_address, host, f'from address "{host}"'),
                                 (self._by_user, user_name, f'for user "{user_name}"')):
            entry = table.get(key)
            if entry is not None and entry.blocked_until > now:
                self.refused["auth_cooloff"] += 1
                log.warning("event=auth_refused reason=cooloff user=%r address=%s retry_in_s=%.0f",
                            user_name, host, entry.blocked_until - now)
                raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS, f"too many authentication failures {what}",
                                 fatal=True, detail=f"Try again in {entry.blocked_until - now:.0f} s.")

    def auth_failed(self, host: str, user_name: str, reason: str, message: str) -> None:
        """Count one failed authentication (logged with who, from where and why; never the credential)."""
        self.auth_failures[reason] += 1
        log.warning("event=auth_failed user=%r address=%s reason=%s error=%r", user_name, host, reason, message)
        if self.failure_limit <= 0 or self._exempt(host):
            return
        now = time.monotonic()
        for table, key, what in ((self._by_address, host, "address"), (self._by_user, user_name, "user")):
            entry = table.get(key)
            if entry is None:
                if len(table) >= MAX_TRACKED_KEYS:
                    self._prune(table, now)
                    if len(table) >= MAX_TRACKED_KEYS:
                        continue
                entry = table[key] = _FailureLog()
            times = entry.times
            times.append(now)
            while times and times[0] <= now - self.failure_window_s:
                times.popleft()
            if len(times) >= self.failure_limit and entry.blocked_until <= now:
                entry.blocked_until = now + self.cooloff_s
                times.clear()  # counting starts again after the cool-off
                log.warning("event=auth_cooloff_started %s=%r failures=%d window_s=%s cooloff_s=%s",
                            what, key, self.failure_limit, self.failure_window_s, self.cooloff_s)

    def _exempt(self, host: str) -> bool:
        if not self.exempt:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.exempt)

    def _prune(self, table: dict[str, _FailureLog], now: float) -> None:
        cutoff = now - self.failure_window_s
        for key in [key for key, entry in table.items() if entry.blocked_until <= now
                    and (not entry.times or entry.times[-1] <= cutoff)]:
            del table[key]

    # ------------------------------------------------------------ new connections

    def accept_delay(self) -> float:
        """How long a new connection waits (unread) for its turn at max_new_connections_per_s: 0 for none.
        Raises ProxyError 53300 (FATAL) when its turn is more than ACCEPT_MAX_WAIT_S away."""
        rate = self.accept_rate
        if rate <= 0:
            return 0.0
        interval = 1.0 / rate
        now = time.monotonic()
        due = max(self._accept_at, now)
        # a burst of up to `rate` connections (one second's worth) passes at once; the next ones are paced
        delay = due - now - (rate - 1) * interval
        if delay > ACCEPT_MAX_WAIT_S:
            self.refused["accept_rate"] += 1
            raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS,
                             f"too many new connections (max_new_connections_per_s = {rate}): try again",
                             fatal=True)
        self._accept_at = due + interval
        return max(delay, 0.0)

    def admit(self, user: str, database: str) -> None:
        """A client logged in: count it, or raise ProxyError 53300 (FATAL) over the user's or the
        database's max_connections. Each admitted client is released once with `release`."""
        limit = self.user_limits.get(user)
        if limit is not None and self._per_user[user] >= limit:
            self.refused["max_connections_user"] += 1
            log.warning("event=client_refused reason=max_connections user=%r limit=%d", user, limit)
            raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS, f'too many connections for role "{user}"', fatal=True)
        limit = self.database_limits.get(database)
        if limit is not None and self._per_database[database] >= limit:
            self.refused["max_connections_database"] += 1
            log.warning("event=client_refused reason=max_connections database=%r limit=%d", database, limit)
            raise ProxyError(sqlstate.TOO_MANY_CONNECTIONS, f'too many connections for database "{database}"',
                             fatal=True)
        self._per_user[user] += 1
        self._per_database[database] += 1

    def clients_of(self, database: str) -> int:
        """Logged-in clients of a database now (the janitor closes an idle wildcard database's pools)."""
        return self._per_database.get(database, 0)

    def release(self, user: str, database: str) -> None:
        for table, key in ((self._per_user, user), (self._per_database, database)):
            table[key] -= 1
            if table[key] <= 0:
                del table[key]

    # ------------------------------------------------------------ timeouts (janitor)

    def timeouts_for(self, user_name: str) -> Timeouts:
        found = self._timeouts.get(user_name)
        if found is None:
            user = self.config.user(user_name)
            found = Timeouts.of(self.config, user) if user is not None else self._default_timeouts
            self._timeouts[user_name] = found
        return found

    def sweep(self, clients: Iterable[Sweepable]) -> None:
        """Janitor, once a second: a client seen in the same place with no progress since `since` has been
        there at least that long (within one tick). Nothing is timed on the request path."""
        if not self.sweeping:
            self._seen.clear()
            return
        now = time.monotonic()
        seen = self._seen
        current: dict[Sweepable, tuple[str, int, float]] = {}
        for client in clients:
            where, progress, user = client.activity()
            if where is OTHER:
                continue
            before = seen.get(client)
            since = before[2] if before is not None and before[0] == where and before[1] == progress else now
            current[client] = (where, progress, since)
            if since == now:
                continue
            waited = now - since
            if where is LOGGING_IN:
                limit, kind, key = self.login_timeout_s, "login", "client_login_timeout_s"
            else:
                timeouts = self.timeouts_for(user)
                if where is RUNNING:
                    limit, kind, key = timeouts.query_s, "query", "query_timeout_ms"
                elif where is IDLE_IN_TRANSACTION:
                    limit, kind, key = (timeouts.idle_in_transaction_s, "idle_in_transaction",
                                        "idle_in_transaction_timeout_ms")
                else:
                    limit, kind, key = timeouts.client_idle_s, "client_idle", "client_idle_timeout_s"
            if 0 < limit <= waited:
                self.timeouts[kind] += 1
                current[client] = (where, progress, float("inf"))  # acted on once
                shown = f"{key} = {limit * 1000:.0f}" if key.endswith("_ms") else f"{key} = {limit:g}"
                log.info("event=timeout kind=%s user=%r waited_s=%.1f limit=%r", kind, user, waited, shown)
                try:
                    client.timed_out(kind, shown)
                except Exception:
                    log.exception("event=timeout_error kind=%s user=%r", kind, user)
        self._seen = current


def _fields(timeouts: Timeouts) -> tuple[float, float, float]:
    return (timeouts.query_s, timeouts.idle_in_transaction_s, timeouts.client_idle_s)
