"""secret=: entries written without the secret, or moved to another key, are misses."""

from __future__ import annotations

import uuid

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import ConfigurationError, SQLCache, cached

from ..conftest import SQLCounter
from ..helpers import make_user, user_name
from ..models import User

SECRET = "correct horse battery staple"


def signed_cache(redis_url: str, engine: Engine, prefix: str, secret: str | None) -> SQLCache:
    c = SQLCache(redis_url, prefix=prefix, secret=secret)
    c.strict_signals = True
    c.register(User)
    c.attach(engine)
    return c


def test_signed_entries(
    engine: Engine, redis_url: str, redis_client: redis.Redis, sql_count: SQLCounter
) -> None:
    """Signed entries hit; entries forged by a writer without the secret, or swapped between keys, miss."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    good = signed_cache(redis_url, engine, prefix, SECRET)
    try:
        a, b = make_user(engine, "a"), make_user(engine, "b")
        assert user_name(engine, a) == "a" and user_name(engine, b) == "b"
        sql_count.reset()
        assert user_name(engine, a) == "a"
        assert len(sql_count) == 0
        key_a, key_b = sorted(redis_client.scan_iter(match=f"{prefix}:e:*"))
        value_a, value_b = redis_client.get(key_a), redis_client.get(key_b)
        assert value_a is not None and value_b is not None
        header_a, payload_a = value_a.split(b"|", 1)
        _, payload_b = value_b.split(b"|", 1)
        # b's authentic payload under a's key and current generations: signed for the other key
        redis_client.set(key_a, header_a + b"|" + payload_b)
        assert user_name(engine, a) == "a"
        assert good.stats()["errors"] == 1
        # an unsigned payload (what a writer without the secret can make) under valid generations
        redis_client.set(key_a, header_a + b"|" + payload_a[16:])
        assert user_name(engine, a) == "a"
        assert good.stats()["errors"] == 2
        good.detach(engine)
        forger = signed_cache(redis_url, engine, prefix, "another secret, long enough")
        with Session(engine) as s:  # the forger fills a query entry the good cache will read
            s.scalars(select(User).options(cached())).all()
        forger.detach(engine)
        good.attach(engine)
        errors = good.stats()["errors"]
        with Session(engine) as s:
            assert len(s.scalars(select(User).options(cached())).all()) == 2
        assert good.stats()["errors"] == errors + 1
    finally:
        good.detach(engine)
        good.clear()


def test_short_secret_refused(redis_url: str) -> None:
    """A secret shorter than 16 characters is a configuration error."""
    with pytest.raises(ConfigurationError, match="secret"):
        SQLCache(redis_url, prefix="x", secret="short")
