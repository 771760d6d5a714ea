"""SQL over HTTP, the pure parts: HTTP/1.1 requests from bytes, text values to JSON, request bodies, and
the [http] config keys."""

from __future__ import annotations

from typing import Any

import pytest

from config.loader import ConfigError, parse
from proxy.http_sql import RequestRefused, parse_body
from proxy.protocol import http
from proxy.protocol.pgjson import BOOL, INT4, NUMERIC, TypeInfo, converter_for, param_text, parse_array


def _request(body: bytes = b"{}", **headers: str) -> bytes:
    lines = ["POST /v1/query HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- HTTP --------------------------------------------------------------------------------------------------


def test_a_request_byte_by_byte_then_the_next_one() -> None:
    parser = http.RequestParser(max_body_bytes=100)
    data = _request(b'{"query": "SELECT 1"}', Authorization="Bearer abc") + _request(b"[]", Connection="close")
    found: list[http.Request] = []
    for byte in data:
        parser.feed(bytes([byte]))
        while (item := parser.next()) is not None:
            assert isinstance(item, http.Request)
            found.append(item)
    assert [(r.method, r.target, r.body, r.keep_alive) for r in found] == [
        ("POST", "/v1/query", b'{"query": "SELECT 1"}', True), ("POST", "/v1/query", b"[]", False)]
    assert found[0].headers["authorization"] == "Bearer abc"


def test_http_1_0_keeps_alive_only_when_asked() -> None:
    for connection, expected in (("", False), ("Keep-Alive", True)):
        parser = http.RequestParser(max_body_bytes=100)
        head = "GET / HTTP/1.0\r\n" + (f"Connection: {connection}\r\n" if connection else "") + "\r\n"
        parser.feed(head.encode())
        item = parser.next()
        assert isinstance(item, http.Request) and item.keep_alive is expected


@pytest.mark.parametrize("data, status", [
    (b"POST /v1/query HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /v1/query HTTP/2.0\r\n\r\n", 505),
    (b"POST /v1/query\r\n\r\n", 400),
    (b"POST /v1/query HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /v1/query HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /v1/query HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /v1/query HTTP/1.1\r\nX: " + b"a" * 20000, 431),
])
def test_malformed_requests(data: bytes, status: int) -> None:
    parser = http.RequestParser(max_body_bytes=100)
    parser.feed(data)
    problem = parser.next()
    assert isinstance(problem, http.HttpProblem) and problem.status == status
    parser.feed(_request())
    assert parser.next() is None  # nothing more is read from a connection that failed


def test_an_oversized_body_is_refused_from_its_length_and_then_dropped() -> None:
    parser = http.RequestParser(max_body_bytes=10)
    parser.feed(_request(b"x" * 4)[:-4].replace(b"Content-Length: 4", b"Content-Length: 50") + b"abcd")
    problem = parser.next()
    assert isinstance(problem, http.HttpProblem) and problem.status == 413 and problem.discard == 46
    parser.feed(b"y" * 40)
    assert parser.discarding == 6


def test_expect_continue_is_flagged_until_the_body_comes() -> None:
    parser = http.RequestParser(max_body_bytes=100)
    parser.feed(_request(b"{}", Expect="100-continue")[:-2])
    assert parser.next() is None and parser.wants_continue
    parser.feed(b"{}")
    assert isinstance(parser.next(), http.Request) and not parser.wants_continue


def test_response_bytes() -> None:
    assert http.response(404, b"{}", keep_alive=False, extra=(("Allow", "POST"),)) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: close\r\nAllow: POST\r\n\r\n{}")


# -- values -------------------------------------------------------------------------------------------------

TYPES = {1007: TypeInfo("_int4", "A", INT4), 1231: TypeInfo("_numeric", "A", NUMERIC),
         1000: TypeInfo("_bool", "A", BOOL), 1009: TypeInfo("_text", "A", 25), 22: TypeInfo("int2vector", "A", 21)}


@pytest.mark.parametrize("oid, text, expected", [
    (INT4, "-12", -12), (20, "9007199254740993", 9007199254740993), (NUMERIC, "1.50", "1.50"),
    (701, "1e+300", 1e300), (701, "-Infinity", "-Infinity"), (BOOL, "f", False), (3802, '{"a": [1]}', {"a": [1]}),
    (1184, "2024-01-02 03:04:05+00", "2024-01-02 03:04:05+00"), (1007, "{1,NULL,3}", [1, None, 3]),
    (1007, "[0:1]={5,6}", [5, 6]), (1231, "{{1.5,2},{3,4}}", [["1.5", "2"], ["3", "4"]]),
    (1009, '{"a b","c\\"d",NULL,"NULL",""}', ["a b", 'c"d', None, "NULL", ""]), (1000, "{}", []),
    (22, "1 2", "1 2"), (1009, "{broken", "{broken"),
])
def test_text_values_to_json(oid: int, text: str, expected: Any) -> None:
    assert converter_for(oid, TYPES)(text) == expected


def test_array_parameters_read_back_as_the_same_list() -> None:
    values = ["a b", 'q"uote', "back\\slash", None, "NULL", "", "{x}"]
    assert parse_array(param_text(values) or "", str) == values
    assert param_text([[1, 2], [3, None]]) == '{{"1","2"},{"3",NULL}}'
    assert (param_text(None), param_text(True), param_text(2.5), param_text({"k": [1]})) == (
        None, "true", "2.5", '{"k":[1]}')


# -- request bodies -------------------------------------------------------------------------------------------


def test_bodies() -> None:
    assert parse_body(b'{"query": "SELECT $1", "params": [1]}', 5) == ([("SELECT $1", [1])], False)
    assert parse_body(b'[{"query": "SELECT 1"}, {"query": "SELECT 2"}]', 5) == (
        [("SELECT 1", []), ("SELECT 2", [])], True)
    for body, code in ((b"{", "08P01"), (b"[]", "08P01"), (b'[{"query": "x"}, 1]', "08P01"),
                       (b'{"query": "x", "param": []}', "08P01"), (b'[{"query": "x"}]' * 1, None)):
        if code is None:
            continue
        with pytest.raises(RequestRefused) as refused:
            parse_body(body, 5)
        assert refused.value.status == 400 and refused.value.code == code
    with pytest.raises(RequestRefused) as refused:
        parse_body(b"[" + b",".join([b'{"query": "SELECT 1"}'] * 6) + b"]", 5)
    assert refused.value.code == "54000" and "http.max_statements" in refused.value.message


# -- config ---------------------------------------------------------------------------------------------------

BASE: dict[str, Any] = {"general": {}, "users": [{"name": "api", "auth": "jwt"}, {"name": "app", "password": "x"}],
                        "databases": [{"name": "app"}], "jwt": {"secret": "s" * 40}}


def _problems(http_table: dict[str, Any], **replace: Any) -> list[str]:
    try:
        parse({**BASE, **replace, "http": http_table})
    except ConfigError as exc:
        return exc.problems
    return []


def test_http_keys() -> None:
    config = parse({**BASE, "http": {"listen": "127.0.0.1:8080", "user": "api", "database": "app",
                                     "max_body_bytes": 1000, "keep_alive_timeout_s": 5}})
    assert (config.http.listen, config.http.max_body_bytes, config.http.keep_alive_timeout_s) == (
        "127.0.0.1:8080", 1000, 5.0)
    assert parse(BASE).http.listen == ""  # off by default
    assert _problems({"listen": "127.0.0.1:8080"}) == [
        'http.user: required when http.listen is set: the [[users]] entry (auth = "jwt") that HTTP requests log in as',
        "http.database: required when http.listen is set: the [[databases]] name requests use"]
    assert _problems({"listen": "127.0.0.1:1", "user": "app", "database": "nope"}) == [
        'http.user: [[users]] entry "app" must have auth = "jwt" (requests carry a JWT)',
        'http.database: no [[databases]] entry is named "nope"']
    assert _problems({"listen": "x", "max_statements": 0, "typo": 1}) == [
        'http.listen: must be "host:port", or "" to disable (got "x")',
        "http.max_statements: must be an integer >= 1 (got 0)", "http.typo: unknown key"]
