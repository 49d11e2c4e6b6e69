"""The relay: a thread per attached engine that deletes the outbox rows its writers applied, and
applies (then deletes) the rows nobody applied once they are ``grace`` seconds old.

All SQL here runs on raw DBAPI connections (``engine.raw_connection()``), so none of it goes through
the engine events that record writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import _aio
from ._keys import Layout
from ._outbox import APPLY_CHUNK, OutboxSQL, decode_body
from ._report import Reporter
from .errors import CacheUnavailable, CodecError

__all__ = ["Relay", "relay_engine"]

log = logging.getLogger("sqlcache")

# ids of rows this process already applied, waiting for the relay to delete them; past this many the
# oldest are forgotten (their rows are then applied once more after the grace period: misses only)
_MAX_DONE = 100_000


def relay_engine(
    source: Engine, close_stores: Callable[[], Awaitable[None]] | None
) -> tuple[Engine, Callable[[Callable[[], None]], None] | None]:
    """The engine a relay of ``source`` queries and what runs its passes: ``source`` and nothing special
    for a sync engine. An asyncio engine's relay runs its passes on an event loop of its own, with an
    engine (a pool) of its own, since asyncio connections belong to the loop that opened them; when the
    loop ends, that loop's Redis connections (``close_stores``) and the pool are closed."""
    if not source.dialect.is_async:
        return source, None
    private = _aio.engine_like(source)

    async def closing() -> None:
        if close_stores is not None:
            await close_stores()
        await _aio.spawn(private.dispose)

    def runner(body: Callable[[], None]) -> None:
        _aio.run_in_own_loop(body, after=closing)

    return private, runner


class Relay:
    """Applies and deletes the outbox rows of one engine's database, for one cache.

    Each pass deletes the rows this process already applied, then applies the rows that are at least
    ``grace`` seconds old (the writer crashed or could not reach Redis) in one Redis call per batch and
    deletes them. A pass that fails (Redis or the database away) is retried after a back-off that
    doubles up to the cache's ``max_backoff``; the failure is reported as ``cache_error`` with
    ``operation="relay"``.
    """

    def __init__(
        self,
        engine: Engine,
        sql: OutboxSQL,
        interval: float,
        grace: float,
        *,
        prefix: str,
        apply: Callable[[list[str], list[str]], None],
        reporter: Reporter,
        layout: Layout,
        backoff: float,
        max_backoff: float,
        source: Engine | None = None,
        runner: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        #: the engine the relay queries, and the attached engine it serves (whose pool keys it): the
        #: same, except for an asyncio engine, whose relay has an engine and an event loop of its own
        self.engine = engine
        self.source = source if source is not None else engine
        self._runner = runner
        self._prefix = prefix
        self._apply = apply
        self._rep = reporter
        self._layout = layout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self.sql = sql
        self.interval = interval
        self.grace = grace
        self._done: dict[str, None] = {}  # insertion-ordered set
        self._done_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        #: passes completed without error (tests wait on it), and passes that failed unexpectedly
        self.passes = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._main, name=f"sqlcache-relay-{prefix}", daemon=True)

    def after_fork(self) -> None:
        """In a forked child: fresh locks and events, and the thread (which did not survive the fork)
        started again if it ran in the parent. Rows the parent applied are the parent's to delete."""
        running = self._thread.ident is not None and not self._stopping.is_set()
        if self._runner is not None:
            # an asyncio relay's own engine: its connections are the parent's, bound to a loop that does
            # not run here; drop them without closing them (the parent still uses the sockets)
            self.engine.dispose(close=False)
        self._done = {}
        self._done_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self._thread.name, daemon=True)
        if running:
            self._thread.start()

    # -- called by the writer ---------------------------------------------------------------------

    def mark_done(self, row_id: str) -> None:
        with self._done_lock:
            self._done[row_id] = None
            if len(self._done) > _MAX_DONE:
                del self._done[next(iter(self._done))]

    def pending_done(self) -> int:
        with self._done_lock:
            return len(self._done)

    # -- the thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Run passes in a daemon thread, every ``interval`` seconds."""
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def ensure_running(self) -> None:
        """Start a new thread if this relay's thread was started and has died without being stopped."""
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopping.is_set():
            self._rep.incr("relay_restarts")
            log.warning("sqlcache relay: its thread had died; started again")
            self._thread = threading.Thread(target=self._main, name=self._thread.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread after a last attempt to delete the rows already applied."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now instead of at the next interval."""
        self._wake.set()

    def _main(self) -> None:
        if self._runner is None:
            self._run()
        else:  # an asyncio driver: the passes run in SQLAlchemy's greenlet on this thread's own loop
            self._runner(self._run)

    def _run(self) -> None:
        delay = self.interval
        while not self._stopping.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.run_once()
                delay = self.interval
            except (CacheUnavailable, SQLAlchemyError, self.sql.dbapi_error) as exc:
                self._rep.report(exc if isinstance(exc, Exception) else RuntimeError(exc), "relay")
                delay = min(max(delay * 2, self._backoff), self._max_backoff)
            except Exception as exc:
                # a defect or a row nobody foresaw: reported, and the thread lives on (a dead relay
                # would leave every later crashed writer's rows unapplied)
                self.failures += 1
                log.exception("sqlcache relay: a pass failed unexpectedly")
                self._rep.report(CodecError(f"relay pass failed: {exc!r}"), "relay")
                delay = min(max(delay * 2, self._backoff), self._max_backoff)
        try:
            self._delete_done()
        except (SQLAlchemyError, self.sql.dbapi_error) as exc:
            log.debug("sqlcache relay: final delete failed: %s", exc)

    def run_once(self) -> int:
        """One pass; returns how many rows it applied. Raises what failed (the thread backs off)."""
        self._delete_done()
        applied = 0
        while True:
            n, full = self._apply_due()
            applied += n
            if not full:
                break
        self.passes += 1
        return applied

    # -- the work -----------------------------------------------------------------------------------

    def _delete_done(self) -> None:
        with self._done_lock:
            ids = list(self._done)
        if not ids:
            return
        self._delete(ids)
        with self._done_lock:
            for i in ids:
                self._done.pop(i, None)

    def _delete(self, ids: Iterable[str]) -> None:
        rows = [self.sql.delete.params({"id": i}) for i in ids]
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.executemany(self.sql.delete.sql, rows)
            finally:
                cursor.close()
            raw.commit()
        finally:
            raw.close()

    def _due(self, batch_before_ms: int) -> list[tuple[str, object]]:
        params = self.sql.due.params({"prefix": self._prefix, "before": batch_before_ms})
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(self.sql.due.sql, params)
                rows = [(str(r[0]), r[1]) for r in cursor.fetchall()]
            finally:
                cursor.close()
            raw.commit()  # ends the read transaction (a long one would pin old row versions)
        finally:
            raw.close()
        return rows

    def _apply_due(self) -> tuple[int, bool]:
        before = int((time.time() - self.grace) * 1000)
        rows = self._due(before)
        if not rows:
            return 0, False
        keys: dict[str, None] = {}
        tags: dict[str, None] = {}
        for _row_id, body in rows:
            parsed = decode_body(body, self._layout)
            if parsed is None:
                # not a row we can read: fence the whole prefix rather than lose what it held
                log.warning("sqlcache relay: unreadable outbox row; invalidating every entry instead")
                keys.update(dict.fromkeys(self._layout.everything))
                tags["*"] = None
                continue
            keys.update(dict.fromkeys(parsed[0]))
            tags.update(dict.fromkeys(parsed[1]))
        # every table's row-writes key (d:r:T) before any row key (d:i:T:pk): a chunk boundary may split
        # them, and a row key moved while d:r:T still holds its old generation could, once evicted, borrow
        # that old generation back (the warm-up rule, consistency.md)
        ordered = sorted(keys, key=lambda k: not self._layout.is_row_writes(k))
        for start in range(0, len(ordered), APPLY_CHUNK):
            # bounded calls: one huge script would outlast the Redis timeout and be retried forever
            self._apply(ordered[start : start + APPLY_CHUNK], list(tags) if start == 0 else [])
        self._delete(row_id for row_id, _ in rows)
        self._rep.incr("outbox_relayed", len(rows))
        return len(rows), len(rows) >= self.sql.batch
