"""Counters behind ``SQLCache.stats()``."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["COUNTERS", "Stats"]

COUNTERS = (
    "hits",  # served from Redis
    "misses",  # answered by the database
    "fills",  # entries stored after a miss
    "fills_refused",  # fills Redis refused as stale: a writer changed a dependency since the miss
    "fills_skipped",  # fills not attempted: a dependency was locked, or the snapshot may predate a commit
    "decodes_reused",  # query hits whose Redis bytes equalled a result decoded before (decoding skipped)
    "too_large",  # results not cached because their entry would exceed max_entry_bytes
    "bypassed",  # reads that could not use the cache (own writes, FOR UPDATE, a SET search_path, ...)
    "stale_served",  # expired-but-valid query entries served while another caller refreshed them
    "stampede_waits",  # callers that waited for another caller's fill of the same query, and got it
    "stampede_timeouts",  # callers that waited past stampede_wait and queried the database themselves
    "invalidations",  # dependencies given a fresh generation
    "repopulated",  # entries written by a committing writer (mode="repopulate")
    "commits_coarsened",  # commits of so many rows that their tables were invalidated instead
    "invalidations_deferred",  # dependencies kept in the pending journal while Redis was away
    "invalidations_replayed",  # dependencies from the journal applied once Redis answered
    "invalidations_lost",  # dependencies dropped when the journal overflowed (a fence replaced them)
    "fences",  # cache-wide invalidations (after a journal overflow or a Redis restart)
    "relay_restarts",  # relay threads found dead (not stopped) and started again
    "outbox_relayed",  # outbox rows applied by this process's relay (their writer never marked them done)
    "restarts",  # Redis restarts noticed (a new run id); each fences the prefix
    "errors",  # Redis failures and undecodable entries
    "lineage_fences",  # servers found holding data another server process vouched for (failover, restart)
    "backoffs",  # times Redis was skipped for a back-off period after repeated failures
    "skipped_backoff",  # calls not made because of a back-off period
    "loop_stalls",  # asyncio calls timed out by a late event loop, not by Redis (no back-off for them)
    "signal_errors",  # exceptions raised by signal receivers
    "broadcasts_dropped",  # pub/sub messages dropped: undecodable, or (with a secret) unsigned or forged
    "plugin_errors",  # exceptions raised by plugins (receivers, operation hooks, close)
    "local_hits",  # reads served from the local tier (local_bytes=), no round trip
    "local_misses",  # reads the local tier could not serve (Redis read)
    "local_invalidations",  # dependency keys Redis's tracking named as changed
    "local_drops",  # times the whole local tier was dropped (flush, lost tracking connection, restart)
)


class Stats:
    """Thread-safe counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (another thread may have held this one at the fork)."""
        self._lock = threading.Lock()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: self._counts[name] for name in COUNTERS}
