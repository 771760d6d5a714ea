"""LISTEN/UNLISTEN as the proxy reads them (channel names as PostgreSQL folds them), the text a pooled server
runs instead, and the hub cutting a server's stream into notifications for their listeners."""

from __future__ import annotations

import struct

import pytest

from proxy.notify import NotifyHub
from proxy.pool import Pool, PoolSettings
from proxy.session_state import listen_only_tags, listen_substitute
from routing.classify import StatementKind, classify


@pytest.mark.parametrize(
    ("sql", "kind", "name", "value"),
    [
        ("LISTEN foo", StatementKind.LISTEN, "foo", None),
        ("listen FooBar", StatementKind.LISTEN, "foobar", None),
        ('LISTEN "FooBar"', StatementKind.LISTEN, "FooBar", None),
        ('LISTEN "with ""quote"""', StatementKind.LISTEN, 'with "quote"', None),
        ("LISTEN /* why */ Foo ;", StatementKind.LISTEN, "foo", None),
        # PostgreSQL lower-cases ASCII letters only in a UTF-8 database
        ("LISTEN ÉTÉ", StatementKind.LISTEN, "ÉtÉ", None),
        # identifiers are cut to 63 bytes, on a character boundary
        ("LISTEN " + "a" * 70, StatementKind.LISTEN, "a" * 63, None),
        ('LISTEN "' + "é" * 40 + '"', StatementKind.LISTEN, "é" * 31, None),
        ("UNLISTEN *", StatementKind.UNLISTEN, None, "*"),
        ('UNLISTEN "*"', StatementKind.UNLISTEN, "*", None),
        # forms left to PostgreSQL
        ("LISTEN", StatementKind.LISTEN, None, None),
        ("LISTEN a b", StatementKind.LISTEN, None, None),
        ('LISTEN ""', StatementKind.LISTEN, None, None),
        ('LISTEN "open', StatementKind.LISTEN, None, None),
        ('LISTEN U&"x"', StatementKind.LISTEN, None, None),
        ("LISTEN 'x'", StatementKind.LISTEN, None, None),
    ],
)
def test_channel_names(sql: str, kind: StatementKind, name: str | None, value: str | None) -> None:
    found = classify(sql)
    assert (found.kind, found.name, found.value) == (kind, name, value)


@pytest.mark.parametrize(
    ("sql", "sent"),
    [
        (b"LISTEN foo", b'UNLISTEN "foo"'),
        (b'listen "Foo"; unlisten bar', b'UNLISTEN "Foo"; unlisten bar'),
        (b"SELECT 1; /* c */ LISTEN Foo", b'SELECT 1;UNLISTEN "foo"'),
        (b"SELECT 'LISTEN x'", b"SELECT 'LISTEN x'"),
    ],
)
def test_listen_substitute(sql: bytes, sent: bytes) -> None:
    assert listen_substitute(sql) == sent


@pytest.mark.parametrize(
    ("sql", "tags"),
    [
        (b"LISTEN a", ("LISTEN",)),
        (b"LISTEN a; UNLISTEN *;", ("LISTEN", "UNLISTEN")),
        (b"LISTEN a; SELECT 1", None),
        (b'LISTEN U&"x"', None),
        (b"UNLISTEN a b", None),
        (b"NOTIFY a", None),
    ],
)
def test_what_the_proxy_answers_itself(sql: bytes, tags: tuple[str, ...] | None) -> None:
    assert listen_only_tags(sql) == tags


class _Recorder:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def notify(self, message: bytes) -> None:
        self.got.append(message)


def _notification(pid: int, channel: str, payload: str) -> bytes:
    body = struct.pack("!i", pid) + channel.encode() + b"\x00" + payload.encode() + b"\x00"
    return b"A" + struct.pack("!I", len(body) + 4) + body


def _hub() -> NotifyHub:
    settings = PoolSettings(size=1, min_size=0, checkout_timeout_ms=1000, idle_timeout_s=0, server_lifetime_s=0,
                            healthcheck_idle_ms=0, connect_timeout_ms=1000, reset_query="")
    pool = Pool("app@app/127.0.0.1:1", ("127.0.0.1", 1), "app", "app", "app", settings)
    return NotifyHub("app@app", lambda: pool)


def test_hub_delivers_whole_notifications_to_each_listener_of_their_channel() -> None:
    hub = _hub()
    first, second, other = _Recorder(), _Recorder(), _Recorder()
    hub.listeners = {"news": {first, second}, "sport": {other}}
    stream = (_notification(41, "news", "one") + b"N" + struct.pack("!I", 4) + _notification(42, "sport", "goal")
              + _notification(43, "nobody", "x") + _notification(44, "news", "two"))
    for at in range(0, len(stream), 3):  # cut anywhere, as reads are
        hub.write(memoryview(stream)[at : at + 3])
    assert first.got == second.got == [_notification(41, "news", "one"), _notification(44, "news", "two")]
    assert other.got == [_notification(42, "sport", "goal")]
    assert hub.delivered == 5
    assert not hub.buffer
    # a whole burst in one read: each listener gets its notifications in one write, in order
    first.got.clear()
    other.got.clear()
    hub.write(stream)
    assert first.got == [_notification(41, "news", "one") + _notification(44, "news", "two")]
    assert other.got == [_notification(42, "sport", "goal")]
