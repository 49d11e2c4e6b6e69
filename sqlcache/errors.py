"""Exceptions raised by sqlcache."""

from __future__ import annotations

__all__ = ["CacheUnavailable", "CodecError", "ConfigurationError", "SQLCacheError"]


class SQLCacheError(Exception):
    """Base class of every sqlcache exception."""


class ConfigurationError(SQLCacheError, ValueError):
    """Bad arguments to ``SQLCache()``, ``register()``, ``attach()`` or ``add_plugin()``."""


class CacheUnavailable(SQLCacheError):
    """Redis could not be reached or timed out; never reaches callers of the ORM."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"redis unavailable during {operation}")
        self.operation = operation


class CodecError(SQLCacheError):
    """A value cannot be encoded, or bytes read from Redis cannot be decoded."""
