"""Quoting of SQL literals and identifiers for the SQL text the proxy writes itself."""

from __future__ import annotations


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
