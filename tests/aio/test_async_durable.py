"""``durable=True`` with an AsyncEngine: commits write their outbox row through the asyncio driver, and
the relay runs its passes on an event loop (and a pool) of its own, in its own thread."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlcache import SQLCache
from sqlcache.errors import ConfigurationError

from ..conftest import free_port
from ..models import User
from .conftest import async_engine_like, run_loop
from .test_async_scenarios import cached_name, make_user, rename


def _rows(engine: Engine, pfx: str) -> int:
    with engine.connect() as c:
        n = c.execute(text("SELECT count(*) FROM sqlcache_outbox WHERE prefix = :p"), {"p": pfx})
        return int(n.scalar_one())


@pytest.fixture
def outbox(engine: Engine, redis_url: str) -> Engine:
    """The outbox table, created through an AsyncEngine (create_outbox takes one)."""
    maker = SQLCache(redis_url, prefix="unused")
    aengine = async_engine_like(engine)
    maker.create_outbox(aengine)
    maker.close()
    return engine


def test_attach_refuses_a_missing_outbox_table_through_the_asyncio_driver(
    engine: Engine, redis_url: str
) -> None:
    cache = SQLCache(redis_url, prefix="x", durable=True, outbox_table="no_such_outbox")
    with pytest.raises(ConfigurationError, match="create_outbox"):
        cache.attach(async_engine_like(engine))
    cache.close()


def test_a_cut_off_async_writer_leaves_its_row_and_an_async_relay_applies_it(
    outbox: Engine, redis_url: str
) -> None:
    """A writer on an AsyncEngine that cannot reach Redis commits v2 (its row written through the asyncio
    driver) and is gone; a reader had v1 cached; a durable cache on another AsyncEngine, whose relay runs
    on a loop of its own, applies the row: the reader sees v2, and no row is left."""
    pfx = f"t{uuid.uuid4().hex[:8]}"
    reader = SQLCache(redis_url, prefix=pfx, default_ttl=600)
    reader.register(User)
    state: dict[str, int] = {}

    async def cache_v1(ae: AsyncEngine) -> None:
        state["uid"] = uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        assert await cached_name(ae, uid) == "v1"

    run_loop(outbox, reader, cache_v1)
    uid = state["uid"]

    dead = f"redis://127.0.0.1:{free_port()}/0"
    writer = SQLCache(dead, prefix=pfx, durable=True, timeout=0.2, relay_interval=3600)
    writer.register(User)

    async def write_v2(ae: AsyncEngine) -> None:
        await rename(ae, uid, "v2")

    run_loop(outbox, writer, write_v2)  # ends with aclose(): its journal is gone, as in a crash
    assert _rows(outbox, pfx) == 1

    stale = SQLCache(redis_url, prefix=pfx, default_ttl=600)
    stale.register(User)

    async def still_v1(ae: AsyncEngine) -> None:
        assert await cached_name(ae, uid) == "v1"  # nobody invalidated Redis yet

    run_loop(outbox, stale, still_v1)

    relayer = SQLCache(redis_url, prefix=pfx, durable=True, relay_grace=0, relay_interval=0.05)
    relayer.register(User)

    async def relayed(ae: AsyncEngine) -> None:
        relay = relayer._parts.outbox.relays[ae.sync_engine.pool]  # type: ignore[union-attr]
        deadline = time.monotonic() + 15
        while _rows(outbox, pfx) and time.monotonic() < deadline:
            relay.wake()
            await asyncio.sleep(0.05)
        stats = {k: v for k, v in relayer.stats().items() if v}
        assert _rows(outbox, pfx) == 0, f"the relay thread never applied the row: {stats}"
        assert relay.passes >= 1 and relay.failures == 0
        assert relay.engine is not ae.sync_engine  # its own engine, on its own loop

    run_loop(outbox, relayer, relayed)

    after = SQLCache(redis_url, prefix=pfx, default_ttl=600)
    after.register(User)

    async def sees_v2(ae: AsyncEngine) -> None:
        assert await cached_name(ae, uid) == "v2"

    run_loop(outbox, after, sees_v2)


def test_relay_without_attaching_refuses_an_asyncio_engine(engine: Engine, redis_url: str) -> None:
    """``cache.relay()`` runs passes in the calling thread: it wants a sync driver, and says so."""
    cache = SQLCache(redis_url, prefix="x", durable=True)
    aengine = async_engine_like(engine)
    for given in (aengine, aengine.sync_engine):
        with pytest.raises(ConfigurationError, match="sync driver"):
            cache.relay(given, start=False)  # type: ignore[arg-type]
    cache.close()
