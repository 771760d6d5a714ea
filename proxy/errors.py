"""Errors raised inside the proxy; the session turns each into an ErrorResponse with its SQLSTATE."""

from __future__ import annotations


class ProxyError(Exception):
    def __init__(self, sqlstate: str, message: str, *, fatal: bool = False, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.fatal = fatal
        self.detail = detail


class PoolError(ProxyError):
    """The pool could not hand out a server (timeout, server down, too many clients)."""


class ServerError(ProxyError):
    """A server connection failed or answered something the proxy could not use."""


class ServerLostError(ServerError):
    """The server connection closed while the proxy was restoring a session on it: nothing of the client's
    was sent, so another server may be tried."""
