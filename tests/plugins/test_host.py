"""The plugin host: what a plugin can reach through it, and that a plugin never breaks a read or a commit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, cached, signals
from sqlcache.errors import ConfigurationError
from sqlcache.plugin import Operation, Plugin, PluginHost, ReadResult, Store

from ..helpers import make_user
from ..models import User


class Recorder:
    """A plugin that records what it hears and sees, and can be told to fail."""

    def __init__(self, name: str = "recorder", fail: str = "") -> None:
        self.name = name
        self.fail = fail
        self.ops: list[Operation] = []
        self.signals: list[tuple[str, dict[str, Any]]] = []
        self.reads = 0
        self.closed = 0
        self.host: PluginHost | None = None

    def setup(self, host: PluginHost) -> None:
        self.host = host
        host.connect(signals.cache_hit, lambda sender, **kw: self._heard("hit", kw))
        host.connect(signals.invalidated, lambda sender, **kw: self._heard("invalidated", kw))
        host.add_operation_hook(self._hook)
        host.wrap_store(self._wrap)
        if self.fail == "setup":
            raise RuntimeError("setup failed")

    def _heard(self, what: str, kw: dict[str, Any]) -> None:
        if self.fail == "receiver":
            raise RuntimeError("receiver failed")
        self.signals.append((what, kw))

    @contextmanager
    def _hook(self, op: Operation) -> Iterator[None]:
        if self.fail == "enter":
            raise RuntimeError("hook failed on entry")
        yield
        self.ops.append(op)
        if self.fail == "exit":
            raise RuntimeError("hook failed on exit")

    def _wrap(self, inner: Store) -> Store:
        return _CountingStore(inner, self)

    def close(self) -> None:
        self.closed += 1
        if self.fail == "close":
            raise RuntimeError("close failed")


class _CountingStore:
    """Delegates every operation; counts reads (what a tier in front of Redis would intercept)."""

    def __init__(self, inner: Store, owner: Recorder) -> None:
        self._inner = inner
        self._owner = owner

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        self._owner.reads += 1
        return self._inner.read(clock_key, entry_key, dep_keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_recorder_is_a_plugin() -> None:
    """The test's plugin satisfies the runtime-checkable Plugin protocol."""
    assert isinstance(Recorder(), Plugin)


def test_hooks_signals_and_store_on_real_operations(engine: Engine, cache: SQLCache) -> None:
    """A miss, a hit, a commit and a cached query reach the plugin as operations with their results,
    as this cache's signals, and through its store wrapper."""
    rec = Recorder()
    cache.add_plugin(rec)
    cache.register(User)
    uid = make_user(engine)
    cache.clear()
    rec.ops.clear()
    with Session(engine) as s:
        assert s.get(User, uid) is not None
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None
        user.name = "bob"
        s.commit()
    with Session(engine) as s:
        s.scalars(select(User).options(cached(tags=["t"]))).all()
        s.scalars(select(User).options(cached(tags=["t"]))).all()
    with Session(engine) as s:
        s.add(User(name="new"))
        s.flush()
        s.scalars(select(User).options(cached())).all()  # own write: bypass
        s.rollback()
    seen = [(o.name, o.kind, o.result) for o in rec.ops]
    assert seen[:3] == [
        ("read", "identity", "miss"),
        ("fill", "identity", "stored"),
        ("read", "identity", "hit"),
    ]
    assert ("lock", None, "ok") in seen and ("release", None, "ok") in seen
    assert seen.count(("read", "query", "hit")) == 1 and ("fill", "query", "stored") in seen
    assert ("read", "query", "bypass") in seen
    identity_read = rec.ops[0]
    assert identity_read.model == "User" and identity_read.keys == 3 and identity_read.key
    query_fill = next(o for o in rec.ops if o.name == "fill" and o.kind == "query")
    assert query_fill.tags == ("t",)
    release = next(o for o in rec.ops if o.name == "release")
    assert release.keys >= 1
    assert [w for w, _ in rec.signals].count("hit") == 2
    assert any(w == "invalidated" for w, _ in rec.signals)
    assert rec.reads >= 4  # every Redis read went through the wrapper


def test_receivers_hear_only_their_cache(engine: Engine, cache: SQLCache, redis_url: str) -> None:
    """A plugin's receivers are connected for its own cache: another cache's signals do not reach it."""
    rec = Recorder()
    cache.add_plugin(rec)
    other = SQLCache(redis_url, prefix=f"o{uuid.uuid4().hex[:10]}")
    try:
        other.invalidate_tags("x")
        assert rec.signals == []
        cache.invalidate_tags("x")
        assert [(w, kw["tags"]) for w, kw in rec.signals] == [("invalidated", ["x"])]
    finally:
        other.clear()
        other.close()


@pytest.mark.parametrize("fail", ["receiver", "enter", "exit"])
def test_failing_plugin_never_breaks_reads_or_commits(engine: Engine, cache: SQLCache, fail: str) -> None:
    """Receivers and hooks that raise are counted in plugin_errors; reads, hits and commits go on
    (even with strict signals, which the suite sets)."""
    cache.register(User)
    rec = Recorder(fail=fail)
    cache.add_plugin(rec)
    uid = make_user(engine)
    for _ in range(2):
        with Session(engine) as s:
            assert s.get(User, uid).name == "ann"
    with Session(engine) as s:
        s.get(User, uid).name = "bob"
        s.commit()
    with Session(engine) as s:
        assert s.get(User, uid).name == "bob"
    assert cache.stats()["plugin_errors"] > 0
    assert cache.stats()["hits"] >= 1


def test_setup_failure_is_undone(engine: Engine, cache: SQLCache) -> None:
    """A plugin whose setup raises is refused, and what it connected, hooked and wrapped is removed."""
    cache.register(User)
    rec = Recorder(fail="setup")
    with pytest.raises(ConfigurationError, match="failed to set up"):
        cache.add_plugin(rec)
    assert cache.plugins() == []
    uid = make_user(engine)
    with Session(engine) as s:
        s.get(User, uid)
    assert rec.ops == [] and rec.signals == [] and rec.reads == 0


def test_names_are_unique_and_plugins_checked(cache: SQLCache) -> None:
    """A duplicate name or an object that is not a plugin is a ConfigurationError naming it."""
    cache.add_plugin(Recorder("a"))
    with pytest.raises(ConfigurationError, match="'a'"):
        cache.add_plugin(Recorder("a"))
    with pytest.raises(ConfigurationError, match="plugins must have"):
        cache.add_plugin(object())  # type: ignore[arg-type]
    cache.add_plugin(Recorder("b"))
    assert [p.name for p in cache.plugins()] == ["a", "b"]


def test_close_closes_plugins_last_first_and_unwraps(engine: Engine, redis_url: str) -> None:
    """close() removes each plugin's hooks, receivers and store wrapper and closes it (a close that
    raises is counted); the constructor's plugins= adds them in order."""
    order: list[str] = []

    class Closing(Recorder):
        def close(self) -> None:
            order.append(self.name)
            super().close()

    a, b = Closing("a"), Closing("b", fail="close")
    c = SQLCache(redis_url, prefix=f"p{uuid.uuid4().hex[:10]}", plugins=[a, b])
    assert [p.name for p in c.plugins()] == ["a", "b"]
    c.attach(engine)
    c.close()
    assert order == ["b", "a"] and c.stats()["plugin_errors"] == 1
    c.invalidate_tags("after-close")
    assert a.signals == [] and a.ops == []
    with pytest.raises(ConfigurationError):
        c.add_plugin(Recorder("late"))


def test_operations_report_redis_errors(engine: Engine) -> None:
    """With Redis unreachable, the read operation ends with result "error" and the error itself; the
    database answers."""
    rec = Recorder()
    uid = make_user(engine)
    c = SQLCache("redis://127.0.0.1:1/0", prefix=f"d{uuid.uuid4().hex[:10]}", plugins=[rec])
    c.register(User)
    c.attach(engine)
    try:
        with Session(engine) as s:
            assert s.get(User, uid).name == "ann"
            s.get(User, uid).name = "bob"
            s.commit()
    finally:
        c.close()
    by_name = {o.name: o for o in rec.ops}
    assert by_name["read"].result == "error" and by_name["read"].error is not None
    assert by_name["lock"].result == "error" and by_name["lock"].error is not None
    assert by_name["release"].result == "deferred" and by_name["release"].error is not None


def test_remove_plugin_undoes_it(engine: Engine, cache: SQLCache) -> None:
    """remove_plugin() takes the plugin's hooks, receivers and store wrapper away and closes it; the
    name is free again; an unknown name is a ConfigurationError."""
    cache.register(User)
    rec = Recorder()
    cache.add_plugin(rec)
    assert cache.remove_plugin("recorder") is rec and rec.closed == 1
    uid = make_user(engine)
    with Session(engine) as s:
        s.get(User, uid)
    cache.invalidate_tags("x")
    assert rec.ops == [] and rec.signals == [] and rec.reads == 0
    with pytest.raises(ConfigurationError, match="'recorder'"):
        cache.remove_plugin("recorder")
    cache.add_plugin(Recorder())


def test_bypasses_and_skipped_fills_reach_hooks(engine: Engine, cache: SQLCache) -> None:
    """A read that bypasses the cache names its model; a fill skipped because a writer holds a lock is
    an operation with result "skipped"; a get of an unregistered model during autoflush is no bypass."""
    cache.register(User)
    rec = Recorder()
    cache.add_plugin(rec)
    uid = make_user(engine)
    with Session(engine) as s:
        user = s.get(User, uid)
        assert user is not None
        user.name = "pending"
        s.get(User, uid + 1000)  # autoflush pending: the database answers
    bypasses = [o for o in rec.ops if o.name == "read" and o.result == "bypass"]
    assert [(o.kind, o.model) for o in bypasses] == [("identity", "User")]
