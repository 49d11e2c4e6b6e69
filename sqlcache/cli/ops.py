"""What ``sqlcache stats``, ``inspect`` and ``flush`` share: reaching the Redis that holds a prefix's
keys (a single server, or the primary of the prefix's slot on a cluster) through sqlcache's own store,
and reporting failures without a password or a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import redis

from sqlcache import _keys
from sqlcache._cluster import ClusterStore
from sqlcache._health import Health
from sqlcache._keys import Layout
from sqlcache._shardstore import store_for
from sqlcache._store import RedisStore, hide_password
from sqlcache.config import CacheConfig
from sqlcache.errors import CacheUnavailable, ConfigurationError

__all__ = ["Target", "connect", "guarded", "shown"]

# Errors that mean "Redis did not answer as asked" (the stores translate theirs to CacheUnavailable).
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, CacheUnavailable)


@dataclass(frozen=True)
class Target:
    """Where one prefix's keys are: ``client`` (plain commands: SCAN, MGET, PTTL), ``store`` (the
    protocol's operations, as a cache runs them) and ``key_prefix`` (what starts every key)."""

    client: redis.Redis
    store: RedisStore | ClusterStore
    key_prefix: str
    url: str  # as shown: the password hidden
    layout: Layout  # the prefix of each table's and tag's keys (a sharded cache's shards)


def shown(url: str) -> str:
    """``url`` fit to print: its password replaced by ``***``."""
    return hide_password(url)


def connect(url: str, prefix: str, timeout: float) -> Target:
    """The target of ``prefix`` on the Redis of ``url`` (``redis://``, ``rediss://``, ``unix://`` or
    ``redis+cluster://``).

    :raises ConfigurationError: a bad prefix or URL (the password not echoed).
    :raises CacheUnavailable: a cluster that cannot say which node serves the prefix.
    """
    CacheConfig(prefix=prefix, timeout=timeout)  # the cache's own checks of the prefix
    store = store_for(url, timeout, Health())
    layout = store.key_layout(prefix)
    if isinstance(store, ClusterStore):
        # a cache sharded over the cluster says so in its first shard's layout key (lineage.lua)
        claim = store.slot_client().get(_keys.layout_key(layout.base))
        if claim is not None and claim.isdigit() and 1 < int(claim) <= 1024:
            store.disconnect()
            store = store_for(url, timeout, Health(), int(claim))
            layout = store.key_layout(prefix)
    client = store.slot_client() if isinstance(store, ClusterStore) else store.client
    return Target(client, store, layout.base, shown(url), layout)


def guarded(command: str, args: argparse.Namespace, body: Callable[[Target], int]) -> int:
    """Run ``body`` on the target of ``args``; an outage or a bad argument is one line on stderr (exit
    2), never a traceback or a password."""
    try:
        target = connect(args.redis_url, args.prefix, args.timeout)
    except ConfigurationError as exc:
        print(f"sqlcache {command}: {exc}", file=sys.stderr)
        return 2
    except REDIS_ERRORS as exc:
        print(
            f"sqlcache {command}: cannot reach Redis at {shown(args.redis_url)}: {_why(exc)}", file=sys.stderr
        )
        return 2
    try:
        return body(target)
    except REDIS_ERRORS as exc:
        print(f"sqlcache {command}: Redis at {target.url} failed: {_why(exc)}", file=sys.stderr)
        return 2
    finally:
        target.store.disconnect()


def _why(exc: BaseException) -> str:
    """The failure in a few words: the redis-py error under a CacheUnavailable, without any URL's password."""
    cause = exc.__cause__ if isinstance(exc, CacheUnavailable) and exc.__cause__ is not None else exc
    return hide_password(f"{type(cause).__name__}: {cause}")
