"""Whether what a lost server left unanswered may run again on another server without the client seeing it twice."""

from __future__ import annotations

from proxy.protocol import codec
from proxy.statements import PreparedStatements
from routing.errors import RoutingError
from routing.router import Router

_Q, _P, _B, _F = (ord(c) for c in "QPBF")


def only_reads(data: bytes, statements: PreparedStatements, router: Router) -> bool:
    """Whether `data` (client messages) only reads. The server may have run it, and committed it, before it
    died: only a read may run again elsewhere. A function called by OID has no text to judge: not a read."""
    pos = 0
    try:
        while len(data) - pos >= 5:
            type_code = data[pos]
            end = pos + 1 + codec.unpack_u32(data, pos + 1)[0]
            if type_code == _Q:
                text: bytes | None = data[pos + 5 : end - 1]
            elif type_code == _P:
                text = codec.split_parse(data[pos + 5 : end])[1]
            elif type_code == _B:
                statement = codec.split_bind(data[pos + 5 : end])[1]
                text = statements.text_of(statement.decode()) if statement else None
            elif type_code == _F:
                return False
            else:
                text = None
            if text and router.route_statement(text.decode("utf-8", "replace")).write:
                return False
            pos = end
    except (ValueError, RoutingError):  # not framed, named or routed as expected: not known to read
        return False
    return True
