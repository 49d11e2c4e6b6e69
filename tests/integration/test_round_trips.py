"""Cost targets, counted (not timed): Redis round trips per read and per committing transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..models import Order, Tag, User


@contextmanager
def count_round_trips(cache: SQLCache) -> Iterator[list[str]]:
    """Record every command the cache's Redis client sends (one entry = one round trip)."""
    client = cache.store.client
    calls: list[str] = []
    original = client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return original(*args, **kwargs)

    client.execute_command = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        client.execute_command = original  # type: ignore[method-assign]


def test_hit_is_one_round_trip(engine: Engine, cache: SQLCache) -> None:
    """A cache hit costs exactly one Redis round trip."""
    cache.register(User)
    with Session(engine) as s:
        u = User(name="a")
        s.add(u)
        s.commit()
        uid = u.id
    with Session(engine) as s:
        s.get(User, uid)
    with count_round_trips(cache) as calls, Session(engine) as s:
        s.get(User, uid)
    assert len(calls) == 1, calls


def test_write_transaction_adds_two_round_trips_whatever_the_rows(engine: Engine, cache: SQLCache) -> None:
    """A commit that wrote 1 or 50 registered rows (ORM and Core) adds exactly two round trips."""
    cache.register(User)
    cache.register(Order)
    for n in (1, 50):
        with count_round_trips(cache) as calls, Session(engine) as s:
            users = [User(name=f"u{i}") for i in range(n)]
            s.add_all(users)
            s.flush()
            s.add_all([Order(user_id=u.id) for u in users])
            s.execute(update(User).where(User.id == users[0].id).values(name="x"))
            s.commit()
        assert len(calls) == 2, (n, calls)


def test_transaction_touching_nothing_cached_adds_zero(engine: Engine, cache: SQLCache) -> None:
    """A transaction that wrote nothing adds no round trip; any write adds the same two."""
    cache.register(User)
    with count_round_trips(cache) as calls, Session(engine) as s:
        s.commit()
    assert calls == []
    with count_round_trips(cache) as calls, Session(engine) as s:
        s.add(Tag(label="t"))
        s.commit()
    # a write to any table moves that table's query dependency: one lock + one release
    assert len(calls) == 2
