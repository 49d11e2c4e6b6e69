"""Durable invalidation in one file: a writer cut off from Redis commits and dies, and the relay still
invalidates what it wrote. Run with a Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL overrides)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

from sqlalchemy import String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def unreachable_redis() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def main() -> None:
    redis_url = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"example-durable-{uuid.uuid4().hex[:6]}"
    path = os.path.join(tempfile.mkdtemp(), "example.db")
    Base.metadata.create_all(create_engine(f"sqlite:///{path}"))

    # "process" A reads through the cache
    reader_engine = create_engine(f"sqlite:///{path}")
    reader = SQLCache(redis_url, prefix=prefix)
    reader.register(User)
    reader.attach(reader_engine)
    statements: list[str] = []
    event.listen(reader_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    # "process" B writes, durably, while it cannot reach Redis
    writer_engine = create_engine(f"sqlite:///{path}")
    writer = SQLCache(unreachable_redis(), prefix=prefix, durable=True, timeout=0.2)
    writer.create_outbox(writer_engine)
    writer.register(User)
    writer.attach(writer_engine)

    with Session(reader_engine) as s:
        s.add(User(id=1, name="ann"))
        s.commit()
    with Session(reader_engine) as s:
        print("A reads:", s.get(User, 1).name)  # miss, filled
    statements.clear()
    with Session(reader_engine) as s:
        print("A reads again:", s.get(User, 1).name, "- SQL statements:", len(statements))  # hit

    with Session(writer_engine) as s:
        s.get(User, 1).name = "bob"
        s.commit()  # succeeds; Redis unreachable, so the invalidation waits in B's journal...
    writer.close()  # ...and B dies: its journal with it. The outbox row survives in the database.

    with Session(reader_engine) as s:
        print("A reads after B's crash:", s.get(User, 1).name, "(stale: only the outbox knows)")

    # any relay (another process's, or `sqlcache relay --once`) applies rows older than relay_grace
    relayer = SQLCache(redis_url, prefix=prefix, durable=True, relay_grace=0)
    applied = relayer.relay(reader_engine, start=False).run_once()
    print("relay applied", applied, "outbox row(s)")
    with Session(reader_engine) as s:
        name = s.get(User, 1).name
        print("A reads after the relay:", name)
        assert name == "bob"
    for c in (reader, relayer):
        c.clear()
        c.close()


if __name__ == "__main__":
    main()
