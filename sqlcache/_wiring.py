"""Every SQLAlchemy listener sqlcache installs: attach() adds them, detach() switches them off (_slots).

Hooks and why each was chosen:

- engine ``begin``: a new database transaction starts; its write record (TxnState) starts empty.
- engine ``before_cursor_execute``: sees every statement, ORM or Core or text, with its execution
  context; records written tables (and that SQL ran, which may fix a snapshot), and statements that
  change name resolution on the connection (SET search_path, USE, ...; ``after_cursor_execute``
  confirms their resets). It does not see rows, nor SQL run on the DBAPI connection directly (pool
  ``connect`` / ``checkout`` listeners, ``select_db()``).
- mapper ``after_insert/after_update/after_delete`` (on each registered class's base mapper, so every
  class of its hierarchy): the unit of work's rows, with their primary keys. They do not see Core or
  bulk statements, hence the hook above, which counts a statement during a flush as those rows only
  when SQLAlchemy's persistence runs it for such a hierarchy (its statement cache says so).
- engine ``commit``: fires just before the DBAPI COMMIT; the lock goes here.
- ``dialect.do_commit`` (wrapped): the only point that runs right after the DBAPI COMMIT for Core and
  ORM alike (there is no engine event after commit); the release goes here. After a COMMIT that
  raised with its outcome unknown (the database may still apply it) the locks are left to expire.
- engine ``rollback``: nothing was committed; the write record is dropped, no Redis call.
- engine ``rollback_savepoint`` / ``handle_error``: a reset of the connection's name resolution
  (RESET search_path, ...) run before them may be undone by the database; it is no longer believed.
- session ``do_orm_execute``: the one entry point of ``Session.get`` and many-to-one lazy loads
  (both end in a SELECT by primary key), before any SQL; lets us answer from Redis (which reads, and
  how: ``_readhooks``). It also sees ORM
  DML, which during a flush (a mapper listener's) runs persistence's code as the unit of work does,
  with no mapper event: the rest of that flush counts as bulk writes.
- session ``after_transaction_create``: a ``bulk_*`` method begins a subtransaction, and so does a
  flush; begun inside a flush's unit of work (a listener's bulk call) or beside one on its
  connection (a listener's own session), the flush's later statements count as bulk writes. ORM DML
  begins no transaction, hence ``do_orm_execute`` above.
- session ``after_begin`` / ``after_transaction_end``: which connections (and so which write records)
  belong to a session's transaction, so that a session never reads from Redis what it wrote itself.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import Connection
from sqlalchemy.orm import InstanceState, Mapper, Session

from . import _sa
from ._readhooks import ReadHooks, ReadPolicies
from ._slots import Slot, hook
from ._transactions import Transactions
from ._txn import TxnState, dml_tables, is_write_sql, nested_dml_tables, scope_changes

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.default import DefaultExecutionContext
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.engine.result import Result
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction

    from ._commit import Commits
    from ._identity import IdentityReader
    from ._outbox import OutboxWriter
    from ._queryread import QueryReader
    from ._readthrough import ReadThrough

log = logging.getLogger("sqlcache")

__all__ = ["Wiring"]


class Policies(ReadPolicies, Protocol):
    """What the listeners ask of the registry (the read hooks: ``policy_for``)."""

    def cascaded(self, table: Any, sql: str, kind: str) -> AbstractSet[Any]: ...

    def records_rows_of(self, compiled_cache: Any) -> bool: ...


# -- the dialect's commit, wrapped once per dialect --------------------------------------------------

_HOOKS = "_sqlcache_commit_hooks"
# committed: True; refused by the database (nothing applied): False; unknown (the COMMIT may still be
# applied: the connection broke, the task awaiting it was cancelled, an interrupt): None
CommitHook = Callable[[Any, "bool | None"], None]


def _add_commit_hook(dialect: Dialect, hook: CommitHook) -> None:
    hooks: list[CommitHook] | None = dialect.__dict__.get(_HOOKS)
    if hooks is None:
        hooks = []
        original = dialect.do_commit
        hooks_ref = hooks

        def do_commit(dbapi_connection: Any) -> None:
            committed: bool | None = None
            try:
                original(dbapi_connection)
                committed = True
            except Exception as exc:
                committed = _failed_commit_outcome(dialect, exc, dbapi_connection)
                raise
            finally:
                for h in list(hooks_ref):
                    h(dbapi_connection, committed)

        setattr(dialect, _HOOKS, hooks)
        dialect.do_commit = do_commit  # type: ignore[method-assign]
    if hook not in hooks:
        hooks.append(hook)


def _failed_commit_outcome(dialect: Dialect, exc: Exception, dbapi_connection: Any) -> bool | None:
    """False if the database answered the COMMIT with an error (a DBAPI error that is not a lost
    connection, as SQLAlchemy tells them apart): nothing was applied. None otherwise: unknown."""
    dbapi = getattr(dialect, "loaded_dbapi", None)
    error = getattr(dbapi, "Error", None)
    if not (isinstance(error, type) and isinstance(exc, error)):
        return None
    try:
        return None if dialect.is_disconnect(exc, dbapi_connection, None) else False  # type: ignore[arg-type]
    except Exception:  # a dialect's check that cannot look: unknown
        return None


def _remove_commit_hook(dialect: Dialect, hook: CommitHook) -> None:
    hooks: list[CommitHook] | None = dialect.__dict__.get(_HOOKS)
    if hooks is None:
        return
    if hook in hooks:
        hooks.remove(hook)
    if not hooks:
        del dialect.__dict__[_HOOKS]
        del dialect.__dict__["do_commit"]


# an installed listener and what it calls: a slot is released only by the owner of what it calls
Hooked = tuple[Slot, Callable[..., Any]]


def _hook(target: Any, name: str, fn: Callable[..., Any], **options: Any) -> Hooked:
    return hook(target, name, fn, **options), fn


def _release(slots: list[Hooked]) -> None:
    for slot, fn in slots:
        slot.release(fn)
    slots.clear()


class Wiring:
    """The listeners of one cache: they record writes for the commit protocol and hand reads to the
    identity and query readers; nothing flows back up."""

    def __init__(
        self,
        txns: Transactions,
        policies: Policies,
        commits: Commits,
        identities: IdentityReader,
        queries: QueryReader,
        reads: ReadThrough,
        outbox: OutboxWriter | None,
    ) -> None:
        self._txns = txns
        self._policies = policies
        self._commits = commits
        self._identities = identities
        self._queries = queries
        self._reads = reads
        self._outbox = outbox
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        # engine.execution_options() makes proxy engines that share the pool: attached by pool
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._mappers: set[Mapper[Any]] = set()
        self._mappers_listening: set[Mapper[Any]] = set()
        # the installed listeners (_slots: released, never removed, so that no dispatch in progress
        # anywhere sees SQLAlchemy's listener deques change)
        self._engine_slots: weakref.WeakKeyDictionary[Engine, list[Hooked]] = weakref.WeakKeyDictionary()
        self._mapper_slots: list[Hooked] = []
        self._session_slots: list[Hooked] = []
        self._session_listening = False
        self._read_hooks = ReadHooks(txns, policies, identities, queries, reads, self._pools)

    # -- install / remove -------------------------------------------------------------------------

    def _engine_events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("begin", self._on_begin),
            ("before_cursor_execute", self._on_before_cursor_execute),
            ("after_cursor_execute", self._on_after_cursor_execute),
            ("commit", self._on_commit),
            ("rollback", self._on_rollback),
            ("rollback_savepoint", self._on_rollback_savepoint),
            ("handle_error", self._on_error),
            ("engine_disposed", self._on_disposed),
        ]

    def _session_events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("do_orm_execute", self._on_orm_execute),
            ("after_begin", self._on_session_begin),
            ("after_transaction_end", self._on_session_txn_end),
            ("after_transaction_create", self._on_session_txn_create),
        ]

    def attach(self, engine: Engine) -> None:
        if engine in self._engines:
            return
        self._engine_slots[engine] = [_hook(engine, name, fn) for name, fn in self._engine_events()]
        _add_commit_hook(engine.dialect, self._on_after_commit)
        self._engines.add(engine)
        self._pools.add(engine.pool)
        if not self._session_listening:
            self._session_slots = [_hook(Session, name, fn) for name, fn in self._session_events()]
            self._session_listening = True
        self._listen_mappers()

    def detach(self, engine: Engine) -> None:
        if engine not in self._engines:
            return
        _release(self._engine_slots.pop(engine, []))
        self._engines.discard(engine)
        if not any(e.pool is engine.pool for e in self._engines):
            self._pools.discard(engine.pool)  # proxies from execution_options() share their pool
        if not any(e.dialect is engine.dialect for e in self._engines):
            _remove_commit_hook(engine.dialect, self._on_after_commit)
        if not self._engines and self._session_listening:
            _release(self._session_slots)
            self._session_listening = False
            self._unlisten_mappers()

    def engines(self) -> list[Engine]:
        return list(self._engines)

    def close(self) -> None:
        """Detach every engine, and remove the session and mapper listeners even when no engine is
        left to detach (engines garbage-collected without detach(): the listeners are on the Session
        class and the mappers, and would otherwise run for every session of the process)."""
        for engine in list(self._engines):
            self.detach(engine)
        if self._session_listening:
            _release(self._session_slots)
            self._session_listening = False
        self._unlisten_mappers()

    def watch_mapper(self, mapper: Mapper[Any]) -> None:
        """Record the unit of work's rows of ``mapper``'s whole hierarchy (listeners on its base mapper,
        propagated): a row of a registered class's table may be written through an unregistered class
        of the hierarchy (its base, loaded without ``polymorphic_on``; a discriminator changed through
        it), and the unit of work's statements for the hierarchy count as rows the events name."""
        self._mappers.add(mapper.base_mapper)
        if self._session_listening:
            self._listen_mappers()

    def _mapper_events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("after_insert", self._on_after_insert),
            ("after_update", self._on_after_update),
            ("after_delete", self._on_after_delete),
        ]

    def _listen_mappers(self) -> None:
        for mapper in self._mappers - self._mappers_listening:
            for name, fn in self._mapper_events():
                # raw: the listener gets the InstanceState, which is what it records (no wrapper of
                # SQLAlchemy's turning it into the object, per row); retval: nothing is wrapped to
                # return EXT_CONTINUE either (mapper events ignore what a listener returns)
                self._mapper_slots.append(_hook(mapper, name, fn, propagate=True, raw=True, retval=True))
            self._mappers_listening.add(mapper)

    def _unlisten_mappers(self) -> None:
        _release(self._mapper_slots)
        self._mappers_listening.clear()

    # -- write records ------------------------------------------------------------------------------

    def _attached(self, conn: Connection) -> bool:
        return conn.engine.pool in self._pools

    def serves(self, bind: Engine | Connection) -> bool:
        """Whether ``bind`` (an engine or connection) is attached: its reads may use the cache."""
        return bind.engine.pool in self._pools

    def _on_begin(self, conn: Connection) -> None:
        self._txns.begin(conn)

    def _on_rollback(self, conn: Connection) -> None:
        self._txns.end(conn)
        if not conn.invalidated:
            self._txns.scope_txn_end(conn.info, False)

    def _on_rollback_savepoint(self, conn: Connection, name: str, context: Any) -> None:
        if not conn.invalidated:
            self._txns.scope_abort(conn)

    def _on_error(self, ctx: Any) -> None:
        conn = ctx.connection
        if conn is not None and not (conn.closed or conn.invalidated):
            self._txns.scope_abort(conn)

    def _on_disposed(self, engine: Engine) -> None:
        # dispose() (also dispose(close=False) in a forked child) replaces the pool: the new one is the
        # same attached engine's, and its relay moves with it
        self._pools.add(engine.pool)
        if self._outbox is not None:
            self._outbox.repool()

    def _on_commit(self, conn: Connection) -> None:
        st = self._txns.end(conn)
        if st is None or not st.wrote_anything():
            return
        key = id(conn.connection)
        try:
            self._commits.check_layout()
            self._commits.before(st, key, conn)
            self._commits.check_layout()  # the lock's new connection may be the one that found out
        except BaseException:
            # refused (another layout), or the durable outbox row could not be written: the COMMIT does
            # not happen. SQLAlchemy leaves the DBAPI transaction open after a commit event raised, and
            # a later checkout of the connection would see its writes (and a later COMMIT there commit
            # them): it is rolled back here
            self._commits.after(key, False)  # whatever the lock did: released (or journalled)
            try:
                conn.engine.dialect.do_rollback(conn.connection)
            except Exception:  # the connection is broken: the pool discards it anyway
                log.debug("sqlcache: rollback after a refused commit failed", exc_info=True)
            raise

    def _on_after_commit(self, dbapi_connection: Any, committed: bool | None) -> None:
        self._commits.after(id(dbapi_connection), committed)
        # the pool's proxy of the DBAPI connection (what Connection hands do_commit): its info is the
        # record's, where the connection's name-resolution state lives
        self._txns.scope_txn_end(getattr(dbapi_connection, "info", None), committed is True)

    def _on_before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: DefaultExecutionContext | None,
        executemany: bool,
    ) -> None:
        st = self._txns.of(conn)
        st.began_sql = True
        seen = self._reads.seen
        if seen.loading():  # a miss is loading: what it reads, its entry depends on
            seen.saw_statement(context.compiled if context is not None else None, statement)
        if context is None:
            return
        if context.isinsert or context.isupdate or context.isdelete:
            # the unit of work's own statement for a registered hierarchy: the mapper events name its
            # rows. Any other (a mapper listener's, a many-to-many relationship's rows, an unregistered
            # class's, even during a flush) is a bulk write of its tables
            flushing = self._txns.flushing(conn) and self._policies.records_rows_of(
                context.execution_options.get("compiled_cache")
            )
            cascaded = self._policies.cascaded
            kind = "delete" if context.isdelete else "update" if context.isupdate else "insert"
            # the SQL SQLAlchemy compiled, where a prefix, a conflict clause or a construct's own
            # rendering is; the same string each time (an insertmanyvalues batch repeats its VALUES)
            sql = context.compiled.string if context.compiled is not None else statement
            for table in dml_tables(context):
                st.tables[table.fullname] = table
                if not flushing:
                    st.bulk[table.fullname] = table
                # rows the database changes itself through FK actions (CASCADE, SET NULL, SET DEFAULT)
                # of the rows this statement deletes or updates, an INSERT's conflict handling included
                # (OR REPLACE, REPLACE, ON CONFLICT DO UPDATE, ON DUPLICATE KEY UPDATE): their tables
                # are written, rows unknown; a plain INSERT, as the unit of work's, changes none
                for other in cascaded(table, sql, kind):
                    st.tables[other.fullname] = other
                    st.bulk[other.fullname] = other
            for table in nested_dml_tables(context):  # a data-modifying CTE's: rows unknown, any kind
                for other in (table, *cascaded(table, sql, "delete"), *cascaded(table, sql, "update")):
                    st.tables[other.fullname] = other
                    st.bulk[other.fullname] = other
        elif context.isddl or is_write_sql(statement):
            st.everything = True
        else:
            changes = scope_changes(statement)
            if changes:
                self._txns.scope_statement(conn, statement, changes)
            return
        if context.execution_options.get("schema_translate_map") or self._txns.scoped(conn):
            # the rows live in another schema (or tenant): never repopulate default-schema keys
            st.translated = True
        if self._outbox is not None and _sa.is_autocommit(conn):
            # a row per statement (one that failed before may have left its own: it stays, harmless)
            self._outbox.write_early(st, conn)

    def _on_after_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: DefaultExecutionContext | None,
        executemany: bool,
    ) -> None:
        self._txns.scope_ran(conn, statement)
        # AUTOCOMMIT: the statement is already committed and no commit event will come
        st = self._txns.peek(conn)
        if st is not None and st.wrote_anything() and _sa.is_autocommit(conn):
            self._txns.begin(conn, TxnState(began_sql=True))
            key = id(conn.connection)
            self._commits.before(st, key, conn)
            self._commits.after(key, True)

    def _record(
        self, mapper: Mapper[Any], conn: Connection, state: InstanceState[Any], deleted: bool
    ) -> None:
        # every class of a hierarchy with a registered class (see watch_mapper): an unregistered one's
        # row is a row of the registered classes' tables all the same
        if conn.engine.pool not in self._pools:
            return
        self._commits.record(self._txns.of(conn), mapper, state, deleted)

    def _on_after_insert(self, mapper: Mapper[Any], conn: Connection, state: InstanceState[Any]) -> None:
        self._record(mapper, conn, state, False)

    def _on_after_update(self, mapper: Mapper[Any], conn: Connection, state: InstanceState[Any]) -> None:
        self._record(mapper, conn, state, False)

    def _on_after_delete(self, mapper: Mapper[Any], conn: Connection, state: InstanceState[Any]) -> None:
        self._record(mapper, conn, state, True)

    # -- sessions -------------------------------------------------------------------------------------

    def _on_session_begin(self, session: Session, transaction: SessionTransaction, conn: Connection) -> None:
        if self._attached(conn):
            self._txns.session_began(session, conn)

    def _on_session_txn_end(self, session: Session, transaction: SessionTransaction) -> None:
        self._txns.session_ended(session, transaction)

    def _on_session_txn_create(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            return
        if _sa.is_flushing(session):
            # begun inside the unit of work: a mapper listener's bulk_* method (or begin_nested()),
            # whose rows no mapper event names
            self._txns.wrote_aside(session, transaction.parent)
        elif _sa.is_flushing_or_bulk(session):
            # a flush or a bulk_* method begins: if another session is flushing on its connection (a
            # listener's own session), that flush's events will not name these rows
            self._txns.wrote_beside(session)

    # -- ORM executions -------------------------------------------------------------------------------

    def _on_orm_execute(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        if orm_state.is_select:
            return self._read_hooks.read(orm_state)  # answered from Redis, or None: SQLAlchemy runs it
        session = orm_state.session
        if orm_state.is_update or orm_state.is_insert or orm_state.is_delete:
            # a mapper listener's ORM statement during the flush (an ORM bulk UPDATE by primary key
            # runs SQLAlchemy's persistence code as the unit of work does): nothing names its rows; the
            # same from another session on the flush's connection
            if _sa.is_flushing(session):
                self._txns.wrote_aside(session, _sa.current_transaction(session))
            else:
                self._txns.wrote_beside(session)
        return None
