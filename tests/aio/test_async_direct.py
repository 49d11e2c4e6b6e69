"""cache.aget / cache.aget_many under AsyncSession, through redis.asyncio (aiosqlite, asyncpg,
aiomysql)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..helpers import make_user, user_name
from ..models import User

Run = Any


def _count(store: Any, name: str, calls: list[int]) -> None:
    """Each call of ``store.<name>`` appends to ``calls`` (the store's own method, wrapped on the
    instance: the test's cache is closed after it)."""
    original = getattr(store, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    setattr(store, name, counted)


def test_aget_and_aget_many_hit_without_sql(run: Run, cache: SQLCache) -> None:
    """The asyncio twins answer as the sync ones: misses load and fill, hits send no SQL and land in
    the AsyncSession's identity map, in the order asked; the sync store is never used."""
    cache.register(User)
    sync_reads: list[int] = []
    for name in ("read_many", "send_read"):
        _count(cache.store, name, sync_reads)

    async def body(ae: AsyncEngine) -> None:
        async with AsyncSession(ae) as s:
            made = [User(name=n) for n in ("a", "b", "c")]
            s.add_all(made)
            await s.flush()
            ids = [u.id for u in made]
            await s.commit()
        async with AsyncSession(ae) as s:
            got = await cache.aget_many(s, User, [ids[2], 999_999, ids[0], ids[1]])
            assert [u and u.name for u in got] == ["c", None, "a", "b"]
        statements: list[str] = []
        event.listen(ae.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        async with AsyncSession(ae) as s:
            got = await cache.aget_many(s, User, ids)
            assert [u.name for u in got] == ["a", "b", "c"]
            assert await cache.aget(s, User, ids[1]) is got[1] is await s.get(User, ids[1])
        async with AsyncSession(ae) as s:
            assert (await cache.aget(s, User, ids[0])).name == "a"
        assert statements == []

    run(body)
    assert sync_reads == []
    assert cache.stats()["hits"] == 4


def test_a_sync_get_beside_an_async_engine_sends_first(engine: Engine, run: Run, cache: SQLCache) -> None:
    """With an AsyncEngine attached too, the cache's store answers each caller in its own world: a sync
    cache.get still sends its MGET before its last checks (on the sync store), an aget reads through the
    asyncio store, and both are hits."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled
    sends: list[int] = []
    _count(cache.store, "send_read", sends)

    async def body(ae: AsyncEngine) -> None:
        with Session(engine) as s:  # sync code beside the loop (outside SQLAlchemy's greenlet)
            assert cache.get(s, User, uid).name == "ann"
        assert sends == [1]
        async with AsyncSession(ae) as s:
            assert (await cache.aget(s, User, uid)).name == "ann"
        assert sends == [1]

    run(body)
    assert cache.stats()["hits"] == 2
