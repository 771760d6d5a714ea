"""Configuration: typed model, TOML loader with key-path errors, and a commented example."""

from config.loader import ConfigError, check, load, parse, split_address
from config.model import (
    Config,
    DatabaseConfig,
    GeneralConfig,
    JwtConfig,
    OmnishardedTableConfig,
    ShardedTableConfig,
    ShardRange,
    ShardValues,
    TwoPhaseCommitConfig,
    UserConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "GeneralConfig",
    "JwtConfig",
    "OmnishardedTableConfig",
    "ShardRange",
    "ShardValues",
    "ShardedTableConfig",
    "TwoPhaseCommitConfig",
    "UserConfig",
    "check",
    "load",
    "parse",
    "split_address",
]
