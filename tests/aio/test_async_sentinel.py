"""AsyncEngine / AsyncSession through Sentinel (one primary, one replica, three sentinels;
tests/topologies.py): the cache's asyncio client is the twin of its Sentinel-managed sync client (the
same sentinels and service), and a failover that loses releases the old primary acknowledged serves
nothing stale in the loop that wrote them."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from sqlalchemy.engine import Engine

from sqlcache import SQLCache

from ..models import User
from ..topologies import LocalSentinel, local_sentinel
from .conftest import run_loop
from .helpers import check_async_failover
from .test_async_scenarios import cached_name, make_user, rename

__all__ = ["local_sentinel"]


def _cache(local_sentinel: LocalSentinel, prefix: str) -> SQLCache:
    client = local_sentinel.sentinel().master_for(local_sentinel.service_name)
    return SQLCache(client, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_async_hits_and_commits_through_sentinel(engine: Engine, local_sentinel: LocalSentinel) -> None:
    cache = _cache(local_sentinel, f"s{uuid.uuid4().hex[:10]}")
    cache.register(User)

    async def body(ae: object) -> None:
        uid = await make_user(ae, "ann")  # type: ignore[arg-type]
        assert await cached_name(ae, uid) == "ann"  # type: ignore[arg-type]
        hits = cache.stats()["hits"]
        assert await cached_name(ae, uid) == "ann"  # type: ignore[arg-type]
        assert cache.stats()["hits"] == hits + 1
        await rename(ae, uid, "bob")  # type: ignore[arg-type]
        assert await cached_name(ae, uid) == "bob"  # type: ignore[arg-type]

    try:
        run_loop(engine, cache, body)  # type: ignore[arg-type]
        with local_sentinel.node(local_sentinel.primary_port()) as node:
            assert node.exists(f"{cache._parts.kp}:clock")  # the async client reached the primary
    finally:
        cache.clear()
        cache.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_async_failover_that_loses_acknowledged_releases_serves_nothing_stale(
    engine: Engine, local_sentinel: LocalSentinel
) -> None:
    cache = _cache(local_sentinel, f"s{uuid.uuid4().hex[:10]}")

    def lose(window: Callable[[], None]) -> None:
        local_sentinel.lose_writes_then_failover(window)

    checked = check_async_failover(engine, cache, lose, rows=10, versions=2, rereads=4)
    assert checked == 60
    print(f"async sentinel failover: {checked} reads checked")
