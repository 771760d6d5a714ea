"""Startup-phase parsing and message encoders of the sans-I/O codec."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import codec
from proxy.protocol.codec import ProtocolError


def _startup(params: dict[str, str], protocol: int = codec.PROTOCOL_V3) -> bytes:
    body = struct.pack("!i", protocol) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def test_startup_message_parameters_round_trip() -> None:
    buffer = bytearray(_startup({"user": "app", "database": "db", "application_name": "x y"}))
    packet = codec.read_startup_packet(buffer)
    assert isinstance(packet, codec.StartupMessage)
    assert packet.parameters == {"user": "app", "database": "db", "application_name": "x y"}
    assert buffer == bytearray()


def test_startup_message_arrives_in_pieces() -> None:
    raw = _startup({"user": "app"})
    buffer = bytearray()
    for index, byte in enumerate(raw[:-1]):
        buffer.append(byte)
        assert codec.read_startup_packet(buffer) is None, index
    buffer.append(raw[-1])
    packet = codec.read_startup_packet(buffer)
    assert isinstance(packet, codec.StartupMessage) and packet.parameters["user"] == "app"


def test_ssl_gss_and_cancel_requests() -> None:
    assert isinstance(codec.read_startup_packet(bytearray(struct.pack("!ii", 8, 80877103))), codec.SSLRequest)
    assert isinstance(codec.read_startup_packet(bytearray(struct.pack("!ii", 8, 80877104))), codec.GSSENCRequest)
    cancel = codec.read_startup_packet(bytearray(codec.cancel_request(4242, -17)))
    assert cancel == codec.CancelRequest(4242, -17)


@pytest.mark.parametrize("key_bytes", [8, 32, 256])
def test_a_cancel_request_with_a_protocol_3_2_key_matches_no_client(key_bytes: int) -> None:
    # protocol 3.2 keys are 4 to 256 bytes; the proxy hands out 4-byte ones, so a longer key is nobody's
    body = struct.pack("!ii", 80877102, 4242) + b"\x5a" * key_bytes
    buffer = bytearray(struct.pack("!i", len(body) + 4) + body + b"next")
    assert codec.read_startup_packet(buffer) == codec.CancelRequest(4242, None)
    assert buffer == b"next"


def test_a_cancel_request_with_a_key_above_256_bytes_is_refused() -> None:
    body = struct.pack("!ii", 80877102, 4242) + b"\x5a" * 257
    with pytest.raises(ProtocolError):
        codec.read_startup_packet(bytearray(struct.pack("!i", len(body) + 4) + body))


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("!i", 3) + b"abcd",  # length below the minimum
        struct.pack("!i", 1_000_000) + b"\0" * 8,  # absurd length
        b"GET / HTTP/1.1\r\n\r\n",  # garbage before startup
    ],
)
def test_bad_startup_lengths_are_protocol_violations(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.read_startup_packet(bytearray(raw))
    assert info.value.sqlstate == "08P01"


def test_unsupported_protocol_version() -> None:
    with pytest.raises(ProtocolError) as info:
        codec.read_startup_packet(bytearray(_startup({"user": "a"}, protocol=2 << 16)))
    assert info.value.sqlstate == "0A000"


def test_startup_without_terminator_is_rejected() -> None:
    body = struct.pack("!i", codec.PROTOCOL_V3) + b"user\0app"
    with pytest.raises(ProtocolError):
        codec.read_startup_packet(bytearray(struct.pack("!i", len(body) + 4) + body))


def test_options_are_split_like_libpq() -> None:
    settings = codec.parse_options(r"-c intervalstyle=postgres_verbose --search_path=a,b -csearch-path=x\ y")
    assert settings == {"intervalstyle": "postgres_verbose", "search_path": "x y"}


def test_options_reject_non_settings() -> None:
    with pytest.raises(ProtocolError) as info:
        codec.parse_options("-x")
    assert info.value.sqlstate == "42601"


def test_error_response_fields_round_trip() -> None:
    raw = codec.error_response("53300", "too many", "FATAL", detail="d", hint="h")
    assert raw[:1] == b"E" and struct.unpack("!I", raw[1:5])[0] == len(raw) - 1
    fields = codec.parse_error_fields(raw[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "53300", "M": "too many", "D": "d", "H": "h"}


def test_parse_and_bind_rebuild() -> None:
    types = struct.pack("!hi", 1, 23)
    parse = codec.build_parse("s1", b"select $1", types)
    name, text, rest = codec.parse_parse(parse[5:])
    assert (name, text, rest) == ("s1", "select $1", types)
    assert codec.split_parse(parse[5:]) == (b"s1", b"select $1", types)
    bind_rest = struct.pack("!hhih", 0, 1, 1, 0) + b"7"
    bind = codec.build_bind(b"portal", b"stmt", bind_rest)
    assert codec.split_bind(bind[5:]) == (b"portal", b"stmt", bind_rest)
    assert struct.unpack("!I", bind[1:5])[0] == len(bind) - 1


def test_ready_for_query_and_keys() -> None:
    assert codec.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert codec.backend_key_data(1, 2) == b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"


@pytest.mark.parametrize("body", [b"s1", b"s1\x00select 1", b""])
def test_split_parse_refuses_unterminated_strings(body: bytes) -> None:
    with pytest.raises(ValueError):
        codec.split_parse(body)


@pytest.mark.parametrize("body", [b"portal", b"\x00stmt", b""])
def test_split_bind_refuses_unterminated_names(body: bytes) -> None:
    with pytest.raises(ValueError):
        codec.split_bind(body)


def test_bound_query_sends_the_parameter_apart_from_the_text() -> None:
    data = codec.bound_query("SELECT passwd FROM pg_shadow WHERE usename=$1", ["o'neil\\"])
    messages = []
    pos = 0
    while pos < len(data):
        length = struct.unpack("!i", data[pos + 1 : pos + 5])[0]
        messages.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert [kind for kind, _ in messages] == [b"P", b"B", b"E", b"S"]
    assert messages[0][1] == b"\x00SELECT passwd FROM pg_shadow WHERE usename=$1\x00\x00\x00"
    # unnamed portal and statement, no parameter formats (text), one value as it is, no result formats
    value = b"o'neil\\"
    assert messages[1][1] == b"\x00\x00" + struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0)
    assert messages[2][1] == b"\x00" + struct.pack("!i", 0)


def test_negotiate_protocol_version_names_the_whole_version() -> None:
    # Int32 196608 (3 << 16: 3.0) as PostgreSQL and libpq 18 have it, then the count and the option names
    body = struct.pack("!ii", 196608, 1) + b"_pq_.compression\x00"
    expected = b"v" + struct.pack("!I", len(body) + 4) + body
    assert codec.negotiate_protocol_version(0, ["_pq_.compression"]) == expected
