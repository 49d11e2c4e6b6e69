"""The consistency scenarios under AsyncSession / AsyncConnection, on aiosqlite, asyncpg and aiomysql
(issue 10). Each body runs in an event loop of its own (the ``run`` fixture)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, selectinload

from sqlcache import SQLCache, cached, signals

from ..helpers import AtRelease
from ..models import Order, User
from .conftest import run_loop
from .helpers import await_, pause_after_select, versions_race

Run = Any


async def make_user(ae: AsyncEngine, name: str, version: int = 1) -> int:
    async with AsyncSession(ae) as s:
        u = User(name=name, version=version)
        s.add(u)
        await s.flush()
        uid = u.id
        await s.commit()
    return uid


async def db_name(ae: AsyncEngine, uid: int) -> str:
    """The row as the database has it, read without the cache (a plain SELECT on a connection)."""
    async with ae.connect() as conn:
        row = await conn.execute(text("SELECT name FROM users WHERE id = :i"), {"i": uid})
        return str(row.scalar_one())


async def rename(ae: AsyncEngine, uid: int, name: str) -> None:
    async with AsyncSession(ae) as s:
        u = await s.get(User, uid)
        assert u is not None
        u.name = name
        await s.commit()


async def cached_name(ae: AsyncEngine, uid: int) -> str:
    async with AsyncSession(ae) as s:
        u = await s.get(User, uid)
        assert u is not None
        return u.name


def test_get_hits_and_a_commit_invalidates_through_redis_asyncio(run: Run, cache: SQLCache) -> None:
    """Misses fill, hits hit, a commit invalidates; and inside the event loop the sync store is never
    used (every Redis call of the asyncio world goes through redis.asyncio, awaited)."""
    cache.register(User)
    from sqlalchemy.util import concurrency

    sync_calls: list[str] = []
    for name in ("read", "generations", "fill", "send_lock", "release_after", "release", "lock"):
        original = getattr(cache.store, name)

        def watched(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            if concurrency.in_greenlet():
                sync_calls.append(_name)
            return _original(*args, **kwargs)

        setattr(cache.store, name, watched)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        cache.clear()
        assert await cached_name(ae, uid) == "v1"
        hits = cache.stats()["hits"]
        assert await cached_name(ae, uid) == "v1"
        assert cache.stats()["hits"] == hits + 1
        await rename(ae, uid, "v2")
        assert await cached_name(ae, uid) == "v2"
        assert await cached_name(ae, uid) == "v2"

    run(body)
    assert sync_calls == []
    st = cache.stats()
    assert st["fills"] >= 2 and st["errors"] == 0


def test_stale_fill_race_for_get_is_refused(run: Run, cache: SQLCache) -> None:
    """Scenario 1 with tasks: the reader misses and SELECTs v1, a writer task commits v2, the reader's
    fill is refused; every later read sees v2."""
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        cache.clear()
        async with pause_after_select(ae, "users") as gate:
            reader = asyncio.create_task(cached_name(ae, uid))
            gate.task = reader
            await gate.wait_paused()
            await rename(ae, uid, "v2")
            gate.resume()
            assert await reader == "v1"
        assert cache.stats()["fills_refused"] == 1
        assert await cached_name(ae, uid) == "v2"
        assert await cached_name(ae, uid) == "v2"

    run(body)


def test_stale_fill_race_for_a_cached_query_is_refused(run: Run, cache: SQLCache) -> None:
    """The same race for a ``cached()`` query: its late fill is refused."""
    cache.register(User)

    async def names(ae: AsyncEngine) -> list[str]:
        async with AsyncSession(ae) as s:
            stmt = select(User).where(User.name.like("v%")).order_by(User.id).options(cached(ttl=60))
            return [u.name for u in (await s.scalars(stmt)).all()]

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        cache.clear()
        async with pause_after_select(ae, "users") as gate:
            reader = asyncio.create_task(names(ae))
            gate.task = reader
            await gate.wait_paused()
            await rename(ae, uid, "v2")
            gate.resume()
            assert await reader == ["v1"]
        assert await names(ae) == ["v2"]
        assert await names(ae) == ["v2"]

    run(body)


def test_core_dml_on_an_async_connection_invalidates(run: Run, cache: SQLCache) -> None:
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        assert await cached_name(ae, uid) == "v1"
        async with ae.begin() as conn:
            await conn.execute(update(User).where(User.id == uid).values(name="v2"))
        assert await cached_name(ae, uid) == "v2"
        async with AsyncSession(ae) as s:  # ORM DML through the session
            await s.execute(update(User).where(User.id == uid).values(name="v3"))
            await s.commit()
        assert await cached_name(ae, uid) == "v3"

    run(body)


def test_rollback_and_savepoint(run: Run, cache: SQLCache) -> None:
    """A rolled-back write changes nothing in the cache; a released savepoint's write is invalidated at
    the commit; a rolled-back savepoint's is not kept."""
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        async with AsyncSession(ae) as s:
            u = await s.get(User, uid)
            assert u is not None
            u.name = "gone"
            await s.flush()
            await s.rollback()
        assert await cached_name(ae, uid) == "v1"
        async with AsyncSession(ae) as s:
            u = await s.get(User, uid)
            assert u is not None
            async with s.begin_nested() as sp:
                u.name = "undone"
                await s.flush()
                await sp.rollback()
            async with s.begin_nested():
                u.name = "v2"
            await s.commit()
        assert await cached_name(ae, uid) == "v2"
        assert await db_name(ae, uid) == "v2"

    run(body)


def test_eager_loads_lazy_loads_and_run_sync(run: Run, cache: SQLCache) -> None:
    """selectinload, ``awaitable_attrs`` lazy loads of a cached relationship and ``run_sync`` read
    through the cache and see commits."""
    cache.register(User)
    cache.register(Order)

    async def body(ae: AsyncEngine) -> None:
        async with AsyncSession(ae) as s:
            u = User(name="ann", orders=[Order(), Order()])
            s.add(u)
            await s.flush()
            uid, oid = u.id, u.orders[0].id
            await s.commit()
        # a cold cache under SQLite's snapshot fills the orders' table keys on the first round, the rest
        # on the second (docs/pages/consistency.md, "Warm-up"); the third is all hits
        for _ in range(3):
            hits = cache.stats()["hits"]
            async with AsyncSession(ae) as s:
                o = await s.get(Order, oid)
                assert o is not None
                owner = await o.awaitable_attrs.user  # many-to-one lazy load: an identity read
                assert owner is not None and owner.name == "ann"
            async with AsyncSession(ae) as s:  # a session of its own: no object it already holds
                stmt = select(User).where(User.id == uid).options(selectinload(User.orders), cached())
                got = (await s.scalars(stmt)).one()
                assert len(await got.awaitable_attrs.orders) == 2
        assert cache.stats()["hits"] == hits + 3

        def sync_part(session: Session) -> str:
            user = session.get(User, uid)
            assert user is not None
            user.name = "bob"
            session.flush()
            return user.name

        async with AsyncSession(ae) as s:
            assert await s.run_sync(sync_part) == "bob"
            await s.commit()
        assert await cached_name(ae, uid) == "bob"

    run(body)


@pytest.mark.parametrize("mode", ["invalidate", "repopulate"])
def test_sync_and_async_engines_share_one_cache(run: Run, cache: SQLCache, engine: Engine, mode: str) -> None:
    """One SQLCache attached to a sync engine and an AsyncEngine of the same database: a commit in
    either world is seen by the other's next read."""
    cache.register(User, mode=mode)  # type: ignore[arg-type]

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        with Session(engine) as s:  # a sync write, in this thread, outside the greenlet
            u = s.get(User, uid)
            assert u is not None and u.name == "v1"
            u.name = "v2"
            s.commit()
        assert await cached_name(ae, uid) == "v2"
        await rename(ae, uid, "v3")
        with Session(engine) as s:
            u = s.get(User, uid)
            assert u is not None and u.name == "v3"

    run(body)


def test_repeatable_read_old_snapshot_not_stored(run: Run, cache: SQLCache, engine: Engine) -> None:
    """Scenario 9 under AsyncSession: a snapshot fixed before another task's commit never stores its
    old row."""
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        other = await make_user(ae, "other")
        snap = ae
        if engine.dialect.name == "postgresql":
            snap = ae.execution_options(isolation_level="REPEATABLE READ")
        async with AsyncSession(snap) as reader:
            await reader.execute(select(User.id).where(User.id == other))  # fixes the snapshot
            await rename(ae, uid, "v2")
            got = await reader.get(User, uid)
            assert got is not None
            assert got.name == "v1" or engine.dialect.name == "sqlite"
            await reader.commit()
        assert await cached_name(ae, uid) == "v2"

    run(body)


def test_many_tasks_never_read_older_than_a_returned_commit(engine: Engine, redis_url: str) -> None:
    """220 tasks in one loop on the same rows: 20 writers bump versions, 200 readers check that a read
    begun after a commit returned never sees an older version. (Under this load Redis replies wait for
    the busy loop past ``timeout`` and the breaker opens, backing off longer each time: ``max_backoff``
    is kept below the deadline by which the cache must serve again once the load stopped.)"""
    cache = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", default_ttl=600, max_backoff=2.0)
    cache.strict_signals = True
    cache.register(User)
    rows, writers, readers, rounds = 4, 20, 200, 5

    async def body(ae: AsyncEngine) -> None:
        ids = [await make_user(ae, f"r{i}", version=0) for i in range(rows)]
        returned = await versions_race(ae, ids, writers, readers, rounds)
        for uid in ids:  # at the end, the cache agrees with the database
            async with AsyncSession(ae) as s:
                u = await s.get(User, uid)
                assert u is not None and u.version == returned[uid] == writers // rows * rounds
        # and, once the writes stopped, serves them. (Under this load a Redis reply may wait for the
        # busy event loop past ``timeout``: the breaker may be open for a moment, and the database answers.)
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            hits = cache.stats()["hits"]
            for uid in ids:
                async with AsyncSession(ae) as s:
                    await s.get(User, uid)
            if cache.stats()["hits"] == hits + rows:
                break
            assert asyncio.get_running_loop().time() < deadline, {k: v for k, v in cache.stats().items() if v}
            await asyncio.sleep(0.05)

    try:
        run_loop(engine, cache, body)
    finally:
        cache.clear()
        cache.close()


class _AtRelease(AtRelease):
    """``action()`` runs when one task's post-commit release (either path) begins, in SQLAlchemy's
    greenlet: it may await through the bridge, or cancel the task."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.task: asyncio.Task[Any] | None = None
        super().__init__(
            lambda _name, _args: action(),
            lambda: self.task is not None and asyncio.current_task() is self.task,
        )


@pytest.mark.parametrize("mode", ["invalidate", "repopulate"])
def test_delayed_release_of_an_older_writer(run: Run, cache: SQLCache, mode: str) -> None:
    """Scenario 2 with tasks: writer 1 commits v1 and its release is held; writer 2 commits v2 and
    releases; writer 1's release then runs. Reads end at v2, never v1."""
    from ..models import Product

    cache.register(Product, mode=mode)  # type: ignore[arg-type]
    stalled, resume = asyncio.Event(), asyncio.Event()

    def stall() -> None:
        stalled.set()
        await_(asyncio.wait_for(resume.wait(), 30))

    plugin = _AtRelease(stall)
    cache.add_plugin(plugin)  # type: ignore[arg-type]

    async def write(pid: int, name: str) -> None:
        async with AsyncSession(run_engine[0]) as s:
            p = await s.get(Product, pid)
            assert p is not None
            p.name = name
            await s.commit()

    async def read(pid: int) -> str:
        async with AsyncSession(run_engine[0]) as s:
            p = await s.get(Product, pid)
            assert p is not None
            return p.name

    run_engine: list[AsyncEngine] = []

    async def body(ae: AsyncEngine) -> None:
        run_engine.append(ae)
        async with AsyncSession(ae) as s:
            p = Product(name="v0", price=1)
            s.add(p)
            await s.flush()
            pid = p.id
            await s.commit()
        writer1 = asyncio.create_task(write(pid, "v1"))
        plugin.task = writer1
        await asyncio.wait_for(stalled.wait(), 20)
        await write(pid, "v2")  # commits after v1, releases before v1's release
        assert await read(pid) == "v2"
        resume.set()
        await writer1
        for _ in range(2):
            assert await read(pid) == "v2"

    run(body)


def test_a_commit_cancelled_during_its_release_still_releases(run: Run, cache: SQLCache) -> None:
    """The task awaiting ``session.commit()`` is cancelled while the release is in flight: the release
    still finishes (or the journal keeps it), so the row is served again at once, not after lock_ttl."""
    cache.register(User)

    def cancel() -> None:
        assert plugin.task is not None
        plugin.task.cancel()

    plugin = _AtRelease(cancel)
    cache.add_plugin(plugin)  # type: ignore[arg-type]

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        writer = asyncio.create_task(rename(ae, uid, "v2"))
        plugin.task = writer
        with pytest.raises(asyncio.CancelledError):
            await writer
        plugin.task = None
        deadline = asyncio.get_running_loop().time() + 10  # lock_ttl is 60 s
        while True:
            hits = cache.stats()["hits"]
            assert await cached_name(ae, uid) == "v2"
            if cache.stats()["hits"] == hits + 1:
                break
            assert asyncio.get_running_loop().time() < deadline, {k: v for k, v in cache.stats().items() if v}
            await asyncio.sleep(0.05)

    run(body)


def test_a_commit_cancelled_before_its_commit_landed_serves_no_older_row(
    run: Run, cache: SQLCache, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task awaiting ``session.commit()`` is cancelled while the driver's COMMIT is still on its way
    (aiosqlite's thread goes on and commits after the task has given up): a read in between goes to the
    database and fills nothing, and once the COMMIT has landed no read is served the old row."""
    if engine.dialect.name != "sqlite":
        pytest.skip("the COMMIT held in the driver's thread is aiosqlite's")
    import threading

    import aiosqlite

    cache.register(User)
    entered, go, slow = threading.Event(), threading.Event(), threading.Event()
    real_commit = aiosqlite.Connection.commit

    async def held_commit(self: Any) -> None:
        if not slow.is_set():
            return await real_commit(self)

        def work() -> None:  # on aiosqlite's thread, which goes on after the task is cancelled
            entered.set()
            go.wait(30)
            self._conn.commit()

        await self._execute(work)

    monkeypatch.setattr(aiosqlite.Connection, "commit", held_commit)

    released: list[object] = []  # after() ran: the hooks of the failed COMMIT are done

    @signals.invalidated.connect_via(cache)
    def on_invalidated(sender: SQLCache, **kw: Any) -> None:
        released.append(kw)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        released.clear()
        try:
            # the reader holds a connection of its own (the writer's stays busy in aiosqlite's thread)
            async with AsyncSession(ae) as reader:
                await reader.connection()
                slow.set()
                writer = asyncio.create_task(rename(ae, uid, "v2"))
                assert await asyncio.to_thread(entered.wait, 10), "the COMMIT never reached the driver"
                slow.clear()
                writer.cancel()
                deadline = asyncio.get_running_loop().time() + 10
                while not released:
                    assert asyncio.get_running_loop().time() < deadline, "the failed COMMIT's hooks never ran"
                    await asyncio.sleep(0.01)
                fills = cache.stats()["fills"]
                u = await reader.get(User, uid)
                assert u is not None and u.name == "v1"  # the database's row: the COMMIT has not landed
                assert cache.stats()["fills"] == fills  # ... and it is not stored
        finally:
            go.set()  # also when an assertion failed: the loop's end waits for the writer's task
        with pytest.raises(asyncio.CancelledError):
            await writer
        deadline = asyncio.get_running_loop().time() + 10
        while await db_name(ae, uid) != "v2":
            assert asyncio.get_running_loop().time() < deadline, "the held COMMIT never landed"
            await asyncio.sleep(0.02)
        assert [await cached_name(ae, uid) for _ in range(2)] == ["v2", "v2"]

    try:
        run(body)
    finally:
        go.set()
        signals.invalidated.disconnect(on_invalidated)
