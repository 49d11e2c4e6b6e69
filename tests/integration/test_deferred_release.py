"""A commit does not wait for its release (``RedisStore.release_after``).

The lock a commit sent before its COMMIT is confirmed after it; the release is then sent, and
``commit()`` returns without its reply. Until Redis runs it, every dependency it releases is still
locked: readers miss and read the database, fills are refused. Its reply is read by the connection's
next checkout; a release Redis refused, or never ran, is journaled like any other.

The release is held at Redis with ``CLIENT PAUSE ... WRITE`` (reads go on, scripts wait) on a private
redis-server, once the lock has run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqlcache import SQLCache, signals

from ..conftest import RedisServer, shareable_url
from ..helpers import AtRelease, make_user, rename_user, user_name
from ..models import User
from ..topologies import wait_until


@dataclass
class Scene:
    writer: SQLCache
    reader: SQLCache
    engine: Engine  # the writer's
    other: Engine  # the reader's: another cache on the same database and Redis, as another process
    admin: redis.Redis
    armed: list[bool]

    def deps(self) -> list[bytes]:
        """Every dependency key's value under the prefix."""
        keys = sorted(self.admin.scan_iter(match=f"{self.writer.config.prefix}:d:*"))
        return [v for v in self.admin.mget(keys) if v is not None] if keys else []

    def locked(self) -> bool:
        return any(b";" in v for v in self.deps())

    def hold(self, _operation: str, _args: tuple[Any, ...]) -> None:
        """As the release begins: once the lock ran, scripts wait (the release among them)."""
        self.armed[0] = False
        wait_until(lambda: None if self.locked() else "not locked yet", 5, "the lock")
        self.admin.client_pause(10_000, all=False)


@pytest.fixture
def scene(private_redis: RedisServer, engine: Engine) -> Iterator[Scene]:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis(port=private_redis.port, socket_timeout=5)
    writer = SQLCache(private_redis.url, prefix=prefix)
    reader = SQLCache(private_redis.url, prefix=prefix)
    other = create_engine(shareable_url(engine))
    writer.attach(engine)
    reader.attach(other)
    writer.register(User)
    reader.register(User)
    armed = [False]
    s = Scene(writer, reader, engine, other, admin, armed)
    writer.add_plugin(AtRelease(s.hold, lambda: armed[0]))  # type: ignore[arg-type]
    try:
        yield s
    finally:
        admin.client_unpause()
        writer.close()
        reader.close()
        other.dispose()


def _errors(cache: SQLCache) -> list[str]:
    seen: list[str] = []

    @signals.cache_error.connect_via(cache, weak=False)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        seen.append(operation)

    return seen


def _reads_hit(s: Scene, engine: Engine, cache: SQLCache, uid: int, name: str) -> None:
    """Reads of ``uid`` return ``name``, and soon from Redis (a hit counted)."""

    def hit() -> str | None:
        before = cache.stats()["hits"]
        assert user_name(engine, uid) == name
        return None if cache.stats()["hits"] > before else "not a hit yet"

    wait_until(hit, 5, f"a hit on {name}")


def test_commit_returns_before_its_release_runs_and_readers_miss_meanwhile(scene: Scene) -> None:
    s = scene
    uid = make_user(s.engine, "v1")
    _reads_hit(s, s.other, s.reader, uid, "v1")
    errors = _errors(s.writer)
    s.armed[0] = True
    t0 = time.monotonic()
    rename_user(s.engine, uid, "v2")
    took = time.monotonic() - t0
    # commit() returned with the release still held at Redis: the dependencies are locked
    assert s.locked()
    assert took < 5, took
    # another process's read sees the commit (its dependency is locked: a miss, the database answers)
    assert user_name(s.other, uid) == "v2"
    assert s.reader.stats()["hits"] >= 1
    s.admin.client_unpause()
    wait_until(lambda: None if not s.locked() else "still locked", 5, "the release")
    # the writer's next command reads the release's reply first, on the same connection: no error
    assert user_name(s.engine, uid) == "v2"
    assert errors == []
    assert s.writer.stats()["invalidations_deferred"] == 0
    _reads_hit(s, s.other, s.reader, uid, "v2")
    _reads_hit(s, s.engine, s.writer, uid, "v2")


def test_a_release_redis_refuses_after_commit_returned_is_journaled(scene: Scene) -> None:
    """The release meets NOSCRIPT (the scripts flushed while it waited): its reply, read by the next
    checkout, reports it; the journal applies it, and reads skip the cache until then."""
    s = scene
    uid = make_user(s.engine, "v1")
    _reads_hit(s, s.engine, s.writer, uid, "v1")
    errors = _errors(s.writer)
    s.armed[0] = True
    rename_user(s.engine, uid, "v2")
    assert s.locked()
    s.admin.script_flush()
    s.admin.client_unpause()
    assert user_name(s.engine, uid) == "v2"  # its checkout reads the refusal
    assert "release" in errors
    assert s.writer.stats()["invalidations_deferred"] >= 1
    assert user_name(s.other, uid) == "v2"
    # the journal's replay released the locks: no waiting for their expiry (lock_ttl, 60 s)
    wait_until(lambda: None if user_name(s.engine, uid) == "v2" and not s.locked() else "locked", 5, "replay")
    _reads_hit(s, s.engine, s.writer, uid, "v2")
    _reads_hit(s, s.other, s.reader, uid, "v2")


def test_a_release_lost_with_its_connection_is_journaled(scene: Scene) -> None:
    """The connection holding the release is killed before Redis ran it: the next checkout finds it
    closed, the journal applies the release, and no caller sees an error."""
    s = scene
    uid = make_user(s.engine, "v1")
    _reads_hit(s, s.engine, s.writer, uid, "v1")
    errors = _errors(s.writer)
    s.armed[0] = True
    rename_user(s.engine, uid, "v2")
    assert s.locked()
    s.admin.client_kill_filter(_type="normal", skipme=True)
    s.admin.client_unpause()
    assert user_name(s.engine, uid) == "v2"
    assert "release" in errors
    assert user_name(s.other, uid) == "v2"
    wait_until(lambda: None if user_name(s.engine, uid) == "v2" and not s.locked() else "locked", 5, "replay")
    _reads_hit(s, s.engine, s.writer, uid, "v2")
    _reads_hit(s, s.other, s.reader, uid, "v2")


def test_connections_closed_with_a_reply_owed_raise_no_false_alarm(scene: Scene) -> None:
    """The pool's connections closed (a failover, say) while one still owes a release's reply: that
    reply is forgotten, not read from the closed socket as a failure."""
    s = scene
    uid = make_user(s.engine, "v1")
    rename_user(s.engine, uid, "v2")  # its release's reply is owed by a pooled connection
    errors = _errors(s.writer)
    failures = s.writer.stats()["errors"]
    s.writer.store.client.connection_pool.disconnect()
    assert user_name(s.engine, uid) == "v2"
    assert errors == []
    assert s.writer.stats()["errors"] == failures
    _reads_hit(s, s.engine, s.writer, uid, "v2")
