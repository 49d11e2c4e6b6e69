"""What the extension reads: the ``SQLCACHE_*`` keys of ``app.config``, the keyword overrides given in
code, and each model's ``__sqlcache__``. No I/O."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from sqlcache.config import ModelPolicy
from sqlcache.errors import ConfigurationError

__all__ = ["CONFIG_KEYS", "LEFT_OUT", "OVERRIDES", "cache_arguments", "check_overrides", "model_policy"]

#: ``app.config`` key -> the :class:`~sqlcache.SQLCache` parameter it sets
CONFIG_KEYS: dict[str, str] = {
    "SQLCACHE_REDIS_URL": "redis_client",
    "SQLCACHE_PREFIX": "prefix",
    "SQLCACHE_DEFAULT_TTL": "default_ttl",
    "SQLCACHE_SECRET": "secret",
    "SQLCACHE_TIMEOUT": "timeout",
    "SQLCACHE_LOCK_TTL": "lock_ttl",
    "SQLCACHE_GENERATION_TTL": "generation_ttl",
    "SQLCACHE_FAILURE_THRESHOLD": "failure_threshold",
    "SQLCACHE_BACKOFF": "backoff",
    "SQLCACHE_MAX_BACKOFF": "max_backoff",
    "SQLCACHE_STAMPEDE_WAIT": "stampede_wait",
    "SQLCACHE_MAX_ENTRY_BYTES": "max_entry_bytes",
    "SQLCACHE_BROADCAST": "broadcast",
    "SQLCACHE_DECODED_CACHE_BYTES": "decoded_cache_bytes",
    "SQLCACHE_WAIT_REPLICAS": "wait_replicas",
    "SQLCACHE_WAIT_TIMEOUT": "wait_timeout",
    "SQLCACHE_PUBLISH_STATS": "publish_stats",
    "SQLCACHE_SHARDS": "shards",
    "SQLCACHE_LOCAL_BYTES": "local_bytes",
    "SQLCACHE_LOCAL_MAX_LAG": "local_max_lag",
}

#: keyword overrides accepted in code: every configurable parameter, and plugin objects
OVERRIDES = frozenset(CONFIG_KEYS.values()) | {"plugins"}

#: SQLCache parameters the extension does not offer, and why (the message of the error naming them).
#: durable=True makes attach() refuse a database without the outbox table, and the extension attaches
#: in the first app context, the one ``flask db upgrade`` would need to create that table.
LEFT_OUT: dict[str, str] = {
    name: "durable invalidation is not offered by the Flask integration yet (docs/pages/flask.md)"
    for name in ("durable", "outbox_table", "relay_interval", "relay_grace")
}

_MODEL_KEYS = ("ttl", "mode")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_overrides(overrides: Mapping[str, object]) -> None:
    """Raise ConfigurationError naming the first keyword that is not an accepted override."""
    for name in overrides:
        if name in LEFT_OUT:
            raise ConfigurationError(f"{name}=: {LEFT_OUT[name]}")
        if name not in OVERRIDES:
            raise ConfigurationError(
                f"FlaskSQLCache() got an unknown keyword {name!r}{_suggest(name, sorted(OVERRIDES))}"
            )


def cache_arguments(config: Mapping[str, object], overrides: Mapping[str, object]) -> dict[str, Any]:
    """The keyword arguments of the app's :class:`~sqlcache.SQLCache`: its ``SQLCACHE_*`` keys, then
    the overrides on top. The values themselves are checked by SQLCache (``Any``: each key has its own
    type, and config values are untyped by nature).

    :raises ConfigurationError: on a ``SQLCACHE_*`` key this extension does not know, no Redis URL, or a
        Redis URL that is not a string. No message carries a value (a URL or a secret may be in it).
    """
    for key in sorted(k for k in config if isinstance(k, str) and k.startswith("SQLCACHE_")):
        left_out = LEFT_OUT.get(key.removeprefix("SQLCACHE_").lower())
        if left_out is not None:
            raise ConfigurationError(f"{key}: {left_out}")
        if key not in CONFIG_KEYS:
            raise ConfigurationError(f"unknown config key {key}{_suggest(key, sorted(CONFIG_KEYS))}")
    url = config.get("SQLCACHE_REDIS_URL")
    if url is not None and not isinstance(url, str):
        raise ConfigurationError(
            f"SQLCACHE_REDIS_URL must be a redis:// URL string, got a {type(url).__name__} "
            "(pass a client object as FlaskSQLCache(redis_client=...))"
        )
    args: dict[str, Any] = {CONFIG_KEYS[k]: config[k] for k in CONFIG_KEYS if k in config}
    args.update(overrides)
    if args.get("redis_client") is None:
        raise ConfigurationError("SQLCACHE_REDIS_URL is not set (nor redis_client= given)")
    return args


def model_policy(cls: type[Any]) -> ModelPolicy | None:
    """The policy ``cls`` declares in its own ``__sqlcache__`` (inherited declarations are its base's);
    None if it declares none.

    :raises ConfigurationError: naming the class, if ``__sqlcache__`` is not a dict of ``ttl`` and
        ``mode`` or a value is out of range.
    """
    if "__sqlcache__" not in vars(cls):
        return None
    spec = vars(cls)["__sqlcache__"]
    where = f"{cls.__module__}.{cls.__qualname__}.__sqlcache__"
    if not isinstance(spec, Mapping):
        raise ConfigurationError(
            f"{where} must be a dict with the keys 'ttl' and 'mode', got a {type(spec).__name__}"
        )
    unknown = sorted(str(k) for k in spec if k not in _MODEL_KEYS)
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown keys {unknown}{_suggest(unknown[0], list(_MODEL_KEYS))}; "
            "it takes 'ttl' (seconds or None) and 'mode' ('invalidate' or 'repopulate')"
        )
    try:
        return ModelPolicy(ttl=spec.get("ttl"), mode=spec.get("mode", "invalidate"))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
