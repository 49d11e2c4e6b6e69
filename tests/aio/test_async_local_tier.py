"""The local tier under AsyncSession: the same tier as the sync world's (one per cache and process) in
front of every event loop's reads, with the same promises. Writers are other caches on other engines
(another process's view: no local tier, no shared Python state)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio.connection as aconnection
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from sqlcache import SQLCache, cached
from sqlcache._astore import AsyncRedisStore

from ..conftest import shareable_url
from ..helpers import rename_user
from ..integration.test_local_tier import serving
from ..models import User
from .conftest import run_loop
from .helpers import versions_race
from .test_async_scenarios import cached_name, make_user

Run = Any


async def until_serving(cache: SQLCache) -> None:
    """Wait (polling with a deadline) until the tier's tracking connection has answered a PING."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not serving(cache):
        assert loop.time() < deadline, "the tracking connection did not answer"
        await asyncio.sleep(0.005)


@pytest.fixture
def local(redis_url: str) -> Iterator[SQLCache]:
    # a bound of 1 s: a busy machine's event loop may stall past the default 0.1 s, which would send
    # reads these tests expect from memory to Redis (the bound itself: tests/integration/test_local_tier.py)
    c = SQLCache(
        redis_url, prefix=f"l{uuid.uuid4().hex[:10]}", default_ttl=600, local_bytes=1 << 20, max_backoff=2.0,
        local_max_lag=1.0,
    )  # fmt: skip
    c.strict_signals = True
    c.register(User)
    yield c
    c.clear()
    c.close()


@pytest.fixture
def other(redis_url: str, engine: Engine, local: SQLCache) -> Iterator[Engine]:
    """Another process's writes: a sync engine to the same database, with a cache of its own (same
    prefix, no local tier)."""
    other = create_engine(shareable_url(engine))
    c = SQLCache(redis_url, prefix=local.config.prefix, default_ttl=600)
    c.register(User)
    c.attach(other)
    yield other
    c.detach(other)
    c.close()
    other.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_an_async_local_hit_needs_no_round_trip(
    engine: Engine, local: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once Redis served an entry or a query to an AsyncSession, the next async reads of it come from
    memory: no command to Redis, objects of their own in each session."""

    async def body(ae: AsyncEngine) -> None:
        await until_serving(local)
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"  # miss, fill
        assert await cached_name(ae, uid) == "ann"  # Redis hit: kept locally
        sent: list[str] = []
        original = aconnection.AbstractConnection.send_command

        async def counting(self: Any, *args: Any, **kw: Any) -> None:
            sent.append(str(args[0]))
            await original(self, *args, **kw)

        query = select(User).where(User.id == uid).options(cached(ttl=60))
        for _ in range(2):  # the query: filled, then a Redis hit kept locally
            async with AsyncSession(ae) as s:
                assert [u.name for u in (await s.scalars(query)).all()] == ["ann"]
        hits = local.stats()["local_hits"]
        monkeypatch.setattr(aconnection.AbstractConnection, "send_command", counting)
        async with AsyncSession(ae) as s1, AsyncSession(ae) as s2:
            a, b = await s1.get(User, uid), await s2.get(User, uid)
            assert a is not None and b is not None and a is not b and a.name == b.name == "ann"
            assert [u.name for u in (await s1.scalars(query)).all()] == ["ann"]
        monkeypatch.undo()
        assert sent == [] and local.stats()["local_hits"] == hits + 3

    run_loop(engine, local, body)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_every_async_read_after_another_process_commit_returned_sees_it(
    engine: Engine, local: SQLCache, other: Engine
) -> None:
    """Strict on one host, under AsyncSession too: 50 times another process commits a new name and, as
    soon as its commit() returned, an AsyncSession reads: it always sees the new name."""

    async def body(ae: AsyncEngine) -> None:
        await until_serving(local)
        uid = await make_user(ae, "v0")
        for _ in range(2):
            assert await cached_name(ae, uid) == "v0"
        for n in range(1, 51):
            rename_user(other, uid, f"v{n}")  # blocks this loop for the commit: nothing else runs meanwhile
            for _ in range(3):  # again: from Redis, then from memory
                assert await cached_name(ae, uid) == f"v{n}"
        assert local.stats()["local_hits"] > 0  # each round's third read, when the tier may serve

    run_loop(engine, local, body)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_an_invalidation_arriving_while_an_async_read_is_in_flight_is_not_lost(
    engine: Engine, local: SQLCache, other: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t0 an async read notes the tier and awaits Redis; t1 Redis answers generation g; t2 another
    process commits, moving g; t3 the reply is to be kept: g is stale and is not kept."""
    armed = [False]
    uid_box: list[int] = []
    original = AsyncRedisStore.read

    def read(self: AsyncRedisStore, clock_key: str, entry_key: str, dep_keys: Any) -> Any:
        r = original(self, clock_key, entry_key, dep_keys)
        if armed[0] and r.hit:
            armed[0] = False
            rename_user(other, uid_box[0], "new")  # between Redis's answer and the tier keeping it
        return r

    monkeypatch.setattr(AsyncRedisStore, "read", read)

    async def body(ae: AsyncEngine) -> None:
        await until_serving(local)
        uid_box.append(await make_user(ae, "old"))
        assert await cached_name(ae, uid_box[0]) == "old"  # filled
        armed[0] = True
        assert await cached_name(ae, uid_box[0]) == "old"  # begun before the commit: old is right
        assert not armed[0]
        assert await cached_name(ae, uid_box[0]) == "new"
        assert await cached_name(ae, uid_box[0]) == "new"

    run_loop(engine, local, body)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_many_tasks_with_a_local_tier_never_read_older_than_a_returned_commit(
    engine: Engine, local: SQLCache
) -> None:
    """120 tasks in one loop on the same rows, reads served from memory where the tier allows: 20
    writers bump versions, 100 readers check that a read begun after a commit returned never sees an
    older version; at the end the tier served reads and agrees with the database."""
    rows, writers, readers, rounds = 4, 20, 100, 5

    async def body(ae: AsyncEngine) -> None:
        async def version(uid: int) -> int:
            async with AsyncSession(ae) as s:
                u = await s.get(User, uid)
                assert u is not None
                return u.version

        await until_serving(local)
        ids = [await make_user(ae, f"r{i}", version=0) for i in range(rows)]
        returned = await versions_race(ae, ids, writers, readers, rounds)
        for uid in ids:
            assert await version(uid) == returned[uid] == writers // rows * rounds
        # and, once the writes stopped, serves them from memory. (Under this load a Redis reply may wait
        # for the busy loop past ``timeout``: the breaker may be open for a moment, and the database
        # answers.)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            hits = local.stats()["local_hits"]
            for uid in ids:
                assert await version(uid) == returned[uid]
            if local.stats()["local_hits"] == hits + rows:
                break
            assert loop.time() < deadline, {k: v for k, v in local.stats().items() if v}
            await asyncio.sleep(0.05)

    run_loop(engine, local, body)
