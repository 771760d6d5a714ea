"""proxy/limits.py on its own: cool-offs per address and per user, the accept pace, client counts, and the
timeout sweep over fake sessions (time is the test's own)."""

from __future__ import annotations

import dataclasses

import pytest

from config.model import Config, DatabaseConfig, GeneralConfig, UserConfig
from proxy import limits as limits_module
from proxy.errors import ProxyError
from proxy.limits import IDLE, IDLE_IN_TRANSACTION, LOGGING_IN, RUNNING, Limits, Timeouts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(limits_module.time, "monotonic", fake)
    return fake


def config(**general: object) -> Config:
    users = (UserConfig(name="app", password="x", max_connections=2, query_timeout_ms=500),
             UserConfig(name="other", password="y"))
    databases = (DatabaseConfig(name="app", max_connections=3), DatabaseConfig(name="app", role="replica"))
    return Config(general=dataclasses.replace(GeneralConfig(), **general), users=users,  # type: ignore[arg-type]
                  databases=databases)


def refused(limits: Limits, host: str, user: str) -> str | None:
    try:
        limits.check_auth(host, user)
    except ProxyError as exc:
        assert exc.sqlstate == "53300" and exc.fatal
        return exc.message
    return None


def test_failures_from_one_address_cool_it_off_for_every_user(clock: Clock) -> None:
    limits = Limits(config(auth_failure_limit=3, auth_failure_window_s=10, auth_failure_cooloff_s=30))
    for user in ("a", "b", "c"):
        assert refused(limits, "10.1.1.1", user) is None
        limits.auth_failed("10.1.1.1", user, "scram", "password authentication failed")
    assert refused(limits, "10.1.1.1", "d") == 'too many authentication failures from address "10.1.1.1"'
    assert refused(limits, "10.2.2.2", "a") is None  # one failure for "a": not cooling off
    clock.now += 30.5
    assert refused(limits, "10.1.1.1", "d") is None
    assert limits.auth_failures["scram"] == 3 and limits.refused["auth_cooloff"] == 1


def test_failures_for_one_user_from_many_addresses_cool_the_user_off(clock: Clock) -> None:
    limits = Limits(config(auth_failure_limit=2))
    limits.auth_failed("10.0.0.1", "app", "scram", "")
    limits.auth_failed("10.0.0.2", "app", "scram", "")
    assert refused(limits, "10.0.0.3", "app") == 'too many authentication failures for user "app"'
    assert refused(limits, "10.0.0.3", "ghost") is None


def test_failures_outside_the_window_do_not_add_up(clock: Clock) -> None:
    limits = Limits(config(auth_failure_limit=2, auth_failure_window_s=5))
    limits.auth_failed("10.0.0.1", "app", "md5", "")
    clock.now += 6
    limits.auth_failed("10.0.0.1", "app", "md5", "")
    assert refused(limits, "10.0.0.1", "app") is None
    clock.now += 1
    limits.auth_failed("10.0.0.1", "app", "md5", "")
    assert refused(limits, "10.0.0.1", "app") is not None


def test_exempt_networks_and_zero_turn_it_off(clock: Clock) -> None:
    limits = Limits(config(auth_failure_limit=1, auth_failure_exempt=("10.0.0.0/8",)))
    limits.auth_failed("10.9.9.9", "x", "scram", "")
    assert refused(limits, "10.9.9.9", "y") is None
    off = Limits(config(auth_failure_limit=0))
    for _ in range(50):
        off.auth_failed("127.0.0.1", "app", "scram", "")
    assert refused(off, "127.0.0.1", "app") is None
    assert off.auth_failures["scram"] == 50  # still counted for the metrics


def test_accept_pace_lets_a_second_through_paces_the_next_and_refuses_the_rest(clock: Clock) -> None:
    limits = Limits(config(max_new_connections_per_s=4))
    delays = []
    refusals = 0
    for _ in range(12):
        try:
            delays.append(limits.accept_delay())
        except ProxyError as exc:
            assert exc.sqlstate == "53300"
            refusals += 1
    assert delays[:4] == [0.0] * 4
    assert delays[4:] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert refusals == 4
    clock.now += 3
    assert limits.accept_delay() == 0.0
    assert Limits(config()).accept_delay() == 0.0  # 0: no pace


def test_max_connections_per_user_and_database_count_and_release() -> None:
    limits = Limits(config())
    limits.admit("app", "app")
    limits.admit("app", "app")
    with pytest.raises(ProxyError, match='too many connections for role "app"'):
        limits.admit("app", "app")
    limits.admit("other", "app")
    with pytest.raises(ProxyError, match='too many connections for database "app"'):
        limits.admit("other", "app")
    limits.release("app", "app")
    limits.admit("other", "app")
    limits.admit("other", "elsewhere")  # no limit there
    assert limits.refused["max_connections_user"] == 1 and limits.refused["max_connections_database"] == 1


def test_a_users_timeouts_override_general() -> None:
    cfg = config(query_timeout_ms=2000, client_idle_timeout_s=7.0)
    assert Timeouts.of(cfg, cfg.user("app")) == Timeouts(0.5, 0.0, 7.0)
    assert Timeouts.of(cfg, cfg.user("other")) == Timeouts(2.0, 0.0, 7.0)


class FakeSession:
    def __init__(self, where: str, user: str = "other") -> None:
        self.where = where
        self.progress = 0
        self.user = user
        self.acted: list[tuple[str, str]] = []

    def activity(self) -> tuple[str, int, str]:
        return self.where, self.progress, self.user

    def timed_out(self, kind: str, limit: str) -> None:
        self.acted.append((kind, limit))


def test_sweep_acts_once_on_what_made_no_progress(clock: Clock) -> None:
    limits = Limits(config(query_timeout_ms=1500, idle_in_transaction_timeout_ms=1000, client_idle_timeout_s=3,
                           client_login_timeout_s=2))
    stuck, working, in_txn, idle, login = (FakeSession(RUNNING), FakeSession(RUNNING),
                                           FakeSession(IDLE_IN_TRANSACTION), FakeSession(IDLE),
                                           FakeSession(LOGGING_IN))
    sessions = [stuck, working, in_txn, idle, login]
    for _ in range(5):
        limits.sweep(sessions)
        working.progress += 1  # a ReadyForQuery each second: never the same statement
        clock.now += 1
    limits.sweep(sessions)
    assert stuck.acted == [("query", "query_timeout_ms = 1500")]  # once, not at every tick
    assert working.acted == []
    assert in_txn.acted == [("idle_in_transaction", "idle_in_transaction_timeout_ms = 1000")]
    assert idle.acted == [("client_idle", "client_idle_timeout_s = 3")]
    assert login.acted == [("login", "client_login_timeout_s = 2")]
    assert limits.timeouts == {"query": 1, "idle_in_transaction": 1, "client_idle": 1, "login": 1}


def test_sweep_restarts_the_clock_when_a_client_moves(clock: Clock) -> None:
    limits = Limits(config(idle_in_transaction_timeout_ms=2000))
    session = FakeSession(IDLE_IN_TRANSACTION)
    for step in range(6):
        session.where = IDLE_IN_TRANSACTION if step % 2 == 0 else RUNNING
        limits.sweep([session])
        clock.now += 1
    assert session.acted == []
