"""The router's decision cache: a statement shape seen before with another integer in it is not parsed
again, and nothing that differs in more than that integer ever takes its decision."""

from __future__ import annotations

import random

import pytest

from routing.router import Router

SHAPES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {n};",
    "SELECT * FROM t WHERE id = {n} FOR UPDATE",
    "SELECT nextval('s') + {n}",
    "SELECT {n}",
    "WITH d AS (DELETE FROM t WHERE id = {n} RETURNING *) SELECT * FROM d",
    "SELECT * FROM t LIMIT {n}",
]


def test_a_new_integer_reuses_the_decision() -> None:
    router = Router()
    first = router.decide("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    misses = router.cache_misses
    for n in (2, 99, 123456789):
        assert router.decide(f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};") is first
    assert router.cache_misses == misses


@pytest.mark.parametrize("text", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1; DELETE FROM pgbench_accounts WHERE aid = 2;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = nextval('s');",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1 FOR UPDATE;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1.5;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = ;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = \u0661;",  # an Arabic-Indic digit
])
def test_anything_else_is_decided_on_its_own(text: str) -> None:
    warm = Router()
    warm.decide("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    assert warm.decide(text).route == Router().decide(text).route


def test_cached_decisions_agree_with_fresh_ones() -> None:
    """Differential: a router that has seen many statements decides as one that sees each for the first time."""
    generator = random.Random(7)
    warm = Router(cache_size=64)
    for _ in range(2000):
        shape = generator.choice(SHAPES)
        text = shape.format(n=generator.choice([0, 1, 7, 42, 10**12, generator.randrange(10**6)]))
        if generator.random() < 0.1:
            text = text.replace(" = ", " = -")
        assert warm.decide(text).route == Router().decide(text).route, text


def test_a_session_remembers_its_last_read_shape_and_nothing_else() -> None:
    """Differential: a session's splitter that has seen many statements routes each as a fresh one does."""
    import tomllib

    from config.loader import parse
    from proxy.protocol import codec
    from proxy.runtime import Runtime
    from proxy.splitter import ReadWriteSplit

    config = parse(tomllib.loads('[[users]]\nname = "app"\npassword = "x"\n[[databases]]\nname = "app"\n'
                                 '[[databases]]\nname = "app"\nport = 5433\nrole = "replica"\n'))
    runtime = Runtime(config)
    cluster = runtime.cluster_for("app")
    assert cluster is not None
    warm = ReadWriteSplit(runtime, cluster, config.users[0])
    generator = random.Random(11)
    texts = [*SHAPES, "SELECT abalance FROM pgbench_accounts WHERE aid = {n}; DELETE FROM t",
             "SELECT abalance FROM pgbench_accounts WHERE aid = {n} FOR UPDATE;",
             "SELECT abalance FROM pgbench_accounts WHERE aid = nextval('s') + {n};"]
    for _ in range(1500):
        data = codec.query(generator.choice(texts).format(n=generator.randrange(10**7)))
        fresh = ReadWriteSplit(runtime, cluster, config.users[0])
        assert warm.start(data, 0, len(data)) == fresh.start(data, 0, len(data))
        assert (warm.role, warm.wrote) == (fresh.role, fresh.wrote), data
        warm.transaction_ended()
