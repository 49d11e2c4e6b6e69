"""Every private SQLAlchemy attribute sqlcache._sa and sqlcache._sabuild rely on exists in the
installed SQLAlchemy: an upgrade that moves one fails here, by name, instead of as a wrong answer
somewhere else."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select
from sqlalchemy import types as sqltypes
from sqlalchemy.orm import Session, joinedload

from sqlcache import _sa, _sabuild

from ..models import Base, Order, User


@pytest.fixture
def session() -> Any:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="a", email="a@x"))
        s.commit()
        yield s
    engine.dispose()


def test_statement_and_mapper_internals() -> None:
    """Select and Mapper attributes that pk_load, cache_key and the load paths read."""
    mapper = User.__mapper__
    assert len(mapper._get_clause) == 2
    stmt: Any = select(User).where(User.id == 1).options(joinedload(User.orders))
    for attr in (
        "_where_criteria",
        "_for_update_arg",
        "_with_options",
        "_limit_clause",
        "_order_by_clauses",
        "_setup_joins",
        "_compile_options",
    ):
        assert hasattr(stmt, attr), attr
    assert _sa.cache_key(stmt) is not None
    assert len(_sa.statement_options(stmt)) == 1
    assert _sa.current_path(stmt) is None or hasattr(_sa.current_path(stmt), "path")
    assert _sa.path_registry(mapper) is not None
    assert _sa.type_is_unknown(sqltypes.NullType()) and not _sa.type_is_unknown(sqltypes.Integer())
    assert issubclass(sqltypes.LargeBinary, _sa.BINARY)


def test_execution_internals(session: Session) -> None:
    """What the do_orm_execute hook reads off an ORMExecuteState, on a real Session.get."""
    seen: list[Any] = []

    def hook(orm_state: Any) -> None:
        seen.append(
            (
                _sa.pk_load(orm_state),
                _sa.bypasses_query_cache(orm_state),
                _sa.pending_autoflush(orm_state),
                _sa.refresh_of(orm_state),
                _sa.legacy_uniquing(orm_state),
                _sa.shard_token(orm_state),
            )
        )

    from sqlalchemy import event

    event.listen(session, "do_orm_execute", hook)
    session.expunge_all()
    session.get(User, 1)
    event.remove(session, "do_orm_execute", hook)
    (found, bypass, pending, refresh, legacy, shard) = seen[0]
    assert found is not None and found[1] == (1,)
    assert (bypass, pending, refresh, legacy, shard) == (False, False, (None, None), False, None)
    assert not _sa.is_flushing(session)
    assert _sa.bound_connections(session) == []
    flushing: list[bool] = []
    event.listen(User, "before_insert", lambda *_: flushing.append(_sa.is_flushing(session)))
    try:
        session.add(User(name="flushed"))
        session.flush()  # the unit of work: its rows are known by the mapper events
        session.bulk_insert_mappings(User, [{"name": "bulk"}])  # type: ignore[arg-type]  # no mapper event
    finally:
        session.rollback()
    assert flushing == [True]
    with session.get_bind().connect() as conn, Session(bind=conn, binds={User: conn}) as bound:
        assert _sa.bound_connections(bound) == [conn]
    assert not _sa.is_autocommit(session.connection())


def test_result_internals(session: Session) -> None:
    """The unique() guard, result attributes and frozen keys the hit path sets and reads."""
    result = session.execute(select(User, Order).outerjoin(Order))
    guard = _sabuild.take_unique_guard(result)
    frozen = result.freeze()
    assert _sabuild.frozen_keys(frozen) == ["User", "Order"]
    assert _sabuild.frozen_single_entity(frozen) is False
    out = frozen()
    _sabuild.require_unique(out, lambda row: row)
    assert guard is None or len(guard) == 2
    meta = _sabuild.result_metadata(["a"], lambda: [None])
    assert _sabuild.with_attributes(out, True)._attributes["is_single_entity"] is True
    assert list(meta.keys) == ["a"]


def test_object_building_internals(session: Session) -> None:
    """Identity map internals, state factory, load numbers and loader strategy classes."""
    identity_map: Any = session.identity_map
    assert isinstance(identity_map._dict, dict) and identity_map._wr is not None
    manager: Any = User.__mapper__.class_manager
    assert callable(manager._state_constructor) and callable(manager._state_setter)
    assert _sa.new_runid() < _sa.new_runid()
    user = session.get(User, 1)
    assert _sabuild.is_instance(user)
    prop = User.__mapper__.relationships["orders"]
    assert _sa.lazy_strategy(prop, "raise") is not None
    assert _sa.LazyCallable is not None and _sa.DeferredCallable is not None
    assert _sa.loader_criteria(None) is None


def test_translate_map_items_ignore_the_compilers_alias() -> None:
    """SQLAlchemy adds ``"_none"`` beside a ``None`` key of a schema_translate_map it rendered (in the
    caller's own dict): the map reads the same before and after."""
    from sqlalchemy import Column, Integer, MetaData, Table

    stm: dict[Any, Any] = {None: "tenant_a"}
    before = _sa.translate_map_items(stm)
    t = Table("t", MetaData(), Column("id", Integer, primary_key=True))
    engine = create_engine("sqlite://").execution_options(schema_translate_map=stm)
    with engine.connect() as c:
        c.exec_driver_sql("ATTACH ':memory:' AS tenant_a")
        t.create(c)
        c.execute(select(t)).all()
    engine.dispose()  # Python 3.13's sqlite3 warns about a connection left to the garbage collector
    assert _sa.translate_map_items(stm) == before
    assert _sa.translate_map_items({"_none": "x"}) == [("'_none'", "'x'")]


def test_autoflush_internals() -> None:
    """Session._is_clean() and Session._autoflush(), with which a direct read flushes pending changes
    first, as a query would; nothing when autoflush is off or nothing is pending."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine, tables=[User.__table__])
    with Session(engine) as s:
        assert not _sa.needs_autoflush(s)
        s.add(User(name="pending"))
        assert _sa.needs_autoflush(s)
        _sa.autoflush(s)
        assert not _sa.needs_autoflush(s) and not s.new
        s.add(User(name="other"))
        with s.no_autoflush:
            assert not _sa.needs_autoflush(s)
    engine.dispose()


def test_autobegin_internals() -> None:
    """Session._transaction, Session.autobegin and Session._autobegin_t(), with which a read refuses to
    run in a session that may not autobegin, as executing the statement would."""
    from sqlalchemy.exc import InvalidRequestError

    engine = create_engine("sqlite://")
    with Session(engine) as s:
        assert s._transaction is None and s.autobegin
        _sa.autobegin(s)  # may autobegin: left alone
        assert s._transaction is None
    with Session(engine, autobegin=False) as s:
        with pytest.raises(InvalidRequestError):
            _sa.autobegin(s)
        with s.begin():
            _sa.autobegin(s)  # a transaction is there: nothing to do
    engine.dispose()


def test_unit_of_work_statements_carry_their_base_mappers_cache() -> None:
    """The unit of work runs a hierarchy's INSERT, UPDATE and DELETE with the base mapper's statement
    cache in its execution options (what Registry.records_rows_of tells its statements by); a
    relationship's many-to-many rows and a mapper listener's statements carry none."""
    from sqlalchemy import event, update

    from ..models import Engineer, Tag

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def note(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if context.isinsert or context.isupdate or context.isdelete:
            table = context.compiled.statement.table.name
            seen.append((table, context.execution_options.get("compiled_cache")))

    def listener(mapper: Any, conn: Any, target: Any) -> None:
        conn.execute(update(User).where(User.id == target.id).values(email="from a listener"))

    event.listen(User, "after_insert", listener)
    try:
        with Session(engine) as s:
            u = User(id=1, name="a", tags=[Tag(id=1, label="t")])
            s.add_all([u, Engineer(id=1, name="e")])
            s.flush()
            u.name = "b"
            s.flush()
            s.delete(u)
            s.commit()
    finally:
        event.remove(User, "after_insert", listener)
    user_cache = _sa.persistence_cache(User.__mapper__)
    employee_cache = _sa.persistence_cache(Engineer.__mapper__)
    assert employee_cache is Engineer.__mapper__.base_mapper._compiled_cache
    assert employee_cache is not Engineer.__mapper__._compiled_cache
    by_table: dict[str, list[Any]] = {}
    for table, cache in seen:
        by_table.setdefault(table, []).append(cache)
    # the insert, the listener's update, the flushed update, the delete
    assert by_table["users"] == [user_cache, None, user_cache, user_cache]
    assert by_table["employees"] == by_table["engineers"] == [employee_cache]
    assert by_table["user_tags"] == [None, None]  # the secondary row's insert and delete
    engine.dispose()


def test_transactions_begun_in_a_flush() -> None:
    """The flush's own subtransaction is begun before the unit of work's window (is_flushing false at
    its after_transaction_create), current_transaction() is it during the window, and a bulk_* method
    a listener calls begins one inside it (is_flushing true): what Transactions.wrote_aside and
    wrote_beside rely on. Outside a flush, a bulk method's begins with is_flushing_or_bulk true."""
    from sqlalchemy import event

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    created: list[tuple[bool, bool, bool]] = []  # (is_flushing, is_flushing_or_bulk, has a parent)
    during: list[Any] = []

    def listener(mapper: Any, conn: Any, target: Any) -> None:
        s = _sa.current_transaction(session)
        during.append((s, s.parent if s is not None else None))
        session.bulk_update_mappings(User, [{"id": target.id, "name": "x"}])  # type: ignore[arg-type]

    with Session(engine) as session:
        session.get(User, 1)  # the root transaction begins
        event.listen(
            session,
            "after_transaction_create",
            lambda s, t: created.append(
                (_sa.is_flushing(s), _sa.is_flushing_or_bulk(s), t.parent is not None)
            ),
        )
        event.listen(User, "after_insert", listener)
        try:
            session.add(User(id=1, name="a"))
            session.flush()
        finally:
            event.remove(User, "after_insert", listener)
        ((flush_txn, root),) = during
        assert root is session.get_transaction() and flush_txn is not root
        # the flush's (a flush beginning: what Transactions.wrote_beside watches), then the bulk method's
        assert created == [(False, True, True), (True, True, True)]
        created.clear()
        session.bulk_update_mappings(User, [{"id": 1, "name": "y"}])  # type: ignore[arg-type]
        assert created == [(False, True, True)]
    engine.dispose()


def test_mapper_registries() -> None:
    """The weak dictionary of live ORM registries (and its mutex) that FkActions reads the MetaData of
    every declarative base from."""
    live = _sa.mapper_registries()
    assert Base.registry in live and _sa.mapper_registry_count() >= 1
    assert all(hasattr(r, "metadata") for r in live)


def test_listener_and_correlation_internals(session: Session) -> None:
    """The do_orm_execute listeners still to run (app_listener_after), and how a SELECT correlates
    (correlates): their answers, not just their names."""
    seen: list[bool] = []

    def first(orm_state: Any) -> None:
        seen.append(_sa.app_listener_after(orm_state))

    def second(orm_state: Any) -> None:
        pass

    event.listen(session, "do_orm_execute", first)
    event.listen(session, "do_orm_execute", second)
    try:
        assert _sa.app_listeners(session)
        session.execute(select(User))
    finally:
        event.remove(session, "do_orm_execute", first)
        event.remove(session, "do_orm_execute", second)
    assert seen == [True]
    count = select(func.count(Order.id))
    assert _sa.correlates(count, "users")
    assert not _sa.correlates(count.correlate(None), "users")
    assert not _sa.correlates(count.correlate_except(None), "users")
    assert _sa.correlates(count.correlate_except(Order), "users")
    assert not _sa.correlates(count.correlate(Order), "users")
