"""Query cache in one file: run with a Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL overrides)."""

from __future__ import annotations

import os
import tempfile

from sqlalchemy import ForeignKey, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from sqlcache import SQLCache, cached


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "example_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "example_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(80))
    author_id: Mapped[int] = mapped_column(ForeignKey("example_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def main() -> None:
    engine = create_engine(f"sqlite:///{os.path.join(tempfile.mkdtemp(), 'example.db')}")
    Base.metadata.create_all(engine)
    cache = SQLCache(os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix="example-q")
    cache.attach(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(engine) as s:
        s.add(Author(id=1, name="ann", books=[Book(title="one"), Book(title="two")]))
        s.commit()

    stmt = select(Author).options(selectinload(Author.books), cached(ttl=60, tags=["authors"]))
    for attempt in range(3):
        statements.clear()
        with Session(engine) as s:
            authors = s.scalars(stmt).all()
            titles = [b.title for b in authors[0].books]
        print(f"run {attempt + 1}: {titles} with {len(statements)} SQL statements")
    with Session(engine) as s:
        s.add(Book(title="three", author_id=1))
        s.commit()  # writes example_books: the query (its selectin load reads it) is invalidated
    with Session(engine) as s:
        print("after a commit:", [b.title for b in s.scalars(stmt).one().books])
    cache.invalidate_tags("authors")
    print(cache.stats())
    cache.clear()
    cache.detach(engine)


if __name__ == "__main__":
    main()
