"""Redis down, killed and restarted, under AsyncSession: the database answers, commits succeed, the
journal is replayed and a restarted Redis is fenced before anything is read from it again; closing
leaves no connection behind."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from sqlcache import SQLCache, signals

from ..conftest import RedisServer, free_port
from ..models import User
from .conftest import run_loop
from .test_async_scenarios import cached_name, make_user, rename


async def _until(predicate: object, what: str, seconds: float = 10) -> None:
    """Poll ``predicate()`` (a coroutine function) until true, or fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def test_redis_unreachable(engine: Engine) -> None:
    """Reads use the database, commits succeed, ``cache_error`` fires once, then the breaker backs off."""
    cache = SQLCache(f"redis://127.0.0.1:{free_port()}/0", prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.2)
    cache.strict_signals = True
    cache.register(User)
    errors: list[str] = []

    @signals.cache_error.connect_via(cache)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        for i in range(5):
            await rename(ae, uid, f"x{i}")
        assert await cached_name(ae, uid) == "x4"

    try:
        run_loop(engine, cache, body)
    finally:
        signals.cache_error.disconnect(on_error)
    st = cache.stats()
    assert len(errors) == 1, errors
    assert st["errors"] >= 5 and st["backoffs"] >= 1 and st["skipped_backoff"] >= 1
    assert st["invalidations_deferred"] >= 1


def test_killed_restarted_redis_replays_the_journal_and_is_fenced(
    engine: Engine, private_redis: RedisServer
) -> None:
    """An entry filled, Redis saved; a commit acknowledged by Redis; Redis killed (the commit's release
    is lost with it); a commit during the outage (journalled); Redis restarted from the old snapshot.
    Reads see the last commit, never the restored entry."""
    cache = SQLCache(private_redis.url, prefix="arestart", timeout=0.3, backoff=0.05, max_backoff=0.05)
    cache.strict_signals = True
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "v1")
        assert await cached_name(ae, uid) == "v1"
        assert await cached_name(ae, uid) == "v1"  # a hit
        private_redis.save()  # the snapshot holds the v1 entry and its generations
        await rename(ae, uid, "v2")  # invalidated in Redis, acknowledged, then lost with the process
        private_redis.stop()
        await rename(ae, uid, "v3")  # Redis away: the invalidation is journalled
        assert cache.stats()["journal"] >= 1
        private_redis.start()  # restores the v1 entry and its old generations

        async def replayed() -> bool:
            return await cached_name(ae, uid) == "v3" and cache.stats()["journal"] == 0

        await _until(replayed, "the journal was never replayed")
        for _ in range(3):
            assert await cached_name(ae, uid) == "v3"
        st = cache.stats()
        assert st["restarts"] == 1 and st["fences"] >= 1 and st["invalidations_replayed"] >= 1

    run_loop(engine, cache, body)


def test_aclose_leaves_no_connection_behind(engine: Engine, private_redis: RedisServer) -> None:
    """After ``await cache.aclose()`` the private server has only the test's own connection. The twenty
    concurrent reads usually open several pooled connections; on a slow machine they may all run on one
    (CI saw it): aclose() must close whatever was opened."""
    admin = redis.Redis(port=private_redis.port, socket_timeout=5)
    cache = SQLCache(private_redis.url, prefix="aclose")
    cache.register(User)

    async def body(ae: AsyncEngine) -> int:
        uid = await make_user(ae, "v1")
        await asyncio.gather(*(cached_name(ae, uid) for _ in range(20)))  # usually several connections
        async with AsyncSession(ae) as s:
            await s.get(User, uid)
        return int(admin.info("clients")["connected_clients"])

    during = run_loop(engine, cache, body)  # run_loop ends with aclose()
    assert during >= 2  # the test's own and at least one of the cache's
    assert int(admin.info("clients")["connected_clients"]) == 1
    admin.close()


def test_loops_that_end_without_aclose_leave_no_connection(
    engine: Engine, private_redis: RedisServer
) -> None:
    """``asyncio.run()`` per job, the cache living on: each loop's connections close when the loop shuts
    down (no aclose(), no release_loop())."""
    admin = redis.Redis(port=private_redis.port, socket_timeout=5)
    cache = SQLCache(private_redis.url, prefix="loops")
    cache.register(User)
    from .conftest import async_engine_like

    async def job() -> None:
        ae = async_engine_like(engine)
        cache.attach(ae)
        try:
            uid = await make_user(ae, "v1")
            await asyncio.gather(*(cached_name(ae, uid) for _ in range(5)))
        finally:
            cache.detach(ae)
            await ae.dispose()

    for _ in range(4):
        asyncio.run(job())
    assert int(admin.info("clients")["connected_clients"]) == 1 + 0  # the admin connection only
    cache.close()
    admin.close()


def test_an_event_loop_that_runs_late_does_not_open_the_breaker(
    engine: Engine, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task's read waits for Redis's reply while another task blocks the event loop (a CPU-bound
    handler) for three timeouts. Redis answered in time; the read's timeout fires when the loop wakes,
    beside the reply. That read falls back to the database, but it is no Redis failure: with a breaker
    that opens on the first failure, the next read is served from Redis, not skipped."""
    import time

    import redis.asyncio.connection as aconnection

    from ..proxy import Proxy

    proxy = Proxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    cache = SQLCache(
        proxy.url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.2, failure_threshold=1, max_backoff=30
    )
    cache.register(User)
    waiting = asyncio.Event()
    armed = [False]
    original = aconnection.AbstractConnection.read_response

    async def read_response(self: object, *args: object, **kwargs: object) -> object:
        if armed[0]:
            armed[0] = False
            waiting.set()  # this task now waits for the reply, its timeout running
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"  # filled
        monkeypatch.setattr(aconnection.AbstractConnection, "read_response", read_response)
        armed[0] = True
        proxy.latency = 0.05  # the reply is not there yet when the read starts waiting for it

        async def block_the_loop() -> None:
            await waiting.wait()
            time.sleep(0.6)  # the stall under test, not a wait for anything

        names = await asyncio.gather(cached_name(ae, uid), block_the_loop())
        assert names[0] == "ann"  # from the database this time
        monkeypatch.undo()
        proxy.latency = 0.0
        hits = cache.stats()["hits"]
        assert await cached_name(ae, uid) == "ann"
        assert cache.stats()["hits"] == hits + 1, {k: v for k, v in cache.stats().items() if v}

    try:
        run_loop(engine, cache, body)
        st = cache.stats()
        assert st["loop_stalls"] == 1 and st["backoffs"] == 0
    finally:
        cache.clear()
        cache.close()
        proxy.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_aclose_is_not_failed_by_a_close_that_outlasts_the_timeout(engine: Engine, redis_url: str) -> None:
    """Under load an event loop may take longer than the connect timeout to see a closed socket's
    transport finish closing, and redis-py then raises from ``disconnect()`` (a CI run hit it at the
    end of 220 busy tasks). The sockets are closed either way: ``aclose()`` finishes, raises nothing,
    and leaves no connection open."""
    cache = SQLCache(redis_url, prefix=f"c{uuid.uuid4().hex[:8]}", default_ttl=600, timeout=0.25)
    cache.register(User)
    opened: list[Any] = []

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        for _ in range(2):
            assert await cached_name(ae, uid) == "ann"
        pool = cache._parts.async_stores.current().client.connection_pool  # type: ignore[attr-defined]
        for conn in [*pool._available_connections, *pool._in_use_connections]:
            writer = conn._writer
            assert writer is not None

            async def slow(original: Any = writer.wait_closed) -> None:
                await original()
                await asyncio.sleep(1)  # the close is seen later than the 0.25 s timeout allows

            writer.wait_closed = slow
            opened.append(conn)

    try:
        run_loop(engine, cache, body)  # its aclose() must not raise
        assert opened and all(not conn.is_connected for conn in opened)
    finally:
        cache.clear()
        cache.close()
