"""What a cached read depends on is what it read: tables named only in SQL text, lightweight tables,
the SQL eager loads and subclass loads run, column_property subqueries; application
``do_orm_execute`` listeners; statements that differ only in what they render.

Each test first makes the read a hit, then commits a write that changes its answer, then reads again:
the answer must be the database's. Each fails on sqlcache before these fixes (served the old answer).
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
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
    column,
    create_engine,
    event,
    func,
    join,
    literal_column,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    column_property,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
    subqueryload,
    with_loader_criteria,
)

from sqlcache import SQLCache, cached
from sqlcache.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]


class DepBase(DeclarativeBase):
    pass


class Review(DepBase):
    __tablename__ = "dep_reviews"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    book_id: Mapped[int] = mapped_column(ForeignKey("dep_books.id"))


class Flag(DepBase):
    __tablename__ = "dep_flags"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    book_id: Mapped[int] = mapped_column(ForeignKey("dep_books.id"))


class Book(DepBase):
    __tablename__ = "dep_books"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    author_id: Mapped[int] = mapped_column(ForeignKey("dep_authors.id"))
    title: Mapped[str] = mapped_column(String(40))
    # loaded with the row: a scalar subquery over another table
    reviews = column_property(
        select(func.count(Review.id)).where(Review.book_id == id).correlate_except(Review).scalar_subquery()
    )


class Shelf(DepBase):
    __tablename__ = "dep_shelves"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    book_id: Mapped[int] = mapped_column(ForeignKey("dep_books.id"))


placements = Table(
    "dep_placements",
    DepBase.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("author_id", ForeignKey("dep_authors.id")),
    Column("shelf_id", ForeignKey("dep_shelves.id")),
)


class Author(DepBase):
    __tablename__ = "dep_authors"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    books: Mapped[list[Book]] = relationship(order_by=Book.id)
    # a primaryjoin that reads a third table
    flagged: Mapped[list[Book]] = relationship(
        primaryjoin=lambda: (Author.id == Book.author_id) & Book.id.in_(select(Flag.book_id)),
        order_by=Book.id,
        viewonly=True,
    )
    # a secondary that is a join of two tables
    shelved: Mapped[list[Book]] = relationship(
        secondary=join(placements, Shelf.__table__, placements.c.shelf_id == Shelf.id),
        primaryjoin=lambda: Author.id == placements.c.author_id,
        secondaryjoin=lambda: Shelf.book_id == Book.id,
        order_by=Book.id,
        viewonly=True,
    )


class Staff(DepBase):
    __tablename__ = "dep_staff"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "staff"}


class Coder(Staff):
    __tablename__ = "dep_coders"
    id: Mapped[int] = mapped_column(ForeignKey("dep_staff.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    # its columns come from a second SELECT of this table only
    __mapper_args__ = {"polymorphic_identity": "coder", "polymorphic_load": "selectin"}


class Player(DepBase):
    __tablename__ = "dep_players"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    team: Mapped[int]


_mate = aliased(Player)
# loaded with the row, over the row's own table (another alias of it): every player of the team
Player.team_size = column_property(  # type: ignore[attr-defined]
    select(func.count(_mate.id)).where(_mate.team == Player.team).scalar_subquery()
)


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    DepBase.metadata.drop_all(engine)
    DepBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Author(id=1, name="a"), Author(id=2, name="b")])
        s.flush()
        s.add_all([Book(id=10, author_id=1, title="t10"), Book(id=11, author_id=1, title="t11")])
        s.flush()
        s.add_all([Shelf(id=1, book_id=10), Shelf(id=2, book_id=11), Coder(id=1, language="py")])
        s.flush()
        s.execute(placements.insert().values(id=1, author_id=1, shelf_id=1))
        s.commit()
    yield engine
    DepBase.metadata.drop_all(engine)


def fresh(engine: Engine, cache: SQLCache, stmt: Any, extract: Callable[[Any], Any], write: Any) -> None:
    """``stmt`` with cached(), read until it is a hit, then ``write`` committed: the cached read answers
    what the same statement without the cache answers."""
    for _ in range(3):
        with Session(engine) as s:
            extract(s.execute(stmt.options(cached())))
    with Session(engine) as s:
        write(s)
        s.commit()
    with Session(engine) as s:
        got = extract(s.execute(stmt.options(cached())))
    with Session(engine) as s:
        want = extract(s.execute(stmt))
    assert got == want


def rows(result: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in result]


def test_sql_text_is_not_cached(db: Engine, cache: SQLCache) -> None:
    """A statement holding SQL text reads tables nobody can name: it is never served from Redis."""
    counts = select(Author.id, literal_column("(SELECT count(*) FROM dep_books)").label("n")).order_by(
        Author.id
    )
    fresh(db, cache, counts, rows, lambda s: s.add(Book(id=12, author_id=2, title="t12")))
    where = select(Author.name).where(
        text("dep_authors.id IN (SELECT author_id FROM dep_flags f JOIN dep_books b ON b.id = f.book_id)")
    )
    fresh(db, cache, where, rows, lambda s: s.add(Flag(id=1, book_id=10)))
    from_text = select(func.count()).select_from(text("dep_flags"))
    fresh(db, cache, from_text, rows, lambda s: s.add(Flag(id=2, book_id=11)))
    bypassed = cache.stats()["bypassed"]
    with Session(db) as s:
        s.execute(from_text.options(cached())).all()
    assert cache.stats()["bypassed"] == bypassed + 1


def test_a_lightweight_table_is_a_dependency_by_its_name(db: Engine, cache: SQLCache) -> None:
    """``table("dep_authors", column("name"))``: cached, and invalidated by writes of that table."""
    light = table("dep_authors", column("id"), column("name"))
    stmt = select(light.c.name).order_by(light.c.id)
    fresh(db, cache, stmt, rows, lambda s: s.execute(update(Author).where(Author.id == 1).values(name="x")))
    hits = cache.stats()["hits"]
    with Session(db) as s:
        assert rows(s.execute(stmt.options(cached()))) == [("x",), ("b",)]
    assert cache.stats()["hits"] == hits + 1  # cached again


def by_author(attr: str) -> Callable[[Any], list[list[Any]]]:
    return lambda result: [[(b.id, b.reviews) for b in getattr(a, attr)] for a in result.scalars()]


@pytest.mark.parametrize(
    ("what", "stmt", "attr", "write"),
    [
        (
            "loader criteria reading another table",
            lambda: select(Author).options(
                selectinload(Author.books.and_(Book.id.in_(select(Flag.book_id))))
            ),
            "books",
            lambda s: s.add(Flag(id=1, book_id=10)),
        ),
        (
            "a column_property of the loaded class",
            lambda: select(Author).options(subqueryload(Author.books)),
            "books",
            lambda s: s.add(Review(id=1, book_id=10)),
        ),
        (
            "a primaryjoin reading a third table",
            lambda: select(Author).options(selectinload(Author.flagged)),
            "flagged",
            lambda s: s.add(Flag(id=1, book_id=11)),
        ),
        (
            "a secondary that is a join",
            lambda: select(Author).options(selectinload(Author.shelved)),
            "shelved",
            lambda s: s.execute(placements.insert().values(id=2, author_id=1, shelf_id=2)),
        ),
    ],
    ids=["criteria", "column_property", "primaryjoin", "secondary_join"],
)
def test_eager_loads_depend_on_the_sql_they_ran(
    db: Engine, cache: SQLCache, what: str, stmt: Callable[[], Any], attr: str, write: Any
) -> None:
    fresh(db, cache, stmt().order_by(Author.id), by_author(attr), write)


def test_a_subclass_loaded_by_a_second_select(db: Engine, cache: SQLCache) -> None:
    """polymorphic_load="selectin": the subclass's table is read by a SELECT of its own."""

    def write(s: Session) -> None:
        coder = s.get(Coder, 1)
        assert coder is not None
        coder.language = "rust"  # an UPDATE of dep_coders only

    fresh(db, cache, select(Staff), lambda r: [c.language for c in r.scalars()], write)


def test_identity_entries_depend_on_what_their_columns_read(db: Engine, cache: SQLCache) -> None:
    """A column_property's subquery is loaded with the row: Session.get and cache.get follow its table."""
    cache.register(Book)

    def reviews(s: Session) -> list[int]:
        book = s.get(Book, 10)
        direct = cache.get(s, Book, 11)
        assert book is not None and direct is not None
        return [book.reviews, direct.reviews]

    for _ in range(2):
        with Session(db) as s:
            assert reviews(s) == [0, 0]
    with Session(db) as s:
        s.add_all([Review(id=1, book_id=10), Review(id=2, book_id=11)])
        s.commit()
    with Session(db) as s:
        assert reviews(s) == [1, 1]
    with Session(db) as s:
        s.add(Review(id=3, book_id=10))
        assert reviews(s) == [2, 1]  # this transaction's own write: the database answers


def test_identity_entries_depend_on_their_own_table_read_under_an_alias(db: Engine, cache: SQLCache) -> None:
    """A column_property counting the row's own table (another alias of it): a write of another row
    changes it, and invalidates it. A correlated subquery (Book.reviews) does not make the row's table a
    dependency of every entry."""
    cache.register(Player)
    with Session(db) as s:
        s.add_all([Player(id=1, team=7), Player(id=2, team=7)])
        s.commit()

    def sizes(s: Session) -> list[int]:
        return [s.get(Player, 1).team_size, cache.get(s, Player, 2).team_size]  # type: ignore[union-attr]

    for _ in range(2):
        with Session(db) as s:
            assert sizes(s) == [2, 2]
    with Session(db) as s:
        s.add(Player(id=3, team=7))
        s.commit()
    with Session(db) as s:
        assert sizes(s) == [3, 3]
    cache.register(Book)
    from sqlcache._hierarchy import hierarchy_for

    assert hierarchy_for(Player.__mapper__).reads == ("dep_players",)
    assert hierarchy_for(Book.__mapper__).reads == ("dep_reviews",)


def test_a_column_property_of_sql_text_is_refused_at_register(redis_url: str) -> None:
    class TextBase(DeclarativeBase):
        pass

    class Counted(TextBase):
        __tablename__ = "dep_counted"
        id: Mapped[int] = mapped_column(primary_key=True)
        n = column_property(literal_column("(SELECT count(*) FROM dep_books)", Integer))
        later = column_property(literal_column("(SELECT 1)", Integer), deferred=True)

    cache = SQLCache(redis_url, prefix=f"txt{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(ConfigurationError, match=r"Counted\.n is SQL text"):
            cache.register(Counted)
    finally:
        cache.close()


def test_two_table_objects_of_one_table_do_not_share_entries(db: Engine, cache: SQLCache) -> None:
    """The same table declared twice (columns in another order, a subset): each select(table) has its
    own entry."""
    other = Table(
        "dep_authors", MetaData(), Column("name", String(40)), Column("id", Integer, primary_key=True)
    )
    only_id = Table("dep_authors", MetaData(), Column("id", Integer, primary_key=True))
    mapped = Author.__table__
    for _ in range(2):
        with Session(db) as s:
            first = rows(s.execute(select(mapped).order_by(mapped.c.id).options(cached())))
            second = rows(s.execute(select(other).order_by(other.c.id).options(cached())))
            third = rows(s.execute(select(only_id).order_by(only_id.c.id).options(cached())))
            assert first == [(1, "a"), (2, "b")]
            assert second == [("a", 1), ("b", 2)]
            assert third == [(1,), (2,)]


def test_custom_operators_are_keyed_by_what_they_render(db: Engine, cache: SQLCache) -> None:
    def value(op: str) -> Any:
        with Session(db) as s:
            return s.scalar(select(Author.id.op(op)(10)).where(Author.id == 2).options(cached()))

    for _ in range(2):
        assert [value("+"), value("-"), value("*")] == [12, -8, 20]


tenant: contextvars.ContextVar[int] = contextvars.ContextVar("tenant")


def only_this_tenant(orm_state: Any) -> None:
    """SQLAlchemy's global-filter recipe: every SELECT sees only the current tenant's authors."""
    if orm_state.is_select:
        orm_state.statement = orm_state.statement.options(
            with_loader_criteria(Author, Author.id == tenant.get(), include_aliases=True)
        )


def test_a_listener_registered_after_attach_is_never_skipped(db: Engine, cache: SQLCache) -> None:
    """A hit returns before the listeners after sqlcache's run: one that changes the statement (a
    tenant filter) would be skipped, and another tenant's rows served. Such reads are not cached."""
    cache.register(Author)
    tenants = sessionmaker(db)
    event.listen(tenants, "do_orm_execute", only_this_tenant)
    try:
        for who in (1, 2, 1, 2):  # the other tenant's reads after each's fill
            tenant.set(who)
            with tenants() as s:
                assert [a.id for a in s.scalars(select(Author).options(cached()))] == [who]
                other = 3 - who
                assert s.get(Author, other) is None
                assert cache.get(s, Author, other) is None
                assert [a and a.id for a in cache.get_many(s, Author, [1, 2])] == [
                    1 if who == 1 else None,
                    2 if who == 2 else None,
                ]
    finally:
        event.remove(tenants, "do_orm_execute", only_this_tenant)


def test_a_listener_registered_before_attach_is_keyed(tmp_path: Path, redis_url: str) -> None:
    """Listeners that run before sqlcache's change the statement it keys: each tenant its own entry,
    and hits. In a fresh interpreter: sqlcache's listener, once installed on the Session class, stays
    installed (emptied) when a cache detaches, so in this process any listener is now "after" it."""
    script = f"""
import contextvars, sys
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import sessionmaker, with_loader_criteria
from sqlcache import SQLCache, cached
from tests.integration.test_query_reads import Author, DepBase, only_this_tenant, tenant
engine = create_engine({f"sqlite:///{tmp_path / 'tenants.db'}"!r})
DepBase.metadata.create_all(engine)
tenants = sessionmaker(engine)
event.listen(tenants, "do_orm_execute", only_this_tenant)
cache = SQLCache({redis_url!r}, prefix={f"ten{uuid.uuid4().hex[:8]}"!r})
cache.attach(engine)
with tenants() as s:
    s.add_all([Author(id=1, name="a"), Author(id=2, name="b")])
    s.commit()
seen = []
for who in (1, 2, 1, 2):
    tenant.set(who)
    with tenants() as s:
        seen.append([a.id for a in s.scalars(select(Author).options(cached()))])
print(seen, cache.stats()["hits"])
cache.clear()
cache.close()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[[1], [2], [1], [2]] 2"


def test_reads_of_an_engine_not_attached_are_left_alone(
    tmp_path: Path, cache: SQLCache, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener on sessions of an engine the cache is not attached to: sqlcache has nothing to say
    about their reads (no bypass counted, no warning)."""
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    DepBase.metadata.create_all(other)
    cache.register(Author)
    sessions = sessionmaker(other)
    event.listen(sessions, "do_orm_execute", only_this_tenant)
    tenant.set(1)
    try:
        before = cache.stats()["bypassed"]
        with sessions() as s:
            s.add(Author(id=1, name="a"))
            s.commit()
            assert s.get(Author, 1) is not None
            assert [a.id for a in s.scalars(select(Author).options(cached()))] == [1]
        assert cache.stats()["bypassed"] == before
        assert "runs after sqlcache's" not in caplog.text
    finally:
        event.remove(sessions, "do_orm_execute", only_this_tenant)
        other.dispose()


def test_a_subclass_with_a_column_of_sql_text_mapped_after_register(tmp_path: Path, redis_url: str) -> None:
    """register() refuses a column of SQL text; a subclass that brings one later (another module
    imported afterwards) breaks no write or read: that hierarchy is simply not cached any more."""

    class LateBase(DeclarativeBase):
        pass

    class Emp(LateBase):
        __tablename__ = "dep_emp"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(10))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "emp"}

    engine = create_engine(f"sqlite:///{tmp_path / 'late.db'}")
    cache = SQLCache(redis_url, prefix=f"late{uuid.uuid4().hex[:8]}")
    cache.register(Emp)
    cache.attach(engine)

    class Boss(Emp):
        __mapper_args__ = {"polymorphic_identity": "boss"}
        staff = column_property(literal_column("(SELECT count(*) FROM dep_emp)", Integer))

    try:
        LateBase.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Boss(id=1), Emp(id=2)])
            s.commit()
        for _ in range(2):
            with Session(engine) as s:
                assert isinstance(s.get(Emp, 1), Boss)
                assert cache.get(s, Emp, 2) is not None
                assert cache.get_many(s, Emp, [2, 1])[1] is not None
        with Session(engine) as s:
            s.add(Emp(id=3))
            s.commit()
        assert cache.stats()["hits"] == 0 and cache.stats()["errors"] == 0
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()
        engine.dispose()


def test_a_begin_sent_as_text_by_an_engine_listener_still_fills(tmp_path: Path, redis_url: str) -> None:
    """SQLAlchemy's pysqlite recipe: a ``begin`` listener sends BEGIN itself, inside a miss's load. That
    is transaction control, not a read of tables nobody can name: the entry is stored."""
    engine = create_engine(f"sqlite:///{tmp_path / 'begin.db'}")

    @event.listens_for(engine, "connect")
    def no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    DepBase.metadata.create_all(engine)
    cache = SQLCache(redis_url, prefix=f"beg{uuid.uuid4().hex[:8]}")
    cache.attach(engine)
    try:
        with Session(engine) as s:
            s.add(Author(id=1, name="a"))
            s.commit()
        for _ in range(3):
            with Session(engine) as s:
                assert [a.name for a in s.scalars(select(Author).options(cached()))] == ["a"]
        assert cache.stats()["fills"] == 1 and cache.stats()["hits"] == 2
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()
        engine.dispose()


def test_a_literal_column_that_only_mentions_select_in_a_word() -> None:
    from sqlcache._hierarchy import is_text

    assert not is_text(literal_column("'selected'"))
    assert is_text(literal_column("(SELECT 1)"))
    assert is_text(literal_column("(\nselect max(id) from t)"))
