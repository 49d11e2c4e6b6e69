"""Release replies read late (``RedisStore.release_after`` leaves the release's reply on its connection):
what each unread reply is, and the per-process settler thread that reads the ones no call of their
store read within ``SETTLE_AFTER`` seconds."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._storelate import LateReplies

__all__ = ["SETTLER", "SETTLE_AFTER", "Owed"]

log = logging.getLogger("sqlcache")


@dataclass(slots=True)
class Owed:
    """A release written behind a lock whose reply is read later (``RedisStore.settle``, and in the
    asyncio world ``AsyncRedisStore.settle``): what it released, to release it again or journal it if
    that reply says Redis did not apply it.

    Several may be owed on one connection (a sharded cluster's node runs one release per shard it
    serves, behind their locks): they are read in order, and only the last, which ``holds`` the
    connection, gives it back to the pool."""

    conn: Any
    pid: int  # the process that wrote it (a forked child never reads its parent's connections)
    since: float  # time.monotonic() when it was written
    clock_key: str
    dep_keys: Sequence[str]
    token: str
    gen_ttl_ms: int
    announce: tuple[str, bytes] | None
    holds: bool = True  # the last reply owed on its connection: it gives the connection back


#: seconds after which a release reply that no call of its store has read is read by the settler thread
SETTLE_AFTER = 1.0


class _Settler:
    """One daemon thread per process that reads the release replies nobody read for ``SETTLE_AFTER``
    seconds (a writer gone quiet, or one whose reads are all local hits): a release Redis did not apply
    is then journalled and replayed within a second or so, as an awaited one's failure would be, rather
    than leaving its rows uncacheable until the lock expires. It wakes once per ``SETTLE_AFTER`` while a
    store it watches lives, and stops when none does (a closed store is no longer watched)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._stores: weakref.WeakSet[LateReplies] = weakref.WeakSet()
        self._running = False
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:  # the thread did not survive the fork; the lock may have been held
        self._mutex = threading.Lock()
        self._stores = weakref.WeakSet()
        self._running = False

    def watch(self, store: LateReplies) -> None:
        with self._mutex:
            self._stores.add(store)
            if self._running:
                return
            self._running = True
        try:
            threading.Thread(target=self._run, name="sqlcache-settle", daemon=True).start()
        except RuntimeError:  # no thread can start (interpreter shutdown, a thread limit)
            with self._mutex:
                self._running = False
            log.warning("sqlcache: no settler thread: release replies are read by the next call only")

    def unwatch(self, store: LateReplies) -> None:
        with self._mutex:
            self._stores.discard(store)

    def _run(self) -> None:
        while True:
            time.sleep(SETTLE_AFTER)  # a periodic check, not a synchronisation
            with self._mutex:
                stores = list(self._stores)
                if not stores:
                    self._running = False
                    return
            due = time.monotonic() - SETTLE_AFTER / 2
            for store in stores:
                oldest = store.unread_since()
                if oldest is None:
                    continue
                try:
                    if oldest < due:
                        store.try_settle()
                except Exception:  # a bug: logged, and the next round tries again
                    log.exception("sqlcache: reading a release's reply failed")
            del stores, store


SETTLER = _Settler()
