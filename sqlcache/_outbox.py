"""Durable invalidation: the outbox table, the row a commit writes into it, and the relay that applies
and deletes the rows.

A committing transaction (``SQLCache(durable=True)``) inserts one row holding the dependency keys it
invalidates, on its own connection, just before the database COMMIT: the row exists exactly when the
writes do. After the COMMIT the writer invalidates Redis as usual and hands the row's id to its
engine's relay, which deletes it. A row nobody marked done (the writer crashed, or could not reach
Redis) is applied by any relay once it is ``grace`` seconds old, then deleted. Invalidations are
idempotent (a fresh generation is only ever a miss), so applying a row twice costs misses, never a
stale read: delivery is at least once.

All SQL here runs on raw DBAPI connections (``engine.raw_connection()`` or the committing connection's
own), so none of it goes through the engine events that record writes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import SQLAlchemyError

from .errors import CacheUnavailable, ConfigurationError

if TYPE_CHECKING:
    from .cache import SQLCache

__all__ = ["DEFAULT_TABLE", "OutboxSQL", "Relay", "outbox_table"]

log = logging.getLogger("sqlcache")

DEFAULT_TABLE = "sqlcache_outbox"

# a row's body stays small whatever the transaction wrote: past this many characters its row keys are
# replaced by the table-wide keys of their tables (coarser, only ever used after a crash or an outage)
MAX_BODY_CHARS = 32_000

# most keys one relay call to Redis carries (a release of 2,000 keys runs in ~15 ms)
APPLY_CHUNK = 2_000

# ids of rows this process already applied, waiting for the relay to delete them; past this many the
# oldest are forgotten (their rows are then applied once more after the grace period: misses only)
_MAX_DONE = 100_000


def outbox_table(metadata: MetaData, name: str = DEFAULT_TABLE) -> Table:
    """The outbox table, defined in ``metadata`` (so that Alembic autogenerate sees it too).

    Columns: ``id`` (a random hex string), ``prefix`` (the cache's key prefix; relays only take their
    own), ``created_ms`` (the writer's wall clock, epoch milliseconds) and ``body`` (JSON: the
    dependency keys and tags to invalidate).
    """
    return Table(
        name,
        metadata,
        Column("id", String(32), primary_key=True),
        Column("prefix", String(255), nullable=False),
        Column("created_ms", BigInteger, nullable=False),
        Column("body", Text, nullable=False),
        Index(f"ix_{name}_prefix_created", "prefix", "created_ms"),
    )


def encode_body(keys: Sequence[str], tags: Sequence[str]) -> str:
    return json.dumps({"keys": list(keys), "tags": list(tags)}, separators=(",", ":"))


def decode_body(body: object, prefix: str) -> tuple[list[str], list[str]] | None:
    """The keys (only those under ``prefix``) and tags of a row; None if the body is not ours."""
    try:
        data = json.loads(body if isinstance(body, (str, bytes)) else "")
        keys = data["keys"]
        tags = data["tags"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(keys, list) or not isinstance(tags, list):
        return None
    if not all(isinstance(k, str) for k in keys) or not all(isinstance(t, str) for t in tags):
        return None
    mine = prefix + ":"
    return [k for k in keys if k.startswith(mine)], tags


class _Statement:
    """A statement compiled once for a dialect, run on a raw DBAPI cursor."""

    def __init__(self, stmt: Any, dialect: Dialect) -> None:
        self.compiled = stmt.compile(dialect=dialect)
        self.sql = str(self.compiled)
        self.positional = bool(self.compiled.positional)

    def params(self, values: dict[str, Any]) -> Any:
        p = self.compiled.construct_params(values)
        if self.positional:
            return tuple(p[name] for name in self.compiled.positiontup or ())
        return p


class OutboxSQL:
    """The outbox's three statements for one dialect."""

    def __init__(self, table: Table, dialect: Dialect, batch: int) -> None:
        t = table
        self.dbapi_error: type[BaseException] = dialect.loaded_dbapi.Error
        self.batch = batch
        self.insert = _Statement(
            insert(t).values(
                id=bindparam("id"),
                prefix=bindparam("prefix"),
                created_ms=bindparam("created_ms"),
                body=bindparam("body"),
            ),
            dialect,
        )
        self.due = _Statement(
            select(t.c.id, t.c.body)
            .where(t.c.prefix == bindparam("prefix"), t.c.created_ms <= bindparam("before"))
            .order_by(t.c.created_ms)
            .limit(batch),
            dialect,
        )
        self.delete = _Statement(delete(t).where(t.c.id == bindparam("id")), dialect)

    def write(self, dbapi_connection: Any, prefix: str, body: str) -> str:
        """Insert a row on ``dbapi_connection`` (inside its current transaction); returns its id."""
        row_id = uuid.uuid4().hex
        values = {"id": row_id, "prefix": prefix, "created_ms": int(time.time() * 1000), "body": body}
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.insert.sql, self.insert.params(values))
        finally:
            cursor.close()
        return row_id


def check_table(engine: Engine, name: str) -> None:
    """Refuse durable invalidation on an engine whose database lacks the outbox table."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "durable=True needs a database other connections can read; an in-memory SQLite is not one"
        )
    try:
        present = inspect(engine).has_table(name)
    except SQLAlchemyError as exc:
        raise ConfigurationError(f"cannot check for the outbox table {name!r}: {exc}") from exc
    if not present:
        raise ConfigurationError(
            f"durable=True: the outbox table {name!r} does not exist in {engine.url.render_as_string()}; "
            "create it with cache.create_outbox(engine), `sqlcache outbox --create`, or the DDL in "
            "docs/durability.md (sqlcache never creates it on its own)"
        )


class Relay:
    """Applies and deletes the outbox rows of one engine's database, for one cache.

    Each pass deletes the rows this process already applied, then applies the rows that are at least
    ``grace`` seconds old (the writer crashed or could not reach Redis) in one Redis call per batch and
    deletes them. A pass that fails (Redis or the database away) is retried after a back-off that
    doubles up to the cache's ``max_backoff``; the failure is reported as ``cache_error`` with
    ``operation="relay"``.
    """

    def __init__(
        self, cache: SQLCache, engine: Engine, sql: OutboxSQL, interval: float, grace: float
    ) -> None:
        self.cache = cache
        self.engine = engine
        self.sql = sql
        self.interval = interval
        self.grace = grace
        self._done: dict[str, None] = {}  # insertion-ordered set
        self._done_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        #: passes completed without error (tests wait on it)
        self.passes = 0
        self._thread = threading.Thread(
            target=self._run, name=f"sqlcache-relay-{cache.config.prefix}", daemon=True
        )

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

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread after a last attempt to delete the rows already applied."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now instead of at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        delay = self.interval
        while not self._stopping.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.run_once()
                delay = self.interval
            except (CacheUnavailable, SQLAlchemyError, self.sql.dbapi_error) as exc:
                self.cache._report(exc if isinstance(exc, Exception) else RuntimeError(exc), "relay")
                delay = min(max(delay * 2, self.cache.config.backoff), self.cache.config.max_backoff)
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
        params = self.sql.due.params({"prefix": self.cache.config.prefix, "before": batch_before_ms})
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
            parsed = decode_body(body, self.cache.config.prefix)
            if parsed is None:
                # not a row we can read: fence the whole prefix rather than lose what it held
                log.warning("sqlcache relay: unreadable outbox row; invalidating every entry instead")
                keys[self.cache._global_key] = None
                tags["*"] = None
                continue
            keys.update(dict.fromkeys(parsed[0]))
            tags.update(dict.fromkeys(parsed[1]))
        ordered = list(keys)
        for start in range(0, len(ordered), APPLY_CHUNK):
            # bounded calls: one huge script would outlast the Redis timeout and be retried forever
            self.cache.apply_relayed(ordered[start : start + APPLY_CHUNK], list(tags) if start == 0 else [])
        self._delete(row_id for row_id, _ in rows)
        self.cache._stats.incr("outbox_relayed", len(rows))
        return len(rows), len(rows) >= self.sql.batch
