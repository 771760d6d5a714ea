"""Errors the routing layer raises; each carries the SQLSTATE the session sends the client."""

from __future__ import annotations

INVALID_PARAMETER_VALUE = "22023"


class RoutingError(Exception):
    """A statement the router refuses to route."""

    def __init__(self, message: str, sqlstate: str = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
