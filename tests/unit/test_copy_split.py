"""COPY parsing and the row splitter: whole rows to the shard of their key, whatever the CopyData chunks."""

from __future__ import annotations

import pytest

from routing.copy_split import CopySplitter, parse_copy
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
    with pytest.raises(RoutingError, match="binary"):
        _split("COPY t (k) FROM STDIN (FORMAT binary)", [b""])


def test_every_row_everywhere_without_a_key() -> None:
    assert _split("COPY t (v) FROM STDIN", [b"x\ny\n"], key_index=None) == {0: b"x\ny\n", 1: b"x\ny\n"}
