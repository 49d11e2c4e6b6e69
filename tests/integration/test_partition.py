"""A TCP proxy between one process and a Redis that keeps its data: partitions and a slow Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, signals

from ..conftest import RedisServer
from ..helpers import make_user, rename_user, writer_and_reader
from ..models import User
from ..proxy import Proxy


@pytest.fixture
def proxy(private_redis: RedisServer) -> Iterator[Proxy]:
    p = Proxy(private_redis.port)
    yield p
    p.close()


def name(engine: Engine, uid: int) -> str:
    with Session(engine) as s:
        u = s.get(User, uid)
        assert u is not None
        return u.name


def test_partition_then_heal(engine: Engine, private_redis: RedisServer, proxy: Proxy) -> None:
    """Writes committed while cut off are invalidated once Redis is back, for every process."""
    prefix = f"p{uuid.uuid4().hex[:8]}"
    behind = SQLCache(proxy.url, prefix=prefix, timeout=0.3, backoff=0.05, max_backoff=0.05)
    behind.strict_signals = True
    other = SQLCache(private_redis.url, prefix=prefix)  # another process, never cut off
    for c in (behind, other):
        c.register(User)
    behind.attach(engine)
    errors: list[str] = []

    @signals.cache_error.connect_via(behind)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    try:
        uid = make_user(engine, "v1")
        assert name(engine, uid) == "v1"  # filled through the proxy; Redis keeps it
        proxy.cut()
        with Session(engine) as s:
            s.get(User, uid).name = "v2"  # read from the database, committed, not invalidated in Redis
            s.commit()
        assert name(engine, uid) == "v2"
        assert behind.stats()["journal"] >= 1 and errors
        proxy.heal()
        deadline = time.monotonic() + 5
        while behind.stats()["journal"] and time.monotonic() < deadline:
            time.sleep(0.05)  # replayed in the background, though this process reads nothing
        assert behind.stats()["journal"] == 0
        behind.detach(engine)
        other.attach(engine)
        assert name(engine, uid) == "v2"  # so the other process sees the new value
    finally:
        signals.cache_error.disconnect(on_error)
        behind.detach(engine)
        other.detach(engine)
        behind.close()  # their connections closed here, not by the garbage collector in a later test
        other.close()


def test_slow_redis_costs_at_most_the_timeout_then_backs_off(
    engine: Engine, private_redis: RedisServer, proxy: Proxy
) -> None:
    """A Redis answering in 2 s adds about the timeout to a read, and nothing once backing off."""
    cache = SQLCache(
        proxy.url, prefix=f"s{uuid.uuid4().hex[:8]}", timeout=0.2, failure_threshold=2, backoff=30
    )
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine, "v1")
        assert name(engine, uid) == "v1"
        proxy.latency = 2.0
        durations = []
        for _ in range(5):
            t0 = time.monotonic()
            assert name(engine, uid) == "v1"
            durations.append(time.monotonic() - t0)
        assert max(durations[:2]) < 0.2 * 2 + 0.5, durations  # the timeout, not Redis' 2 s
        assert max(durations[2:]) < 0.15, durations  # backing off: Redis not even asked
        assert cache.stats()["backoffs"] >= 1
    finally:
        proxy.latency = 0
        cache.detach(engine)


def test_close_applies_the_journal_when_redis_is_back(
    engine: Engine, private_redis: RedisServer, proxy: Proxy
) -> None:
    """A process that journalled an invalidation during a partition and shuts down cleanly after it
    healed (a rolling deploy after a blip) applies its journal in close(), even while its breaker is
    still open: other processes are not served the old row until the entry expires."""
    writer = SQLCache(proxy.url, prefix="closing", timeout=0.3, failure_threshold=1, backoff=30)
    reader = SQLCache(private_redis.url, prefix="closing")
    with writer_and_reader(engine, writer, reader) as other:
        uid = make_user(engine)
        assert [name(other, uid), name(other, uid)] == ["ann", "ann"]
        proxy.cut()
        rename_user(engine, uid, "bob")
        assert writer.stats()["journal"] >= 1 and writer.stats()["backoffs"] >= 1
        proxy.heal()
        writer.close()  # the breaker is open for 30 s: the last replay goes to Redis anyway
        assert writer.stats()["journal"] == 0
        assert name(other, uid) == "bob"
