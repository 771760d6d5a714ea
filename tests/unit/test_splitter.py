"""The read/write split's held-back BEGIN: what the proxy answers itself, and how far its reply reaches (the
relay must not send a server any message of a batch the proxy answered)."""

from __future__ import annotations

import struct
import tomllib

import pytest

from config.loader import parse
from proxy.protocol import codec
from proxy.runtime import Runtime
from proxy.splitter import ReadWriteSplit
from routing.router import TransactionState

CONFIG = ('[[users]]\nname = "app"\npassword = "x"\n[[databases]]\nname = "app"\n'
          '[[databases]]\nname = "app"\nport = 5433\nrole = "replica"\n')


def _split() -> ReadWriteSplit:
    config = parse(tomllib.loads(CONFIG))
    runtime = Runtime(config)
    cluster = runtime.cluster_for("app")
    assert cluster is not None
    return ReadWriteSplit(runtime, cluster, config.users[0])


def _parse(sql: str, name: bytes = b"") -> bytes:
    return codec.message(b"P", name + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def _bind(statement: bytes = b"") -> bytes:
    return codec.message(b"B", b"\x00" + statement + b"\x00" + struct.pack("!hhh", 0, 0, 0))


DESCRIBE_PORTAL = codec.message(b"D", b"P\x00")
DESCRIBE_STATEMENT = codec.message(b"D", b"S\x00")
EXECUTE = codec.message(b"E", b"\x00" + struct.pack("!i", 0))
SYNC = codec.message(b"S")
FLUSH = codec.message(b"H")


def _types(reply: bytes) -> bytes:
    """The message types of a backend reply, in order."""
    types = bytearray()
    pos = 0
    while pos < len(reply):
        types.append(reply[pos])
        pos += 1 + struct.unpack_from("!I", reply, pos + 1)[0]
    assert pos == len(reply)
    return bytes(types)


@pytest.mark.parametrize(("batch", "types"), [
    (_parse("BEGIN") + _bind() + DESCRIBE_PORTAL + EXECUTE + SYNC, b"12nCZ"),  # libpq's PQexecParams
    (_parse("BEGIN") + _bind() + DESCRIBE_STATEMENT + EXECUTE + SYNC, b"12tnCZ"),
    (_parse("BEGIN") + _bind() + EXECUTE + FLUSH + SYNC, b"12CZ"),
    (_parse("START TRANSACTION") + _bind() + DESCRIBE_PORTAL + EXECUTE + SYNC, b"12nCZ"),
])
def test_an_extended_begin_alone_is_answered_up_to_its_sync(batch: bytes, types: bytes) -> None:
    split = _split()
    answered = split.start(batch, 0, len(batch))
    assert answered is not None
    reply, answered_to = answered
    assert answered_to == len(batch)  # the Bind, Describe, Execute and Sync too: none goes to a server
    assert _types(reply) == types
    assert reply.endswith(codec.ready_for_query(b"T"))
    assert split.routing.state is TransactionState.PENDING
    assert split.take_deferred_begin() == ("BEGIN" if b"BEGIN" in batch else "START TRANSACTION")


def test_a_lone_begin_query_is_answered_up_to_its_end() -> None:
    split = _split()
    data = codec.query("BEGIN")
    assert split.start(data, 0, len(data)) == (codec.command_complete("BEGIN") + codec.ready_for_query(b"T"),
                                               len(data))


def test_begin_then_commit_answers_the_commit_only() -> None:
    split = _split()
    begin = codec.query("BEGIN")
    assert split.start(begin, 0, len(begin)) is not None
    commit = codec.query("COMMIT")
    assert split.start(commit, 0, len(commit)) == (codec.command_complete("COMMIT") + codec.ready_for_query(b"I"),
                                                   len(commit))
    assert split.deferred_begin == b""


@pytest.mark.parametrize("batch", [
    # BEGIN with the next statement after its Sync: it goes along with it
    _parse("BEGIN") + _bind() + DESCRIBE_PORTAL + EXECUTE + SYNC + _parse("SELECT 1") + _bind() + EXECUTE + SYNC,
    # BEGIN and a statement before one Sync
    _parse("BEGIN") + _bind() + EXECUTE + _parse("SELECT 1") + _bind() + EXECUTE + SYNC,
    # not up to its Sync yet
    _parse("BEGIN") + _bind() + DESCRIBE_PORTAL + EXECUTE,
    # a named statement or portal: the server must know it
    _parse("BEGIN", name=b"s1") + _bind(b"s1") + EXECUTE + SYNC,
    _parse("BEGIN") + _bind(b"s1") + EXECUTE + SYNC,
])
def test_an_extended_begin_with_more_is_not_held_back(batch: bytes) -> None:
    split = _split()
    assert split.start(batch, 0, len(batch)) is None
    assert split.deferred_begin == b""
