"""Memory per client: hold N authenticated, idle connections to a pooler and watch its RSS.

Clients are asyncpg connections: startup, authentication, ReadyForQuery, then nothing. At most
`concurrency` handshakes run at once, each has a timeout, and the whole opening phase has a deadline.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

CONNECT_TIMEOUT_S = 30.0
OPEN_DEADLINE_S = 180.0
CLOSE_TIMEOUT_S = 5.0
SETTLE_S = 2.0
CONCURRENCY = 32
# File descriptors kept free for everything else the bench process has open.
SPARE_FDS = 256
MAX_ERRORS_KEPT = 5


@dataclass(slots=True)
class MemoryResult:
    """RSS of one pooler process before, while and after `opened` idle clients were connected."""

    label: str
    wanted: int
    opened: int = 0
    rss_rest_kb: int = 0
    rss_loaded_kb: int = 0
    rss_after_kb: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def per_client_kb(self) -> float | None:
        if self.opened <= 0:
            return None
        return (self.rss_loaded_kb - self.rss_rest_kb) / self.opened


def raise_open_file_limit(needed: int) -> int:
    """Raise our soft RLIMIT_NOFILE (inherited by children started later) to at least `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


async def _open_clients(
    host: str, port: int, user: str, password: str, database: str, count: int, result: MemoryResult
) -> list[Any]:
    connections: list[Any] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            try:
                connection = await asyncpg.connect(
                    host=host, port=port, user=user, password=password, database=database,
                    ssl=False, timeout=CONNECT_TIMEOUT_S, statement_cache_size=0,
                )  # fmt: skip
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if len(result.errors) < MAX_ERRORS_KEPT:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                return
            connections.append(connection)

    tasks = [asyncio.create_task(open_one()) for _ in range(count)]
    _done, pending = await asyncio.wait(tasks, timeout=OPEN_DEADLINE_S)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
        result.errors.append(f"{len(pending)} clients not connected within {OPEN_DEADLINE_S:.0f}s")
    return connections


async def _close_clients(connections: list[Any]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY * 4)

    async def close_one(connection: Any) -> None:
        async with gate:
            try:
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
            except Exception:
                connection.terminate()

    await asyncio.gather(*(close_one(connection) for connection in connections))


async def _measure(
    label: str, pid: int, rss_kb: Callable[[int], int], host: str, port: int,
    user: str, password: str, database: str, count: int,
) -> MemoryResult:  # fmt: skip
    result = MemoryResult(label, count)
    await asyncio.sleep(SETTLE_S)
    result.rss_rest_kb = rss_kb(pid)
    started = time.monotonic()
    connections = await _open_clients(host, port, user, password, database, count, result)
    try:
        result.opened = len(connections)
        # Let the pooler finish whatever it does after a login before reading its RSS.
        await asyncio.sleep(max(SETTLE_S, (time.monotonic() - started) * 0.1))
        alive = sum(1 for connection in connections if not connection.is_closed())
        if alive != result.opened:
            result.errors.append(f"{result.opened - alive} idle clients were disconnected by the pooler")
        result.rss_loaded_kb = rss_kb(pid)
    finally:
        await _close_clients(connections)
    await asyncio.sleep(SETTLE_S)
    result.rss_after_kb = rss_kb(pid)
    return result


def measure(
    label: str, pid: int, rss_kb: Callable[[int], int], host: str, port: int,
    user: str, password: str, database: str, count: int,
) -> MemoryResult:  # fmt: skip
    """RSS of process `pid` at rest, with `count` idle clients connected to host:port, and after they left."""
    raise_open_file_limit(count + SPARE_FDS)
    return asyncio.run(_measure(label, pid, rss_kb, host, port, user, password, database, count))
