"""The local tier in front of the stores (``_local`` is the tier itself): :class:`LocalStore`, the
sync store with the tier answering its reads first, the same in front of every event loop's store
(:func:`in_front`), and :func:`local_tier_for`, which makes a cache's tier with the tracking its
store needs (one server, Sentinel, a cluster)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import _keys
from ._cluster import ClusterStore
from ._ctracking import cluster_tracking
from ._health import Health
from ._local import LocalTier, TrackingLike
from ._protocol import ReadResult, Store
from ._store import RedisStore
from ._stracking import server_tracking
from .config import CacheConfig
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._aworlds import LoopStore

__all__ = ["LocalStore", "in_front", "local_tier_for"]


class LocalStore:
    """The cache's sync store with the local tier in front of its reads; everything else is the store's."""

    def __init__(self, inner: Store, tier: LocalTier) -> None:
        self._inner = inner
        self._tier = tier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        tier = self._tier
        local = tier.lookup(entry_key, dep_keys)
        if local is not None:
            tier.count("local_hits", 1)
            return local
        mark = tier.mark()
        r = self._inner.read(clock_key, entry_key, dep_keys)
        tier.count("local_misses", 1)
        if r.hit and not r.swr and r.payload is not None and r.generations is not None:
            tier.remember(entry_key, dep_keys, r.generations, r.payload, r.clock, mark)
        return r

    def delete(self, *keys: str) -> None:
        self._tier.forget(keys)
        self._inner.delete(*keys)

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        tier = self._tier
        out: list[ReadResult | None] = [tier.lookup(k, d) for k, d in entries]
        todo = [i for i, r in enumerate(out) if r is None]
        if len(todo) < len(entries):
            tier.count("local_hits", len(entries) - len(todo))
        if todo:
            mark = tier.mark()
            got = self._inner.read_many(clock_key, [entries[i] for i in todo])
            tier.count("local_misses", len(todo))
            for i, r in zip(todo, got, strict=True):
                out[i] = r
                if r.hit and not r.swr and r.payload is not None and r.generations is not None:
                    tier.remember(entries[i][0], entries[i][1], r.generations, r.payload, r.clock, mark)
        return [r for r in out if r is not None]


def local_tier_for(
    store: object, c: CacheConfig, health: Health, count: Callable[[str, int], None]
) -> LocalTier:
    """The local tier of a cache on ``store``: it watches every dependency key, whatever its kind, and
    every entry key (an entry that expires or is deleted goes from the tier too). It holds the health
    and the counters, not the cache: its keeper must not keep the cache alive.

    On a Redis Cluster (sharded or not) it watches with a tracking connection per primary serving one of
    the cache's slots (``_ctracking``).

    Behind Redis Sentinel it watches the primary the sentinels name, and checks each round that they
    still name it (``_stracking``).

    :raises ConfigurationError: a store it cannot watch (a pool of Sentinel replicas, a custom pool),
        TLS settings that make no context, or OCSP validation."""
    if not isinstance(store, (ClusterStore, RedisStore)):
        raise ConfigurationError(f"the local tier (local_bytes=) cannot watch a {type(store).__name__}")
    layout = store.key_layout(c.prefix)
    prefixes = [ns + kind for ns in layout.namespaces for kind in (":d:", ":e:", ":q:")]
    make: Callable[[], TrackingLike]
    if isinstance(store, ClusterStore):
        slots = [_keys.clock_key(p) for p in layout.prefixes]
        make = cluster_tracking(store.target, slots, prefixes, c.timeout)
    else:
        make = server_tracking(store.client, prefixes, c.timeout, c.local_max_lag)
    return LocalTier(c.local_bytes, c.local_max_lag, make, lambda: health.epoch, count)


def in_front(make: Callable[[], LoopStore], tier: LocalTier | None) -> Callable[[], LoopStore]:
    """How to make an event loop's store with ``tier`` (the sync world's own) in front of its reads."""
    if tier is None:
        return make
    return lambda: cast("LoopStore", LocalStore(cast(Store, make()), tier))
