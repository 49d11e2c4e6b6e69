"""sqlcache: Redis as a safe, fast second-level cache for SQLAlchemy 2.x."""

from __future__ import annotations

from . import signals
from ._outbox import outbox_table
from ._relay import Relay
from .cache import SQLCache
from .config import CacheConfig, ModelPolicy
from .errors import CacheUnavailable, CodecError, ConfigurationError, SQLCacheError
from .options import CacheOption, cached

__version__ = "0.3.0"

__all__ = [
    "CacheConfig",
    "CacheOption",
    "CacheUnavailable",
    "CodecError",
    "ConfigurationError",
    "ModelPolicy",
    "Relay",
    "SQLCache",
    "SQLCacheError",
    "__version__",
    "cached",
    "outbox_table",
    "signals",
]
