"""COPY parsing and the row splitter: whole rows to the shard of their key, whatever the CopyData chunks."""

from __future__ import annotations

import pytest

from routing.copy_split import BINARY_SIGNATURE, BinaryCopySplitter, CopySplitter, parse_copy
from routing.errors import RoutingError

SHARD_OF = {"1": 0, "2": 1, "3": 0, "a b": 1}.__getitem__


def test_parse_copy_statements() -> None:
    copy = parse_copy('COPY public.orders (tenant_id, "Note") FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER \';\')')
    assert copy is not None and copy.table == "orders" and copy.columns == ("tenant_id", "Note")
    assert copy.incoming and copy.format == "csv" and copy.header and copy.delimiter == ";"
    legacy = parse_copy("copy orders from stdin csv header")
    assert legacy is not None and legacy.format == "csv" and legacy.header and legacy.columns is None
    out = parse_copy("COPY (SELECT * FROM orders WHERE tenant_id = 3) TO STDOUT")
    assert out is not None and out.query == "SELECT * FROM orders WHERE tenant_id = 3" and not out.incoming
    assert parse_copy("COPY orders FROM '/tmp/file'") is None


def _split(statement: str, chunks: list[bytes], key_index: int | None = 0) -> dict[int, bytes]:
    copy = parse_copy(statement)
    assert copy is not None
    splitter = CopySplitter(copy, key_index, (0, 1), SHARD_OF, "tenant_id")
    out: dict[int, bytes] = {0: b"", 1: b""}
    for chunk in chunks:
        for shard, rows in splitter.feed(chunk).items():
            out[shard] += b"".join(rows)
    for shard, rows in splitter.finish().items():
        out[shard] += b"".join(rows)
    return out


def test_text_rows_across_chunks() -> None:
    data = b"1\tone\n2\ttwo\n3\tth\\tree\n"
    for cut in range(1, len(data)):
        assert _split("COPY t (k, v) FROM STDIN", [data[:cut], data[cut:]]) == {
            0: b"1\tone\n3\tth\\tree\n", 1: b"2\ttwo\n"}


def test_text_escaped_key_end_marker_and_last_row_without_newline() -> None:
    assert _split("COPY t (v, k) FROM STDIN", [b"x\ta\\040b\n"], key_index=1) == {0: b"", 1: b"x\ta\\040b\n"}
    assert _split("COPY t (k) FROM STDIN", [b"1\n\\.\n2\n"]) == {0: b"1\n", 1: b""}
    assert _split("COPY t (k) FROM STDIN", [b"1\n2"]) == {0: b"1\n", 1: b"2\n"}


def test_csv_quotes_newlines_and_header() -> None:
    data = b'k,v\n1,"multi\nline, ""q"""\n"2",x\n'
    for cut in range(1, len(data)):
        out = _split("COPY t (k, v) FROM STDIN (FORMAT csv, HEADER)", [data[:cut], data[cut:]])
        assert out == {0: b'k,v\n1,"multi\nline, ""q"""\n', 1: b'k,v\n"2",x\n'}, cut


def test_rows_without_a_key_are_refused() -> None:
    with pytest.raises(RoutingError, match="row 2") as found:
        _split("COPY t (k, v) FROM STDIN", [b"1\ta\n\\N\tb\n"])
    assert found.value.sqlstate == "23502"
    with pytest.raises(RoutingError, match="NULL or missing"):
        _split("COPY t (k, v) FROM STDIN (FORMAT csv)", [b",b\n"])


def test_every_row_everywhere_without_a_key() -> None:
    assert _split("COPY t (v) FROM STDIN", [b"x\ny\n"], key_index=None) == {0: b"x\ny\n", 1: b"x\ny\n"}


# -- binary format ------------------------------------------------------------------------------------

HEADER = BINARY_SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"


def _tuple(*fields: bytes | None) -> bytes:
    out = len(fields).to_bytes(2, "big")
    for value in fields:
        out += b"\xff\xff\xff\xff" if value is None else len(value).to_bytes(4, "big") + value
    return out


def _binary(chunks: list[bytes], key_index: int | None = 0) -> dict[int, bytes]:
    by_key = {b"\x00\x01": 0, b"\x00\x02": 1}
    splitter = BinaryCopySplitter(key_index, (0, 1), by_key.__getitem__, "k")
    out: dict[int, bytes] = {0: b"", 1: b""}
    for chunk in chunks:
        for shard, rows in splitter.feed(chunk).items():
            out[shard] += b"".join(rows)
    for shard, rows in splitter.finish().items():
        out[shard] += b"".join(rows)
    return out


def test_binary_tuples_go_to_their_keys_shard_with_the_header_and_trailer_everywhere() -> None:
    one, two, three = _tuple(b"\x00\x01", b"a"), _tuple(b"\x00\x02", None), _tuple(b"\x00\x01", b"ccc")
    data = HEADER + one + two + three + TRAILER
    expected = {0: HEADER + one + three + TRAILER, 1: HEADER + two + TRAILER}
    assert _binary([data]) == expected
    # cut anywhere, even one byte at a time, the same rows arrive whole
    assert _binary([data[i : i + 1] for i in range(len(data))]) == expected
    assert _binary([data[:7], data[7:23], data[23:]]) == expected


def test_binary_key_in_another_column_and_a_header_extension() -> None:
    header = BINARY_SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x03" + b"xyz"
    row = _tuple(b"v", b"\x00\x02")
    assert _binary([header + row + TRAILER], key_index=1) == {0: header + TRAILER, 1: header + row + TRAILER}


def test_binary_without_a_key_goes_everywhere_and_bad_data_is_refused() -> None:
    row = _tuple(b"v")
    assert _binary([HEADER + row + TRAILER], key_index=None) == {0: HEADER + row + TRAILER,
                                                                 1: HEADER + row + TRAILER}
    with pytest.raises(RoutingError, match="NULL or missing k") as null_key:
        _binary([HEADER + _tuple(None, b"x")])
    assert null_key.value.sqlstate == "23502"
    with pytest.raises(RoutingError, match="signature") as bad:
        _binary([b"1\tx\n"])
    assert bad.value.sqlstate == "22P04"
    with pytest.raises(RoutingError, match="inside a row"):
        _binary([HEADER + _tuple(b"\x00\x01")[:-1]])
