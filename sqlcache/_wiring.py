"""Every SQLAlchemy listener sqlcache installs: attach() adds them, detach() removes them.

Hooks and why each was chosen:

- engine ``begin``: a new database transaction starts; its write record (TxnState) starts empty.
- engine ``before_cursor_execute``: sees every statement, ORM or Core or text, with its execution
  context; records written tables (and that SQL ran, which may fix a snapshot). It does not see rows.
- mapper ``after_insert/after_update/after_delete`` (registered classes): the unit of work's rows,
  with their primary keys. They do not see Core or bulk statements, hence the hook above.
- engine ``commit``: fires just before the DBAPI COMMIT; the lock goes here.
- ``dialect.do_commit`` (wrapped): the only point that runs right after the DBAPI COMMIT for Core and
  ORM alike (there is no engine event after commit); the release goes here, success or not.
- engine ``rollback``: nothing was committed; the write record is dropped, no Redis call.
- session ``do_orm_execute``: the one entry point of ``Session.get`` and many-to-one lazy loads
  (both end in a SELECT by primary key), before any SQL; lets us answer from Redis.
- session ``after_begin`` / ``after_transaction_end``: which connections (and so which write records)
  belong to a session's transaction, so that a session never reads from Redis what it wrote itself.
"""

from __future__ import annotations

import inspect as pyinspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql import Select
from sqlalchemy.util import immutabledict

from ._txn import TxnState, dml_tables, is_write_sql
from .options import CacheOption, QueryPolicy

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.engine.default import DefaultExecutionContext
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.engine.result import Result
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction

    from .cache import SQLCache

__all__ = ["Wiring", "result_metadata", "with_attributes"]

_PER_STATEMENT = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})

# -- the few private SQLAlchemy attributes we rely on, one function each ---------------------------


def pk_load(orm_state: ORMExecuteState) -> tuple[Mapper[Any], tuple[Any, ...]] | None:
    """(mapper, pk) if this execution is a plain load by primary key (Session.get, many-to-one lazy load,
    the load of an expired object's attributes).

    SQLAlchemy marks neither publicly: both build ``select(mapper).where(mapper._get_clause[0])`` and
    pass the key as parameters, which is what we recognise here.
    """
    stmt = orm_state.statement
    if type(stmt) is not Select:
        return None
    mapper = orm_state.bind_mapper
    if mapper is None:
        return None
    get_clause, get_params = mapper._get_clause
    where = stmt._where_criteria
    if len(where) != 1:
        return None
    # 2.1 passes the clause itself, 2.0 an annotated copy of it
    if where[0] is not get_clause and getattr(where[0], "_Annotated__element", None) is not get_clause:
        return None
    if (
        stmt._for_update_arg is not None
        or stmt._with_options
        or stmt._limit_clause is not None
        or stmt._order_by_clauses
        or stmt._setup_joins
    ):
        return None
    opts = orm_state.load_options
    if (
        opts._populate_existing
        or getattr(opts, "_is_user_refresh", False)  # session.refresh(): the database, explicitly
        or opts._identity_token is not None
        or opts._yield_per
        or orm_state.execution_options.get("populate_existing")
    ):
        return None
    params = orm_state.parameters
    if not isinstance(params, dict):
        return None
    try:
        pk = tuple(params[get_params[col].key] for col in mapper.primary_key)
    except KeyError:
        return None
    if any(v is None for v in pk):
        return None
    return mapper, pk


def is_flushing(session: Session) -> bool:
    """True while the session's unit of work runs (no public flag exists; ``_flushing`` since 0.x)."""
    return bool(session._flushing)


def is_autocommit(conn: Connection) -> bool:
    """True if each statement commits on its own (no ``commit`` event will follow)."""
    return bool(conn._is_autocommit_isolation())


_RESULT_META_PARAMS = pyinspect.signature(SimpleResultMetaData.__init__).parameters


def result_metadata(
    keys: Sequence[str | None],
    filters: Callable[[], list[Any]],
    extra: list[tuple[Any, ...]] | None = None,
) -> SimpleResultMetaData:
    """Result metadata whose ``unique()`` keys come from ``filters`` (per column: a key function or
    None), as the ORM's do; ``extra`` holds, per column, the objects ``row._mapping[...]`` accepts
    besides the name (entity, attribute, column).

    SQLAlchemy 2.1 takes ``_create_unique_filters`` (asked per result), 2.0 ``_unique_filters``.
    """
    names: Any = keys  # None for an unnamed column, as SQLAlchemy's own ORM results have
    if "_create_unique_filters" in _RESULT_META_PARAMS:
        return SimpleResultMetaData(names, extra=extra, _create_unique_filters=lambda _r: filters())
    return SimpleResultMetaData(names, extra=extra, _unique_filters=filters())  # type: ignore[call-arg]


def column_extras(stmt: Any) -> list[tuple[Any, ...]]:
    """Per result column, what a database result's row mapping accepts as a key besides the name: the
    entity, the ORM attribute and its column, or the Core column."""
    out: list[tuple[Any, ...]] = []
    for desc in stmt.column_descriptions:
        expr = desc.get("expr")
        if expr is None:
            out.append(())
            continue
        column = getattr(expr, "expression", None) if expr is not desc.get("entity") else None
        out.append((expr,) if column is None or column is expr else (expr, column))
    return out


def with_attributes(result: Result[Any], single_entity: bool, filtered: bool | None = None) -> Result[Any]:
    """Mark a result as the ORM does, so that legacy ``Query`` returns entities, not one-item rows, and
    uniques the rows of any statement returning an entity (``filtered``: an entity among the columns)."""
    result._attributes = immutabledict(
        {"is_single_entity": single_entity, "filtered": single_entity if filtered is None else filtered}
    )
    return result


# -- the dialect's commit, wrapped once per dialect --------------------------------------------------

_HOOKS = "_sqlcache_commit_hooks"
CommitHook = Callable[[Any, bool], None]


def _add_commit_hook(dialect: Dialect, hook: CommitHook) -> None:
    hooks: list[CommitHook] | None = dialect.__dict__.get(_HOOKS)
    if hooks is None:
        hooks = []
        original = dialect.do_commit
        hooks_ref = hooks

        def do_commit(dbapi_connection: Any) -> None:
            committed = False
            try:
                original(dbapi_connection)
                committed = True
            finally:
                for h in list(hooks_ref):
                    h(dbapi_connection, committed)

        setattr(dialect, _HOOKS, hooks)
        dialect.do_commit = do_commit  # type: ignore[method-assign]
    if hook not in hooks:
        hooks.append(hook)


def _remove_commit_hook(dialect: Dialect, hook: CommitHook) -> None:
    hooks: list[CommitHook] | None = dialect.__dict__.get(_HOOKS)
    if hooks is None:
        return
    if hook in hooks:
        hooks.remove(hook)
    if not hooks:
        del dialect.__dict__[_HOOKS]
        del dialect.__dict__["do_commit"]


class Wiring:
    """The listeners of one SQLCache."""

    def __init__(self, cache: SQLCache) -> None:
        self.cache = cache
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        # engine.execution_options() makes proxy engines that share the pool: attached by pool
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._mappers: set[Mapper[Any]] = set()
        self._mappers_listening: set[Mapper[Any]] = set()
        self._session_listening = False
        self._metas: dict[Mapper[Any], SimpleResultMetaData] = {}
        # per-cache keys in Connection.info / Session.info, so that two caches never share state
        self._txn_key = ("sqlcache.txn", id(cache))
        self._conns_key = ("sqlcache.conns", id(cache))
        self._clock_key = ("sqlcache.clock", id(cache))

    # -- install / remove -------------------------------------------------------------------------

    def _engine_events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("begin", self._on_begin),
            ("before_cursor_execute", self._on_before_cursor_execute),
            ("after_cursor_execute", self._on_after_cursor_execute),
            ("commit", self._on_commit),
            ("rollback", self._on_rollback),
        ]

    def _session_events(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("do_orm_execute", self._on_orm_execute),
            ("after_begin", self._on_session_begin),
            ("after_transaction_end", self._on_session_txn_end),
        ]

    def attach(self, engine: Engine) -> None:
        if engine in self._engines:
            return
        for name, fn in self._engine_events():
            event.listen(engine, name, fn)
        _add_commit_hook(engine.dialect, self._on_after_commit)
        self._engines.add(engine)
        self._pools.add(engine.pool)
        if not self._session_listening:
            for name, fn in self._session_events():
                event.listen(Session, name, fn)
            self._session_listening = True
        self._listen_mappers()

    def detach(self, engine: Engine) -> None:
        if engine not in self._engines:
            return
        for name, fn in self._engine_events():
            event.remove(engine, name, fn)
        self._engines.discard(engine)
        if not any(e.pool is engine.pool for e in self._engines):
            self._pools.discard(engine.pool)  # proxies from execution_options() share their pool
        if not any(e.dialect is engine.dialect for e in self._engines):
            _remove_commit_hook(engine.dialect, self._on_after_commit)
        if not self._engines and self._session_listening:
            for name, fn in self._session_events():
                event.remove(Session, name, fn)
            self._session_listening = False
            self._unlisten_mappers()

    def engines(self) -> list[Engine]:
        return list(self._engines)

    def watch_mapper(self, mapper: Mapper[Any]) -> None:
        self._mappers.add(mapper)
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
                event.listen(mapper, name, fn, propagate=True)
            self._mappers_listening.add(mapper)

    def _unlisten_mappers(self) -> None:
        for mapper in self._mappers_listening:
            for name, fn in self._mapper_events():
                event.remove(mapper, name, fn)
        self._mappers_listening.clear()

    # -- write records ------------------------------------------------------------------------------

    def txn(self, conn: Connection) -> TxnState:
        info = conn.info
        st: TxnState | None = info.get(self._txn_key)
        if st is None:
            st = TxnState()
            info[self._txn_key] = st
        return st

    def _attached(self, conn: Connection) -> bool:
        return conn.engine.pool in self._pools

    def _on_begin(self, conn: Connection) -> None:
        conn.info[self._txn_key] = TxnState()

    def _on_rollback(self, conn: Connection) -> None:
        conn.info.pop(self._txn_key, None)

    def _on_commit(self, conn: Connection) -> None:
        st: TxnState | None = conn.info.pop(self._txn_key, None)
        if st is not None and st.wrote_anything():
            self.cache.precommit(st, id(conn.connection), conn)

    def _on_after_commit(self, dbapi_connection: Any, committed: bool) -> None:
        self.cache.postcommit(id(dbapi_connection), committed)

    def _on_before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: DefaultExecutionContext | None,
        executemany: bool,
    ) -> None:
        st = self.txn(conn)
        st.began_sql = True
        if context is None:
            return
        if context.isinsert or context.isupdate or context.isdelete:
            flushing = self._session_flushing(conn)
            cache = self.cache
            for table in dml_tables(context):
                st.tables[table.fullname] = table
                if not flushing:
                    st.bulk[table.fullname] = table
                cascaded: set[Any] = set()
                if context.isdelete:
                    cascaded |= cache.cascades(table, True, False)
                if context.isupdate:
                    cascaded |= cache.cascades(table, False, True)
                for other in cascaded:
                    st.tables[other.fullname] = other
                    st.bulk[other.fullname] = other
        elif context.isddl or is_write_sql(statement):
            st.everything = True
        else:
            return
        if context.execution_options.get("schema_translate_map"):
            st.translated = True  # the rows live in another schema: never repopulate default-schema keys
        if self.cache.config.durable and is_autocommit(conn):
            # a row per statement (one that failed before may have left its own: it stays, harmless)
            self.cache.outbox_early(st, conn)

    def _on_after_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: DefaultExecutionContext | None,
        executemany: bool,
    ) -> None:
        # AUTOCOMMIT: the statement is already committed and no commit event will come
        st: TxnState | None = conn.info.get(self._txn_key)
        if st is not None and st.wrote_anything() and is_autocommit(conn):
            conn.info[self._txn_key] = TxnState(began_sql=True)
            key = id(conn.connection)
            self.cache.precommit(st, key, conn)
            self.cache.postcommit(key, True)

    def _session_flushing(self, conn: Connection) -> bool:
        for ref in conn.info.get(self._conns_key, ()):
            s = ref()
            if s is not None and is_flushing(s):
                return True
        return False

    def _record(self, mapper: Mapper[Any], conn: Connection, target: Any, deleted: bool) -> None:
        if not self._attached(conn) or self.cache.policy_for(mapper) is None:
            return
        self.cache.record_identity(self.txn(conn), mapper, instance_state(target), deleted)

    def _on_after_insert(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        self._record(mapper, conn, target, False)

    def _on_after_update(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        self._record(mapper, conn, target, False)

    def _on_after_delete(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        self._record(mapper, conn, target, True)

    # -- sessions -------------------------------------------------------------------------------------

    def _on_session_begin(self, session: Session, transaction: SessionTransaction, conn: Connection) -> None:
        if not self._attached(conn):
            return
        conns: list[Connection] = session.info.setdefault(self._conns_key, [])
        if conn not in conns:
            conns.append(conn)
        refs: list[weakref.ref[Session]] = conn.info.setdefault(self._conns_key, [])
        refs[:] = [r for r in refs if r() is not None and r() is not session]
        refs.append(weakref.ref(session))
        clock = session.info.get(self._clock_key)
        st = self.txn(conn)
        if clock is not None and not st.began_sql:
            st.clock0 = clock

    def _on_session_txn_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            session.info.pop(self._conns_key, None)
            session.info.pop(self._clock_key, None)

    def note_clock(self, session: Session, clock: int, txns: list[TxnState]) -> None:
        """Remember a clock reading taken before the transaction's first statement, if it is one."""
        if not txns:
            session.info.setdefault(self._clock_key, clock)  # handed to the connection by after_begin
        for st in txns:
            if not st.began_sql and st.clock0 is None:
                st.clock0 = clock

    def session_txns(self, session: Session) -> list[TxnState]:
        out = []
        for conn in session.info.get(self._conns_key, ()):
            st = conn.info.get(self._txn_key) if not conn.closed else None
            if st is not None:
                out.append(st)
        return out

    def session_txns_isolation(self, session: Session) -> Iterator[tuple[TxnState, bool]]:
        """Each write record of the session's transaction, with whether its snapshot is fixed."""
        for conn in session.info.get(self._conns_key, ()):
            if conn.closed:
                continue
            st = conn.info.get(self._txn_key)
            if st is None:
                continue
            yield st, _snapshot_fixed(conn)

    # -- reads ----------------------------------------------------------------------------------------

    @staticmethod
    def _bind(orm_state: ORMExecuteState, mapper: Any, clause: Any) -> Any:
        """The engine or connection this execution goes to (its bind arguments included: an explicit
        bind, a shard id)."""
        args = dict(orm_state.bind_arguments)
        args.setdefault("mapper", mapper)
        if clause is not None:
            args.setdefault("clause", clause)
        return orm_state.session.get_bind(**args)

    def translation(self, orm_state: ORMExecuteState, bind: Any) -> str:
        """ "" or a digest of what makes the same statement read other rows: the ``schema_translate_map``
        in effect (execution options over those of the session's connection, of the bind) and a shard
        (identity token, shard id). Part of every entry key; dependencies stay per table name, so a
        write under any map or on any shard invalidates them all."""
        stm = orm_state.execution_options.get("schema_translate_map")
        if stm is None:
            for conn in orm_state.session.info.get(self._conns_key, ()):
                if not conn.closed and conn.engine.pool is bind.engine.pool:
                    stm = conn.get_execution_options().get("schema_translate_map")
                    break
            else:
                stm = bind.get_execution_options().get("schema_translate_map")
        shard = (
            orm_state.load_options._identity_token
            or orm_state.execution_options.get("identity_token")
            or orm_state.execution_options.get("_sa_shard_id")
            or orm_state.bind_arguments.get("shard_id")
        )
        if not stm and shard is None:
            return ""
        text = repr((sorted((repr(k), repr(v)) for k, v in (stm or {}).items()), repr(shard)))
        return blake2b(text.encode(), digest_size=8).hexdigest()

    def one_row_result(self, mapper: Mapper[Any], obj: Any) -> Result[Any]:
        meta = self._metas.get(mapper)
        if meta is None:
            meta = self._metas[mapper] = result_metadata([mapper.class_.__name__], lambda: [id])
        return IteratorResult(meta, iter(() if obj is None else ((obj,),)))

    def _on_orm_execute(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        if not orm_state.is_select:
            return None
        session = orm_state.session
        if session.autoflush and orm_state.load_options._autoflush and not session._is_clean():
            # SQLAlchemy autoflushes after this event, then runs the statement against the flushed
            # rows (a pending insert found by a get, a changed column matched by a WHERE): only the
            # database can answer that
            if orm_state.user_defined_options or pk_load(orm_state) is not None:
                self.cache.note_bypass()
            return None
        for opt in orm_state.user_defined_options:
            if isinstance(opt, CacheOption):
                bind = self._bind(orm_state, orm_state.bind_mapper, orm_state.statement)
                if bind.engine.pool not in self._pools:
                    return None
                tr = self.translation(orm_state, bind)
                return self.cache.read_query(orm_state, opt.payload, bind.engine, tr)
        found = pk_load(orm_state)
        if found is None:
            if orm_state.is_relationship_load:
                return self._relationship_load(orm_state)
            return None
        mapper, pk = found
        policy = self.cache.policy_for(mapper)
        if policy is None:
            return None
        bind = self._bind(orm_state, mapper, None)
        if bind.engine.pool not in self._pools:
            return None
        return self.cache.read_identity(orm_state, mapper, pk, policy, self.translation(orm_state, bind))

    def _relationship_load(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        """A lazy load of a collection of registered objects: cached like a query on its tables."""
        mapper = orm_state.bind_mapper
        if mapper is None:
            return None
        policy = self.cache.policy_for(mapper)
        if policy is None:
            return None
        bind = self._bind(orm_state, mapper, orm_state.statement)
        if bind.engine.pool not in self._pools:
            return None
        tr = self.translation(orm_state, bind)
        return self.cache.read_query(
            orm_state, QueryPolicy(ttl=policy.ttl), bind.engine, tr, relationship=True
        )


def _snapshot_fixed(conn: Connection) -> bool:
    """Whether the transaction keeps the snapshot of its first statement (repeatable read and up)."""
    if conn.dialect.name == "sqlite":
        return True
    level = conn.get_execution_options().get("isolation_level") or conn.default_isolation_level
    return str(level).upper() not in _PER_STATEMENT
