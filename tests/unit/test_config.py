"""Configuration mistakes fail fast with the offending value in the message."""

from __future__ import annotations

import pytest

from sqlcache import ConfigurationError, SQLCache
from sqlcache.config import CacheConfig, ModelPolicy


@pytest.mark.parametrize("prefix", ["", "has space", "glob*", "a[b]", 3])
def test_bad_prefix(prefix: object) -> None:
    """Prefixes that would break key scanning are refused."""
    with pytest.raises(ConfigurationError, match="prefix"):
        CacheConfig(prefix=prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, 1.5, "60", True])
def test_bad_ttl(ttl: object) -> None:
    """TTLs are positive ints of seconds or None."""
    with pytest.raises(ConfigurationError, match=repr(ttl).replace("(", r"\(")[:8].replace("[", r"\[")):
        ModelPolicy(ttl=ttl)  # type: ignore[arg-type]


def test_bad_mode() -> None:
    """Only the two documented modes exist."""
    with pytest.raises(ConfigurationError, match="'sometimes'"):
        ModelPolicy(mode="sometimes")  # type: ignore[arg-type]


def test_bad_client_and_register() -> None:
    """A non-client, and registering an unmapped class, raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        SQLCache(object(), prefix="x")  # type: ignore[arg-type]
    cache = SQLCache("redis://127.0.0.1:6379/0", prefix="x")
    with pytest.raises(ConfigurationError, match="not a mapped class"):
        cache.register(int)
    with pytest.raises(ConfigurationError):
        cache.attach("sqlite://")  # type: ignore[arg-type]
