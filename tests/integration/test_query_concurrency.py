"""Stampede protection and stale-while-revalidate for cached queries."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, cached

from ..conftest import SQLCounter
from ..helpers import finish, make_user, pause_after_select, run_in_thread
from ..models import User


def users_query(engine: Engine, **opts: object) -> list[str]:
    with Session(engine) as s:
        return [u.name for u in s.scalars(select(User).order_by(User.id).options(cached(**opts)))]  # type: ignore[arg-type]


def query_entry(client: redis.Redis, cache: SQLCache) -> bytes:
    (key,) = [k for k in client.scan_iter(match=f"{cache.config.prefix}:q:*") if not k.endswith(b":lock")]
    return key


class _Waiters:
    """A plugin counting the threads that are waiting for another caller's fill (the store's pause)."""

    name = "waiters"

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def setup(self, host: Any) -> None:
        plugin = self

        class Wrapper:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                attr = getattr(self._inner, name)
                if name != "pause":
                    return attr

                def pause(seconds: float) -> None:
                    plugin.threads.add(threading.get_ident())
                    attr(seconds)

                return pause

        host.wrap_store(Wrapper)

    def close(self) -> None:
        pass


def test_concurrent_misses_query_the_database_once(
    engine: Engine, redis_url: str, sql_count: SQLCounter
) -> None:
    """Six callers miss one key together: one queries the database, the others get its fill. (The
    first is held between its SELECT and its fill until the five others are all waiting for it; they
    wait up to ``stampede_wait``, set far above how long that takes on a loaded machine.)"""
    cache = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", default_ttl=600, stampede_wait=30)
    waiters = _Waiters()
    cache.add_plugin(waiters)
    cache.attach(engine)
    try:
        make_user(engine, "a")
        sql_count.reset()
        with pause_after_select(engine, "users") as gate:
            first, out = run_in_thread(lambda: users_query(engine))
            gate.thread = first
            first.start()
            gate.wait_paused()  # it holds the stampede lock, between its SELECT and its fill
            others = [run_in_thread(lambda: users_query(engine)) for _ in range(5)]
            for t, _ in others:
                t.start()
            deadline = time.monotonic() + 30
            while len(waiters.threads) < 5:
                assert time.monotonic() < deadline, "the five callers never waited for the fill"
                time.sleep(0.01)  # polling the waiters' count, with a deadline
            gate.resume()
            assert finish(first, out) == ["a"]
            assert all(finish(t, o) == ["a"] for t, o in others)
        assert sql_count.selects() == 1, ({k: v for k, v in cache.stats().items() if v}, sql_count.statements)
        assert cache.stats()["stampede_waits"] == 5
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()


def test_dead_lock_holder_blocks_no_one_past_expiry(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, sql_count: SQLCounter
) -> None:
    """A stampede lock whose holder died expires, and the next caller queries at once."""
    make_user(engine, "a")
    users_query(engine)
    entry = query_entry(redis_client, cache)
    redis_client.delete(entry)
    redis_client.set(entry + b":lock", b"dead-holder", px=300)
    started = time.monotonic()
    assert users_query(engine) == ["a"]
    assert time.monotonic() - started < cache.config.stampede_wait
    assert redis_client.get(entry + b":lock") is None  # taken over, then dropped by the fill


def test_lock_released_only_by_owner(cache: SQLCache, redis_client: redis.Redis) -> None:
    """Compare-and-delete: another token cannot drop a caller's stampede lock."""
    key = f"{cache.config.prefix}:q:{uuid.uuid4().hex}"
    assert cache.store.try_fill_lock(key, "mine", 5000)
    assert not cache.store.try_fill_lock(key, "theirs", 5000)
    cache.store.unlock_fill(f"{cache.config.prefix}:clock", key, "theirs")
    assert redis_client.get(key + ":lock") == b"mine"
    cache.store.unlock_fill(f"{cache.config.prefix}:clock", key, "mine")
    assert redis_client.get(key + ":lock") is None


@pytest.fixture
def expired(engine: Engine, cache: SQLCache) -> Iterator[None]:
    make_user(engine, "a")
    assert users_query(engine, ttl=1, swr=60) == ["a"]
    time.sleep(1.2)  # past the TTL, within swr
    yield


def test_swr_serves_expired_entry_while_another_refreshes(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, sql_count: SQLCounter, expired: None
) -> None:
    """An expired but valid entry is served (no SQL) while another caller holds the refresh."""
    entry = query_entry(redis_client, cache)
    redis_client.set(entry + b":lock", b"refresher", px=5000)
    sql_count.reset()
    assert users_query(engine, ttl=1, swr=60) == ["a"]
    assert len(sql_count) == 0
    assert cache.stats()["stale_served"] == 1
    redis_client.delete(entry + b":lock")
    assert users_query(engine, ttl=1, swr=60) == ["a"]  # this caller refreshes
    assert sql_count.selects() == 1
    sql_count.reset()
    assert users_query(engine, ttl=1, swr=60) == ["a"]  # fresh again
    assert len(sql_count) == 0


def test_swr_never_serves_invalidated_entry(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, expired: None
) -> None:
    """After a commit, an expired entry is not served even though stale serving is allowed."""
    entry = query_entry(redis_client, cache)
    redis_client.set(entry + b":lock", b"refresher", px=300)  # a refresher is at work
    with Session(engine) as s:
        s.scalars(select(User)).one().name = "b"
        s.commit()
    assert users_query(engine, ttl=1, swr=60) == ["b"]
    assert cache.stats()["stale_served"] == 0
