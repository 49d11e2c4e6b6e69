"""Connection and engine life cycle: disposed engines and invalidated connections behave as they do
without the cache, and the cache keeps working through them."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import MetaData, create_engine, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, outbox_table

from ..conftest import SQLCounter
from ..helpers import durable_cache, make_user, rename_user, user_name
from ..models import User


def test_rollback_after_the_connection_was_invalidated(engine: Engine, cache: SQLCache) -> None:
    """A rollback after the database connection was invalidated mid-transaction succeeds (it raised
    PendingRollbackError from the cache's rollback listener), and the session works again."""
    cache.register(User)
    uid = make_user(engine)
    with Session(engine) as s:
        s.execute(text("SELECT 1"))
        s.connection().invalidate()
        s.rollback()
        user = s.get(User, uid)
        assert user is not None and user.name == "ann"


@pytest.mark.parametrize("close", [True, False])
def test_dispose_keeps_the_cache_working(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, close: bool
) -> None:
    """After engine.dispose() (close=False too, as in a forked child) reads are still served from Redis
    and commits still invalidate their rows (not table-wide keys)."""
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    old = engine.pool
    engine.dispose(close=close)
    old.dispose()  # what the parent process does with its own pool; close=False leaves it to us here
    sql_count.reset()
    assert user_name(engine, uid) == "ann"
    assert sql_count.selects() == 0  # a hit
    rename_user(engine, uid, "bob")
    assert user_name(engine, uid) == "bob"
    sql_count.reset()
    assert user_name(engine, uid) == "bob"
    assert sql_count.selects() == 0


@pytest.fixture
def durable(engine: Engine, redis_url: str) -> Iterator[SQLCache]:
    with durable_cache(engine, redis_url, f"l{uuid.uuid4().hex[:10]}", relay_interval=3600) as cache:
        yield cache


def test_dispose_keeps_durable_commits_working(engine: Engine, durable: SQLCache) -> None:
    """With durable=True a commit after engine.dispose() writes its outbox row and succeeds (every
    commit raised and was rolled back), and the relay deletes the row."""
    uid = make_user(engine)
    engine.dispose()
    rename_user(engine, uid, "bob")
    assert user_name(engine, uid) == "bob"
    relays = set(durable._outbox.relays.values()) if durable._outbox is not None else set()
    assert len(relays) == 1
    (relay,) = relays
    relay.run_once()
    table = outbox_table(MetaData())
    with engine.connect() as c:
        left = c.execute(select(table).where(table.c.prefix == durable.config.prefix)).all()
    assert left == []


def test_close_after_the_engine_was_collected_removes_the_listeners(redis_url: str, _tmpdir: str) -> None:
    """close() removes the cache's Session and mapper listeners also when its engine was garbage-collected
    without detach(): they stayed on the Session class and ran for every session of the process."""

    def listeners() -> tuple[int, int]:
        return len(Session().dispatch.do_orm_execute), len(inspect(User).dispatch.after_insert)

    before = listeners()
    cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")
    cache.register(User)
    eng = create_engine(f"sqlite:///{_tmpdir}/collected.db")
    cache.attach(eng)
    assert listeners() == (before[0] + 1, before[1] + 1)
    del eng
    gc.collect()
    cache.close()
    assert listeners() == before
