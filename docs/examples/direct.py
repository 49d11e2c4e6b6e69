"""cache.get / cache.get_many in one file: run with a Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL
overrides). An N+1 loop of Session.get becomes one Redis round trip, then no SQL at all."""

from __future__ import annotations

import os
import tempfile

from sqlalchemy import String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "example_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "example.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    cache = SQLCache(
        os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix="example-direct"
    )
    cache.attach(engine)
    cache.register(Author)
    with Session(engine) as s:
        s.add_all([Author(id=i, name=f"author {i}") for i in range(1, 6)])
        s.commit()

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    wanted = [3, 1, 42, 3]  # in any order, duplicates allowed; 42 does not exist
    with Session(engine) as s:
        authors = cache.get_many(s, Author, wanted)  # misses: one SELECT ... IN, then guarded fills
        print("first get_many:", [a and a.name for a in authors], "- SQL statements:", len(statements))
    statements.clear()
    with Session(engine) as s:
        authors = cache.get_many(s, Author, wanted)  # hits: one Redis round trip
        print("second get_many:", [a and a.name for a in authors], "- SQL statements:", len(statements))
        assert authors[0] is authors[3] is s.get(Author, 3)  # in the identity map, as a load puts them
        print("get:", cache.get(s, Author, 1).name, "- SQL statements:", len(statements))
    print({k: v for k, v in cache.stats().items() if k in ("hits", "misses", "fills")})
    cache.clear()
    cache.detach(engine)


if __name__ == "__main__":
    main()
