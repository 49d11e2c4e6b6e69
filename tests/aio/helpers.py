"""Deterministic race drivers for asyncio: pause one task right after a given SELECT, let others run,
resume. The pause happens in SQLAlchemy's greenlet, awaiting an asyncio.Event on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import concurrency

from sqlcache import SQLCache

from ..models import User

# SQLAlchemy 2.0 calls it await_only, 2.1 await_
await_ = getattr(concurrency, "await_", None) or concurrency.await_only


class TaskGate:
    """Blocks ``task`` after its next matching SELECT until ``resume()``."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self._resume = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None

    def resume(self) -> None:
        self._resume.set()

    async def wait_paused(self, timeout: float = 20) -> None:
        await asyncio.wait_for(self.paused.wait(), timeout)

    def block(self) -> None:
        self.paused.set()
        await_(asyncio.wait_for(self._resume.wait(), 30))


@asynccontextmanager
async def pause_after_select(aengine: AsyncEngine, table: str) -> AsyncIterator[TaskGate]:
    gate = TaskGate()
    fired = False

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal fired
        if (
            gate.task is not None
            and asyncio.current_task() is gate.task
            and not fired
            and statement.lstrip().upper().startswith("SELECT")
            and table in statement
        ):
            fired = True
            gate.block()

    event.listen(aengine.sync_engine, "after_cursor_execute", after)
    try:
        yield gate
    finally:
        gate.resume()
        event.remove(aengine.sync_engine, "after_cursor_execute", after)


def check_async_failover(
    engine: Engine,
    cache: SQLCache,
    lose: Callable[[Callable[[], None]], object],
    rows: int,
    versions: int,
    rereads: int,
) -> int:
    """The asyncio twin of ``tests.helpers.check_failover``, in one event loop; returns the reads
    checked, and closes ``cache``.

    ``rows`` users are filled at "v0" through ``cache`` (registering User) on an AsyncEngine; then
    ``lose(window)`` runs on a thread of its own while the loop is free: ``window`` commits versions
    1..``versions`` of every row on the loop, each read back (filled on the old primary only), while
    the primary's replica receives nothing; then ``lose`` fails over. Afterwards, in the same loop,
    ``rereads`` rounds of reads must return the last version that returned, at least one round of them
    from Redis, and the cache must have fenced."""
    from ..models import User
    from .conftest import async_engine_like

    cache.register(User)
    checked = 0

    async def name(ae: AsyncEngine, uid: int) -> str:
        async with AsyncSession(ae) as s:
            u = await s.get(User, uid)
            assert u is not None
            return u.name

    async def main() -> None:
        nonlocal checked
        ae = async_engine_like(engine)
        cache.attach(ae)
        loop = asyncio.get_running_loop()
        try:
            uids = []
            for _ in range(rows):
                async with AsyncSession(ae) as s:
                    u = User(name="v0", version=1)
                    s.add(u)
                    await s.flush()
                    uids.append(u.id)
                    await s.commit()
            for uid in uids:
                assert await name(ae, uid) == "v0"  # filled, then replicated
            last = dict.fromkeys(uids, "v0")

            async def commits() -> None:
                nonlocal checked
                for n in range(1, versions + 1):
                    for uid in uids:
                        async with AsyncSession(ae) as s:
                            u = await s.get(User, uid)
                            assert u is not None
                            u.name = f"v{n}"
                            await s.commit()
                        last[uid] = f"v{n}"
                        assert await name(ae, uid) == last[uid]
                        checked += 1

            def window() -> None:  # on lose()'s thread, while the loop is free
                asyncio.run_coroutine_threadsafe(commits(), loop).result()

            await asyncio.to_thread(lose, window)
            hits = cache.stats()["hits"]
            for _ in range(rereads):
                for uid in uids:
                    assert await name(ae, uid) == last[uid]
                    checked += 1
            assert cache.stats()["hits"] - hits >= rows  # Redis answered: not all misses
            assert cache.stats()["fences"] >= 1
        finally:
            await cache.aclose()
            await ae.dispose()

    try:
        asyncio.run(main())
    finally:
        cache.close()
    return checked


async def versions_race(
    ae: AsyncEngine, ids: list[int], writers: int, readers: int, rounds: int
) -> dict[int, int]:
    """Tasks in one loop on the rows ``ids`` (versions at 0): ``writers`` tasks bump versions (one writer
    per row at a time, so versions rise in order), ``readers`` tasks read through ``AsyncSession.get``
    and check that a read begun after a commit returned never sees an older version. Returns, per row,
    the highest version whose commit returned."""
    returned = dict.fromkeys(ids, 0)
    locks = {uid: asyncio.Lock() for uid in ids}
    checked = 0

    async def writer(n: int) -> None:
        uid = ids[n % len(ids)]
        for _ in range(rounds):
            async with locks[uid], AsyncSession(ae) as s:
                u = await s.get(User, uid)
                assert u is not None
                u.version += 1
                v = u.version
                await s.commit()
                returned[uid] = max(returned[uid], v)
            await asyncio.sleep(0)

    async def reader(n: int) -> None:
        nonlocal checked
        for k in range(rounds):
            uid = ids[(n + k) % len(ids)]
            floor = returned[uid]
            async with AsyncSession(ae) as s:
                u = await s.get(User, uid)
                assert u is not None
                assert u.version >= floor, (uid, u.version, floor)
            checked += 1

    await asyncio.gather(*(writer(i) for i in range(writers)), *(reader(i) for i in range(readers)))
    assert checked == readers * rounds
    return returned
