"""HTTP/1.1 requests from bytes (sans-I/O): request line, headers, Content-Length bodies, keep-alive; and
the bytes of a response. No chunked request bodies: they are refused with 411."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 16 * 1024
_HEAD_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    keep_alive: bool = True


@dataclass(frozen=True, slots=True)
class HttpProblem:
    """A request that cannot be read: answered with `status`, then the connection closes. `discard`: body
    bytes the client announced, read and dropped before closing (so the client sees the answer, not a reset)."""

    status: int
    message: str
    discard: int = 0


@dataclass(slots=True)
class RequestParser:
    """Feed bytes with `feed`; `next` hands back whole requests in order, an HttpProblem (after which the
    parser only discards), or None when more bytes are needed."""

    max_body_bytes: int
    max_header_bytes: int = MAX_HEADER_BYTES
    buffer: bytearray = field(default_factory=bytearray)
    head: Request | None = None  # headers read, body still arriving
    body_length: int = 0
    wants_continue: bool = False  # `Expect: 100-continue` on the request whose body is awaited
    failed: bool = False
    discarding: int = 0

    def feed(self, data: bytes) -> None:
        if self.failed:
            self.discarding = max(0, self.discarding - len(data))
            return
        self.buffer += data

    def next(self) -> Request | HttpProblem | None:
        if self.failed:
            return None
        if self.head is None:
            end = self.buffer.find(_HEAD_END)
            if end < 0:
                if len(self.buffer) > self.max_header_bytes:
                    return self._fail(HttpProblem(431, f"request head longer than {self.max_header_bytes} bytes"))
                return None
            if end > self.max_header_bytes:
                return self._fail(HttpProblem(431, f"request head longer than {self.max_header_bytes} bytes"))
            head_bytes = bytes(self.buffer[:end])
            del self.buffer[: end + len(_HEAD_END)]
            parsed = _parse_head(head_bytes)
            if isinstance(parsed, HttpProblem):
                return self._fail(parsed)
            request, length = parsed
            if length > self.max_body_bytes:
                already = len(self.buffer)
                self.buffer.clear()
                return self._fail(HttpProblem(
                    413, f"request body of {length} bytes is larger than http.max_body_bytes ({self.max_body_bytes})",
                    discard=max(0, length - already)))
            self.head, self.body_length = request, length
            self.wants_continue = request.headers.get("expect", "").lower() == "100-continue"
        if len(self.buffer) < self.body_length:
            return None
        request = self.head
        assert request is not None
        request.body = bytes(self.buffer[: self.body_length])
        del self.buffer[: self.body_length]
        self.head = None
        self.wants_continue = False
        return request

    def _fail(self, problem: HttpProblem) -> HttpProblem:
        self.failed = True
        self.discarding = problem.discard
        self.buffer.clear()
        self.head = None
        return problem


def _parse_head(head: bytes) -> tuple[Request, int] | HttpProblem:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
        return HttpProblem(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        version_text = "1.1"
    elif version == b"HTTP/1.0":
        version_text = "1.0"
    elif version.startswith(b"HTTP/"):
        return HttpProblem(505, "only HTTP/1.1 and HTTP/1.0 are supported")
    else:
        return HttpProblem(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            return HttpProblem(400, "malformed header line")  # also obsolete line folding
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "transfer-encoding" in headers:
        return HttpProblem(411, "chunked request bodies are not supported: send the body with a Content-Length")
    length = 0
    declared = headers.get("content-length")
    if declared is not None:
        lengths = {item.strip() for item in declared.split(",")}
        if len(lengths) != 1:
            return HttpProblem(400, "conflicting Content-Length headers")
        length_text = lengths.pop()
        if not length_text.isascii() or not length_text.isdigit() or len(length_text) > 18:
            return HttpProblem(400, "Content-Length must be a number of bytes")
        length = int(length_text)
    tokens = {item.strip().lower() for item in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version_text == "1.1" else "keep-alive" in tokens
    request = Request(method.decode("ascii"), target.decode("ascii"), version_text, headers, keep_alive=keep_alive)
    return request, length


def response(status: int, body: bytes, *, keep_alive: bool, content_type: str = "application/json",
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The bytes of one response with a Content-Length body."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if not keep_alive:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
