"""Pure parts of two-phase commit: global ids, the COMMIT answers the proxy writes itself, the histogram."""

from __future__ import annotations

import pytest

from proxy.fanout import _answers
from proxy.protocol import codec
from proxy.twophase.coordinator import LATENCY_BUCKETS_S, TwoPhase
from proxy.twophase.gid import Gid, parse


def test_a_gid_names_instance_transaction_and_shard_and_reads_back() -> None:
    gid = Gid("0a1b2c3d4e", 42, 3)
    assert gid.text == "shardgate_0a1b2c3d4e_42_3"
    assert parse(gid.text) == gid
    assert gid.decision_key == "0a1b2c3d4e_42"
    assert Gid("0a1b2c3d4e", 42, 0).decision_key == gid.decision_key  # one decision for every shard's part


@pytest.mark.parametrize("text", ["", "shardgate_", "mine", "shardgate_XYZ_1_0", "shardgate_ab_1", "shardgate_ab_1_0x",
                                  "shardgate_ab_-1_0", "xshardgate_ab_1_0", "shardgate_ab_1_0 "])
def test_gids_shardgate_did_not_make_are_left_alone(text: str) -> None:
    assert parse(text) is None


def _messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(data[pos:end])
        pos = end
    return out


def test_a_simple_commit_gets_its_tag_and_ready_for_query() -> None:
    assert _answers(codec.query("COMMIT"), False, "COMMIT", None) == \
        codec.command_complete("COMMIT") + codec.ready_for_query(b"I")


def test_an_extended_commit_gets_what_the_server_would_send() -> None:
    batch = (codec.build_parse("", b"COMMIT", b"\x00\x00") + codec.build_bind(b"", b"", b"\x00\x00\x00\x00\x00\x00")
             + codec.message(b"D", b"P\x00") + codec.message(b"E", b"\x00\x00\x00\x00\x00") + codec.SYNC)
    answered = _messages(_answers(batch, True, "COMMIT", None))
    assert [m[:1] for m in answered] == [b"1", b"2", b"n", b"C", b"Z"]
    assert answered[3] == codec.command_complete("COMMIT")
    assert answered[4] == codec.ready_for_query(b"I")


def test_an_extended_commit_that_failed_gets_the_error_then_ready_for_query() -> None:
    error = codec.error_response("40001", "rolled back")
    batch = (codec.build_parse("", b"COMMIT", b"\x00\x00") + codec.build_bind(b"", b"", b"\x00\x00\x00\x00\x00\x00")
             + codec.message(b"E", b"\x00\x00\x00\x00\x00") + codec.SYNC)
    answered = _messages(_answers(batch, True, None, error))
    assert [m[:1] for m in answered] == [b"1", b"2", b"E", b"Z"]
    assert answered[2] == error


class _Topology:
    config = None

    def cluster_for(self, database: str, shard: int = 0) -> None:
        return None

    def shards_of(self, database: str) -> list[object]:
        return []


def test_the_commit_latency_histogram_is_cumulative() -> None:
    tp = TwoPhase(_Topology())  # type: ignore[arg-type]
    for seconds in (0.0005, 0.003, 0.003, 7.0):
        tp._observe(seconds)
    buckets = dict(tp.latency_buckets())
    assert buckets["0.001"] == 1
    assert buckets["0.005"] == 3
    assert buckets[repr(LATENCY_BUCKETS_S[-1])] == 3
    assert buckets["+Inf"] == 4
    assert tp.latency_sum_s == pytest.approx(7.0065)
