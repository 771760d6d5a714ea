"""The `/* shardgate: shard=... */` comment hint: which shards a statement names, and the router's Route."""

from __future__ import annotations

import pytest

from routing.classify import ALL_SHARDS, shard_hint
from routing.route import Role
from routing.router import Router


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("/* shardgate: shard=all */ SELECT 1", ALL_SHARDS),
        ("/* shardgate: shard=1 */ SELECT 1", (1,)),
        ("/*shardgate:shard=1*/SELECT 1", (1,)),
        ("/* SHARDGATE: SHARD = ALL */ SELECT 1", ALL_SHARDS),
        ("-- shardgate: shard=2, 0\nSELECT 1", (0, 2)),
        ("/* app=web */ /* shardgate: shard=3 */ SELECT 1", (3,)),
        ("  \n/* shardgate: shard=0 */ UPDATE t SET a = 1", (0,)),
        ("SELECT /* shardgate: shard=1 */ 1", None),  # not a leading comment
        ("/* shardgate: primary */ SELECT 1", None),
        ("/* shardgate: shard=one */ SELECT 1", None),
        ("/* shardgate: shard=1 and more */ SELECT 1", None),
        ("SELECT 1", None),
        ("", None),
        ("/* unterminated shardgate: shard=1", None),
    ],
)
def test_shard_hint(sql: str, expected: tuple[int, ...] | None) -> None:
    assert shard_hint(sql) == expected


def test_router_puts_the_shards_in_the_route() -> None:
    router = Router()
    assert router.route_statement("/* shardgate: shard=all */ SELECT 1").shards is None
    assert router.route_statement("/* shardgate: shard=1 */ SELECT 1").shards == (1,)
    # the same statement with another shard is another cache entry, not the first one's answer
    assert router.route_statement("/* shardgate: shard=2 */ SELECT 1").shards == (2,)
    assert router.route_statement("SELECT 1").shards == (0,)
    route = router.route_statement("/* shardgate: shard=1 */ /* shardgate: replica */ SELECT 1")
    assert route.shards == (1,) and route.role is Role.REPLICA
    assert router.route_statement("/* shardgate: shard=1 */ INSERT INTO t VALUES (1)").write
