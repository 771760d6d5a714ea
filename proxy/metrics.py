"""Traffic counters the request path bumps once per batch or transaction (never per message), read by the
admin listener at scrape time: statements and transactions by route, their durations, checkout waits,
bytes, errors by SQLSTATE class, bans."""

from __future__ import annotations

from bisect import bisect_left

ROUTES = ("primary", "replica", "shard", "multi_shard")
# seconds: from half a millisecond (a point read over loopback) to half a minute
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ERROR_SOURCES = ("server", "proxy")


class Histogram:
    """Counts per bucket (upper bounds, the last one +Inf) and the sum, as Prometheus histograms hold them."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect_left(self.bounds, value_s)] += 1
        self.sum_s += value_s

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of values <= le) per bucket, +Inf last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class Traffic:
    """One per runtime. Plain attributes and dicts with every key present, so bumping one is an add."""

    __slots__ = ("bans", "checkout_wait", "client_bytes", "errors", "queries", "query_duration", "server_bytes",
                 "transactions")

    def __init__(self) -> None:
        self.queries = dict.fromkeys(ROUTES, 0)  # statements and batches, counted at their ReadyForQuery
        self.transactions = dict.fromkeys(ROUTES, 0)  # at the ReadyForQuery that ends them (status idle)
        self.query_duration = Histogram()  # a client's batch arriving -> the server's ReadyForQuery
        self.checkout_wait = Histogram()  # clients that had to wait for a server: how long
        self.client_bytes = 0  # received from clients
        self.server_bytes = 0  # received from servers (nearly all of it relayed to clients)
        self.errors: dict[tuple[str, str], int] = {}  # (source, SQLSTATE class) -> ErrorResponses to clients
        self.bans = 0

    def error(self, source: str, code: str) -> None:
        key = (source, code[:2])
        self.errors[key] = self.errors.get(key, 0) + 1


def error_code(body: bytes) -> str:
    """The SQLSTATE of an ErrorResponse body (its fields, after the 5-byte header); XX000 without one."""
    pos, size = 0, len(body)
    while pos < size and body[pos]:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            break
        if body[pos] == 0x43:  # 'C'
            return body[pos + 1 : end].decode("ascii", "replace")
        pos = end + 1
    return "XX000"
