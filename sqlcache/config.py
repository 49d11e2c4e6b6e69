"""Frozen option bags and their validation; no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigurationError

__all__ = ["MAX_LOCK_TTL", "MAX_TTL", "CacheConfig", "Mode", "ModelPolicy", "validate_ttl"]

Mode = Literal["invalidate", "repopulate"]

_PREFIX = re.compile(r"^[^\s*?\[\]\\]+$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


#: The longest TTL accepted, in seconds (ten years): Redis refuses expiries in milliseconds far beyond
#: it, and every refusal would count as an outage.
MAX_TTL = 10 * 365 * 86400
#: The longest pre-commit lock, in seconds: longer than any transaction's COMMIT; the Lua scripts treat
#: a lock expiring further ahead as garbage (a hostile or damaged value).
MAX_LOCK_TTL = 86400


def validate_ttl(ttl: object, what: str, maximum: int = MAX_TTL) -> int | None:
    """Return ``ttl`` if it is ``None`` or a positive int of seconds up to ``maximum``; raise
    ConfigurationError otherwise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= maximum:
        raise ConfigurationError(
            f"{what} must be a positive int of seconds (at most {maximum}) or None, got {ttl!r}"
        )
    return ttl


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Settings of one :class:`~sqlcache.SQLCache`.

    :param prefix: every Redis key starts with ``prefix + ":"``.
    :param default_ttl: seconds an entry lives when its model or query gives none (``None``: no expiry).
    :param timeout: seconds any Redis call may take before the database answers instead.
    :param lock_ttl: seconds a pre-commit lock lives if its writer never releases it.
    :param generation_ttl: seconds a dependency generation lives after it was last written.
    :param stampede_wait: seconds a cached query's caller waits for another caller's fill of the same
        key before it queries the database itself.
    :param wait_replicas: replicas that must acknowledge every release (Redis ``WAIT``) before a commit
        returns; 0: none asked (docs/pages/deployment.md).
    :param wait_timeout: seconds ``WAIT`` may take; below ``timeout``.
    :param publish_stats: seconds between two publications of ``stats()`` to Redis (``sqlcache stats``
        reads them); None: not published.
    :param shards: on a Redis Cluster, how many shards (hash tags) the cache's keys are spread over;
        1: every key in one slot.
    :param local_bytes: bytes of entries the local tier holds in process memory; 0: no local tier.
    :param local_max_lag: seconds beyond which the local tier serves nothing unless Redis's tracking
        connection answered a PING sent that recently.
    """

    prefix: str
    default_ttl: int | None = 3600
    timeout: float = 0.25
    lock_ttl: int = 60
    generation_ttl: int = 7 * 24 * 3600
    failure_threshold: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    stampede_wait: float = 2.0
    max_entry_bytes: int = 8 * 1024 * 1024
    broadcast: bool = False
    durable: bool = False
    outbox_table: str = "sqlcache_outbox"
    relay_interval: float = 1.0
    relay_grace: float = 10.0
    decoded_cache_bytes: int = 4 * 1024 * 1024
    wait_replicas: int = 0
    wait_timeout: float = 0.1
    publish_stats: float | None = None
    shards: int = 1
    local_bytes: int = 0
    local_max_lag: float = 0.1

    def __post_init__(self) -> None:
        if (
            isinstance(self.local_bytes, bool)
            or not isinstance(self.local_bytes, int)
            or not (0 <= self.local_bytes <= 1 << 40)
        ):
            raise ConfigurationError(
                f"local_bytes must be an int of bytes in [0, 2**40], got {self.local_bytes!r}"
            )
        if type(self.local_max_lag) not in (int, float) or not 0.001 <= self.local_max_lag <= 60:
            raise ConfigurationError(
                f"local_max_lag must be seconds in [0.001, 60], got {self.local_max_lag!r}"
            )
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or not 1 <= self.shards <= 1024:
            raise ConfigurationError(f"shards must be an int in [1, 1024], got {self.shards!r}")
        if not isinstance(self.prefix, str) or not self.prefix or not _PREFIX.match(self.prefix):
            raise ConfigurationError(
                "prefix must be a non-empty string without whitespace or glob characters, "
                f"got {self.prefix!r}"
            )
        validate_ttl(self.default_ttl, "default_ttl")
        if self.lock_ttl is None:
            raise ConfigurationError("lock_ttl must be a positive int of seconds, got None")
        validate_ttl(self.lock_ttl, "lock_ttl", MAX_LOCK_TTL)
        validate_ttl(self.generation_ttl, "generation_ttl")
        if self.generation_ttl is None:
            raise ConfigurationError("generation_ttl must be a positive int of seconds, got None")
        if not isinstance(self.timeout, (int, float)) or not 0 < self.timeout <= 60:
            raise ConfigurationError(f"timeout must be seconds in (0, 60], got {self.timeout!r}")
        if not isinstance(self.stampede_wait, (int, float)) or not 0 <= self.stampede_wait <= 60:
            raise ConfigurationError(f"stampede_wait must be seconds in [0, 60], got {self.stampede_wait!r}")
        if (
            not isinstance(self.wait_replicas, int)
            or isinstance(self.wait_replicas, bool)
            or self.wait_replicas < 0
        ):
            raise ConfigurationError(f"wait_replicas must be an int >= 0, got {self.wait_replicas!r}")
        if self.wait_replicas and (
            not isinstance(self.wait_timeout, (int, float)) or not 0.001 <= self.wait_timeout < self.timeout
        ):
            raise ConfigurationError(
                f"wait_timeout must be seconds in [0.001, timeout), got {self.wait_timeout!r}"
            )
        if not isinstance(self.max_entry_bytes, int) or self.max_entry_bytes < 1:
            raise ConfigurationError(f"max_entry_bytes must be a positive int, got {self.max_entry_bytes!r}")
        if not isinstance(self.outbox_table, str) or not _TABLE.match(self.outbox_table):
            raise ConfigurationError(
                f"outbox_table must be a plain SQL identifier, got {self.outbox_table!r}"
            )
        if self.durable and len(self.prefix) > 255:
            raise ConfigurationError(
                "durable=True needs a prefix of at most 255 characters (the outbox column)"
            )
        if not isinstance(self.relay_interval, (int, float)) or not 0 < self.relay_interval <= 3600:
            raise ConfigurationError(
                f"relay_interval must be seconds in (0, 3600], got {self.relay_interval!r}"
            )
        if not isinstance(self.relay_grace, (int, float)) or not 0 <= self.relay_grace <= 86400:
            raise ConfigurationError(f"relay_grace must be seconds in [0, 86400], got {self.relay_grace!r}")
        if (
            isinstance(self.decoded_cache_bytes, bool)
            or not isinstance(self.decoded_cache_bytes, int)
            or self.decoded_cache_bytes < 0
        ):
            raise ConfigurationError(
                f"decoded_cache_bytes must be an int >= 0, got {self.decoded_cache_bytes!r}"
            )
        if self.publish_stats is not None and (
            type(self.publish_stats) not in (int, float) or not 0.1 <= self.publish_stats <= 3600
        ):
            raise ConfigurationError(
                f"publish_stats must be None or seconds in [0.1, 3600], got {self.publish_stats!r}"
            )
        if self.failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold must be >= 1, got {self.failure_threshold!r}")


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """How one registered mapped class is cached: ``ttl`` seconds (None: the cache default) and mode."""

    ttl: int | None = None
    mode: Mode = "invalidate"

    def __post_init__(self) -> None:
        validate_ttl(self.ttl, "ttl")
        if self.mode not in ("invalidate", "repopulate"):
            raise ConfigurationError(f"mode must be 'invalidate' or 'repopulate', got {self.mode!r}")
