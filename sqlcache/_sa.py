"""Every use of private SQLAlchemy API, one small function (or name) each, with the reason beside it.

Checked against SQLAlchemy 2.0.x and 2.1.x (CI runs the suite on both);
tests/unit/test_sa_internals.py fails loudly if an upgrade moves any of them. Nothing else in the
package touches an underscored SQLAlchemy attribute.
"""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Column, util
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Connection
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import loading as _loading
from sqlalchemy.orm import mapperlib as _mapperlib
from sqlalchemy.orm import strategies as _strategies
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.sql import Select
from sqlalchemy.sql.visitors import iterate
from sqlalchemy.util import immutabledict

if TYPE_CHECKING:
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import InstanceState, ORMExecuteState, Session, SessionTransaction

    from ._hierarchy import Shape

__all__ = [
    "BINARY",
    "DeferredCallable",
    "LazyCallable",
    "app_listener_after",
    "app_listeners",
    "autobegin",
    "autoflush",
    "build_objects",
    "bypasses_query_cache",
    "cache_key",
    "correlates",
    "current_path",
    "current_transaction",
    "discriminator_columns",
    "driver_autocommit",
    "from_objects",
    "frozen_keys",
    "frozen_single_entity",
    "is_autocommit",
    "is_flushing",
    "is_flushing_or_bulk",
    "is_instance",
    "lazy_strategy",
    "legacy_uniquing",
    "loader_criteria",
    "mapper_registries",
    "mapper_registry_count",
    "needs_autoflush",
    "new_runid",
    "path_registry",
    "pending_autoflush",
    "persistence_cache",
    "pk_load",
    "refresh_of",
    "refresh_unloaded",
    "require_unique",
    "result_metadata",
    "shard_token",
    "statement_options",
    "take_unique_guard",
    "type_is_unknown",
    "with_attributes",
]

#: The binary types' common base (LargeBinary, BINARY, VARBINARY, BLOB): no public name covers them all.
BINARY: type[sqltypes.TypeEngine[Any]] = sqltypes._Binary

# The ORM numbers each load ("runid", a process-wide counter) and stamps it on the objects a load builds
# from its rows. Taking a number before a statement runs tells, afterwards, the objects it built (a larger
# number: its own load, its eager loads, and our hits) from those the session already held, whose values
# may be older than the statement. Hits stamp theirs the same way.
new_runid: Callable[[], int] = _loading._new_runid


# -- statements and executions ------------------------------------------------------------------------


def translate_map_items(stm: Any) -> list[tuple[str, str]]:
    """A ``schema_translate_map``'s entries, in a stable order, without the ``"_none"`` alias of the
    ``None`` key that SQLAlchemy's compiler adds to the caller's own dict the first time it renders a
    statement with it (sql/compiler.py, ``_render_schema_translates``): without this, a key computed
    before the first execution differs from one computed after it."""
    return sorted((repr(k), repr(v)) for k, v in stm.items() if not (k == "_none" and None in stm))


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


def autobegin(session: Session) -> None:
    """For a session with ``autobegin=False`` and no transaction: raise as executing the statement
    would (a hit executes none). A session that may autobegin is left alone: beginning its
    (connection-less) transaction on every hit costs about 9% of a hit, for ``in_transaction()`` alone
    (docs/pages/transparency.md)."""
    if session._transaction is None and not session.autobegin:
        session._autobegin_t()


def key_list(raw: Any) -> list[Any]:
    """A primary key (not a dict) as ``Session.get`` reads it: ``util.to_list(key, default=[None])``."""
    return util.to_list(raw, default=[None])


def needs_autoflush(session: Session) -> bool:
    """Whether a query of ``session`` would flush first (autoflush on, changes pending): the test
    ``Session._autoflush`` makes, without an ORM execution to ask (a direct read)."""
    return bool(session.autoflush and not session._is_clean())


def autoflush(session: Session) -> None:
    """Flush as a query's autoflush does (``Session._autoflush``: errors say a query caused it)."""
    session._autoflush()


def bypasses_query_cache(orm_state: ORMExecuteState) -> bool:
    """FOR UPDATE, populate_existing, yield_per: the caller wants the database itself, row by row; and
    the legacy ``Query.only_return_tuples()``, whose rows a rebuilt result would not shape alike."""
    stmt: Any = orm_state.statement
    opts = orm_state.load_options
    return bool(
        getattr(stmt, "_for_update_arg", None) is not None
        or opts._populate_existing
        or opts._yield_per
        or getattr(opts, "_only_return_tuples", False)
    )


def correlates(sel: Any, name: str) -> bool:
    """Whether the SELECT ``sel``, as a subquery, takes the table ``name`` from the query around it
    rather than reading it whole: auto-correlation (the default), ``correlate(table)``, or
    ``correlate_except(...)`` not naming it."""
    if sel._auto_correlate:
        return True

    def names(froms: Any) -> set[str]:
        return {str(getattr(f, "fullname", None) or getattr(f, "name", "")) for f in froms or ()}

    if name in names(sel._correlate):
        return True
    excepted = sel._correlate_except
    return bool(excepted) and name not in names(excepted)


def app_listener_after(orm_state: ORMExecuteState) -> bool:
    """Whether a ``do_orm_execute`` listener that is not sqlcache's runs after the one running now.

    A cache hit returns a result, and SQLAlchemy then skips the listeners after it: one that changes the
    statement (a global tenant filter adding ``with_loader_criteria``) would never see it, and the hit
    would answer the statement it did not change. ``_remaining_events`` is what ``invoke_statement``
    runs next."""
    return any(not getattr(fn, "sqlcache_listener", False) for fn in orm_state._remaining_events())


def app_listeners(session: Session) -> bool:
    """Whether the session has a ``do_orm_execute`` listener that is not sqlcache's (the direct path
    would skip it: Session.get answers instead)."""
    return any(not getattr(fn, "sqlcache_listener", False) for fn in session.dispatch.do_orm_execute)


def pending_autoflush(orm_state: ORMExecuteState) -> bool:
    """Whether SQLAlchemy will autoflush pending changes before running this statement (no public flag:
    ``Session._is_clean()`` and the load option ``_autoflush``)."""
    session = orm_state.session
    return bool(session.autoflush and orm_state.load_options._autoflush and not session._is_clean())


def refresh_of(orm_state: ORMExecuteState) -> tuple[Any, Any]:
    """(the state this load refreshes or None, the attributes it asks for or None): one call on the
    identity hit path."""
    state = orm_state.load_options._refresh_state
    if state is None:
        return None, None
    return state, getattr(orm_state.statement._compile_options, "_only_load_props", None)


def legacy_uniquing(orm_state: ORMExecuteState) -> bool:
    """A legacy ``Query``: its results unique entity rows by identity."""
    return bool(orm_state.load_options._legacy_uniquing)


def shard_token(orm_state: ORMExecuteState) -> Any:
    """The identity token of a horizontally sharded load (part of every key when present)."""
    return orm_state.load_options._identity_token


def cache_key(stmt: Any) -> Any:
    """SQLAlchemy's own cache key of a statement (its shape plus bound parameters), or None."""
    return stmt._generate_cache_key()


def statement_options(stmt: Any) -> Sequence[Any]:
    """The loader and user options of a statement (``Select._with_options``)."""
    return stmt._with_options or ()


def current_path(stmt: Any) -> Any:
    """The load path a lazy load's statement runs under (None for a top-level statement)."""
    return getattr(stmt._compile_options, "_current_path", None)


def path_registry(entity: Any) -> Any:
    """The root load path of a mapper or of an aliased entity."""
    return entity._path_registry


def type_is_unknown(type_: Any) -> bool:
    """NullType: SQLAlchemy does not know what the column's values are (``TypeEngine._isnull``)."""
    return bool(type_._isnull)


def from_objects(clause: Any, default: Any) -> Any:
    """The FROM objects a clause (an alias, a join used as a DML target) is made of."""
    return getattr(clause, "_from_objects", default)


def loader_criteria(loadopt: Any) -> Any:
    """Extra criteria a loader option carries (``lazyload(A.b.and_(...))``), or None."""
    return getattr(loadopt, "_extra_criteria", None) if loadopt is not None else None


def mapper_registries() -> list[Any]:
    """Every live ORM registry of the process (each declarative base has one): the MetaData of their
    tables is where FK actions into a written table may be declared. SQLAlchemy keeps them in a weak
    dictionary of its own, read under its configure mutex (as its ``_all_registries()`` does)."""
    with _mapperlib._CONFIGURE_MUTEX:
        return list(_mapperlib._mapper_registries)


def mapper_registry_count() -> int:
    """How many ORM registries are alive (cheap: the weak dictionary's length)."""
    return len(_mapperlib._mapper_registries)


# -- connections and sessions -------------------------------------------------------------------------


def current_transaction(session: Session) -> SessionTransaction | None:
    """The session's innermost transaction: during a flush, the flush's own (a subtransaction), or one
    begun inside it; ``session.get_transaction()`` answers the outermost only."""
    return session._transaction


def discriminator_columns(mapper: Mapper[Any]) -> frozenset[Any]:
    """The columns ``mapper``'s polymorphic discriminator is read from: ``polymorphic_on`` itself, or
    those of the SQL expression it is (a ``case()`` over columns, say); empty without one."""
    on = mapper.polymorphic_on
    return frozenset() if on is None else frozenset(e for e in iterate(on) if isinstance(e, Column))


def is_flushing(session: Session) -> bool:
    """True while the session's unit of work runs its statements, whose rows the mapper events name
    (no public flag exists). Not for the legacy bulk methods (``bulk_update_mappings``,
    ``bulk_insert_mappings``, ``bulk_save_objects``): they set ``_flushing`` too, but fire no mapper
    event, so their statements count as bulk writes. ``_warn_on_events`` is set around the unit of
    work's ``execute()`` only (1.4 and up)."""
    return bool(session._flushing and session._warn_on_events)


def is_flushing_or_bulk(session: Session) -> bool:
    """True from the start of a flush (before its unit-of-work window) and during a legacy ``bulk_*``
    method."""
    return bool(session._flushing)


def persistence_cache(mapper: Mapper[Any]) -> Any:
    """The statement cache SQLAlchemy's persistence runs ``mapper``'s hierarchy's unit-of-work INSERT,
    UPDATE and DELETE with (their ``compiled_cache`` execution option): its base mapper's."""
    return mapper.base_mapper._compiled_cache


def bound_connections(session: Session) -> list[Connection]:
    """The connections ``session`` is bound to (``Session(bind=conn)``, ``binds={...: conn}``): its
    transaction joins theirs, whose writes it sees before its own ``after_begin`` has fired."""
    out: list[Connection] = []
    bind = session.bind
    if isinstance(bind, Connection):
        out.append(bind)
    # ``Session.binds`` in 2.1, the private ``__binds`` before
    binds = getattr(session, "binds", None)
    if binds is None:
        binds = getattr(session, "_Session__binds", None)
    if binds:
        for b in binds.values():
            if isinstance(b, Connection) and b not in out:
                out.append(b)
    return out


def is_autocommit(conn: Connection) -> bool:
    """True if each statement commits on its own: SQLAlchemy's ``isolation_level="AUTOCOMMIT"``, or
    autocommit switched on in the driver itself (``connect_args={"autocommit": True}``), which
    SQLAlchemy does not know about: its COMMIT then commits nothing, and a connection closed without
    one "rolls back" statements the database already committed."""
    if conn._is_autocommit_isolation():
        return True
    return driver_autocommit(conn.connection.dbapi_connection)


def driver_autocommit(dbapi_connection: Any) -> bool:
    """Whether a DBAPI connection is in the driver's own autocommit mode (psycopg and psycopg2:
    ``autocommit``; PyMySQL: ``autocommit_mode``; mysqlclient: ``get_autocommit()``; sqlite3 from
    Python 3.12: ``autocommit``)."""
    if dbapi_connection is None:
        return False
    if getattr(dbapi_connection, "autocommit", None) is True:
        return True
    if getattr(dbapi_connection, "autocommit_mode", None) is True:
        return True
    get = getattr(dbapi_connection, "get_autocommit", None)
    if callable(get):
        try:
            return bool(get())
        except Exception:  # a closed connection's driver error: not ours to raise
            return False
    return False


# -- results ----------------------------------------------------------------------------------------

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


def with_attributes(result: Result[Any], single_entity: bool, filtered: bool | None = None) -> Result[Any]:
    """Mark a result as the ORM does, so that legacy ``Query`` returns entities, not one-item rows, and
    uniques the rows of any statement returning an entity (``filtered``: an entity among the columns)."""
    result._attributes = immutabledict(
        {"is_single_entity": single_entity, "filtered": single_entity if filtered is None else filtered}
    )
    return result


def take_unique_guard(result: Result[Any]) -> Any:
    """Lift the ORM's "unique() must be invoked" guard (a joined eager load of a collection) off a
    result before freezing it (freezing would trip it on rows of several columns, and drops it)."""
    guard = result._unique_filter_state
    result._unique_filter_state = None
    return guard


class _Uniquing:
    """Stands in for the ORM's QueryContext on a result sqlcache built or froze: SQLAlchemy 2.1's
    selectin loader reads ``result.context.requires_uniquing`` to choose between ``unique()`` and a raw
    read of the rows, and the raw read asserts that no unique() guard is set."""

    requires_uniquing = True


_UNIQUING = _Uniquing()


def require_unique(result: Result[Any], check: Callable[[Any], Any]) -> None:
    """Put the "unique() must be invoked" guard (``check``) on a result, as the ORM does, and say so
    where SQLAlchemy looks for it (``result.context``)."""
    result._unique_filter_state = (set(), check)
    if getattr(result, "context", None) is None:
        cast(Any, result).context = _UNIQUING


def is_instance(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a mapped class (not a Row)."""
    return hasattr(obj, "_sa_instance_state")


def frozen_single_entity(frozen: FrozenResult[Any]) -> bool:
    return bool((getattr(frozen, "_attributes", None) or {}).get("is_single_entity"))


def frozen_keys(frozen: FrozenResult[Any]) -> list[str]:
    """Column names of a frozen result, None for unnamed columns (``.keys`` drops those; typed as str
    as the rows layout stores them). Plain strings: a Core table's column names are ``quoted_name``
    (a str subclass the codec refuses)."""
    keys = getattr(frozen.metadata, "_keys", None) or frozen.metadata.keys
    return [k if k is None or type(k) is str else str(k) for k in keys]  # type: ignore[misc]


# -- building objects as a load does ------------------------------------------------------------------


def refresh_unloaded(shape: Shape, obj: Any, mask: int, values: Sequence[Any]) -> bool:
    """An object already in the identity map, found again by a hit: if none of its columns is loaded
    (all expired by a commit), it takes the entry's values, as from a database load; True if so.

    An object holding some columns keeps them and loads the others from the database on access: the
    entry may hold a newer version of the row than the loaded columns came from (another commit, or a
    repeatable-read snapshot), and one object must never mix two versions of its row.
    """
    dict_ = obj.__dict__
    state = instance_state(obj)
    if any(key in dict_ or key in state.committed_state for key in shape.keys):
        return False
    j = 0
    keys = []
    for i, key in enumerate(shape.keys):
        if mask >> i & 1:
            set_committed_value(obj, key, values[j])
            keys.append(key)
            j += 1
    if state.manager.dispatch.refresh:  # as after a reload from the database (ext.mutable listens)
        state.manager.dispatch.refresh(state, None, keys)
    return True


def build_one(session: Session, shape: Shape, mask: int, values: list[Any], runid: int) -> Any:
    """:func:`build_objects` for the one object of an identity entry (``values`` without the two
    trailers, no load options): the object the identity map held, or one built into it.

    The hot path of a direct ``cache.get`` hit: the same steps as build_objects' loop, without its
    setup for many objects of several shapes; what a failure half-built is taken back out."""
    identity_map: Any = session.identity_map
    if mask == shape.full_mask and len(shape.pk_positions) == 1:
        identity_key: tuple[Any, ...] = (shape.identity_class, (values[shape.pk_positions[0]],), None)
    else:
        identity_key = shape.identity_key(mask, values)
    states: dict[Any, Any] = identity_map._dict
    found = states.get(identity_key)
    if found is not None:
        existing = found.obj()
        if existing is not None:
            refresh_unloaded(shape, existing, mask, values)
            return existing
    manager = shape.mapper.class_manager
    cls: Any = manager.class_
    instance = cls.__new__(cls)
    state = manager._state_constructor(instance, manager)
    manager._state_setter(instance, state)
    state.key = identity_key
    state.session_id = session.hash_key
    state.runid = runid
    states[identity_key] = state
    state._instance_dict = identity_map._wr
    try:
        if mask == shape.full_mask:
            instance.__dict__.update(zip(shape.keys, values))  # noqa: B905
        else:
            _fill_partial(shape, state, state.dict, mask, values)
        load = manager.dispatch.load
        if load:
            load(state, None)
        loaded = session.dispatch.loaded_as_persistent
        if loaded:
            loaded(session, state)
    except BaseException:  # nothing half-built stays in the session
        identity_map.safe_discard(state)
        state.session_id = None
        state.key = None
        raise
    return instance


def build_objects(
    session: Session,
    shapes: Sequence[Shape | None],
    objects: list[list[Any]],
    load_options: tuple[Any, ...],
    load_path: Any,
    instances: list[Any],
    new: bytearray,
    runid: int,
) -> None:
    """Objects for validated ``[*values, shape index, mask]`` entries, appended to ``instances``, with
    ``new[n] = 1`` for each one built here (0: the identity map held it already).

    The hot loop of a hit, inlined on purpose (83 lines): per object one identity-key tuple, one
    instance and its state, nothing else that outlives the call; a helper call per object costs more
    than the loop's own work for small objects."""
    # What loading.py does per row, without the row: the identity map's own dict and weak reference
    # are used directly (WeakInstanceDict.get / _add_unpresent inlined; both are what loading.py calls)
    # and ClassManager.new_instance() is spelled out, to keep the state.
    identity_map: Any = session.identity_map
    states: dict[Any, Any] = identity_map._dict
    lookup = states.get
    wr = identity_map._wr
    hash_key = session.hash_key
    listeners = session.dispatch.loaded_as_persistent
    persistent_evt = listeners if listeners else None
    append = instances.append
    last_si = -1
    shape: Shape | None = None
    cls: Any = None
    ctor: Any = None
    setter: Any = None
    manager: Any = None
    load: Any = None
    keys: tuple[str, ...] = ()
    full_mask = -1
    pos = -1
    ic: Any = None
    for n, obj in enumerate(objects):
        si = obj[-2]
        if si != last_si:
            shape = shapes[si]
            assert shape is not None
            manager = shape.mapper.class_manager
            cls = manager.class_
            ctor = manager._state_constructor
            setter = manager._state_setter
            load = manager.dispatch.load if manager.dispatch.load else None
            keys = shape.keys
            full_mask = shape.full_mask
            pos = shape.pk_positions[0] if len(shape.pk_positions) == 1 else -1
            ic = shape.identity_class
            last_si = si
        assert shape is not None
        mask = obj[-1]
        full = mask == full_mask
        if full and pos >= 0:
            identity_key: tuple[Any, ...] = (ic, (obj[pos],), None)
        elif full:
            identity_key = (ic, tuple([obj[k] for k in shape.pk_positions]), None)
        else:
            identity_key = shape.identity_key(mask, obj)
        found = lookup(identity_key)
        if found is not None:
            existing = found.obj()
            if existing is not None:
                append(existing)
                refresh_unloaded(shape, existing, mask, obj)
                continue
        instance = cls.__new__(cls)
        state = ctor(instance, manager)
        setter(instance, state)
        state.key = identity_key
        state.session_id = hash_key
        state.runid = runid
        if load_options:
            state.load_options = load_options
        if load_path is not None:
            state.load_path = load_path
        states[identity_key] = state
        state._instance_dict = wr
        append(instance)
        new[n] = 1  # from here on, a failure takes it back out (discard_built)
        if full:
            # stops before the two trailers; no strict= (a keyword argument makes zip() much slower here)
            instance.__dict__.update(zip(keys, obj))  # noqa: B905
        else:
            _fill_partial(shape, state, state.dict, mask, obj)
        if load is not None:
            load(state, None)
        if persistent_evt is not None:
            persistent_evt(session, state)


def _fill_partial(
    shape: Shape, state: InstanceState[Any], dict_: dict[str, Any], mask: int, values: list[Any]
) -> None:
    j = 0
    expired = state.expired_attributes
    for i, key in enumerate(shape.keys):
        if mask >> i & 1:
            dict_[key] = values[j]
            j += 1
        elif not shape.deferred[i]:
            # a column the original load did not fetch (a subclass table): loads on access, as after
            # a polymorphic load of the base class
            expired.add(key)


def _strategy_class(name: str) -> Any:
    for candidate in ("_" + name, name):  # 2.1 name first, then 2.0's
        found = getattr(_strategies, candidate, None)
        if found is not None:
            return found
    raise ImportError(f"sqlalchemy.orm.strategies has no {name}: unsupported SQLAlchemy version")


# A load leaves a callable in ``state.callables`` for each attribute whose loader strategy differs from
# the mapper's default: raiseload(), lazyload() of an eagerly configured relationship, defer(...,
# raiseload=True). The callable classes are private (renamed with a leading underscore in 2.1).
LazyCallable: Any = _strategy_class("LoadLazyAttribute")
DeferredCallable: Any = _strategy_class("LoadDeferredColumns")


def lazy_strategy(prop: Any, kind: str) -> Any:
    """The relationship's loader strategy object for ``lazy=kind``."""
    return prop._get_strategy((("lazy", kind),))
