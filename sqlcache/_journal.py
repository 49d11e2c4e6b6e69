"""Invalidations Redis did not take: kept in process, replayed before this process reads Redis again,
and replaced by one fence (every entry under the prefix) when they are too many or Redis restarted.

Also the one path that gives dependencies fresh generations outside a commit (``invalidate()``, a
relay's batch, a replay): :meth:`Journal.invalidate_now`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import signals
from ._keys import Layout
from ._protocol import StoreSlot
from ._report import Reporter
from .errors import CacheUnavailable

log = logging.getLogger("sqlcache")

__all__ = ["Journal", "Keys"]

# Most dependency keys a process keeps while Redis is away before it gives up on them one by one and
# fences the whole prefix instead (a burst of misses, never a stale read).
JOURNAL_LIMIT = 10_000
#: writers' locks a replay drops, at most (the rest expire after ``lock_ttl``)
HELD_LIMIT = 100
#: seconds close() waits at most for a background replay in flight
CLOSE_WAIT = 10.0

Identity = tuple[type[Any], tuple[Any, ...]]
Announce = Callable[[list[Identity], list[str]], tuple[str, bytes] | None]


class Keys:
    """The keys and generation lifetime every Redis operation of one cache names."""

    __slots__ = ("clock", "everything", "gen_ttl_ms", "layout", "prefix")

    def __init__(self, layout: Layout, clock: str, gen_ttl_ms: int) -> None:
        self.layout = layout  # which prefix starts the keys of each table and tag
        self.prefix = layout.base
        self.clock = clock  # the invalidation clock (of the first shard; a sharded store finds the others)
        # the dependency of every entry, one per shard (a fence moves them all)
        self.everything: list[str] = list(layout.everything)
        self.gen_ttl_ms = gen_ttl_ms


class Journal:
    """The pending journal of one cache and its background replay.

    :param backing_off: whether the store is skipping Redis for a back-off period (no replay then).
    :param retry_after: seconds between background replay attempts.
    """

    def __init__(
        self,
        slot: StoreSlot,
        reporter: Reporter,
        keys: Keys,
        announce: Announce,
        backing_off: Callable[[], bool],
        retry_after: float,
    ) -> None:
        self._slot = slot
        self._rep = reporter
        self._keys = keys
        self._announce = announce
        self._backing_off = backing_off
        self._retry_after = retry_after
        # reentrant: a garbage-collector callback may close this cache on a thread that holds it
        self._mutex = threading.RLock()
        # key -> number of the defer that last added it: a replay forgets a key only if no defer added it
        # again while the replay was in flight (that defer's commit may have come after the replay's call)
        self._journal: dict[str, int] = {}
        # lock token -> (the keys it locked, its defer's number): writers whose release is journalled. Their
        # locks stay on the keys until lock_ttl unless the replay releases them as the writer would have:
        # until then nobody could fill an entry of those rows (a minute after every outage, by default)
        self._held: dict[str, tuple[tuple[str, ...], int]] = {}
        self._defers = 0
        # fences asked for and fences applied: counters, not a flag, so that a fence asked for while
        # another is being applied (a second restart noticed meanwhile) is never cleared with it
        self._fences_asked = 0
        self._fences_done = 0
        self._timer: threading.Timer | None = None
        self._closed = False
        # held by a background replay while it runs: close() waits for one in flight, which would
        # otherwise open connections after the store closed its own
        self._background = threading.RLock()
        #: called after every successful replay (relays wake up: Redis is back)
        self.on_replayed: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._journal)

    def defer(self, keys: list[str], token: str = "") -> None:
        """Keep ``keys`` until Redis takes them; ``token``: the lock a writer took on them, if any, which
        the replay drops (as the writer's release would have)."""
        self._schedule()
        with self._mutex:
            if token and (token in self._held or len(self._held) < HELD_LIMIT):
                # a lock journalled in parts (a sharded commit's releases, lost node by node): the
                # replay releases every part, not only the last
                merged = dict.fromkeys(self._held.get(token, ((), 0))[0])
                merged.update(dict.fromkeys(keys))
                self._held[token] = (tuple(merged), self._defers + 1)
            # journalled even while a fence is pending: that fence may be in Redis already (a replay in
            # flight), before this commit's COMMIT, and cover nothing it wrote; a replay that applies a
            # fence forgets only the keys deferred before it began (see replay)
            self._defers += 1
            self._journal.update(dict.fromkeys(keys, self._defers))
            self._rep.incr("invalidations_deferred", len(keys))
            if len(self._journal) > JOURNAL_LIMIT:
                # the fence asked for first: replay()'s unlocked fast path never sees an empty journal
                # with no fence pending in between
                self._fences_asked += 1
                self._rep.incr("invalidations_lost", len(self._journal))
                self._journal.clear()

    def fence(self) -> None:
        """Move every entry under the prefix before this process reads Redis again (a Redis restart:
        its snapshot may be older than invalidations it acknowledged)."""
        with self._mutex:
            self._fences_asked += 1
        self._rep.incr("restarts")

    @property
    def _fence_pending(self) -> bool:
        return self._fences_asked != self._fences_done

    def replay(self) -> bool:
        """Apply the journal before anything is read from Redis again; False if Redis is still away."""
        if not self._journal and self._fences_asked == self._fences_done and not self._held:  # hit path
            return True
        with self._mutex:
            held = dict(self._held)
            taken = dict(self._journal)
            keys = sorted(taken)
            defers = self._defers
            asked = self._fences_asked
            fence = asked != self._fences_done
        if fence:
            keys = list(self._keys.everything)
        run = self._rep.begin("replay", keys=len(keys)) if self._rep.hooks else None
        try:
            try:
                k = self._keys
                for token, (locked, _) in held.items():  # fresh generations, and the writer's lock gone
                    self._slot.current.release(k.clock, list(locked), token, k.gen_ttl_ms)
                if keys:
                    self._release(keys, [], ["*"])
            except CacheUnavailable as exc:
                if run is not None:
                    run.end("error", exc)
                self._rep.report(exc, "replay")
                return False
            with self._mutex:
                for token, (_, seq) in held.items():
                    if self._held.get(token, (None, -1))[1] == seq:
                        del self._held[token]
                if fence:  # the fence supersedes every key journalled before this replay began
                    self._journal = {k: seq for k, seq in self._journal.items() if seq > defers}
                    self._fences_done = asked  # a fence asked for since stays pending
                    self._rep.incr("fences")
                else:
                    for key, seq in taken.items():
                        if self._journal.get(key) == seq:
                            del self._journal[key]
            self._rep.incr("invalidations_replayed", len(keys))
            if run is not None:
                run.end("ok")
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        for wake in list(self.on_replayed):
            wake()  # Redis is back: the outbox rows left meanwhile need not wait for a back-off
        return True

    def invalidate_now(self, keys: list[str], identities: list[Identity], tags: list[str]) -> None:
        """Fresh generations for ``keys`` now (outside any transaction); journalled if Redis is away."""
        run = self._rep.begin("invalidate", keys=len(keys), tags=tuple(tags)) if self._rep.hooks else None
        try:
            self._release(keys, identities, tags)
            self._rep.incr("invalidations", len(keys))
            if run is not None:
                run.end("ok")
        except CacheUnavailable as exc:
            if run is not None:
                run.end("deferred", exc)
            self._rep.report(exc, "invalidate")
            self.defer(keys)
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        if signals.invalidated.receivers:
            self._rep.send(signals.invalidated, identities=identities, tags=tags, remote=False)

    def apply(self, keys: list[str], tags: list[str]) -> None:
        """Fresh generations for ``keys`` (a relay's batch); raises CacheUnavailable if Redis is away."""
        run = self._rep.begin("relay", keys=len(keys)) if self._rep.hooks else None
        try:
            self._release(keys, [], tags)
            if run is not None:
                run.end("ok")
        except CacheUnavailable as exc:
            if run is not None:
                run.end("error", exc)
            raise
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        self._rep.incr("invalidations", len(keys))

    def _release(self, keys: list[str], identities: list[Identity], tags: list[str]) -> None:
        k = self._keys
        self._slot.current.release(k.clock, keys, "", k.gen_ttl_ms, announce=self._announce(identities, tags))

    # -- background replay ------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Retry the journal in the background too, so an idle process does not leave other processes
        reading entries it could not invalidate once Redis is back."""
        with self._mutex:
            if self._timer is not None or self._closed:
                return
            timer = threading.Timer(self._retry_after, self._replay_in_background)
            timer.daemon = True
            self._timer = timer
        timer.start()

    def _replay_in_background(self) -> None:
        with self._background:
            with self._mutex:
                self._timer = None
                if self._closed:
                    return
            if (self._journal or self._fence_pending) and not self._backing_off():
                self.replay()
        if self._journal or self._fence_pending:
            self._schedule()

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, and the background replay (its timer thread did not survive
        the fork) scheduled again if anything is pending."""
        self._mutex = threading.RLock()
        self._background = threading.RLock()
        self._timer = None
        if self._journal or self._fence_pending:
            self._schedule()

    def close(self) -> None:
        """A last replay (one attempt, within the store's timeout), then cancel the background replay.
        What Redis did not take stays journalled (a later replay() still applies it) and is logged: until
        then, other processes may serve what those commits changed."""
        if (self._journal or self._fence_pending or self._held) and not self.replay():
            log.warning(
                "sqlcache: closed with %d invalidations Redis has not taken%s; other processes may serve "
                "what those commits changed until the entries expire",
                len(self._journal) + len(self._held),
                " and a fence" if self._fence_pending else "",
            )
        with self._mutex:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        # a background replay in flight ends first (within the store's timeout); bounded, should this
        # thread hold something that replay waits for
        if self._background.acquire(timeout=CLOSE_WAIT):
            self._background.release()
