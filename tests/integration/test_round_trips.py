"""Cost targets, counted (not timed): Redis commands per read and per committing transaction.

Counted by a redis-py connection class that tallies every command it writes (pipelined or not), on a
private Redis; warm-up runs first so that connection handshakes and script loading are not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..conftest import RedisServer
from ..models import Order, Product, Tag, User


class CountingConnection(redis.Connection):
    sent: list[str] = []

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.sent.append(str(args[0]).upper())
        super().send_command(*args, **kwargs)


@pytest.fixture
def counted(engine: Engine, private_redis: RedisServer) -> Iterator[tuple[SQLCache, list[str]]]:
    pool = redis.ConnectionPool(
        connection_class=CountingConnection, port=private_redis.port, socket_timeout=0.25, retry=None
    )
    cache = SQLCache(redis.Redis(connection_pool=pool), prefix="count")
    # a pool of its own to the same server, with the caller's connection class (which counts here)
    assert cache.store.client.connection_pool.connection_class is CountingConnection
    cache.strict_signals = True
    cache.attach(engine)
    CountingConnection.sent = []
    yield cache, CountingConnection.sent
    cache.detach(engine)
    cache.close()
    pool.disconnect()


def commands(sent: list[str]) -> list[str]:
    """Commands written since the last call."""
    out = list(sent)
    sent.clear()
    return out


def test_hit_is_one_command(engine: Engine, counted: tuple[SQLCache, list[str]]) -> None:
    """A cache hit is exactly one command (an MGET): one round trip."""
    cache, sent = counted
    cache.register(User)
    with Session(engine) as s:
        u = User(name="a")
        s.add(u)
        s.commit()
        uid = u.id
    with Session(engine) as s:
        s.get(User, uid)
    commands(sent)
    with Session(engine) as s:
        s.get(User, uid)
    assert commands(sent) == ["MGET"]


@pytest.mark.parametrize("model", [User, Product])
def test_write_transaction_adds_two_commands_whatever_the_rows(
    engine: Engine, counted: tuple[SQLCache, list[str]], model: type
) -> None:
    """A commit that wrote 1 or 50 registered rows (ORM and Core) costs a lock and a release, no more."""
    cache, sent = counted
    cache.register(User)
    cache.register(Order)
    cache.register(Product, mode="repopulate")
    with Session(engine) as s:  # warm-up: connection handshake, script loading
        s.add(Tag(label="warm"))
        s.commit()
    for n in (1, 50):
        commands(sent)
        with Session(engine) as s:
            if model is User:
                users = [User(name=f"u{i}") for i in range(n)]
                s.add_all(users)
                s.flush()
                s.add_all([Order(user_id=u.id) for u in users])
                s.execute(update(User).where(User.id == users[0].id).values(name="x"))
            else:
                s.add_all([Product(name=f"p{i}", price=1) for i in range(n)])
            s.commit()
        assert commands(sent) == ["EVALSHA", "EVALSHA"], n


def test_transaction_writing_nothing_adds_zero(engine: Engine, counted: tuple[SQLCache, list[str]]) -> None:
    """A transaction that wrote nothing costs no command; any write costs the same two."""
    cache, sent = counted
    cache.register(User)
    with Session(engine) as s:  # warm-up
        s.add(Tag(label="warm"))
        s.commit()
    commands(sent)
    with Session(engine) as s:
        s.commit()
    assert commands(sent) == []
    with Session(engine) as s:
        s.add(Tag(label="t"))
        s.commit()
    # a write to any table moves that table's query dependency: one lock + one release
    assert commands(sent) == ["EVALSHA", "EVALSHA"]
