"""The fan-out executor: one batch sent to several shards' servers at once, their answers merged into one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

from proxy.errors import ProxyError, ServerLostError
from proxy.pool import Pool
from proxy.protocol import codec, sqlstate
from proxy.server import ServerConnection
from proxy.session_state import ServerState
from routing.merge import ResultMerger
from routing.merge_plan import MergePlan

log = logging.getLogger("shardgate.executor")

_COPY_FAIL = codec.message(b"f", codec.cstr("COPY is not supported across shards"))
_STATUS_RANK = {b"E": 0, b"T": 1, b"I": 2}


class ClientOutput(Protocol):
    """Where the merged answer goes (the client session) and who reads less when a server stalls."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Target(NamedTuple):
    """One shard of a fan-out: a server the session already holds there, or the pool to check one out of."""

    shard: int
    server: ServerConnection | None
    pool: Pool | None


class FanoutLeg:
    """One server's part of a fan-out: its sink and its writer, cutting its bytes into whole messages
    for the merger."""

    __slots__ = ("borrowed", "executor", "index", "partial", "paused", "pool", "server", "shard")

    def __init__(self, executor: FanoutExecutor, index: int, shard: int, server: ServerConnection,
                 borrowed: bool, pool: Pool | None = None) -> None:
        self.executor = executor
        self.index = index
        self.shard = shard
        self.server = server
        self.pool = pool  # the pool it was checked out of (None when borrowed)
        self.borrowed = borrowed  # the session's own server (home or linked), not checked out for this
        self.partial = bytearray()
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        buffer = self.partial
        buffer += data
        size = len(buffer)
        pos = 0
        feed = self.executor.merger.feed
        index = self.index
        while size - pos >= 5:
            end = pos + 1 + codec.unpack_u32(buffer, pos + 1)[0]
            if end > size:
                break
            feed(index, bytes(buffer[pos:end]))
            pos = end
        if pos:
            del buffer[:pos]
        self.executor.forward()

    def on_server_ready(self, server: ServerConnection, status: bytes) -> None:
        if not server.outstanding:
            self.executor.leg_done()

    def on_server_lost(self, server: ServerConnection) -> None:
        self.executor.lost(self)

    def pause_reading(self) -> None:
        self.executor.client.pause_reading()

    def resume_reading(self) -> None:
        self.executor.client.resume_reading()


class FanoutExecutor:
    """Runs one batch (a Query, or Parse ... Sync) on every target at once: `start` gets servers where
    the session has none (their session state restored to `wanted`, then `then`, a BEGIN when the client
    is in a transaction), `send` sends the same messages to all, the answers are merged as they stream in
    (see routing.merge) and written to `client`, `finish` waits for the last of them. Afterwards `legs`
    says which server served which shard. `hidden_parse_completes`: ParseCompletes of Parses the proxy
    sent itself (the client's unnamed statement prepared again), not shown to the client."""

    def __init__(self, client: ClientOutput, targets: list[Target], wanted: ServerState, then: str,
                 hidden_parse_completes: int = 0, merge: MergePlan | None = None, collation: str = "C", *,
                 copy: bool = False) -> None:
        self.client = client
        self.targets = targets
        self.wanted = wanted
        self.then = then
        self.legs: list[FanoutLeg] = []
        self.merger = ResultMerger(len(targets), hidden_parse_completes, merge, collation, copy=copy)
        self._done: asyncio.Future[None] | None = None

    def explain(self, rows: tuple[list[bytes], list[bytes]]) -> None:
        """EXPLAIN: each shard's plan kept together, after its header row; the trailer rows after all."""
        headers, trailer = rows
        self.merger = ResultMerger(len(self.targets), self.merger.hidden_parse_completes, by_source=True,
                                   headers=headers, trailer=trailer)

    def servers(self) -> list[ServerConnection]:
        return [leg.server for leg in self.legs]

    async def start(self) -> None:
        """Get a server on every target. Raises ProxyError when one cannot be had: nothing was sent, and
        the servers checked out are back in their pools."""
        try:
            await self._gather_legs()
        except BaseException:
            self.release_checked_out()
            raise
        for leg in self.legs:
            server = leg.server
            server.sink = leg
            server.out = leg
            server.relayed = server.saw_error = False

    def send(self, messages: bytes, syncs: int, for_leg: Callable[[bytes, FanoutLeg], bytes] | None = None) -> None:
        """The client's messages to every server (a batch may come in parts, each ending in Flush);
        `for_leg` makes each server's own version of them (renamed statements, its part of a split INSERT)."""
        for leg in self.legs:
            # made before the Syncs are counted: a renamed statement's reply is matched to this batch
            own = messages if for_leg is None else for_leg(messages, leg)
            leg.server.outstanding += syncs
            leg.server.send(own)

    async def finish(self) -> bytes:
        """Wait until every server answered what it was sent; the merged transaction status. Raises
        ServerLostError when a server died meanwhile."""
        self._done = asyncio.get_running_loop().create_future()
        self.leg_done()
        await self._done
        self.forward()
        for leg in self.legs:
            if leg.paused:
                leg.paused = False
                leg.server.resume_reading()
        return min((leg.server.txn_status for leg in self.legs), key=_STATUS_RANK.__getitem__)

    async def _gather_legs(self) -> None:
        pending: list[tuple[int, Target]] = []
        for index, target in enumerate(self.targets):
            if target.server is not None:
                self.legs.append(FanoutLeg(self, index, target.shard, target.server, borrowed=True))
            else:
                pending.append((index, target))
        results = await asyncio.gather(*(t.pool.checkout() for _, t in pending if t.pool is not None),
                                       return_exceptions=True)
        error: BaseException | None = None
        for (index, target), checked_out in zip(pending, results, strict=True):
            if isinstance(checked_out, BaseException):
                error = error or checked_out
            else:
                self.legs.append(FanoutLeg(self, index, target.shard, checked_out, borrowed=False,
                                           pool=target.pool))
        self.legs.sort(key=lambda leg: leg.index)
        if error is not None:
            raise error
        restores = [leg.server.pool.restore(leg.server, self.wanted, self.then)
                    for leg in self.legs if not leg.borrowed]
        for result in await asyncio.gather(*restores, return_exceptions=True):
            if isinstance(result, ServerLostError):
                raise ProxyError(sqlstate.CONNECTION_FAILURE, "server connection lost while setting up the session")
            if isinstance(result, BaseException):
                raise result

    def forward(self) -> None:
        """Write what the merger has ready; hold back servers the merger is holding at a barrier."""
        merger = self.merger
        out = merger.take()
        if out:
            self.client.write(out)
        for leg in self.legs:
            held = merger.held(leg.index)
            if held and not leg.paused:
                leg.paused = True
                leg.server.pause_reading()
            elif leg.paused and not held:
                leg.paused = False
                leg.server.resume_reading()
        if merger.copy_sources:
            for index in list(merger.copy_sources):
                self.legs[index].server.send(_COPY_FAIL)
                merger.copy_sources.discard(index)

    def leg_done(self) -> None:
        done = self._done
        if done is not None and not done.done() and all(not leg.server.outstanding for leg in self.legs):
            done.set_result(None)

    def lost(self, leg: FanoutLeg) -> None:
        log.info("event=fanout_server_lost shard=%d server=%s:%s", leg.shard, *leg.server.address)
        done = self._done
        if done is not None and not done.done():
            done.set_exception(ServerLostError(sqlstate.CONNECTION_FAILURE, "server connection lost"))

    def release_checked_out(self) -> None:
        """The servers this fan-out checked out go back to their pools (the borrowed ones stay with the
        session); a server still busy is closed by its pool."""
        kept = []
        for leg in self.legs:
            if leg.borrowed:
                kept.append(leg)
            else:
                leg.server.pool.checkin(leg.server)
        self.legs = kept
