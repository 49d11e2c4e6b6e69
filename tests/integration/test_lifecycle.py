"""Connection and engine life cycle: disposed engines and invalidated connections behave as they do
without the cache, and the cache keeps working through them."""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import MetaData, create_engine, event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, outbox_table, signals

from ..conftest import SQLCounter
from ..helpers import (
    check_a_dropped_cache_closes_its_connections,
    durable_cache,
    make_user,
    rename_user,
    user_name,
)
from ..models import User


def test_rollback_after_the_connection_was_invalidated(engine: Engine, cache: SQLCache) -> None:
    """A rollback after the database connection was invalidated mid-transaction succeeds (it raised
    PendingRollbackError from the cache's rollback listener), and the session works again."""
    cache.register(User)
    uid = make_user(engine)
    with Session(engine) as s:
        s.execute(text("SELECT 1"))
        s.connection().invalidate()
        s.rollback()
        user = s.get(User, uid)
        assert user is not None and user.name == "ann"


@pytest.mark.parametrize("close", [True, False])
def test_dispose_keeps_the_cache_working(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, close: bool
) -> None:
    """After engine.dispose() (close=False too, as in a forked child) reads are still served from Redis
    and commits still invalidate their rows (not table-wide keys)."""
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    old = engine.pool
    engine.dispose(close=close)
    old.dispose()  # what the parent process does with its own pool; close=False leaves it to us here
    sql_count.reset()
    assert user_name(engine, uid) == "ann"
    assert sql_count.selects() == 0  # a hit
    rename_user(engine, uid, "bob")
    assert user_name(engine, uid) == "bob"
    sql_count.reset()
    assert user_name(engine, uid) == "bob"
    assert sql_count.selects() == 0


@pytest.fixture
def durable(engine: Engine, redis_url: str) -> Iterator[SQLCache]:
    with durable_cache(engine, redis_url, f"l{uuid.uuid4().hex[:10]}", relay_interval=3600) as cache:
        yield cache


def test_dispose_keeps_durable_commits_working(engine: Engine, durable: SQLCache) -> None:
    """With durable=True a commit after engine.dispose() writes its outbox row and succeeds (every
    commit raised and was rolled back), and the relay deletes the row."""
    uid = make_user(engine)
    engine.dispose()
    rename_user(engine, uid, "bob")
    assert user_name(engine, uid) == "bob"
    relays = set(durable._parts.outbox.relays.values()) if durable._parts.outbox is not None else set()
    assert len(relays) == 1
    (relay,) = relays
    relay.run_once()
    table = outbox_table(MetaData())
    with engine.connect() as c:
        left = c.execute(select(table).where(table.c.prefix == durable.config.prefix)).all()
    assert left == []


def test_close_after_the_engine_was_collected_switches_the_listeners_off(
    redis_url: str, _tmpdir: str
) -> None:
    """close() switches off the cache's Session and mapper listeners also when its engine was
    garbage-collected without detach(): nothing keeps the cache alive, and the next cache takes the same
    listeners instead of adding more (they stay installed: see test_close_inside_a_dispatch)."""

    def listeners() -> tuple[int, int]:
        return len(Session().dispatch.do_orm_execute), len(inspect(User).dispatch.after_insert)

    def cycle(name: str) -> weakref.ref[SQLCache]:
        cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")
        cache.register(User)
        eng = create_engine(f"sqlite:///{_tmpdir}/{name}.db")
        cache.attach(eng)
        del eng
        gc.collect()
        cache.close()
        return weakref.ref(cache)

    first = cycle("collected")
    installed = listeners()
    second = cycle("collected2")
    gc.collect()
    assert first() is None and second() is None
    assert listeners() == installed


def test_close_inside_a_dispatch(engine: Engine, redis_url: str) -> None:
    """close() and detach() from inside an event dispatch (as another thread, or a garbage-collector
    callback, may run them at any moment) leave SQLAlchemy's dispatch alone: removing a listener there
    raised "deque mutated during iteration" in the user's session."""
    cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")
    cache.register(User)
    cache.attach(engine)
    uid = make_user(engine, "ann")

    def close_now(orm_state: object) -> None:
        cache.close()

    event.listen(Session, "do_orm_execute", close_now, insert=True)
    try:
        with Session(engine) as s:
            assert s.get(User, uid) is not None
    finally:
        event.remove(Session, "do_orm_execute", close_now)

    other = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")
    other.attach(engine)

    def detach_now(*args: object) -> None:
        other.detach(engine)

    event.listen(engine, "before_cursor_execute", detach_now, insert=True)
    try:
        with engine.connect() as c:
            assert c.execute(select(User.name).where(User.id == uid)).scalar_one() == "ann"
    finally:
        event.remove(engine, "before_cursor_execute", detach_now)
        other.close()


def test_close_from_a_gc_callback_inside_hook_does_not_deadlock(redis_url: str, _tmpdir: str) -> None:
    """hook() and release() allocate while they hold the slots' lock, so a garbage-collector callback
    (a finalizer that closes a cache) can run inside them on the same thread: it must not wait for
    itself. Run in a thread so that a deadlock fails the test instead of hanging it."""
    from sqlcache import _slots

    cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")
    cache.attach(create_engine(f"sqlite:///{_tmpdir}/gc.db"))
    other = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}")

    def inside_hook() -> None:
        with _slots._lock:  # as hook() holds it when a collection runs the finalizer
            cache.close()
            other.attach(create_engine(f"sqlite:///{_tmpdir}/gc2.db"))

    t = threading.Thread(target=inside_hook, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    other.close()


def test_a_second_release_leaves_a_reused_slot_alone() -> None:
    """A slot released twice (two threads closing one cache) must not take the listener of the cache
    that reused it in between."""
    from sqlcache import _slots

    class Target:
        pass

    calls: list[str] = []
    target = Target()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_slots.event, "listen", lambda *a, **k: None)  # a plain object: nothing to listen on
        first = _slots.hook(target, "evt", lambda: calls.append("a"))
        first_fn = first.fn
        assert first_fn is not None
        first.release(first_fn)
        second = _slots.hook(target, "evt", lambda: calls.append("b"))
        assert second is first  # reused
        first.release(first_fn)  # the late second release
        assert second.fn is not None
        second.fn()
    assert calls == ["b"]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_close_reentering_from_inside_the_journal_does_not_deadlock(engine: Engine) -> None:
    """A garbage-collector callback may close a cache on a thread that is inside the cache's journal
    (here: the counter the journal bumps while it holds its lock closes the cache, as such a callback
    would): close() returns, and so does the commit whose invalidation was being journalled."""
    from ..conftest import free_port

    cache = SQLCache(f"redis://127.0.0.1:{free_port()}/0", prefix=f"j{uuid.uuid4().hex[:10]}", timeout=0.2)
    cache.register(User)
    cache.attach(engine)
    uid = make_user(engine)
    rep = cache._parts.rep
    original = rep.incr

    def incr(name: str, n: int = 1) -> None:
        original(name, n)
        if name == "invalidations_deferred":
            cache.close()

    rep.incr = incr  # type: ignore[method-assign]
    done = threading.Event()

    def commit() -> None:
        rename_user(engine, uid, "bob")  # Redis is away: the journal keeps the keys
        done.set()

    t = threading.Thread(target=commit, daemon=True)
    t.start()
    assert done.wait(20), "close() from inside the journal deadlocked"
    t.join()
    assert cache._closed


def test_close_reentering_from_inside_the_cluster_router_does_not_deadlock() -> None:
    """As 66a3b0b for the journal: a garbage-collector callback (a Flask app's finalizer, say) may close
    a cache on a thread that is inside ClusterStore._route. close() stops the stats publisher, whose
    delete routes again and waits for the router's plain Lock, held by this very thread."""
    from ..conftest import free_port

    port = free_port()
    cache = SQLCache(
        f"redis+cluster://127.0.0.1:{port}",
        prefix=f"c{uuid.uuid4().hex[:8]}",
        timeout=0.2,
        publish_stats=3600,
    )
    store: Any = cache.store
    deadline = threading.Event()
    for _ in range(100):  # the publisher's first turn (it fails: nothing listens there) is over
        if cache.stats()["errors"] >= 1:
            break
        deadline.wait(0.05)
    original = store._make

    def make() -> Any:
        cache.close()  # as a GC callback would, right here
        return original()

    store._make = make
    store._cluster = None
    done = threading.Event()

    def work() -> None:
        cache.invalidate_tags("t")  # routes: builds the cluster client under the router's lock
        done.set()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    assert done.wait(15), "close() from inside the cluster router deadlocked"


@pytest.mark.parametrize("local_bytes", [0, 1 << 20], ids=["redis", "local_tier"])
def test_a_cache_dropped_unclosed_closes_its_connections(redis_url: str, local_bytes: int) -> None:
    """A cache dropped without close() is collected (with a local tier too, whose keeper's finalizer
    held it), and its connections to Redis are closed then, not left to the collector socket by socket,
    each with a ResourceWarning."""
    check_a_dropped_cache_closes_its_connections(redis_url, local_bytes=local_bytes)


class _App:
    """An application object holding the cache (and what else it needs)."""

    client: redis.Redis | None = None
    cache: SQLCache | None = None


class _Credentials(redis.CredentialProvider):
    """Credentials read from the application (the shared server's default user takes any password)."""

    def __init__(self, app: _App) -> None:
        self.app = app

    def get_credentials(self) -> tuple[str, str]:
        return ("default", "any")


def test_a_dropped_cache_whose_pool_settings_hold_it_is_collected(redis_url: str) -> None:
    """What closes a dropped cache's connections holds their sockets only, not the pool, whose settings
    hold the caller's objects: a credential provider holding the application that holds the cache does
    not keep the cache alive (it did while the pool itself was held)."""
    app = _App()
    app.client = redis.Redis.from_url(redis_url, credential_provider=_Credentials(app))
    app.cache = SQLCache(app.client, prefix=f"d{uuid.uuid4().hex[:10]}")
    app.cache.register(User)
    app.cache.invalidate(User, 1)
    gone = weakref.ref(app.cache)
    del app
    gc.collect()
    assert gone() is None


class _Counting:
    """A plugin with a signal receiver."""

    name = "counting"

    def __init__(self) -> None:
        self.seen = 0

    def setup(self, host: Any) -> None:
        host.connect(signals.invalidated, self._seen)

    def _seen(self, sender: object, **kwargs: Any) -> None:
        self.seen += 1

    def close(self) -> None:
        pass


def test_a_dropped_cache_with_a_plugin_receiving_signals_is_collected(redis_url: str) -> None:
    """A plugin's receiver (on a module-level signal) does not keep a dropped cache alive."""
    plugin = _Counting()
    cache = SQLCache(redis_url, prefix=f"d{uuid.uuid4().hex[:10]}", plugins=[plugin])
    cache.register(User)
    cache.invalidate(User, 1)
    assert plugin.seen == 1
    gone = weakref.ref(cache)
    del cache
    gc.collect()
    assert gone() is None


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_dropped_cache_ends_its_connections_though_a_forked_child_holds_them(redis_url: str) -> None:
    """A cache dropped unclosed ends its connections on the server (shut down, as redis-py's disconnect
    does) though a child forked meanwhile still holds copies of their descriptors."""
    cache = SQLCache(redis_url, prefix=f"d{uuid.uuid4().hex[:10]}")
    cache.register(User)
    cache.invalidate(User, 1)
    conn: Any = cache.store.client.connection_pool._available_connections[0]
    conn.send_command("CLIENT", "ID")
    cid = conn.read_response()
    del conn
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # holds the descriptors until told to go
        os.read(read_end, 1)
        os._exit(0)
    try:
        del cache
        gc.collect()
        admin = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while str(cid) in [str(c["id"]) for c in admin.client_list()]:
            assert time.monotonic() < deadline, "the connection is still open on the server"
            time.sleep(0.02)
        admin.close()
    finally:
        os.write(write_end, b"x")
        os.waitpid(child, 0)
        os.close(read_end)
        os.close(write_end)
