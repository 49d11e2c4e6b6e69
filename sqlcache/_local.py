"""The local tier (``SQLCache(..., local_bytes=...)``): entries held in this process's memory as Redis
returned them, with the generations of their dependencies, and served without a round trip while Redis
itself says nothing they depend on has changed.

How it stays correct (docs/pages/local-tier.md):

- An entry is served locally only when every dependency's generation is still the one the local table
  holds, and that table only ever holds generations Redis returned. Redis's tracking connection
  (``_tracking``: ``CLIENT TRACKING ... BCAST PREFIX <dependency keys>``) names every dependency key that
  changes, whoever changed it; the name drops the generation, and with it every entry depending on it.
  A flushed database, a lost or reconnected tracking connection, or a Redis restart drop everything.
- The staleness bound is enforced, not hoped for: a local hit is served only if the tracking connection
  answered a PING sent at most ``max_lag`` seconds ago. Redis answers in order on that connection, so
  every invalidation of a change made before the PING has been taken off it and applied. Before serving,
  a reader also takes off whatever has already arrived (without waiting): a commit's lock moves its
  dependency keys before its database COMMIT, so on one host the message is in the socket before
  ``commit()`` returns, and a read begun after that sees it.
- A reply in flight never stores a generation that was invalidated meanwhile: a read notes the tier's
  sequence number before its Redis call, and its result is kept only if no message dropped one of its
  dependencies since (and the tracking connection is the same one).

One tier per cache and process, in front of the reads of both worlds: the sync store's, and every event
loop's asyncio store (a lookup is memory and a non-blocking read of the tracking socket, with nothing to
await). One tracking connection per cache and process, kept by a daemon thread (the keeper) that makes
it, drains it and pings it every ``max_lag / 4`` while nobody else does. On one server the readers ping
it themselves while they read (a PING's answer alone proves every message before it arrived): the
keeper then wakes once a second only, as it does when nothing was read through the tier for a second
(the next read wakes it). A thread that wakes every few milliseconds in a busy process
contends with it for the GIL, and every call that releases the GIL (a socket read, a poll) then
costs a thread switch: measured, a reader's poll of the tracking socket took 10 µs instead of 1 µs
half of the time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._protocol import ReadResult

log = logging.getLogger("sqlcache")

__all__ = ["LocalTier", "TrackingLike"]

_MAX_DROPS = 10_000  # recent drops remembered at most (then every reply in flight is refused)
_MAX_BACKOFF = 5.0  # seconds between attempts at a tracking connection, at most
_KEPT_WAIT = 1.0  # seconds the keeper sleeps while readers keep the connection proven, or read nothing
_KEPT_ROUNDS = 4  # rounds in a row the readers pinged before the keeper sleeps that long
_IDLE_AFTER = 1.0  # seconds without a read through the tier before it does too


class TrackingLike(Protocol):
    #: a PING's answer alone proves that every message sent before it has arrived, so any thread may
    #: send one (one server); False: each round's answer counts only once the keeper checked it
    #: (``verify``: a cluster's nodes, Sentinel's primary)
    pong_proves: bool

    @property
    def partial(self) -> bool: ...
    def connect(self) -> None: ...
    def ping(self) -> None: ...
    def verify(self) -> None: ...
    def poll(self) -> list[tuple[str, list[bytes]]]: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class _Entry:
    deps: tuple[str, ...]
    gens: tuple[bytes, ...]
    joined: bytes
    payload: bytes
    size: int


def _stop_thread(ref: weakref.ref[LocalTier]) -> None:
    tier = ref()
    if tier is not None:
        tier.after_fork()


class LocalTier:
    """The local table, the tracking connection and its keeper thread.

    :param max_bytes: entries (payload, generations and keys) held at most, least recently used first out.
    :param max_lag: seconds since the last PING the tracking connection answered beyond which nothing is
        served locally.
    :param tracking: makes a tracking connection (``_tracking.Tracking``).
    :param epoch: the cache's count of Redis restarts noticed (everything is dropped when it moves).
    :param count: adds to one of the cache's counters.
    """

    def __init__(
        self,
        max_bytes: int,
        max_lag: float,
        tracking: Callable[[], TrackingLike],
        epoch: Callable[[], int],
        count: Callable[[str, int], None],
    ) -> None:
        self.max_bytes = max_bytes
        self.max_lag = max_lag
        self._make = tracking
        self._epoch = epoch
        self.count = count
        self._interval = min(1.0, max(0.001, max_lag / 4))
        self._kept_wait = max(self._interval, _KEPT_WAIT)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # generations of the dependencies of the entries held, and how many of them use each: a
        # generation goes with the last entry using it (the table stays within what the entries need)
        self._gens: dict[str, bytes] = {}
        self._refs: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._floor = 0  # a reply noted before this sequence number may have missed a drop: not kept
        self._seq = 0
        self.bytes = 0
        self._clock = 0  # the newest clock reading a reply carried (a local hit reports it)
        self._tracking: TrackingLike | None = None
        self._serial = 0  # grows with every tracking connection
        self._seen_epoch = epoch()
        self._pings: deque[float] = deque()
        self._alive = float("-inf")  # when the last PING the connection answered was sent
        self._pinged = float("-inf")  # when the last PING was sent, by the keeper or a reader
        self._kept = False  # a reader pinged while the tier served, since the keeper's last round
        self._read = False  # a reader found the tier serving, since the keeper's last round
        self._looked = False  # a read went through the tier, since the keeper's last round
        self._idle = False  # the keeper sleeps for want of reads: the next read wakes it
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to stop the keeper, or to have it connect again soon
        self._attempted = float("-inf")  # when the keeper last tried to connect
        self._thread: threading.Thread | None = None
        self._wanted = False  # start() was called: a forked child starts the keeper on first use
        self._failures = 0  # tracking connections that failed in a row (back-off, one warning)
        self._abandoned = False  # the cache was dropped unclosed: the keeper closes as it stops
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _stop_thread(me))

    # -- the keeper --------------------------------------------------------------------------------

    def start(self) -> None:
        self._wanted = True
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name="sqlcache-local-tier", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._wanted = False  # a read after close() does not start the keeper again
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            self._lost(count=False)

    def after_fork(self) -> None:
        """In a forked child: a lock and a stop event of its own, nothing held, the parent's socket
        closed here (not for the parent), and the keeper started again on the first read."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        tracking, self._tracking = self._tracking, None
        if tracking is not None:
            tracking.close()  # this process's descriptor only: the parent's connection lives on
        self._thread = None
        self._drop_all(count=False)
        self._alive = float("-inf")

    def abandon(self) -> None:
        """The cache was dropped without close(): its finalizer, on whichever thread collected it (the
        keeper's own, perhaps inside the lock). Nothing here waits or takes the lock: the keeper stops
        and closes the tracking connection on its way out; with no keeper running, it is closed here
        if the lock is free (nothing else uses a dropped cache's tier)."""
        self._abandoned = True
        self._wanted = False
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if (thread is None or not thread.is_alive()) and self._lock.acquire(blocking=False):
            try:
                self._lost(count=False)
            finally:
                self._lock.release()

    def _run(self) -> None:
        try:
            self._keep()
        finally:
            if self._abandoned:
                with self._lock:
                    self._lost(count=False)

    def _keep(self) -> None:
        wait = self._interval
        kept_rounds = idle_rounds = 0
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            wait = self._interval
            if self._tracking is None:
                early = self._attempted + self._interval - time.monotonic()
                if early > 0:  # woken by a reader that found it broken: attempts stay an interval apart
                    wait = early
                    continue
                self._attempted = time.monotonic()
                # connected outside the lock: readers do not wait on a Redis that does not answer
                epoch = self._epoch()  # before connecting: a restart or move noticed after it drops it
                try:
                    tracking = self._make()
                    tracking.connect()
                except Exception as exc:  # TrackingError, or anything the connection did
                    self._failures += 1
                    if self._failures == 1:
                        log.warning("sqlcache: the local tier's tracking connection failed (%s)", exc)
                    wait = min(_MAX_BACKOFF, self._interval * 2**self._failures)
                    continue
                self._failures = 0
                with self._lock:
                    if self._stop.is_set():  # closed while it connected (locating may take a while)
                        tracking.close()
                        return
                    self._install(tracking, epoch)
            with self._lock:
                current = self._tracking
                if current is None:  # a reader found it broken meanwhile: connected again next round
                    continue
                kept, self._kept = self._kept, False
                read, self._read = self._read, False
                looked, self._looked = self._looked, False
                try:
                    self._drain()
                    # readers found the tier serving: this round's PING is left to them (one is due
                    # before the next round), so that they take over; skipped once, the bound still
                    # holds with room to spare (the last PING is at most two intervals old then)
                    if not (kept or (read and current.pong_proves)):
                        self._ping(current)
                except Exception:  # TrackingError, or anything the connection did: start over
                    self._lost()
                    continue
            kept_rounds = kept_rounds + 1 if kept else 0
            idle_rounds = 0 if looked else idle_rounds + 1
            # nothing read through the tier for a second: the keeper wakes once a second (to drain the
            # connection and prove it), out of the way of whatever else the process does; the first
            # read that finds the tier stale wakes it, and is answered by Redis meanwhile
            self._idle = idle = kept_rounds < _KEPT_ROUNDS and idle_rounds * self._interval >= _IDLE_AFTER
            if kept_rounds >= _KEPT_ROUNDS or idle:
                # or the readers pinged while the tier served, round after round: they keep it proven
                # while they read, and the keeper stays out of their way (see the module). Reads in
                # bursts further apart do not get here: between them, the keeper's cadence serves them
                wait = self._kept_wait
            try:
                # a cluster's proof that the nodes still serve the cache's slots (a round trip: outside
                # the lock, readers go on meanwhile; the round's answer counts only once it passed)
                current.verify()
            except Exception:
                with self._lock:
                    if self._tracking is current:
                        self._lost()

    def _install(self, tracking: TrackingLike, epoch: int) -> None:
        self._tracking = tracking
        self._seen_epoch = epoch  # a restart or move noticed before it was made is not its to answer for
        self._serial += 1
        self._pings.clear()
        self._pinged = float("-inf")
        self._kept = self._read = False
        self._idle = False
        self._alive = float("-inf")  # nothing served before this connection answered a PING
        self._drop_all(count=False)  # what changed while no connection watched is not known

    def _ping(self, tracking: TrackingLike) -> None:
        sent = time.monotonic()  # taken before the PING is written: the bound is never late
        tracking.ping()
        self._pings.append(sent)
        self._pinged = sent

    def _lost(self, count: bool = True) -> None:
        tracking, self._tracking = self._tracking, None
        if tracking is not None:
            tracking.close()
            self._wake.set()  # found broken: the keeper connects again without waiting out a long sleep
        self._alive = float("-inf")
        self._drop_all(count=count)

    # -- the table (under the lock) ------------------------------------------------------------------

    def _drop_all(self, count: bool = True) -> None:
        self._entries.clear()
        self._gens.clear()
        self._refs.clear()
        self._drops.clear()
        self._clock = 0
        self._seq += 1
        self._floor = self._seq
        self.bytes = 0
        if count:
            self.count("local_drops", 1)

    def _drain(self) -> None:
        """Apply every message that has arrived (TrackingError if the connection broke)."""
        tracking = self._tracking
        if tracking is None:
            return
        for kind, keys in tracking.poll():
            if kind == "keys":
                self._seq += 1
                for raw in keys:
                    key = raw.decode("utf-8", "surrogateescape")
                    self._gens.pop(key, None)  # a dependency: every entry using it is invalid now
                    gone = self._entries.get(key)  # an entry key: filled again, deleted or expired
                    if gone is not None:
                        self._forget(key, gone)
                    self._drops[key] = self._seq
                self.count("local_invalidations", len(keys))
                if len(self._drops) > _MAX_DROPS:
                    self._drops.clear()
                    self._floor = self._seq + 1
            elif kind == "all":  # FLUSHDB / FLUSHALL
                self._drop_all()
            elif kind == "pong" and self._pings:
                self._alive = self._pings.popleft()

    def _serving(self) -> bool:
        """Whether the table may be trusted now: messages taken off, the connection answered in time."""
        if self._tracking is None:
            if self._wanted and (self._thread is None or not self._thread.is_alive()):
                self.start()  # a forked child's first read
            return False
        epoch = self._epoch()
        if epoch != self._seen_epoch:  # a Redis restart, or a new primary, noticed by the cache's stores
            self._seen_epoch = epoch
            self._lost()  # and the tracking connection made again (on a cluster: located again)
            return False
        try:
            self._drain()
        except BaseException as exc:  # interrupted too: messages taken off and not applied are lost
            self._lost()
            if not isinstance(exc, Exception):
                raise
            return False
        tracking = self._tracking
        if tracking.partial:
            return False  # part of a message is here: it may name what is about to be served
        now = time.monotonic()
        fresh = now - self._alive <= self.max_lag
        if now - self._pinged >= self._interval and tracking.pong_proves:
            try:
                self._ping(tracking)
            except Exception:
                self._lost()
                return False
            # only a reader that finds the tier serving takes over from the keeper: reads further apart
            # than max_lag would find it stale every time, and the keeper's cadence is what serves them
            self._kept = self._kept or fresh
        self._read = self._read or fresh
        self._looked = True
        if self._idle and not fresh:
            self._idle = False
            self._wake.set()
        return fresh

    # -- reads -------------------------------------------------------------------------------------

    def lookup(self, entry_key: str, dep_keys: Sequence[str]) -> ReadResult | None:
        """A local hit, or None (then Redis is read and :meth:`remember` told)."""
        with self._lock:
            if not self._serving():
                return None
            e = self._entries.get(entry_key)
            if e is None or len(e.deps) != len(dep_keys):
                return None
            gens = self._gens
            for d, want, g in zip(dep_keys, e.deps, e.gens, strict=True):
                if d != want or gens.get(d) != g:
                    self._forget(entry_key, e)
                    return None
            self._entries.move_to_end(entry_key)
            clock = self._clock
        return ReadResult(True, e.payload, e.joined, clock, False)

    def mark(self) -> tuple[int, int]:
        """What a read notes before its Redis call (see :meth:`remember`)."""
        return self._seq, self._serial

    def remember(
        self,
        entry_key: str,
        dep_keys: Sequence[str],
        joined: bytes,
        payload: bytes,
        clock: Any,
        mark: tuple[int, int],
    ) -> None:
        """Keep what Redis returned for a hit, unless a dependency may have changed since ``mark``."""
        gens = tuple(joined.split(b","))
        if len(gens) != len(dep_keys):
            return
        size = len(payload) + len(joined) + len(entry_key) + sum(len(d) for d in dep_keys) + 200
        if size > self.max_bytes // 4:
            return  # a few large results would push everything else out
        seq0, serial0 = mark
        with self._lock:
            if not self._serving() or self._serial != serial0:
                return
            # t0 mark: seq0; t1 Redis answers g for dependency d; t2 d changes, its message is applied
            # (seq > seq0); t3 this reply arrives: g is already stale, and is not kept
            drops = self._drops
            if self._floor > seq0 or drops.get(entry_key, -1) > seq0:
                return
            if any(drops.get(d, -1) > seq0 for d in dep_keys):
                return
            if any(self._gens.get(d, g) != g for d, g in zip(dep_keys, gens, strict=True)):
                return  # a generation known for a dependency already, another: not this reply's to settle
            old = self._entries.get(entry_key)
            if old is not None:
                self._forget(entry_key, old)
            for d, g in zip(dep_keys, gens, strict=True):
                self._gens[d] = g
                self._refs[d] = self._refs.get(d, 0) + 1
            self._entries[entry_key] = _Entry(tuple(dep_keys), gens, joined, payload, size)
            self.bytes += size
            while self.bytes > self.max_bytes and self._entries:
                key, gone = next(iter(self._entries.items()))
                self._forget(key, gone)
            if type(clock) is int and clock > self._clock:
                self._clock = clock

    def _forget(self, entry_key: str, e: _Entry) -> None:
        if self._entries.pop(entry_key, None) is None:
            return
        self.bytes -= e.size
        refs = self._refs
        for d in e.deps:
            n = refs.get(d, 0) - 1
            if n > 0:
                refs[d] = n
            else:
                refs.pop(d, None)
                self._gens.pop(d, None)

    def forget(self, keys: Sequence[str]) -> None:
        """Entries deleted from Redis by this process (undecodable ones): not served from here either."""
        with self._lock:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:
                    self._forget(key, e)
