"""Throwaway local PostgreSQL servers for `shardgate quickstart`, the tests and the benchmarks (never traffic)."""

from localpg.binaries import BinariesNotFound, client_tool, embedded_bin, find_pg_bin, supports_ssl
from localpg.topology import (
    DEFAULT_USERS,
    PgServer,
    Topology,
    TopologyError,
    UserSpec,
    free_port,
)

__all__ = ["DEFAULT_USERS", "BinariesNotFound", "PgServer", "Topology", "TopologyError", "UserSpec",
           "client_tool", "embedded_bin", "find_pg_bin", "free_port", "supports_ssl"]
