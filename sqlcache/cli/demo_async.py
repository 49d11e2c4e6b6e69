"""The demo's asyncio step: the same cache and database through an AsyncEngine and AsyncSession."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from sqlcache import SQLCache

__all__ = ["async_step"]

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "mysql": "mysql+aiomysql"}


def async_step(engine: Engine, cache: SQLCache, model: type[Any], key: int) -> list[str]:
    """Lines to show: an AsyncSession hit on an entry the sync engine filled, an async commit that
    invalidates it before it returns, and the sync engine reading the new value. One line saying why,
    if no asyncio driver is installed for this database."""
    try:
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    except ImportError as exc:  # pragma: no cover - SQLAlchemy without its asyncio extension
        return [f"skipped: {exc}"]
    driver = _DRIVERS.get(engine.dialect.name)
    if driver is None:
        return [f"skipped: no asyncio driver known for {engine.dialect.name}"]
    url = make_url(engine.url.render_as_string(hide_password=False)).set(drivername=driver)
    try:
        aengine = create_async_engine(url)
    except ImportError as exc:
        return [f"skipped: {exc} (pip install '.[demo]' installs aiosqlite)"]
    out: list[str] = []

    async def main() -> None:
        cache.attach(aengine)
        try:
            with Session(engine) as s:
                s.get(model, key)  # the sync engine fills (or already holds) the entry
            hits = cache.stats()["hits"]
            async with AsyncSession(aengine) as s:
                obj = await s.get(model, key)
                assert obj is not None
                out.append(f"await session.get(): {obj.name!r}, a hit: {cache.stats()['hits'] == hits + 1}")
                obj.name = obj.name + " (async)"
                await s.commit()
                out.append("await session.commit(): the entry was invalidated before it returned")
            with Session(engine) as s:
                obj = s.get(model, key)
                assert obj is not None
                out.append(f"the sync engine now reads {obj.name!r}")
        finally:
            cache.detach(aengine)
            await cache.release_loop()  # this loop's asyncio connections to Redis
            await aengine.dispose()

    asyncio.run(main())
    return out
