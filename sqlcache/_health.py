"""What every store of one cache knows about its Redis server: the circuit breaker and the server's run
id. Shared by the stores of each I/O world (sync, asyncio), which reach the same server: an outage seen
from one world skips Redis in the other too, and a restart is noticed once and fenced once. No I/O."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .errors import CacheUnavailable

__all__ = ["Health"]

log = logging.getLogger("sqlcache")


class Health:
    """After ``failure_threshold`` consecutive failures, Redis is skipped for a back-off period
    (doubling up to ``max_backoff``) so that a dead Redis does not add a timeout to every request.

    ``epoch`` grows at every restart of the server, so that each store knows to load its scripts again.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failure_threshold = failure_threshold
        self._base_backoff = backoff
        self._max_backoff = max_backoff
        self._now = clock
        self._mutex = threading.Lock()
        self._failures = 0
        self._next_backoff = backoff
        self.open_until = 0.0
        self.backoffs = 0
        self.skipped = 0
        self.stalls = 0  # asyncio timeouts the event loop caused (not counted as Redis failures)
        self.ok_seq = 0  # successful calls so far: tells one failure burst from the next
        self.run_ids: dict[str, str] = {}  # per server (node name on a cluster; "" for one server)
        self.on_restart: Callable[[], None] | None = None
        # told of a release whose reply, read after commit() returned (a store's ``settle``), says Redis
        # did not apply it: (its dependency keys, its lock's token, why). None: releases are awaited
        self.on_release_lost: Callable[[Sequence[str], str, CacheUnavailable], None] | None = None
        self.restart_pending = False
        self.epoch = 0
        # per shard, lineage.lua's keys and arguments (clock, lineage key, dependency of every entry,
        # layout key, generation ttl ms, layout): what a new connection sends first; None: not checked
        self.lineage: list[tuple[str, str, str, str, int, str]] | None = None
        self.lineage_fences = 0  # servers found holding data another server process vouched for
        # why this process must not use Redis at all: the prefix holds another layout (set once, kept)
        self.conflict: str | None = None
        # (replicas, timeout ms): every release is followed by WAIT on its connection; None: not
        self.wait: tuple[int, int] | None = None

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (one held by another thread at the fork would never be freed)."""
        self._mutex = threading.Lock()

    @property
    def backing_off(self) -> bool:
        return self.open_until > self._now()

    def check(self, operation: str) -> None:
        """Raise CacheUnavailable while backing off (and count the call skipped), and for good once the
        prefix was found to hold another layout."""
        if self.open_until and self.open_until > self._now():
            self.skipped += 1
            raise CacheUnavailable(operation)
        if self.conflict is not None:
            self.skipped += 1
            raise CacheUnavailable(f"{operation} ({self.conflict})")

    def failed(self) -> None:
        with self._mutex:
            self._failures += 1
            if self._failures >= self._failure_threshold:
                self.open_until = self._now() + self._next_backoff
                self._next_backoff = min(self._next_backoff * 2, self._max_backoff)
                self._failures = 0
                self.backoffs += 1

    def retry_now(self) -> None:
        """End the back-off now: the next call goes to Redis (a closing cache's last journal replay)."""
        self.open_until = 0.0

    def stalled(self) -> None:
        """A call timed out because its event loop ran late, not because Redis did: not a failure."""
        self.stalls += 1

    def answered(self, operation: str) -> None:
        """A call succeeded. If a new connection found the server restarted, its answer must not be
        used: the owner is told (it fences before the next read) and CacheUnavailable is raised."""
        if self.restart_pending:
            if self.conflict is not None:  # the answer came under another layout: never used
                raise CacheUnavailable(f"{operation} ({self.conflict})")
            # t0 entry e filled under generation g1; Redis snapshots to disk
            # t1 a commit moves g1 to g2, acknowledged; Redis dies before its next snapshot
            # t2 Redis restarts from the snapshot: e and g1 are back and e looks valid. This answer came
            #    from the restarted server: drop it, and let the owner fence before the next read
            with self._mutex:
                self.restart_pending = False
            if self.on_restart is not None:
                self.on_restart()
            raise CacheUnavailable(f"{operation} (redis restarted)")
        self.ok_seq += 1
        # after an outage the breaker opened (failures counted from zero again): a success also ends
        # its doubled back-off, or the next short blip would wait as long as the outage's last one
        if self._failures or self._next_backoff != self._base_backoff:
            with self._mutex:
                self._failures = 0
                self._next_backoff = self._base_backoff
                self.open_until = 0.0

    def connected(self, info: object, node: str = "") -> None:
        """A new connection's ``INFO server`` reply from ``node``: a run id other than the last one seen
        there is a restart."""
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
        run_id = ""
        for line in text.splitlines():
            if line.startswith("run_id:"):
                run_id = line[len("run_id:") :].strip()
        self._seen(run_id, node)

    def _seen(self, run_id: str, node: str) -> None:
        with self._mutex:
            last = self.run_ids.get(node)
            if last is not None and run_id != last:
                self.restart_pending = True
                self.epoch += 1
            self.run_ids[node] = run_id

    def lineage_calls(self, shards: Sequence[int] = (0,)) -> list[list[str | int]] | None:
        """What a new connection sends instead of INFO: lineage.lua's keys and arguments (after its
        source and ``numkeys``) for each of ``shards``, or None when the cache does not check lineage
        (INFO then)."""
        if self.lineage is None:
            return None
        return [list(self.lineage[i]) for i in shards]

    def lineage_checked(self, reply: object, node: str = "") -> None:
        """lineage.lua's reply on a new connection to ``node``: the server's run id (as INFO's, for
        restart detection), whether it fenced, and the layout the prefix holds if it is not ours."""
        ok = isinstance(reply, list) and len(reply) == 3
        run_id: object = reply[0] if ok else b""  # type: ignore[index]
        fenced: object = reply[1] if ok else 0  # type: ignore[index]
        other: object = reply[2] if ok else b""  # type: ignore[index]
        self._seen(run_id.decode("ascii", "replace") if isinstance(run_id, bytes) else str(run_id), node)
        if fenced == 1:
            with self._mutex:
                self.lineage_fences += 1
        if other and self.lineage is not None:
            held = other[1:].decode("ascii", "replace")[:20] if isinstance(other, bytes) else "?"
            self.layout_conflict(held, self.lineage[0][5])

    def layout_conflict(self, held: str, mine: str) -> None:
        """The prefix's keys are laid out for ``held`` shards, this cache's for ``mine``: from now on this
        cache does not use Redis, and its commits are refused (their invalidations would reach no entry
        the other processes read)."""
        if self.conflict is None:
            log.error(
                "sqlcache: the prefix's keys are laid out for %r shards and this cache for %r; it will not "
                "use Redis, and its commits are refused",
                held,
                mine,
            )
        self.conflict = (
            f"the prefix's keys are laid out for {held!r} shards and this cache for {mine!r}: its "
            "invalidations would miss theirs (docs/pages/deployment.md)"
        )
        with self._mutex:
            self.restart_pending = True  # this connection's first answer is dropped too

    def short_ack(self, acked: object) -> str | None:
        """WAIT's reply after a release: why it is short of the replicas asked for, or None. The stores
        fail the call with it (an outage, through the breaker): the journal keeps the invalidation and
        replays it, WAIT included, until enough replicas have it."""
        wait = self.wait
        if wait is None or (isinstance(acked, int) and acked >= wait[0]):
            return None
        return f"release acknowledged by {acked} of {wait[0]} replicas"

    def moved(self) -> None:
        """Another server now holds what the last one held (a replica promoted after a failover, a slot
        migrated): what it holds may be older than what was acknowledged, as after a restart."""
        with self._mutex:
            self.restart_pending = True
            self.epoch += 1
