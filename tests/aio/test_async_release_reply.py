"""Under AsyncSession, as in the sync world: a commit returns once Redis has applied its lock, and its
release's reply is read by the loop store's next call, by ``aclose()``, or by a timer on the loop for a
writer gone quiet. What that reply may still say (NOSCRIPT, a broken connection) is handled then: sent
again, or journalled, and never a stale read meanwhile."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlcache import SQLCache, _astorelate, signals
from sqlcache._aclient import async_client_like
from sqlcache._astore import AsyncRedisStore
from sqlcache._health import Health
from sqlcache._pools import Wire, client_for
from sqlcache._settle import Owed

from ..conftest import RedisServer, shareable_url
from ..helpers import user_name
from ..integration.test_release_reply import once_locked, row_dependency
from ..models import User
from ..proxy import Proxy
from .conftest import async_engine_like, run_loop
from .test_async_scenarios import cached_name, make_user, rename


def loop_store(cache: SQLCache) -> AsyncRedisStore:
    """The running loop's store of ``cache``."""
    stores: Any = cache._parts.async_stores
    store: AsyncRedisStore = stores._by_loop[asyncio.get_running_loop()]
    return store


async def until(predicate: Callable[[], bool], what: str, seconds: float = 20) -> None:
    """Poll ``predicate()`` with the loop running (its timers fire meanwhile), failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


class Pair:
    """A writer cache (its asyncio engine made by the test's loop) and a reader cache of another
    process, on one prefix, the reader on a sync engine of the same database; ``errors``: the writer's
    failed operations."""

    def __init__(self, engine: Engine, writer_url: str, reader_url: str, **writer: Any) -> None:
        prefix = f"ar{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.writer = SQLCache(writer_url, prefix=prefix, **writer)
        self.reader = SQLCache(reader_url, prefix=prefix, timeout=2)
        self.other = create_engine(shareable_url(engine))
        self.writer.register(User)
        self.reader.register(User)
        self.reader.attach(self.other)
        self.client = redis.Redis.from_url(reader_url, socket_timeout=5)  # Redis itself, never cut off
        self.errors: list[str] = []

        @signals.cache_error.connect_via(self.writer)
        def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
            self.errors.append(operation)

        self._on_error = on_error

    def served_from_redis(self, uid: int, name: str) -> bool:
        """Whether the reader's read of the user, after one that may fill, is a hit with ``name``."""
        assert user_name(self.other, uid) == name
        hits = self.reader.stats()["hits"]
        return user_name(self.other, uid) == name and self.reader.stats()["hits"] == hits + 1

    async def renamed_once_locked(self, ae: AsyncEngine, then: Callable[[], None]) -> int:
        """A user "ann" read by both caches, then renamed "bob" by the writer, ``then`` run once Redis
        has applied the commit's lock (before the database COMMIT); the user's id."""
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann" and user_name(self.other, uid) == "ann"
        with once_locked(ae.sync_engine, self.client, row_dependency(self.writer, uid), then):
            await rename(ae, uid, "bob")
        return uid

    def run(self, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
        try:
            return run_loop(self.engine, self.writer, body)
        finally:
            self.client.close()
            signals.cache_error.disconnect(self._on_error)
            self.reader.detach(self.other)
            self.reader.close()
            self.other.dispose()


def test_a_release_redis_refused_after_the_commit_returned_is_sent_again(
    engine: Engine, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses its scripts between the lock and the release (SCRIPT FLUSH): ``commit()`` returns
    with the release's reply unread; another process reads the new row at once (the lock holds); the
    writer's next call reads NOSCRIPT and sends the release again, after which both are served from
    Redis."""
    monkeypatch.setattr(_astorelate, "SETTLE_AFTER", 3600)  # the writer's next call reads it, not the timer
    pair = Pair(engine, private_redis.url, private_redis.url, timeout=2)

    async def body(ae: AsyncEngine) -> None:
        uid = await pair.renamed_once_locked(ae, pair.client.script_flush)
        assert len(loop_store(pair.writer)._owed) == 1  # returned before the release's reply was read
        assert user_name(pair.other, uid) == "bob"  # another process, before the writer's next call
        assert await cached_name(ae, uid) == "bob"  # that call sent the release again first
        assert not loop_store(pair.writer)._owed
        hits = pair.writer.stats()["hits"]
        assert await cached_name(ae, uid) == "bob" and pair.writer.stats()["hits"] == hits + 1
        assert pair.served_from_redis(uid, "bob")
        assert pair.errors == [] and pair.writer.stats()["journal"] == 0

    pair.run(body)


def test_a_release_lost_after_the_commit_returned_is_journalled(
    engine: Engine, private_redis: RedisServer
) -> None:
    """The release never reaches Redis (the proxy holds what the writer sends once the lock's reply is
    on its way): ``commit()`` returns without error; until the writer's next call finds the reply
    missing, everyone reads the database (the lock holds); that call reports the release and journals
    it, and once Redis is reachable again the replay drops the lock."""
    proxy = Proxy(private_redis.port)
    pair = Pair(engine, proxy.url, private_redis.url, timeout=0.5, backoff=0.05, max_backoff=0.05)

    async def body(ae: AsyncEngine) -> None:
        uid = await pair.renamed_once_locked(ae, proxy.hold)
        assert pair.errors == []
        for _ in range(2):  # the lock holds: read from the database, and not filled
            assert user_name(pair.other, uid) == "bob"
        assert not pair.served_from_redis(uid, "bob")
        proxy.cut()
        assert await cached_name(ae, uid) == "bob"  # the writer's next call: the reply is not there
        assert "release" in pair.errors and pair.writer.stats()["journal"] >= 1
        proxy.heal()
        deadline = time.monotonic() + 10
        while pair.writer.stats()["journal"]:  # replayed before the writer's next read of Redis
            assert time.monotonic() < deadline, "the journal was never replayed"
            assert await cached_name(ae, uid) == "bob"
            await asyncio.sleep(0.02)
        # the replay dropped the lock (a background replay that took the journal before this one
        # emptied it may still move the generations once more: polled, with a deadline)
        await until(lambda: pair.served_from_redis(uid, "bob"), "the lock was never dropped")

    try:
        pair.run(body)
    finally:
        proxy.close()


def test_a_release_lost_by_a_writer_gone_quiet_is_journalled_by_the_loop(
    engine: Engine, private_redis: RedisServer
) -> None:
    """As above, but the writer makes no further call: a timer on its loop reads (and misses) the reply
    about a second later, the journal replays the release, and the other process is served from Redis
    again long before the lock (600 s here) would have expired."""
    proxy = Proxy(private_redis.port)
    pair = Pair(
        engine, proxy.url, private_redis.url, timeout=0.5, backoff=0.05, max_backoff=0.05, lock_ttl=600
    )

    async def body(ae: AsyncEngine) -> None:
        uid = await pair.renamed_once_locked(ae, proxy.hold)
        await until(lambda: pair.writer.stats()["journal"] > 0, "the loop never read the reply")
        assert "release" in pair.errors and not loop_store(pair.writer)._owed
        proxy.heal()  # for the replay (the journal's own timer); the release itself was never delivered
        await until(lambda: pair.served_from_redis(uid, "bob"), "the release was never replayed")
        assert pair.writer.stats()["invalidations_replayed"] >= 1

    try:
        pair.run(body)
    finally:
        proxy.close()


def test_aclose_journals_a_lost_release_before_the_last_replay(
    engine: Engine, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``cache.aclose()`` reads the replies its loop's store left unread before ``close()`` replays the
    journal for the last time: a release lost on its way is journalled in time for that replay and
    (Redis still unreachable) reported as not taken, not silently dropped."""
    proxy = Proxy(private_redis.port)
    writer = SQLCache(
        proxy.url, prefix=f"az{uuid.uuid4().hex[:8]}", timeout=0.3, backoff=0.05, max_backoff=0.05
    )
    writer.register(User)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)

    async def main() -> None:
        ae = async_engine_like(engine)
        writer.attach(ae)
        try:
            uid = await make_user(ae, "ann")
            assert await cached_name(ae, uid) == "ann"
            with once_locked(ae.sync_engine, client, row_dependency(writer, uid), proxy.hold):
                await rename(ae, uid, "bob")
            with caplog.at_level(logging.WARNING, logger="sqlcache"):
                await writer.aclose()
        finally:
            await ae.dispose()

    try:
        asyncio.run(main())
        assert "invalidations Redis has not taken" in caplog.text
    finally:
        client.close()
        proxy.close()


def test_a_release_behind_a_refused_lock_is_awaited(engine: Engine, private_redis: RedisServer) -> None:
    """A lock Redis refused (its scripts flushed before the commit) locked nothing: the release's reply
    is read before the commit returns."""
    pair = Pair(engine, private_redis.url, private_redis.url, timeout=2)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"
        pair.client.script_flush()
        await rename(ae, uid, "bob")
        assert not loop_store(pair.writer)._owed
        assert pair.served_from_redis(uid, "bob")

    pair.run(body)


def test_tasks_committing_together_each_get_their_release_read(
    engine: Engine, private_redis: RedisServer
) -> None:
    """Tasks of one loop commit and read at once: every reply owed is read by some later call, none
    twice (a reply read by the wrong call would put a connection out of step), and the pool stays
    small."""
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time: SQLite serialises the commits this test overlaps")
    pair = Pair(engine, private_redis.url, private_redis.url, timeout=2)

    async def body(ae: AsyncEngine) -> None:
        uids = [await make_user(ae, f"u{i}") for i in range(4)]

        async def work(uid: int) -> None:
            for i in range(15):
                await rename(ae, uid, f"{uid}-{i}")
                assert await cached_name(ae, uid) == f"{uid}-{i}"

        await asyncio.gather(*(work(uid) for uid in uids))
        for uid in uids:
            await cached_name(ae, uid)
            hits = pair.writer.stats()["hits"]
            assert await cached_name(ae, uid) == f"{uid}-14" and pair.writer.stats()["hits"] == hits + 1
        assert not loop_store(pair.writer)._owed
        assert pair.writer.stats()["errors"] == 0 and pair.writer.stats()["journal"] == 0
        # two per task at most (one in use, one awaiting its reply), the reader's and this client's
        assert int(pair.client.info("clients")["connected_clients"]) <= 2 * len(uids) + 2

    pair.run(body)


def recording_health(**settings: Any) -> tuple[Health, list[tuple[Sequence[str], str]]]:
    """A Health whose lost releases are recorded, (keys, token) each, in the list returned with it."""
    health = Health(**settings)
    lost: list[tuple[Sequence[str], str]] = []
    health.on_release_lost = lambda keys, token, exc: lost.append((keys, token))
    return health, lost


def store_on(server: RedisServer, health: Health, timeout: float) -> AsyncRedisStore:
    """An asyncio store of its own on ``server`` (made in the running loop)."""
    return AsyncRedisStore(async_client_like(client_for(server.url, timeout), timeout), health)


async def owed_blpop(store: AsyncRedisStore, seconds: int, i: int = 0) -> None:
    """A reply owed on a pooled connection that comes after ``seconds`` (0: never): BLPOP of an empty
    list stands for a release whose reply is late."""
    conn = await store._connection()
    await Wire.asend(conn, "BLPOP", f"never-{uuid.uuid4().hex}", seconds)
    store._owed.append(Owed(conn, os.getpid(), time.monotonic(), "clock", [f"k{i}"], f"t{i}", 1000, None))


async def settling_a_late_reply(store: AsyncRedisStore, seconds: int) -> asyncio.Task[None]:
    """A task of the running loop settling ``store``, once it has taken a reply that comes after
    ``seconds`` (0: never) and is reading it."""
    await owed_blpop(store, seconds)
    reading = asyncio.get_running_loop().create_task(store.settle())
    await until(lambda: not store._owed, "the task never took the reply")
    return reading


def test_one_settle_never_waits_out_a_timeout_per_unread_reply(private_redis: RedisServer) -> None:
    """Ten replies that never come: the first read times out, the other nine are handed over unread;
    each is reported lost, and every connection is dropped."""
    timeout = 0.5
    health, lost = recording_health(failure_threshold=100)

    async def main() -> float:
        store = store_on(private_redis, health, timeout)
        try:
            for i in range(10):
                await owed_blpop(store, 0, i)
            started = time.monotonic()
            await store.settle()
            return time.monotonic() - started
        finally:
            await store.aclose()

    elapsed = asyncio.run(main())
    assert sorted(lost) == sorted(([f"k{i}"], f"t{i}") for i in range(10))
    assert elapsed < 5 * timeout, elapsed  # one timeout, not ten


def test_disconnect_waits_for_a_reply_another_task_is_reading(private_redis: RedisServer) -> None:
    """A reply another task is reading when the store disconnects is read to the end first: closed
    under it, an applied release would be reported lost."""
    health, lost = recording_health()

    async def main() -> None:
        store = store_on(private_redis, health, 5.0)
        try:
            reading = await settling_a_late_reply(store, 1)
            await store.disconnect()
            assert reading.done() and lost == []
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_reply_whose_reading_is_cancelled_is_journalled(private_redis: RedisServer) -> None:
    """The task reading a reply is cancelled (its loop shutting down): the release is handed to the
    journal as lost, the cancellation goes on, and the connection is dropped, not given back in the
    middle of a reply."""
    health, lost = recording_health()

    async def main() -> None:
        store = store_on(private_redis, health, 5.0)
        try:
            reading = await settling_a_late_reply(store, 0)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert lost == [(["k0"], "t0")]
            pool: Any = store.client.connection_pool
            assert not pool._in_use_connections and not any(
                c.is_connected for c in pool._available_connections
            )
            assert await store.client.ping()  # and the store goes on, on a new connection
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_quiet_writers_applied_release_is_read_by_the_loop(
    engine: Engine, private_redis: RedisServer
) -> None:
    """The common case of a writer gone quiet: its release applied, the reply read by the loop's timer,
    the connection back in the pool, nothing journalled or reported."""
    pair = Pair(engine, private_redis.url, private_redis.url, timeout=2)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"
        await rename(ae, uid, "bob")
        store = loop_store(pair.writer)
        pool: Any = store.client.connection_pool
        assert len(store._owed) == 1 and len(pool._in_use_connections) == 1
        await until(lambda: not store._owed, "the loop never read the reply")
        assert not pool._in_use_connections
        assert pair.errors == [] and pair.writer.stats()["journal"] == 0
        assert pair.served_from_redis(uid, "bob")

    pair.run(body)


# the closed loop's connections and its parked async generator are left to the garbage collector (as a
# loop closed by hand leaves them): collected within the test, their warnings are this scenario's own
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_loop_closed_without_its_shutdown_journals_what_it_left_unread(
    engine: Engine, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop closed by hand (no ``shutdown_asyncgens()``, so no ``aclose()`` and no timer) with a
    release's reply unread: when the next loop's store is made, that release is journalled, with a
    warning, and replayed; it is not left to its lock's expiry (600 s here) unreported."""
    pair = Pair(engine, private_redis.url, private_redis.url, timeout=2, lock_ttl=600)
    ae = async_engine_like(engine)
    pair.writer.attach(ae)

    async def commit() -> int:
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"
        await rename(ae, uid, "bob")
        assert len(loop_store(pair.writer)._owed) == 1
        await ae.dispose()
        return uid

    loop = asyncio.new_event_loop()
    try:
        uid = loop.run_until_complete(commit())
    finally:
        loop.close()
    deferred = pair.writer.stats()["invalidations_deferred"]

    async def after() -> None:
        try:
            with caplog.at_level(logging.WARNING, logger="sqlcache"):
                assert await cached_name(ae, uid) == "bob"  # a new loop's store: the old one's is dropped
            assert "release replies unread" in caplog.text
            assert pair.writer.stats()["invalidations_deferred"] > deferred
            await until(lambda: pair.served_from_redis(uid, "bob"), "the release was never replayed")
        finally:
            await ae.dispose()

    try:
        pair.run(lambda _: after())
    finally:
        pair.writer.detach(ae)
        gc.collect()
