"""Every use of private SQLAlchemy API about statements, sessions, transactions and mappers, one small
function (or name) each, with the reason beside it (rebuilding results and objects: ``_sabuild``).

Checked against SQLAlchemy 2.0.x and 2.1.x (CI runs the suite on both);
tests/unit/test_sa_internals.py fails loudly if an upgrade moves any of them. Nothing else in the
package touches an underscored SQLAlchemy attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, util
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import loading as _loading
from sqlalchemy.orm import mapperlib as _mapperlib
from sqlalchemy.orm import strategies as _strategies
from sqlalchemy.sql import Select
from sqlalchemy.sql.visitors import iterate

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction


__all__ = [
    "BINARY",
    "DeferredCallable",
    "LazyCallable",
    "app_listener_after",
    "app_listeners",
    "autobegin",
    "autoflush",
    "bypasses_query_cache",
    "cache_key",
    "correlates",
    "current_path",
    "current_transaction",
    "discriminator_columns",
    "driver_autocommit",
    "from_objects",
    "is_autocommit",
    "is_flushing",
    "is_flushing_or_bulk",
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
    "shard_token",
    "statement_options",
    "type_is_unknown",
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
