"""Configuration: typed model, TOML loader with key-path errors, and a commented example."""

from config.loader import ConfigError, check, load, parse, split_address
from config.model import Config, DatabaseConfig, GeneralConfig, JwtConfig, UserConfig

__all__ = [
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "GeneralConfig",
    "JwtConfig",
    "UserConfig",
    "check",
    "load",
    "parse",
    "split_address",
]
