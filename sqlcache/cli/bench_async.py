"""The benchmark's asyncio rows: ``AsyncSession.get`` uncached and as a sqlcache hit, and a committing
update (a get, one column changed, ``commit()``) uncached and cached, on the same database and entries
as the sync rows, measured in the same interleaved run.

Each operation is timed inside its coroutine (from before ``AsyncSession`` opens to after it closes),
so the event loop's own start and stop per sample are not counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sqlcache import SQLCache

__all__ = ["AsyncRows", "async_rows", "async_url"]

_DRIVERS = {"postgresql": "postgresql+asyncpg", "mysql": "mysql+aiomysql", "sqlite": "sqlite+aiosqlite"}


def async_url(url: str) -> str | None:
    """The asyncio driver's URL for the benchmark's database, or None if there is none we know."""
    u = make_url(url)
    name = _DRIVERS.get(u.get_backend_name())
    return None if name is None else u.set(drivername=name).render_as_string(hide_password=False)


class AsyncRows:
    """An event loop of its own, an uncached AsyncEngine, one with ``cache`` attached and one with
    ``local`` (a cache with a local tier) attached."""

    def __init__(
        self, url: str, connect_args: dict[str, Any], cache: SQLCache, model: type[Any], local: SQLCache
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._cache = cache
        self._local_cache = local
        self._model = model
        self.plain = create_async_engine(url, connect_args=connect_args)
        self.cached = create_async_engine(url, connect_args=connect_args)
        self.local = create_async_engine(url, connect_args=connect_args)
        cache.attach(self.cached)
        local.attach(self.local)

    def get(self, engine: AsyncEngine, rnd: random.Random, ids: list[int]) -> Callable[[], int]:
        model = self._model

        async def op() -> int:
            key = rnd.choice(ids)
            t0 = time.perf_counter_ns()
            async with AsyncSession(engine) as s:
                await s.get(model, key)
            return time.perf_counter_ns() - t0

        return lambda: self._loop.run_until_complete(op())

    def update(self, engine: AsyncEngine, rnd: random.Random, ids: list[int]) -> Callable[[], int]:
        """The sync ``update`` row under AsyncSession: get a row, change one column, commit."""
        model = self._model

        async def op() -> int:
            key = rnd.choice(ids)
            t0 = time.perf_counter_ns()
            async with AsyncSession(engine) as s:
                row = await s.get(model, key)
                assert row is not None
                row.score += 1
                await s.commit()
            return time.perf_counter_ns() - t0

        return lambda: self._loop.run_until_complete(op())

    def served_from_redis(self, key: int) -> bool:
        """One async get of ``key``: a hit with no SQL."""
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])

        event.listen(self.cached.sync_engine, "before_cursor_execute", count)
        hits = self._cache.stats()["hits"]
        try:
            self.get(self.cached, random.Random(0), [key])()
        finally:
            event.remove(self.cached.sync_engine, "before_cursor_execute", count)
        return not statements and self._cache.stats()["hits"] == hits + 1

    def close(self) -> None:
        """This loop's connections to Redis and the databases closed, then the loop."""

        async def closing() -> None:
            await self._cache.release_loop()
            await self._local_cache.release_loop()
            for engine in (self.plain, self.cached, self.local):
                await engine.dispose()

        try:
            self._loop.run_until_complete(closing())
        finally:
            self._loop.close()


def async_rows(url: str, cache: SQLCache, model: type[Any], schema: str, local: SQLCache) -> AsyncRows | None:
    """The asyncio rows' engines, or None (said why) if the database has no asyncio driver here.
    ``schema``: PostgreSQL's search path, as the sync rows set it; ``local``: the cache with a local
    tier (the sync rows' own: its tier is the process's)."""
    aurl = async_url(url)
    if aurl is None:
        print("sqlcache bench: no asyncio rows (no asyncio driver known for this database)")
        return None
    connect_args: dict[str, Any] = {}
    if aurl.startswith("postgresql"):
        connect_args = {"server_settings": {"search_path": schema}}
    try:
        return AsyncRows(aurl, connect_args, cache, model, local)
    except ImportError as exc:
        print(f"sqlcache bench: no asyncio rows ({exc}; the dev extra installs the asyncio drivers)")
        return None
