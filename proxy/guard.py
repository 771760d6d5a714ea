"""Statements a session refuses before any server sees them: claim forgery (JWT), transactions in statement mode."""

from __future__ import annotations

from auth.claims import is_forgery_attempt
from proxy.protocol import codec, sqlstate
from proxy.protocol.sqltext import quote_literal
from proxy.session_state import Effect

Refusal = tuple[str, str, str]  # (sqlstate, message, hint)

FORGERY = (sqlstate.INSUFFICIENT_PRIVILEGE, "a JWT session cannot change its claims or role",
           "request.jwt.* settings and the role come from the token")
TRANSACTION_IN_STATEMENT_MODE = (sqlstate.FEATURE_NOT_SUPPORTED,
                                 "transaction blocks are not allowed in statement pool mode",
                                 'run each statement on its own, or use pool_mode = "transaction"')
PREPARE_TRANSACTION_POOLED = (sqlstate.FEATURE_NOT_SUPPORTED,
                              "PREPARE TRANSACTION is not allowed in transaction or statement pool mode",
                              "Shardgate owns the global transaction ids and commits transactions over several "
                              'shards itself; use pool_mode = "session" to prepare transactions by hand')


def prepares_transaction(effects: tuple[Effect, ...]) -> bool:
    return any(effect.kind == "prepare_transaction" for effect in effects)


class Guard:
    """What this session refuses: `jwt` checks every statement text for claim forgery, `statement_mode`
    refuses transaction blocks."""

    __slots__ = ("jwt", "statement_mode")

    def __init__(self, *, jwt: bool, statement_mode: bool) -> None:
        self.jwt = jwt
        self.statement_mode = statement_mode

    @property
    def refuses(self) -> bool:
        return self.jwt or self.statement_mode

    def refusal(self, sql: bytes) -> Refusal | None:
        """Why a Query's text is answered with an error instead of run, or None."""
        if self.statement_mode and opens_transaction(sql):
            return TRANSACTION_IN_STATEMENT_MODE
        if self.forges_claims(sql):
            return FORGERY
        return None

    def forges_claims(self, sql: bytes) -> bool:
        """A JWT session's statement text that could change its claims or role."""
        return self.jwt and is_forgery_attempt(sql.decode("utf-8", "replace"))


def raising_query(refusal: Refusal) -> bytes:
    """A Query that makes the server raise the refusal: an open transaction aborts as PostgreSQL would,
    and the reply keeps its place among pipelined replies."""
    code, message, hint = refusal
    return codec.query(
        f"DO $shardgate$BEGIN RAISE EXCEPTION USING ERRCODE = {quote_literal(code)}, "
        f"MESSAGE = {quote_literal(message)}, HINT = {quote_literal(hint)}; END$shardgate$"
    )


def opens_transaction(sql: bytes) -> bool:
    head = sql.lstrip()[:17].lower()
    return head.startswith(b"begin") or head.startswith(b"start transaction")
