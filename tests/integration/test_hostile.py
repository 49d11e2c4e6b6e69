"""Hostile or damaged values under the cache's own keys (clock, generations, locks, fresh-until stamps):
a miss or a repair, never an exception in the caller and never a stale read."""

from __future__ import annotations

import sys
import uuid

import msgpack
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _keys, cached
from sqlcache.config import MAX_LOCK_TTL, MAX_TTL, CacheConfig, ModelPolicy
from sqlcache.errors import ConfigurationError

from ..helpers import make_user, rename_user
from ..models import User


def _name(engine: Engine, uid: int) -> str:
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None
        return user.name


@pytest.mark.parametrize("clock", [b"9" * 5000, b"x", b"-5", b"1.5"], ids=["5000-digits", "x", "-5", "1.5"])
def test_unreadable_clock_never_raises(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, clock: bytes
) -> None:
    """A clock that is not a number sqlcache wrote (5,000 digits made int() raise out of get()) is a
    miss answered by the database; the clock is repaired and hits resume."""
    cache.register(User)
    uid = make_user(engine)
    _name(engine, uid)
    redis_client.set(_keys.clock_key(cache.config.prefix), clock)
    assert _name(engine, uid) == "ann"
    assert _name(engine, uid) == "ann"
    raw = redis_client.get(_keys.clock_key(cache.config.prefix))
    assert raw is not None and raw.isdigit() and len(raw) <= 16
    hits = cache.stats()["hits"]
    assert _name(engine, uid) == "ann"
    assert cache.stats()["hits"] == hits + 1


def test_clock_beyond_two_to_the_53_still_invalidates(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """Past 2^53 a double no longer counts by one: every release drew the same generation and commits
    stopped invalidating (v2 was served after v3 committed). Such a clock is replaced, not used."""
    cache.register(User)
    uid = make_user(engine)
    _name(engine, uid)
    redis_client.set(_keys.clock_key(cache.config.prefix), str(2**60))
    rename_user(engine, uid, "v2")
    assert _name(engine, uid) == "v2"  # filled under the generation of the v2 commit
    rename_user(engine, uid, "v3")
    assert _name(engine, uid) == "v3"
    assert _name(engine, uid) == "v3"


def test_hostile_generation_and_lock_values(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """A generation of 5,000 digits, or a lock said to expire in a thousand years, is garbage: read as
    missing (a fresh generation), so reads answer from the database and the cache fills again."""
    cache.register(User)
    uid = make_user(engine)
    dep = _keys.identity_dep_key(cache.config.prefix, "users", (uid,))
    for value in (
        b"7" * 5000,
        b"5;99999999999999999999;tok;tok:99999999999999999999",
        b"5;1;t;t:" + b"9" * 40,
    ):
        _name(engine, uid)
        redis_client.set(dep, value)
        assert _name(engine, uid) == "ann"
        assert _name(engine, uid) == "ann"
        hits = cache.stats()["hits"]
        assert _name(engine, uid) == "ann"
        assert cache.stats()["hits"] == hits + 1, value[:40]
        rename_user(engine, uid, "bob")
        assert _name(engine, uid) == "bob"
        rename_user(engine, uid, "ann")


def test_huge_fresh_until_stamp_never_raises(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """A stale-while-revalidate stamp of 5,000 digits is not a stamp: the entry is a miss, no exception."""
    make_user(engine)
    stmt = select(User).options(cached(ttl=60, swr=60))
    with Session(engine) as s:
        assert [u.name for u in s.scalars(stmt)] == ["ann"]
    (key,) = [k for k in redis_client.scan_iter(f"{cache.config.prefix}:q:*") if not k.endswith(b":lock")]
    entry = redis_client.get(key)
    assert entry is not None
    header, _, payload = entry.partition(b"|")
    gens = header.split(b";F")[0]
    redis_client.set(key, gens + b";F" + b"9" * 5000 + b"|" + payload)
    with Session(engine) as s:
        assert [u.name for u in s.scalars(stmt)] == ["ann"]


def test_ttl_bounds() -> None:
    """TTLs past ten years and locks past a day are refused at configuration (Redis would refuse the
    expiry at every call, each refusal an outage)."""
    with pytest.raises(ConfigurationError, match="at most"):
        ModelPolicy(ttl=MAX_TTL + 1)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        CacheConfig(prefix="p", lock_ttl=MAX_LOCK_TTL + 1)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        CacheConfig(prefix="p", lock_ttl=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="generation_ttl"):
        CacheConfig(prefix="p", generation_ttl=10**12)
    with pytest.raises(ConfigurationError, match="ttl"):
        cached(ttl=10**12)
    assert ModelPolicy(ttl=MAX_TTL).ttl == MAX_TTL


def test_prefix_that_extends_another_is_its_own(
    engine: Engine, redis_url: str, redis_client: redis.Redis
) -> None:
    """Caches "t…" and "t…:b" share nothing: clear() of the first leaves every key of the second, and
    neither ever reads the other's entries."""
    base = f"t{uuid.uuid4().hex[:10]}"
    outer, inner = SQLCache(redis_url, prefix=base), SQLCache(redis_url, prefix=f"{base}:b")
    try:
        for c in (outer, inner):
            c.strict_signals = True
            c.register(User)
        inner.attach(engine)
        uid = make_user(engine)
        assert _name(engine, uid) == "ann"  # inner filled its entry
        inner_keys = set(redis_client.scan_iter(_keys.scan_pattern(inner.config.prefix)))
        assert inner_keys
        outer.clear()
        assert set(redis_client.scan_iter(_keys.scan_pattern(inner.config.prefix))) == inner_keys
        hits = inner.stats()["hits"]
        assert _name(engine, uid) == "ann"
        assert inner.stats()["hits"] == hits + 1
    finally:
        inner.detach(engine)
        for c in (outer, inner):
            c.clear()
            c.close()


def test_entry_larger_than_any_fill_is_not_decoded(engine: Engine, cache: SQLCache, redis_url: str) -> None:
    """An entry larger than max_entry_bytes (no fill writes one) is refused before decoding: a miss,
    the entry deleted, cache_error("decode")."""
    cache.register(User)
    uid = make_user(engine, "x" * 40)
    assert _name(engine, uid) == "x" * 40  # filled by the suite's cache
    small = SQLCache(redis_url, prefix=cache.config.prefix, max_entry_bytes=10)
    small.register(User)
    cache.detach(engine)
    small.attach(engine)
    try:
        assert _name(engine, uid) == "x" * 40
        st = small.stats()
        # refused as an error (not a hit), answered by the database, and not stored again by this cache
        assert (st["hits"], st["errors"], st["too_large"]) == (0, 1, 1)
    finally:
        small.detach(engine)
        small.close()
        cache.attach(engine)


def test_entry_with_colliding_set_members_is_a_quick_miss(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """A forged identity entry of the right shape whose value is a set of thousands of distinct big ints
    with one hash (building that set took quadratic time) is a miss: refused before hashing any of them,
    deleted, cache_error("decode"); the database answers."""
    cache.register(User)
    uid = make_user(engine)
    assert _name(engine, uid) == "ann"
    (key,) = list(redis_client.scan_iter(f"{cache.config.prefix}:e:*"))
    entry = redis_client.get(key)
    assert entry is not None
    header, _, payload = entry.partition(b"|")
    fp, cid, mask, values = msgpack.unpackb(payload[1:], strict_map_key=False, ext_hook=msgpack.ExtType)
    members = []
    for k in range(20000):
        n = 2**64 + k * sys.hash_info.modulus
        members.append(msgpack.ExtType(2, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True)))
    values[1] = msgpack.ExtType(9, msgpack.packb(members))
    redis_client.set(key, header + b"|" + payload[:1] + msgpack.packb([fp, cid, mask, values]))
    errors = cache.stats()["errors"]
    assert _name(engine, uid) == "ann"
    assert cache.stats()["errors"] == errors + 1
