"""Identity cache in one file: run with a Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL overrides)."""

from __future__ import annotations

import os
import tempfile

from sqlalchemy import String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache, signals


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "example.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    cache = SQLCache(os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix="example")
    cache.attach(engine)
    cache.register(User)

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    @signals.invalidated.connect_via(cache)
    def report(sender: SQLCache, identities: list[object], tags: list[str], remote: bool) -> None:
        print("invalidated:", identities, tags)

    with Session(engine) as s:
        s.add(User(id=1, name="ann"))
        s.commit()
    with Session(engine) as s:
        print("first get:", s.get(User, 1).name)  # miss: SQL, then a guarded fill
    statements.clear()
    with Session(engine) as s:
        print("second get:", s.get(User, 1).name, "- SQL statements:", len(statements))  # hit: 0
        s.get(User, 1).name = "bob"
        s.commit()  # invalidates before commit() returns
    with Session(engine) as s:
        print("after commit:", s.get(User, 1).name)
    print(cache.stats())
    cache.clear()
    cache.detach(engine)


if __name__ == "__main__":
    main()
