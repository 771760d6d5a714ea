"""Authentication failures, each carrying the SQLSTATE the client will see."""

from __future__ import annotations


class AuthError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
