"""Sans-I/O PostgreSQL v3 framing and the encoders for messages the proxy writes itself."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.protocol import sqlstate

PROTOCOL_V3 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_BYTES = 10_000
# Protocol 3.2's longest cancel key; the proxy negotiates 3.0 and hands out 4-byte keys.
MAX_CANCEL_KEY_BYTES = 256

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
unpack_u32 = _U32.unpack_from
pack_u32 = _U32.pack
unpack_i32 = _I32.unpack_from
unpack_i16 = _I16.unpack_from
unpack_header = struct.Struct("!BI").unpack_from  # (message type byte, length) of the message at an offset


class ProtocolError(Exception):
    """Input that is not the PostgreSQL protocol; the connection that sent it is closed."""

    def __init__(self, message: str, code: str = sqlstate.PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.sqlstate = code
        self.message = message


# ---------------------------------------------------------------- startup phase


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """`secret_key` is None for a key of another length than the 4 bytes the proxy hands out (protocol 3.2
    allows up to 256): it matches no client of ours."""

    process_id: int
    secret_key: int | None


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def read_startup_packet(buffer: bytearray) -> StartupPacket | None:
    """Take one length-prefixed startup-phase packet off `buffer`, or None when it is incomplete."""
    if len(buffer) < 8:
        if len(buffer) >= 4:
            _check_startup_length(unpack_u32(buffer, 0)[0])
        return None
    length = unpack_u32(buffer, 0)[0]
    _check_startup_length(length)
    if len(buffer) < length:
        return None
    code = unpack_u32(buffer, 4)[0]
    body = bytes(buffer[8:length])
    del buffer[:length]
    if code == SSL_REQUEST_CODE and length == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and length == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE and length == 16:
        pid, key = struct.unpack("!ii", body)
        return CancelRequest(pid, key)
    if code == CANCEL_REQUEST_CODE and 12 < length <= 12 + MAX_CANCEL_KEY_BYTES:
        return CancelRequest(_I32.unpack_from(body, 0)[0], None)
    if code >> 16 != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )
    return StartupMessage(code, _parse_startup_parameters(body))


def _check_startup_length(length: int) -> None:
    if length < 8 or length > MAX_STARTUP_BYTES:
        raise ProtocolError("invalid length of startup packet")


def _parse_startup_parameters(body: bytes) -> dict[str, str]:
    parts = body.split(b"\x00")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    fields = parts[:-2]
    if len(fields) % 2:
        raise ProtocolError("invalid startup packet layout: parameter without value")
    try:
        decoded = [f.decode() for f in fields]
    except UnicodeDecodeError:
        raise ProtocolError("invalid startup packet: parameters are not valid UTF-8")
    return dict(zip(decoded[::2], decoded[1::2], strict=True))


def parse_options(options: str) -> dict[str, str]:
    """Settings from the startup `options` parameter (`-c name=value` and `--name=value`)."""
    settings: dict[str, str] = {}
    tokens = _split_options(options)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "-c" and index + 1 < len(tokens):
            pair = tokens[index + 1]
            index += 2
        elif token.startswith("-c") or token.startswith("--"):
            pair = token[2:]
            index += 1
        else:
            raise ProtocolError(f"invalid command-line argument for server process: {token}", "42601")
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ProtocolError(f"invalid command-line argument for server process: {pair}", "42601")
        settings[name.replace("-", "_").lower()] = value
    return settings


def _split_options(options: str) -> list[str]:
    """Split on whitespace; a backslash escapes the next character (libpq's rule)."""
    tokens: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        tokens.append("".join(current))
    return tokens


# ---------------------------------------------------------------- typed messages


def read_cstring(data: bytes | memoryview, offset: int) -> tuple[str, int]:
    """A NUL-terminated string at offset, and the offset after its NUL."""
    raw = bytes(data[offset:]) if isinstance(data, memoryview) else data
    start = 0 if isinstance(data, memoryview) else offset
    end = raw.find(b"\x00", start)
    if end < 0:
        raise ProtocolError("invalid message format: missing string terminator")
    value = raw[start:end].decode("utf-8", "replace")
    consumed = end - start + 1
    return value, offset + consumed


def message(type_code: bytes, body: bytes = b"") -> bytes:
    return type_code + _U32.pack(len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


AUTH_OK = authentication(0)
AUTH_CLEARTEXT = authentication(3)
PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
NO_DATA = message(b"n")
SSL_REFUSED = b"N"
SSL_ACCEPTED = b"S"
SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)
SYNC = message(b"S")
TERMINATE = message(b"X")


def negotiate_protocol_version(newest_minor: int, unrecognized_options: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion: the newest 3.x version served, and the `_pq_.` options not known."""
    names = list(unrecognized_options)
    # The whole version (3 << 16 | minor), as PostgreSQL sends it: libpq 18 reads a bare minor as 0.x and
    # refuses the connection ("server requested downgrade to pre-3.0 protocol version").
    version = PROTOCOL_V3 | newest_minor
    return message(b"v", _I32.pack(version) + _I32.pack(len(names)) + b"".join(cstr(n) for n in names))


def auth_md5(salt: bytes) -> bytes:
    return authentication(5, salt)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(10, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return authentication(11, data)


def auth_sasl_final(data: bytes) -> bytes:
    return authentication(12, data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", struct.pack("!ii", process_id, secret_key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def _fields(severity: str, code: str, text: str, detail: str | None, hint: str | None) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(code) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return body + b"\x00"


def error_response(
    code: str, text: str, severity: str = "ERROR", detail: str | None = None, hint: str | None = None
) -> bytes:
    return message(b"E", _fields(severity, code, text, detail, hint))


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def bound_query(sql: str, params: Sequence[str]) -> bytes:
    """One statement with text parameters ($1, ...) sent apart from its text: Parse, Bind, Execute of the
    unnamed statement and portal, then Sync (answered with one ReadyForQuery, as a Query)."""
    values = b"".join(_I32.pack(len(raw)) + raw for raw in (value.encode() for value in params))
    bind = _I16.pack(0) + _I16.pack(len(params)) + values + _I16.pack(0)
    return (build_parse("", sql.encode(), _I16.pack(0)) + build_bind(b"", b"", bind)
            + message(b"E", b"\x00" + _I32.pack(0)) + SYNC)


def startup_message(parameters: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in parameters.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def password_message(payload: bytes) -> bytes:
    return message(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    raw = bytes(body)
    offset = 0
    while offset < len(raw) and raw[offset] != 0:
        code = chr(raw[offset])
        end = raw.find(b"\x00", offset + 1)
        if end < 0:
            break
        fields[code] = raw[offset + 1 : end].decode("utf-8", "replace")
        offset = end + 1
    return fields


# ---------------------------------------------------------------- Parse / Bind / Describe / Close


def split_parse(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Parse body -> (statement name, query text, parameter-type section) as raw bytes; ValueError when
    a string is not terminated."""
    name_end = body.index(b"\x00")
    query_end = body.index(b"\x00", name_end + 1)
    return body[:name_end], body[name_end + 1 : query_end], body[query_end + 1 :]


def parse_parse(body: bytes) -> tuple[str, str, bytes]:
    """Parse message body -> (statement name, query text, raw parameter-type section)."""
    name, query, param_types = split_parse(body)
    return name.decode(), query.decode("utf-8", "replace"), param_types


def build_parse(name: str, query_text: bytes, param_types: bytes) -> bytes:
    return message(b"P", cstr(name) + query_text + b"\x00" + param_types)


def split_bind(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Bind body -> (portal name, statement name, rest) as raw bytes; ValueError when a name is not
    terminated."""
    portal_end = body.index(b"\x00")
    stmt_end = body.index(b"\x00", portal_end + 1)
    return body[:portal_end], body[portal_end + 1 : stmt_end], body[stmt_end + 1 :]


def whole_bind_at(data: bytes, start: int, end: int) -> bool:
    """`data[start:end]` is exactly one Bind message (the bytes around it already known to a caller that
    remembers a batch by what precedes and follows its Bind)."""
    return end - start >= 7 and data[start] == 0x42 and unpack_u32(data, start + 1)[0] == end - start - 1


def build_bind(portal: bytes, statement: bytes, rest: bytes) -> bytes:
    return message(b"B", portal + b"\x00" + statement + b"\x00" + rest)
