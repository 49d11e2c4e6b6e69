"""The invalidation clock inside one script: a script reads it from Redis once and keeps it (``CLOCK`` in
``lua/_lib.lua``); every generation it draws is still new, and the clock it leaves is the largest."""

from __future__ import annotations

import uuid

import redis
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _keys

from ..models import User


def _generation(raw: bytes) -> int:
    return int(raw.split(b";")[0])


def test_a_release_of_many_keys_draws_a_new_generation_for_each(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    cache.register(User)
    with Session(engine) as s:
        users = [User(name=f"u{i}") for i in range(40)]
        s.add_all(users)
        s.commit()
        p = cache.config.prefix
        clock = redis_client.get(_keys.clock_key(p))
        before = int(clock) if clock is not None else 0
        for u in users:
            u.name += "!"
        s.commit()
    deps = [k for k in redis_client.scan_iter(match=f"{p}:d:*") if k != _keys.global_dep_key(p).encode()]
    values = [v for v in redis_client.mget(deps) if v is not None]
    gens = [_generation(v) for v in values if b";" not in v]
    assert len(gens) == len(values) >= 41  # 40 rows, their table's row-writes key; none left locked
    released = [g for g in gens if g > before]
    assert len(released) >= 41 and len(set(released)) == len(released)
    clock_now = redis_client.get(_keys.clock_key(p))
    assert clock_now is not None and int(clock_now) == max(gens)


def test_a_lineage_fence_draws_above_the_clock_it_moved(
    engine: Engine, redis_url: str, redis_client: redis.Redis
) -> None:
    """lineage.lua moves a clock that lags behind to a minute ahead of Redis TIME, then draws the fence's
    generation: above the moved clock, never from the value it read first."""
    p = f"t-{uuid.uuid4().hex[:8]}"
    redis_client.set(_keys.clock_key(p), b"5")
    redis_client.set(_keys.lineage_key(p), b"another-server")
    cache = SQLCache(redis_url, prefix=p)
    try:
        cache.attach(engine)
        cache.register(User)
        with Session(engine) as s:
            s.get(User, 1)  # the first connection runs lineage.lua: a fence
        assert cache.stats()["lineage_fences"] == 1
        fence = redis_client.get(_keys.global_dep_key(p))
        clock = redis_client.get(_keys.clock_key(p))
        assert fence is not None and clock is not None
        redis_now_us = int(redis_client.time()[0]) * 1_000_000
        assert _generation(fence) > redis_now_us + 50_000_000  # the minute's lead, less this test's time
        assert int(clock) >= _generation(fence)
    finally:
        cache.close()
        for key in redis_client.scan_iter(match=f"{p}:*"):
            redis_client.delete(key)


def test_a_clock_at_its_edge_never_repeats_a_generation(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """A clock at 2^53 - 1 counts past the last integer a double holds within one release: the script
    resets it (a minute ahead of Redis TIME) rather than draw the same generation twice."""
    cache.register(User)
    p = cache.config.prefix
    with Session(engine) as s:
        users = [User(name=f"u{i}") for i in range(5)]
        s.add_all(users)
        s.commit()
        names = [u.name for u in users]  # loaded (and filled) now: the release is the next script to draw
        redis_client.set(_keys.clock_key(p), str(2**53 - 1))
        for u, name in zip(users, names, strict=True):
            u.name = name + "!"
        s.commit()
    deps = [k for k in redis_client.scan_iter(match=f"{p}:d:*") if k != _keys.global_dep_key(p).encode()]
    gens = [_generation(v) for v in redis_client.mget(deps) if v is not None and b";" not in v]
    assert len(gens) >= 6 and len(set(gens)) == len(gens), sorted(gens)
