"""Fixtures of the asyncio suite: the same databases as the sync suite, through asyncio drivers
(aiosqlite, asyncpg, aiomysql). Each test runs its body in an event loop of its own (``run``), with an
AsyncEngine made in that loop and disposed before it ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sqlcache import SQLCache

from ..conftest import RUN_ID


def async_engine_like(engine: Engine) -> AsyncEngine:
    """An AsyncEngine on the database (schema, file) ``engine`` uses."""
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        aengine = create_async_engine(
            make_url(url.render_as_string(hide_password=False)).set(drivername="sqlite+aiosqlite"),
            connect_args={"timeout": 30},
        )

        @event.listens_for(aengine.sync_engine, "connect")
        def _wal(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return aengine
    if backend == "postgresql":
        return create_async_engine(
            url.set(drivername="postgresql+asyncpg", query={}),
            connect_args={"server_settings": {"search_path": f"sqlcache_{RUN_ID}"}},
        )
    return create_async_engine(url.set(drivername="mysql+aiomysql"))


Body = Callable[[AsyncEngine], Awaitable[Any]]


def run_loop(engine: Engine, cache: SQLCache, body: Body) -> Any:
    """A new event loop runs ``await body(async_engine)``, with ``cache`` attached to an AsyncEngine on
    ``engine``'s database; then ``await cache.aclose()`` (this loop's connections to Redis) and the
    engine's disposal, before the loop ends."""

    async def main() -> Any:
        aengine = async_engine_like(engine)
        cache.attach(aengine)
        try:
            return await body(aengine)
        finally:
            await cache.aclose()
            await aengine.dispose()

    return asyncio.run(main())


@pytest.fixture
def run(engine: Engine, cache: SQLCache) -> Iterator[Callable[[Body], Any]]:
    """``run(body)``: :func:`run_loop` with the ``cache`` fixture."""
    yield lambda body: run_loop(engine, cache, body)
