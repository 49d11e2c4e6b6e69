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
import time
import uuid
from collections.abc import Callable, Sequence
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

from ._keys import Layout
from ._txn import coarse_keys
from .errors import ConfigurationError, SQLCacheError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ._relay import Relay
    from ._txn import TxnState

__all__ = ["DEFAULT_TABLE", "OutboxRow", "OutboxSQL", "OutboxWriter", "check_table", "outbox_table"]

DEFAULT_TABLE = "sqlcache_outbox"

# a row's body stays small whatever the transaction wrote: past this many characters its row keys are
# replaced by the table-wide keys of their tables (coarser, only ever used after a crash or an outage)
MAX_BODY_CHARS = 32_000

# most keys one relay call to Redis carries (a release of 2,000 keys runs in ~15 ms)
APPLY_CHUNK = 2_000


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


def decode_body(body: object, layout: Layout) -> tuple[list[str], list[str]] | None:
    """The keys (only the cache's own: ``layout``) and tags of a row; None if the body is not ours."""
    try:
        data = json.loads(body if isinstance(body, (str, bytes)) else "")
        keys = data["keys"]
        tags = data["tags"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    if not isinstance(keys, list) or not isinstance(tags, list):
        return None
    if not all(isinstance(k, str) for k in keys) or not all(isinstance(t, str) for t in tags):
        return None
    return [k for k in keys if layout.owns(k)], tags


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
            "docs/pages/durability.md (sqlcache never creates it on its own)"
        )


class OutboxRow:
    """A row a committing transaction wrote; :meth:`done` once its invalidation was applied."""

    __slots__ = ("relay", "row_id")

    def __init__(self, relay: Relay, row_id: str) -> None:
        self.relay = relay
        self.row_id = row_id

    def done(self) -> None:
        self.relay.mark_done(self.row_id)


class OutboxWriter:
    """Writes each committing transaction's outbox row, and keeps one relay per attached pool.

    :param new_relay: builds (without starting) the relay of an engine.
    """

    def __init__(self, layout: Layout, table: str, new_relay: Callable[[Engine], Relay]) -> None:
        prefix = layout.base
        if len(prefix) > 255:  # the key prefix: a cluster's hash tag adds to the user's
            raise ConfigurationError(
                "durable=True needs a prefix of at most 255 characters (the outbox column)"
            )
        self._prefix = prefix
        self._layout = layout
        self._table = table
        self._new_relay = new_relay
        self.relays: dict[Any, Relay] = {}  # engine.pool -> its relay

    def start(self, engine: Engine, check: Callable[[], None] | None = None) -> None:
        """Start ``engine``'s relay (once per pool). :raises ConfigurationError: no outbox table.

        ``check``: how to check for the table, when ``engine`` cannot be used from here (asyncio)."""
        if engine.pool in self.relays:
            return
        if check is None:
            check_table(engine, self._table)
        else:
            check()
        relay = self._new_relay(engine)
        self.relays[engine.pool] = relay
        relay.start()

    def repool(self) -> None:
        """Key every relay by its engine's pool now (``engine.dispose()`` replaced a pool)."""
        self.relays = {relay.source.pool: relay for relay in set(self.relays.values())}

    def stop(self, engine: Engine) -> None:
        relay = self.relays.pop(engine.pool, None)
        if relay is not None:
            relay.stop()

    def stop_all(self) -> None:
        relays, self.relays = set(self.relays.values()), {}
        for relay in relays:
            relay.stop()

    def after_fork(self) -> None:
        for relay in set(self.relays.values()):
            relay.after_fork()

    def wake_all(self) -> None:
        for relay in set(self.relays.values()):
            relay.ensure_running()
            relay.wake()

    def write(self, st: TxnState, conn: Connection, keys: list[str], tags: list[str]) -> OutboxRow:
        """Insert the transaction's outbox row on its own connection, before its COMMIT.

        :raises SQLCacheError: the row could not be written; the transaction was rolled back.
        """
        dbapi_connection = conn.connection.dbapi_connection
        relay = self.relays.get(conn.engine.pool)
        problem: BaseException | None = None
        if relay is None:  # detached or closed while this transaction ran
            problem = ConfigurationError("durable=True but this engine is not attached (or the cache closed)")
        else:
            body = encode_body(keys, tags)
            if len(body) > MAX_BODY_CHARS:
                body = encode_body(coarse_keys(self._layout, st), tags)
            relay.ensure_running()  # a relay thread that died is noticed by the next commit
            try:
                return OutboxRow(relay, relay.sql.write(dbapi_connection, self._prefix, body))
            except relay.sql.dbapi_error as exc:
                problem = exc
        # SQLAlchemy neither commits nor resets a connection whose commit event raised: roll the
        # transaction back here, or its locks would outlive it in the pool
        try:
            dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:  # the driver's own error: the connection is unusable, drop it
            conn.invalidate()
        raise SQLCacheError(
            f"durable invalidation: writing the outbox row failed ({problem}); the transaction was "
            "rolled back"
        ) from problem

    def write_early(self, st: TxnState, conn: Connection) -> None:
        """AUTOCOMMIT: a write is about to be committed by the statement itself, with no COMMIT to
        write the outbox row before; write a row with the statement's table-wide keys first."""
        st.outbox = self.write(st, conn, coarse_keys(self._layout, st), [])
