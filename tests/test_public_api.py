"""The contract names of DESIGN.md section 1: a rename fails here, not in a user's code."""

from __future__ import annotations

import inspect

import sqlcache
from sqlcache import SQLCache, signals


def test_all() -> None:
    """__all__ is sorted and exports exactly the public names."""
    assert sqlcache.__all__ == sorted(sqlcache.__all__)
    assert set(sqlcache.__all__) >= {
        "SQLCache",
        "signals",
        "ConfigurationError",
        "CacheUnavailable",
        "CodecError",
        "SQLCacheError",
        "__version__",
    }


def test_cache_methods() -> None:
    """The facade's verbs and their parameters."""
    for name in [
        "attach",
        "detach",
        "register",
        "invalidate",
        "invalidate_tags",
        "invalidate_model",
        "clear",
        "stats",
        "get",
        "get_many",
        "aget",
        "aget_many",
    ]:
        assert callable(getattr(SQLCache, name)), name
    for name in ("get", "aget"):
        assert list(inspect.signature(getattr(SQLCache, name)).parameters)[1:] == ["session", "cls", "pk"]
    for name in ("get_many", "aget_many"):
        assert list(inspect.signature(getattr(SQLCache, name)).parameters)[1:] == ["session", "cls", "pks"]
    params = inspect.signature(SQLCache.__init__).parameters
    assert list(params)[1:4] == ["redis_client", "prefix", "default_ttl"]
    reg = inspect.signature(SQLCache.register).parameters
    assert list(reg)[1:] == ["cls", "ttl", "mode"]
    assert reg["mode"].default == "invalidate" and reg["ttl"].default is None


def test_signals() -> None:
    """The four signals exist under their documented names."""
    for name in ["cache_hit", "cache_miss", "invalidated", "cache_error"]:
        assert hasattr(signals, name)
