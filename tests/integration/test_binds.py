"""Custom binds: sqlcache asks for a bind exactly as the ORM does, and never calls user code the ORM
would not call (horizontal sharding's shard_chooser, get_bind() overrides)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import Session, selectinload

from sqlcache import SQLCache

from ..models import Base, Order, User


@pytest.fixture
def two_files() -> Iterator[tuple[Engine, Engine]]:
    with tempfile.TemporaryDirectory(prefix="sqlcache-binds-") as d:
        engines = tuple(create_engine(f"sqlite:///{Path(d) / name}.db") for name in ("a", "b"))
        for e in engines:
            Base.metadata.create_all(e)
        yield engines[0], engines[1]
        for e in engines:
            e.dispose()


@pytest.fixture
def cache_on(redis_url: str) -> Iterator[SQLCache]:
    cache = SQLCache(redis_url, prefix=f"b{uuid.uuid4().hex[:10]}")
    cache.strict_signals = True
    cache.register(User)
    cache.register(Order)
    yield cache
    cache.clear()
    cache.close()


def test_sharded_session_never_calls_the_shard_chooser_without_an_instance(
    two_files: tuple[Engine, Engine], cache_on: SQLCache
) -> None:
    """With horizontal sharding, get(), lazy loads and queries work as without the cache: the user's
    shard_chooser (which needs an instance) is not called by sqlcache with instance=None."""
    a, b = two_files
    for e in (a, b):
        cache_on.attach(e)
    calls: list[Any] = []

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        calls.append(instance)
        if isinstance(instance, Order):
            return "a" if instance.user_id % 2 else "b"
        return "a" if instance.id % 2 else "b"  # AttributeError on None, as a user's would

    def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
        return ["a" if primary_key[0] % 2 else "b"]

    def execute_chooser(orm_context: Any) -> list[str]:
        return ["a", "b"]

    def sharded() -> ShardedSession:
        return ShardedSession(
            shard_chooser=shard_chooser,
            identity_chooser=identity_chooser,
            execute_chooser=execute_chooser,
            shards={"a": a, "b": b},
        )

    with sharded() as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two"), Order(id=1, user_id=1)])
        s.commit()
    for _ in range(2):
        with sharded() as s:
            one, two = s.get(User, 1), s.get(User, 2)
            assert one is not None and two is not None and (one.name, two.name) == ("one", "two")
            order = s.get(Order, 1)
            assert order is not None and order.user is not None and order.user.name == "one"
            assert sorted(u.name for u in s.scalars(select(User))) == ["one", "two"]
    assert None not in calls


class Routing(Session):
    """A routing session as SQLAlchemy's docs show it, recording how it is asked."""

    engine: Engine
    asked: list[tuple[str, ...]] = []

    def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:  # type: ignore[override]
        Routing.asked.append(
            tuple(sorted(["mapper"] * (mapper is not None) + ["clause"] * (clause is not None) + list(kw)))
        )
        return Routing.engine


def _work(engine: Engine) -> None:
    with Routing(engine) as s:
        s.add_all([User(id=1, name="one"), Order(id=1, user_id=1)])
        s.commit()
    with Routing(engine) as s:
        user = s.get(User, 1)
        assert user is not None
        s.refresh(user)
        s.expire(user)
        assert user.name == "one"
        users = s.scalars(select(User).options(selectinload(User.orders))).all()
        assert [len(u.orders) for u in users] == [1]
        order = s.get(Order, 1)
        assert order is not None and order.user is user


def test_get_bind_is_asked_as_the_orm_asks(two_files: tuple[Engine, Engine], cache_on: SQLCache) -> None:
    """A get_bind() override is called with the arguments the ORM uses, never with more: the set of
    argument shapes it sees with the cache attached is one it also sees without (save the ORM's own
    ``_sa_skip_events`` marker, which SQLAlchemy adds whenever an event hook runs the statement itself
    with ``invoke_statement()``, as a miss does)."""
    a, _b = two_files
    Routing.engine = a
    Routing.asked = []
    _work(a)
    without = set(Routing.asked)
    with a.begin() as c:
        for table in reversed(Base.metadata.sorted_tables):
            c.execute(table.delete())
    cache_on.attach(a)
    Routing.asked = []
    _work(a)
    with_cache = {tuple(k for k in shape if k != "_sa_skip_events") for shape in Routing.asked}
    assert with_cache <= without, with_cache - without
