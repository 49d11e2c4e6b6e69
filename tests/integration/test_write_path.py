"""Write path: every way of writing through the attached engine invalidates what it wrote."""

from __future__ import annotations

import decimal
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    case,
    create_engine,
    delete,
    event,
    insert,
    pool,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SAWarning
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, Session, mapped_column, object_session, registry
from sqlalchemy.sql.expression import Executable, Insert

from sqlcache import SQLCache, cached, signals

from ..conftest import SQLCounter, shareable_url
from ..helpers import make_user
from ..models import Car, Employee, Engineer, Order, Tag, Truck, User, Vehicle, user_tags


# the same tables under classes of another registry: rows of a registered class's table written by an
# unregistered class, and a many-to-many association table that is also a registered class
class PlainUser:
    id: int
    name: str


class UserTagLink:
    user_id: int
    tag_id: int


class PlainEmployee:  # the employees/engineers tables without polymorphic loading
    id: int
    name: str


class PlainEngineer(PlainEmployee):
    language: str | None


class ExprVehicle:  # the vehicles table, its discriminator a SQL expression over the kind column
    id: int
    kind: str
    wheels: int
    payload: int | None


class ExprCar(ExprVehicle):
    pass


class ExprTruck(ExprVehicle):
    pass


_other = registry()
_other.map_imperatively(PlainUser, User.__table__)
_other.map_imperatively(UserTagLink, user_tags)
_other.map_imperatively(PlainEmployee, Employee.__table__)
_other.map_imperatively(PlainEngineer, Engineer.__table__, inherits=PlainEmployee)
_kind = Vehicle.__table__.c.kind
_other.map_imperatively(
    ExprVehicle,
    Vehicle.__table__,
    polymorphic_on=case((_kind == "car", "car"), (_kind == "truck", "truck"), else_="vehicle"),
    polymorphic_identity="vehicle",
)
_other.map_imperatively(ExprCar, inherits=ExprVehicle, polymorphic_identity="car")
_other.map_imperatively(ExprTruck, inherits=ExprVehicle, polymorphic_identity="truck")


def warm(engine: Engine, cls: type, pk: object) -> None:
    with Session(engine) as s:
        s.get(cls, pk)


def name_of(engine: Engine, uid: int) -> str | None:
    with Session(engine) as s:
        u = s.get(User, uid)
        return None if u is None else u.name


def make_users(engine: Engine, n: int = 3) -> list[int]:
    with Session(engine) as s:
        us = [User(name=f"u{i}") for i in range(n)]
        s.add_all(us)
        s.commit()
        return [u.id for u in us]


def test_orm_update_statement(engine: Engine, cache: SQLCache) -> None:
    """session.execute(update(User)...) invalidates every cached user."""
    cache.register(User)
    ids = make_users(engine)
    for i in ids:
        warm(engine, User, i)
    with Session(engine) as s:
        s.execute(update(User).where(User.id == ids[0]).values(name="changed"))
        s.commit()
    assert name_of(engine, ids[0]) == "changed"
    assert name_of(engine, ids[1]) == "u1"


def test_orm_bulk_update_by_pk_and_bulk_insert(engine: Engine, cache: SQLCache) -> None:
    """ORM bulk UPDATE by primary key and bulk INSERT invalidate their rows."""
    cache.register(User)
    ids = make_users(engine)
    warm(engine, User, ids[1])
    warm(engine, User, 9001)
    with Session(engine) as s:
        s.execute(update(User), [{"id": ids[1], "name": "bulk"}])
        s.execute(insert(User), [{"id": 9001, "name": "inserted"}])
        s.commit()
    assert name_of(engine, ids[1]) == "bulk"
    assert name_of(engine, 9001) == "inserted"


def test_core_connection_statements(engine: Engine, cache: SQLCache) -> None:
    """connection.execute(update/delete on the table) through the engine invalidates."""
    cache.register(User)
    ids = make_users(engine)
    for i in ids:
        warm(engine, User, i)
    users = User.__table__
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == ids[0]).values(name="core"))
        conn.execute(delete(users).where(users.c.id == ids[2]))
    assert name_of(engine, ids[0]) == "core"
    assert name_of(engine, ids[2]) is None


def test_text_sql_write_invalidates_everything(engine: Engine, cache: SQLCache) -> None:
    """A write in text SQL, whose table we do not parse, invalidates every entry."""
    cache.register(User)
    ids = make_users(engine)
    warm(engine, User, ids[0])
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET name = 'txt' WHERE id = :i"), {"i": ids[0]})
    assert name_of(engine, ids[0]) == "txt"


def test_database_cascade_delete(engine: Engine, cache: SQLCache) -> None:
    """ON DELETE CASCADE rows removed by the database are invalidated too."""
    cache.register(User)
    cache.register(Order)
    (uid,) = make_users(engine, 1)
    with Session(engine) as s:
        o = Order(user_id=uid, total=decimal.Decimal("3"))
        s.add(o)
        s.commit()
        oid = o.id
    warm(engine, Order, oid)
    with engine.begin() as conn:
        conn.execute(delete(User.__table__).where(User.__table__.c.id == uid))
    with Session(engine) as s:
        assert s.get(Order, oid) is None


def test_relationship_only_changes(engine: Engine, cache: SQLCache) -> None:
    """Moving an order to another user (collection change only) invalidates the order."""
    cache.register(Order)
    a, b = make_users(engine, 2)
    with Session(engine) as s:
        o = Order(user_id=a, total=decimal.Decimal("1"))
        s.add(o)
        s.commit()
        oid = o.id
    warm(engine, Order, oid)
    with Session(engine) as s:
        ub = s.get(User, b)
        ub.orders.append(order := s.get(Order, oid))  # moves it: a collection change only
        assert order.user is ub
        s.commit()
    with Session(engine) as s:
        assert s.get(Order, oid).user_id == b


def test_many_to_many_and_cascade_delete_orphan(engine: Engine, cache: SQLCache) -> None:
    """Association rows and delete-orphan cascades through the unit of work invalidate."""
    cache.register(Order)
    cache.register(Tag)
    (uid,) = make_users(engine, 1)
    with Session(engine) as s:
        u = s.get(User, uid)
        o = Order(total=decimal.Decimal("2"))
        u.orders.append(o)
        u.tags.append(Tag(label="x"))
        s.commit()
        oid = o.id
    warm(engine, Order, oid)
    with Session(engine) as s:
        u = s.get(User, uid)
        u.orders.clear()  # delete-orphan
        u.tags.clear()
        s.commit()
    with Session(engine) as s:
        assert s.get(Order, oid) is None
        assert s.scalars(select(user_tags.c.user_id)).all() == []


def test_rollback_leaves_cache_correct(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """Scenario 3: a transaction flushes, reads its own rows, rolls back; the cache never saw them."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)
    with Session(engine) as s:
        u = s.get(User, uid)
        u.name = "uncommitted"
        s.flush()
        s.expire_all()
        sql_count.reset()
        assert s.get(User, uid).name == "uncommitted"  # own write: from the database
        assert sql_count.selects() == 1
        s.add(User(id=4242, name="ghost"))
        s.flush()
        assert s.get(User, 4242).name == "ghost"
        s.rollback()
    assert name_of(engine, uid) == "u0"
    assert name_of(engine, 4242) is None
    assert cache.stats()["fills"] >= 1


def test_savepoint_rollback(engine: Engine, cache: SQLCache) -> None:
    """Writes in a rolled-back savepoint and a committed outer transaction leave correct entries."""
    cache.register(User)
    a, b = make_users(engine, 2)
    warm(engine, User, a)
    warm(engine, User, b)
    with Session(engine) as s:
        s.get(User, a).name = "outer"
        nested = s.begin_nested()
        s.get(User, b).name = "inner"
        s.flush()
        nested.rollback()
        s.commit()
    assert name_of(engine, a) == "outer"
    assert name_of(engine, b) == "u1"


def test_session_committing_nothing(engine: Engine, cache: SQLCache) -> None:
    """A session that commits without writing leaves entries valid and costs no Redis write."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)
    before = cache.stats()["invalidations"]
    with Session(engine) as s:
        s.get(User, uid)
        s.commit()
    assert cache.stats()["invalidations"] == before
    assert cache.stats()["hits"] >= 1


def test_own_writes_never_filled(engine: Engine, cache: SQLCache) -> None:
    """A transaction that wrote a table neither reads that table from the cache nor fills it."""
    cache.register(User)
    ids = make_users(engine, 2)
    fills = cache.stats()["fills"]
    with Session(engine) as s:
        s.execute(update(User).where(User.id == ids[0]).values(name="mine"))
        assert s.get(User, ids[1]).name == "u1"  # table written in bulk: database read, no fill
        assert cache.stats()["fills"] == fills
        s.rollback()
    assert name_of(engine, ids[0]) == "u0"


def test_autocommit_connection(engine: Engine, cache: SQLCache) -> None:
    """A statement on an AUTOCOMMIT connection, committed by the database at once, invalidates at once."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)
    users = User.__table__
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(users.update().where(users.c.id == uid).values(name="auto"))
        assert name_of(engine, uid) == "auto"


def test_primary_key_change(engine: Engine, cache: SQLCache) -> None:
    """Changing a row's primary key through the ORM invalidates both the old and the new key."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)
    warm(engine, User, uid + 1000)
    with Session(engine) as s:
        s.get(User, uid).id = uid + 1000
        s.commit()
    assert name_of(engine, uid) is None
    assert name_of(engine, uid + 1000) == "u0"


def test_huge_transaction_invalidates_its_tables_in_a_few_keys(engine: Engine, cache: SQLCache) -> None:
    """A commit of more rows than MAX_COMMIT_KEYS locks and releases its tables (two keys each), not one
    key per row: bounded scripts; every entry of those tables is still invalidated."""

    from sqlalchemy import select

    from sqlcache import cached
    from sqlcache._commit import MAX_COMMIT_KEYS

    cache.register(User)
    uid = make_user(engine)
    with Session(engine) as s:
        assert s.get(User, uid) is not None
        assert [u.name for u in s.scalars(select(User).options(cached()))] == ["ann"]
    sent: list[int] = []
    store: Any = cache.store
    original = store.send_lock

    def send_lock(clock: str, keys: Any, *args: Any) -> Any:
        sent.append(len(keys))
        return original(clock, keys, *args)

    store.send_lock = send_lock
    try:
        with Session(engine) as s:
            s.add_all(User(name=f"u{i}") for i in range(MAX_COMMIT_KEYS + 200))
            user = s.get(User, uid)
            assert user is not None
            user.name = "bob"
            s.commit()
    finally:
        store.send_lock = original
    assert sent and max(sent) <= 10 and cache.stats()["commits_coarsened"] == 1
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None and user.name == "bob"
        names = [u.name for u in s.scalars(select(User).where(User.id == uid).options(cached()))]
        assert names == ["bob"]


def test_driver_autocommit_invalidates_each_statement(engine: Engine, redis_url: str) -> None:
    """Autocommit switched on in the driver (connect_args), unknown to SQLAlchemy: a statement on a
    connection closed without commit() was committed by the database, and must be invalidated (the
    cache served the old row: SQLAlchemy's "rollback" had dropped the write record)."""
    import sys
    import uuid

    import pytest
    from sqlalchemy import create_engine

    from ..conftest import shareable_url

    if engine.dialect.name == "sqlite" and sys.version_info < (3, 12):
        pytest.skip("sqlite3's own autocommit attribute exists from Python 3.12")
    auto = create_engine(shareable_url(engine), connect_args={"autocommit": True})
    cache = SQLCache(redis_url, prefix=f"ac{uuid.uuid4().hex[:10]}")
    cache.strict_signals = True
    cache.register(User)
    cache.attach(auto)
    try:
        uid = make_user(auto, "v1")
        with Session(auto) as s:
            assert s.get(User, uid).name == "v1"  # cached
        with auto.connect() as c:
            c.execute(update(User).where(User.id == uid).values(name="v2"))  # no commit(): the driver did
        with Session(auto) as s:
            assert s.get(User, uid).name == "v2"
        with Session(auto) as s:
            user = s.get(User, uid)
            user.name = "v3"
            s.commit()
        with Session(auto) as s:
            assert s.get(User, uid).name == "v3"
    finally:
        cache.detach(auto)
        cache.clear()
        cache.close()
        auto.dispose()


def test_legacy_bulk_methods_invalidate_what_they_write(engine: Engine, cache: SQLCache) -> None:
    """Session.bulk_update_mappings, bulk_insert_mappings and bulk_save_objects run inside the
    session's flush flag but fire no mapper event: their statements count as bulk writes of their
    tables, so cached rows and cached absences are not served after the commit."""
    cache.register(User)
    ids = make_users(engine, 1)
    for pk in (ids[0], 9101, 9102):
        warm(engine, User, pk)  # rows, and absences (integer keys)
    with Session(engine) as s:
        s.bulk_update_mappings(User, [{"id": ids[0], "name": "mapped"}])  # type: ignore[arg-type]
        s.bulk_insert_mappings(User, [{"id": 9101, "name": "inserted"}])  # type: ignore[arg-type]
        s.commit()
    assert (name_of(engine, ids[0]), name_of(engine, 9101)) == ("mapped", "inserted")
    for pk in (ids[0], 9101):
        warm(engine, User, pk)
    with Session(engine) as s:
        u = s.get(User, ids[0])
        assert u is not None
        s.expunge(u)
        u.name = "saved"
        s.bulk_save_objects([u, User(id=9102, name="new")])  # an UPDATE (it has a key) and an INSERT
        s.commit()
    assert [name_of(engine, pk) for pk in (ids[0], 9102)] == ["saved", "new"]


class _RoutedToConnection(Session):
    """A Session whose get_bind() answers a Connection (routing written by the application)."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.routed_to = conn

    def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
        return self.routed_to


@pytest.mark.parametrize("joined", ["bind", "get_bind"])
def test_a_session_bound_to_a_connection_sees_its_writes_and_stores_none(
    engine: Engine, cache: SQLCache, joined: str
) -> None:
    """A Session bound to a Connection that wrote (Core, or another session's flush on it), by
    Session(bind=conn) or by its own get_bind() answering it, is in that transaction from its first
    read: it reads those rows from the database, never from Redis, fills nothing from them, and after
    a rollback nobody is served what was never committed."""

    def reader_on(conn: Any) -> Session:
        return Session(bind=conn) if joined == "bind" else _RoutedToConnection(conn)

    cache.register(User)
    ids = make_users(engine, 2)
    for pk in (*ids, 9201):
        warm(engine, User, pk)
    expected = ["uncommitted", "flushed", "uncommitted too"]
    with engine.connect() as conn:
        conn.execute(update(User).where(User.id == ids[0]).values(name="uncommitted"))
        conn.execute(insert(User).values(id=9201, name="uncommitted too"))
        with Session(bind=conn) as writer:
            u = writer.get(User, ids[1])
            assert u is not None
            u.name = "flushed"
            writer.flush()
            with reader_on(conn) as reader:
                assert [cache.get(reader, User, pk).name for pk in (*ids, 9201)] == expected
            with reader_on(conn) as reader:
                assert [u.name for u in cache.get_many(reader, User, [*ids, 9201])] == expected
            with reader_on(conn) as reader:
                assert [reader.get(User, pk).name for pk in (*ids, 9201)] == expected  # type: ignore[union-attr]
        conn.rollback()
    for _ in range(2):
        assert [name_of(engine, pk) for pk in (*ids, 9201)] == ["u0", "u1", None]


def test_a_session_routed_to_a_connection_since_closed_flushes(engine: Engine, cache: SQLCache) -> None:
    """A connection get_bind() answered for a read served from Redis (no transaction began, so none
    ended to forget it) and closed since: the session's next flush and commit on another connection
    neither trip over it nor lose their writes."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)
    with engine.connect() as first:
        session = _RoutedToConnection(first)
        assert session.get(User, uid) is not None  # a hit: routed to `first`, nothing began
    session.expunge_all()
    with engine.connect() as second:
        session.routed_to = second
        session.add(User(id=9601, name="added"))  # no read first: `first` is still on record
        session.flush()
        session.commit()
        second.commit()
    session.close()
    for _ in range(2):
        assert [name_of(engine, pk) for pk in (uid, 9601)] == ["u0", "added"]


def test_a_session_kept_alive_says_nothing_of_a_connection_it_gave_back(
    tmp_path: Path, redis_url: str
) -> None:
    """A session that used a pooled connection and gave it back, then flushes on another one: a Core
    UPDATE that meanwhile runs on the first connection (another thread's, here a listener's) is not
    that flush's work, and invalidates its table like any Core DML."""
    engine = create_engine(f"sqlite:///{tmp_path / 'kept.db'}", poolclass=pool.QueuePool)
    User.metadata.create_all(engine)
    cache = SQLCache(redis_url, prefix=f"kept{uuid.uuid4().hex[:8]}")
    cache.attach(engine)
    cache.register(User)
    other: Any = None

    def meanwhile(*_: Any) -> None:  # while kept's unit of work runs on its new connection
        other.execute(update(User).where(User.id == uid).values(name="new"))
        other.commit()

    try:
        uid = make_user(engine, "old")
        engine.dispose()
        kept = Session(engine)
        kept.get(Order, 1)
        kept.commit()  # its connection goes back to the pool; the session lives on
        other = engine.connect()  # the connection it gave back
        assert name_of(engine, uid) == "old"  # cached
        event.listen(Order, "before_insert", meanwhile)
        try:
            kept.add(Order(user_id=uid))
            kept.commit()
        finally:
            event.remove(Order, "before_insert", meanwhile)
        assert name_of(engine, uid) == "new"
        other.close()
        kept.close()
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()
        engine.dispose()


def commit_an_order_with(engine: Engine, uid: int, listener: Any) -> None:
    """Commit a new order of user ``uid``, with ``listener`` on Order's after_insert meanwhile."""
    event.listen(Order, "after_insert", listener)
    try:
        with Session(engine) as s:
            s.add(Order(user_id=uid, total=decimal.Decimal("3")))
            s.commit()
    finally:
        event.remove(Order, "after_insert", listener)


def test_statements_of_mapper_listeners_during_a_flush_invalidate_their_rows(
    engine: Engine, cache: SQLCache
) -> None:
    """A statement a mapper listener runs on the flush's connection (the pattern SQLAlchemy's docs show
    for counters and audit columns) is not the unit of work's: no mapper event names its rows, so it
    counts as a bulk write of its table."""
    cache.register(User)
    cache.register(Order)
    (uid,) = make_users(engine, 1)
    warm(engine, User, uid)

    def bump(mapper: Mapper[Any], conn: Any, target: Order) -> None:
        conn.execute(update(User).where(User.id == target.user_id).values(name="counted"))

    commit_an_order_with(engine, uid, bump)
    for _ in range(2):  # the database's row, then the entry filled from it
        assert name_of(engine, uid) == "counted"


def test_rows_written_through_an_unregistered_class_of_the_same_table(
    engine: Engine, cache: SQLCache
) -> None:
    """An unregistered class mapped to a registered class's table writes its rows without the events
    sqlcache records: its unit-of-work statements count as bulk writes of the table."""
    cache.register(User)
    (uid,) = make_users(engine, 1)
    for pk in (uid, 9301):
        warm(engine, User, pk)  # a row and an absence
    with Session(engine) as s:
        plain = s.get(PlainUser, uid)
        assert plain is not None
        plain.name = "through another class"
        new = PlainUser()
        new.id, new.name = 9301, "inserted through another class"
        s.add(new)
        s.commit()
    for _ in range(2):
        assert [name_of(engine, pk) for pk in (uid, 9301)] == [
            "through another class",
            "inserted through another class",
        ]


def test_many_to_many_rows_of_a_registered_association_class(engine: Engine, cache: SQLCache) -> None:
    """The secondary rows a relationship writes (dependency.py's own statements, no mapper event) are
    rows of a registered class too when its table is mapped: a cached absence does not outlive the
    insert, nor a cached row the delete."""
    cache.register(UserTagLink)
    (uid,) = make_users(engine, 1)
    with Session(engine) as s:
        tag = Tag(label="t")
        s.add(tag)
        s.commit()
        tid = tag.id

    def link_exists() -> bool:
        with Session(engine) as s:
            return s.get(UserTagLink, (uid, tid)) is not None

    for _ in range(2):
        assert not link_exists()  # the absence is cached
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None
        user.tags.append(s.get(Tag, tid))  # type: ignore[arg-type]
        s.commit()
    for _ in range(2):
        assert link_exists()
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None
        user.tags.clear()
        s.commit()
    for _ in range(2):
        assert not link_exists()


@pytest.mark.parametrize("through", ["flushing", "own"])
@pytest.mark.parametrize("how", ["orm_bulk_update", "legacy_bulk"])
def test_a_mapper_listeners_bulk_writes_through_the_session_during_a_flush(
    engine: Engine, cache: SQLCache, how: str, through: str
) -> None:
    """A listener that writes through the flushing session, or through a session of its own on the
    flush's connection: an ORM bulk UPDATE by primary key, or the legacy bulk_* methods, run
    SQLAlchemy's persistence code as the unit of work does, with no mapper event; the rest of that
    flush counts as bulk writes."""
    cache.register(User)
    cache.register(Order)
    (uid,) = make_users(engine, 1)
    for pk in (uid, 9501):
        warm(engine, User, pk)

    def write(mapper: Mapper[Any], conn: Any, target: Order) -> None:
        session = object_session(target) if through == "flushing" else Session(bind=conn)
        assert session is not None
        if how == "orm_bulk_update":
            session.execute(update(User), [{"id": uid, "name": "bulk"}])
        else:
            session.bulk_update_mappings(User, [{"id": uid, "name": "bulk"}])  # type: ignore[arg-type]
            session.bulk_insert_mappings(User, [{"id": 9501, "name": "bulk too"}])  # type: ignore[arg-type]

    commit_an_order_with(engine, uid, write)
    expected = ["bulk", None] if how == "orm_bulk_update" else ["bulk", "bulk too"]
    for _ in range(2):
        assert [name_of(engine, pk) for pk in (uid, 9501)] == expected


def test_rows_written_through_an_unregistered_class_of_a_registered_hierarchy(
    engine: Engine, cache: SQLCache
) -> None:
    """Only a subclass is registered. Its rows written through the unregistered base (loaded without
    polymorphic_on, or a discriminator changed through it) are recorded all the same, and so are the
    rows of another registered class on the same table (Employee, in another hierarchy). The signal
    names the registered classes' rows only, as listen() does in other processes."""
    cache.register(PlainEngineer)
    cache.register(Car)
    cache.register(Employee)
    reported: list[tuple[type, tuple[Any, ...]]] = []

    def note(sender: Any, identities: Any, **kw: Any) -> None:
        reported.extend(identities)

    def state() -> tuple[str | None, str | None, bool]:
        with Session(engine) as s:
            engineer, employee = s.get(PlainEngineer, eid), s.get(Employee, eid)
            return (
                None if engineer is None else engineer.name,
                None if employee is None else employee.name,
                s.get(Car, vid) is not None,
            )

    signals.invalidated.connect(note, sender=cache)
    try:
        with Session(engine) as s:
            eng = Engineer(name="old", language="py")
            vehicle = Vehicle(wheels=3)
            s.add_all([eng, vehicle])
            s.commit()
            eid, vid = eng.id, vehicle.id
        assert (Engineer, (eid,)) in reported  # a registered class (Employee's policy)
        assert (Vehicle, (vid,)) not in reported
        for _ in range(2):
            assert state() == ("old", "old", False)  # the engineer cached (twice), the car's absence too
        reported.clear()
        with Session(engine) as s:
            as_employee = s.get(PlainEmployee, eid)
            as_vehicle = s.get(Vehicle, vid)
            assert type(as_employee) is PlainEmployee and type(as_vehicle) is Vehicle
            as_employee.name = "new"
            as_vehicle.kind = "car"  # it is a Car from now on
            s.commit()
        assert reported == []  # invalidated, not reported (the tables are in the tags)
    finally:
        signals.invalidated.disconnect(note, sender=cache)
    for _ in range(2):
        assert state() == ("new", "new", True)


@pytest.mark.parametrize("discriminator", ["column", "expression"])
def test_repopulating_a_row_that_became_another_class(
    engine: Engine, cache: SQLCache, discriminator: str
) -> None:
    """An object whose discriminator is assigned (the row is another class's from then on): its entry is
    invalidated, never repopulated from the object, whose class the database no longer answers. The
    same when ``polymorphic_on`` is a SQL expression over the column."""
    base, car_cls, truck_cls = (
        (Vehicle, Car, Truck) if discriminator == "column" else (ExprVehicle, ExprCar, ExprTruck)
    )
    cache.register(base, mode="repopulate")
    with Session(engine) as s:
        car = Car(wheels=4, payload=5)
        s.add(car)
        s.commit()
        cid = car.id
    warm(engine, car_cls, cid)
    with Session(engine) as s:
        found = s.get(car_cls, cid)
        assert found is not None
        found.kind, found.wheels, found.payload = "truck", 6, 900  # every column: the whole new state known
        if discriminator == "column":
            with pytest.warns(SAWarning, match="polymorphic identity"):
                s.commit()
        else:
            s.commit()
    for _ in range(2):
        with Session(engine) as s:
            assert s.get(car_cls, cid) is None
            truck = s.get(base, cid)
            assert type(truck) is truck_cls and (truck.wheels, truck.payload) == (6, 900)


@pytest.mark.parametrize("lost", [True, False], ids=["connection_lost", "refused"])
def test_a_commit_that_raised(engine: Engine, cache: SQLCache, lost: bool) -> None:
    """A COMMIT that raised with its outcome unknown (the connection lost, as the dialect tells it) may
    still be applied by the database: a read in between goes to the database and fills nothing, and
    after the late COMMIT (played here by an engine the cache is not attached to, once the failed one
    rolled back) no read is served the old row. A COMMIT the database refused applied nothing: its
    locks go at once, and the row is cached again by the next read."""
    cache.register(User)
    writer_engine = create_engine(shareable_url(engine))  # a dialect of its own, to break
    plain = create_engine(shareable_url(engine))

    def commit_fails(dbapi_connection: object) -> None:
        raise writer_engine.dialect.loaded_dbapi.OperationalError("the COMMIT failed")

    writer_engine.dialect.do_commit = commit_fails  # type: ignore[method-assign]
    writer_engine.dialect.is_disconnect = lambda *_: lost  # type: ignore[method-assign]
    cache.attach(writer_engine)
    try:
        (uid,) = make_users(engine, 1)
        warm(engine, User, uid)
        with Session(writer_engine) as s:
            s.get(User, uid).name = "late"  # type: ignore[union-attr]
            with pytest.raises(DBAPIError):
                s.commit()
        writer_engine.dispose()  # the failed transaction's connection closed: nothing of it applied
        fills = cache.stats()["fills"]
        assert name_of(engine, uid) == "u0"  # from the database: nothing landed (yet)
        if not lost:
            assert cache.stats()["fills"] == fills + 1  # released: cached again
            return
        assert cache.stats()["fills"] == fills  # locked: not stored
        with plain.begin() as c:  # the COMMIT lands
            c.execute(update(User.__table__).where(User.__table__.c.id == uid).values(name="late"))
        assert [name_of(engine, uid) for _ in range(2)] == ["late", "late"]
    finally:
        cache.detach(writer_engine)
        writer_engine.dispose()
        plain.dispose()


# -- FK actions the database runs itself (ON DELETE / ON UPDATE CASCADE) -----------------------------
#
# Tables of their own, in two declarative bases (two MetaData): created on each database by the
# fk_tables fixture, emptied before each test.


class _FkBase(DeclarativeBase):
    pass


class _OtherBase(DeclarativeBase):  # another module's base: another MetaData
    pass


class Account(_FkBase):
    """A parent referenced by a key that is not its primary key, which an upsert may change."""

    __tablename__ = "fk_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(10), unique=True)


class Entry(_FkBase):
    """Follows its account's code (ON UPDATE CASCADE only)."""

    __tablename__ = "fk_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    code: Mapped[str | None] = mapped_column(String(10), ForeignKey("fk_accounts.code", onupdate="CASCADE"))


class Line(_FkBase):
    """Goes with its account (ON DELETE CASCADE only)."""

    __tablename__ = "fk_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("fk_accounts.id", ondelete="CASCADE"))


class Note(_OtherBase):
    """Goes with its account, declared in another MetaData."""

    __tablename__ = "fk_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    account_id: Mapped[int | None] = mapped_column(ForeignKey(Account.__table__.c.id, ondelete="CASCADE"))


class Badge(_FkBase):
    """A parent whose code resolves a conflict by REPLACE in SQLite (a plain INSERT may delete a row)."""

    __tablename__ = "fk_badges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(10), unique=True, sqlite_on_conflict_unique="REPLACE")


class Award(_FkBase):
    """Goes with its badge (ON DELETE CASCADE only)."""

    __tablename__ = "fk_awards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    badge_id: Mapped[int | None] = mapped_column(ForeignKey("fk_badges.id", ondelete="CASCADE"))


class Node(_FkBase):
    """A tree whose subtrees go with their root (a self-referencing ON DELETE CASCADE)."""

    __tablename__ = "fk_nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("fk_nodes.id", ondelete="CASCADE"))


class Replace(Insert):
    """MySQL / MariaDB REPLACE: an INSERT that first deletes the rows it conflicts with."""

    inherit_cache = True


@compiles(Replace)
def _replace(element: Replace, compiler: Any, **kw: Any) -> str:
    return "REPLACE" + compiler.visit_insert(element, **kw)[len("INSERT") :]


@pytest.fixture
def fk_tables(engine: Engine) -> Engine:
    """The tables above on ``engine``'s database, empty. Through an engine of its own: no cache sees these
    statements (so the test's own first statement on a table is the cache's first)."""
    plain = create_engine(shareable_url(engine))
    try:
        _FkBase.metadata.create_all(plain)
        _OtherBase.metadata.create_all(plain)
        with plain.begin() as c:
            for md in (_OtherBase.metadata, _FkBase.metadata):
                for table in reversed(md.sorted_tables):
                    c.execute(table.delete())
    finally:
        plain.dispose()
    return engine


def add_rows(engine: Engine, *rows: Any) -> None:
    with Session(engine) as s:
        for row in rows:
            s.add(row)
            s.flush()
        s.commit()


def cached_reads(engine: Engine, cls: Any, pk: int, column: Any) -> tuple[Any, list[Any]]:
    """The object ``cls`` ``pk`` (identity cache) and ``column`` of every row of its table (query cache)."""
    with Session(engine) as s:
        obj = s.get(cls, pk)
        got = (None if obj is None else getattr(obj, column.key), column)
        rows = s.scalars(select(column).order_by(column).options(cached())).all()
        return got[0], list(rows)


def assert_served_from_redis(engine: Engine, sql_count: SQLCounter, read: Any) -> Any:
    """``read()`` twice: the second is answered without SQL (so a stale entry would be served)."""
    first = read()
    sql_count.reset()
    assert read() == first and len(sql_count) == 0
    return first


def upsert_changing_code(engine: Engine) -> Executable:
    """An INSERT of account 1 that, conflicting on its primary key, updates its code to "z"."""
    if engine.dialect.name == "mysql":
        my = mysql.insert(Account).values(id=1, code="z")
        return my.on_duplicate_key_update(code=my.inserted.code)
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    up = dialect_insert(Account).values(id=1, code="z")
    return up.on_conflict_do_update(index_elements=["id"], set_={"code": up.excluded.code})


def test_an_upsert_changing_a_referenced_key_invalidates_the_rows_it_cascades_to(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """Review q, h7a: an INSERT ... ON CONFLICT DO UPDATE (PostgreSQL, SQLite) / ON DUPLICATE KEY UPDATE
    (MariaDB) that changes a referenced key reaches ON UPDATE CASCADE children, which were served
    stale: only UPDATE and DELETE statements were looked up for FK actions."""
    cache.register(Entry)
    add_rows(engine, Account(id=1, code="a"), Entry(id=1, code="a"))
    read = lambda: cached_reads(engine, Entry, 1, Entry.code)  # noqa: E731
    assert assert_served_from_redis(engine, sql_count, read) == ("a", ["a"])
    with Session(engine) as s:  # through the ORM session (an ORM-enabled INSERT)
        s.execute(upsert_changing_code(engine))
        s.commit()
    assert read() == ("z", ["z"])


def replacing_statements(engine: Engine) -> list[Executable]:
    """Statements that, conflicting with account 1's code or primary key, delete account 1."""
    accounts = Account.__table__
    if engine.dialect.name == "sqlite":
        return [
            insert(accounts).prefix_with("OR REPLACE").values(id=1, code="c"),
            update(accounts).prefix_with("OR REPLACE").where(accounts.c.id == 2).values(code="a"),
        ]
    if engine.dialect.name == "mysql":
        return [Replace(accounts).values(id=1, code="c"), Replace(accounts).values(id=2, code="a")]
    return []


def test_a_statement_replacing_a_referenced_row_invalidates_the_rows_it_cascades_to(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """Review q, h7b: SQLite INSERT OR REPLACE / UPDATE OR REPLACE and MariaDB REPLACE delete the row
    they conflict with, and so its ON DELETE CASCADE children, which were served stale."""
    statements = replacing_statements(engine)
    if not statements:
        pytest.skip("PostgreSQL has no INSERT or UPDATE that deletes the rows it conflicts with")
    cache.register(Line)
    read = lambda: cached_reads(engine, Line, 1, Line.id)  # noqa: E731
    for stmt in statements:
        with engine.begin() as c:
            c.execute(delete(Line))
            c.execute(delete(Account))
        add_rows(engine, Account(id=1, code="a"), Account(id=2, code="b"), Line(id=1, account_id=1))
        assert assert_served_from_redis(engine, sql_count, read) == (1, [1])
        with engine.begin() as c:  # through a Core connection
            c.execute(stmt)
        assert read() == (None, []), str(stmt.compile(engine))


def test_inserts_that_change_no_referenced_row_leave_the_children_cached(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """The unit of work's INSERTs of new parents (and plain Core ones, and an upsert that does nothing
    on a conflict) cannot reach a child: the children's entries stay."""
    cache.register(Entry)
    cache.register(Line)
    add_rows(engine, Account(id=1, code="a"), Entry(id=1, code="a"), Line(id=1, account_id=1))
    entry = lambda: cached_reads(engine, Entry, 1, Entry.code)  # noqa: E731
    line = lambda: cached_reads(engine, Line, 1, Line.id)  # noqa: E731
    assert assert_served_from_redis(engine, sql_count, entry) == ("a", ["a"])
    assert assert_served_from_redis(engine, sql_count, line) == (1, [1])
    add_rows(engine, Account(id=2, code="b"))
    with engine.begin() as c:
        c.execute(insert(Account), [{"id": 3, "code": "c"}, {"id": 4, "code": "d"}])
        if engine.dialect.name != "mysql":
            dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
            c.execute(dialect_insert(Account).values(id=1, code="q").on_conflict_do_nothing())
    sql_count.reset()
    assert (entry(), line()) == (("a", ["a"]), (1, [1]))
    assert len(sql_count) == 0


@pytest.mark.parametrize("how", ["delete", "update"])
def test_an_orm_statement_on_a_parent_invalidates_the_rows_it_cascades_to(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter, how: str
) -> None:
    """An ORM-enabled DELETE / UPDATE (``session.execute(delete(Account)...)``) names an annotated copy of
    its table, which the FK lookup compared by identity: the ON DELETE / ON UPDATE CASCADE children
    were served stale (pre-existing)."""
    cache.register(Entry)
    cache.register(Line)
    add_rows(engine, Account(id=1, code="a"), Entry(id=1, code="a"), Line(id=1, account_id=1))
    entry = lambda: cached_reads(engine, Entry, 1, Entry.code)  # noqa: E731
    line = lambda: cached_reads(engine, Line, 1, Line.id)  # noqa: E731
    assert assert_served_from_redis(engine, sql_count, entry) == ("a", ["a"])
    assert assert_served_from_redis(engine, sql_count, line) == (1, [1])
    with Session(engine) as s:
        if how == "delete":
            s.execute(delete(Entry))  # no ON DELETE action: it would refuse
            s.execute(delete(Account).where(Account.id == 1))
        else:
            s.execute(update(Account).where(Account.id == 1).values(code="b"))
        s.commit()
    assert line() == ((None, []) if how == "delete" else (1, [1]))
    assert entry() == ((None, []) if how == "delete" else ("b", ["b"]))


def test_a_plain_insert_into_a_table_that_replaces_on_conflict_invalidates_the_rows_it_cascades_to(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """A SQLite table whose unique constraint says ON CONFLICT REPLACE (``sqlite_on_conflict_unique``)
    turns a plain INSERT, the unit of work's too, into one that deletes the row it conflicts with."""
    if engine.dialect.name != "sqlite":
        pytest.skip("ON CONFLICT REPLACE in a table's constraint is SQLite's")
    cache.register(Award)
    add_rows(engine, Badge(id=1, code="a"), Award(id=1, badge_id=1))
    read = lambda: cached_reads(engine, Award, 1, Award.id)  # noqa: E731
    assert assert_served_from_redis(engine, sql_count, read) == (1, [1])
    add_rows(engine, Badge(id=2, code="a"))  # SQLite deletes badge 1, and so award 1
    assert read() == (None, [])


@pytest.mark.parametrize("reader", ["same_cache", "another_process"])
def test_a_cascade_into_a_table_of_another_metadata(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter, redis_url: str, reader: str
) -> None:
    """Review q, h8: FK actions were searched in the written table's own MetaData only, so a child
    declared in another one (another declarative base) was served stale after its parent's DELETE.
    ``another_process``: the rows are written and read through another cache and engine (as another
    process would), so the deleting cache never saw the child's table at all."""
    other: SQLCache | None = None
    other_engine: Engine | None = None
    if reader == "another_process":
        other = SQLCache(redis_url, prefix=cache.config.prefix, default_ttl=600)
        other_engine = create_engine(shareable_url(engine))
        other.attach(other_engine)
        read_with, read_engine = other, other_engine
    else:
        read_with, read_engine = cache, engine
    try:
        read_with.register(Note)
        add_rows(read_engine, Account(id=1, code="a"), Note(id=1, account_id=1))
        read = lambda: cached_reads(read_engine, Note, 1, Note.id)  # noqa: E731
        assert assert_served_from_redis(engine, sql_count, read) == (1, [1])
        with engine.begin() as c:  # the database deletes the note too
            c.execute(delete(Account.__table__).where(Account.__table__.c.id == 1))
        assert read() == (None, [])
    finally:
        if other is not None and other_engine is not None:
            other.detach(other_engine)
            other.close()
            other_engine.dispose()


def test_a_child_table_declared_after_the_first_write_to_its_parent(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """Review q, h8: the FK actions of a table were worked out once, at its first write: a child
    declared afterwards (a module imported later) was never searched."""
    with engine.begin() as c:  # the cache works out what a DELETE of accounts reaches
        c.execute(delete(Account.__table__).where(Account.__table__.c.id == 0))
    md = _OtherBase.metadata  # a MetaData the cache searches already (a declarative base's)
    late = Table(
        f"fk_late_{uuid.uuid4().hex[:8]}",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("account_id", ForeignKey(Account.__table__.c.id, ondelete="CASCADE")),
    )
    plain = create_engine(shareable_url(engine))
    try:
        late.create(plain)
        add_rows(engine, Account(id=1, code="a"))
        with plain.begin() as c:
            c.execute(insert(late).values(id=1, account_id=1))

        def read() -> list[int]:
            with Session(engine) as s:  # labelled: a bare column of an unmapped table is not stored
                return list(s.scalars(select(late.c.id.label("late_id")).options(cached())))

        assert read() == [1]
        sql_count.reset()
        assert read() == [1] and len(sql_count) == 0
        with engine.begin() as c:
            c.execute(delete(Account.__table__).where(Account.__table__.c.id == 1))
        assert read() == []
    finally:
        late.drop(plain, checkfirst=True)
        md.remove(late)
        plain.dispose()


def test_the_unit_of_work_deleting_a_row_whose_own_table_cascades(
    engine: Engine, cache: SQLCache, fk_tables: Engine, sql_count: SQLCounter
) -> None:
    """The unit of work deletes a node; the database deletes its subtree, rows of the same table no
    statement names. Their entries were served: the written table itself was left out of what its FK
    actions reach, and the unit of work's statement names only its own row (pre-existing)."""
    cache.register(Node)
    add_rows(engine, Node(id=1), Node(id=2, parent_id=1), Node(id=3, parent_id=2), Node(id=4))
    read = lambda: cached_reads(engine, Node, 3, Node.id)  # noqa: E731
    assert assert_served_from_redis(engine, sql_count, read) == (3, [1, 2, 3, 4])
    with Session(engine) as s:
        s.delete(s.get(Node, 1))  # no relationship: the ORM deletes node 1 only
        s.commit()
    assert read() == (None, [4])


def test_a_data_modifying_cte_inside_dml_is_a_write_of_its_table(engine: Engine, cache: SQLCache) -> None:
    """PostgreSQL's ``WITH gone AS (DELETE ... RETURNING id) INSERT INTO ... SELECT id FROM gone``: the
    rows the CTE deletes are written too, not only the INSERT's target."""
    if engine.dialect.name != "postgresql":
        pytest.skip("data-modifying CTEs are PostgreSQL's")
    log = Table("cte_log", MetaData(), Column("id", Integer))
    log.create(engine)  # DDL moves everything: before the entries are filled
    cache.register(User)
    first, second = make_user(engine, "one"), make_user(engine, "two")
    users = User.__table__
    query = select(User.name).order_by(User.id).options(cached())
    try:
        for _ in range(2):
            with Session(engine) as s:
                assert s.get(User, first) is not None
                assert s.scalars(query).all() == ["one", "two"]
        gone = delete(users).where(users.c.id == first).returning(users.c.id).cte("gone")
        with engine.begin() as conn:
            conn.execute(insert(log).from_select(["id"], select(gone.c.id)))
        with Session(engine) as s:
            assert s.get(User, first) is None
            assert s.get(User, second) is not None
            assert s.scalars(query).all() == ["two"]
    finally:
        log.drop(engine)
