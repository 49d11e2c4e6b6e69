"""Deterministic race drivers: pause a thread right after a given SELECT, run a writer, resume."""

from __future__ import annotations

import gc
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from .models import User


class Gate:
    """Blocks the chosen thread after its next matching SELECT until ``resume()``."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self._resume = threading.Event()
        self.thread: threading.Thread | None = None

    def resume(self) -> None:
        self._resume.set()

    def wait_paused(self, timeout: float = 20) -> None:
        assert self.paused.wait(timeout), "reader never reached the paused point"

    def block(self) -> None:
        self.paused.set()
        assert self._resume.wait(30), "test never resumed the reader"


@contextmanager
def pause_after_select(engine: Engine, table: str) -> Iterator[Gate]:
    """Pause ``gate.thread`` just after it ran a SELECT that reads ``table`` (between SELECT and fill)."""
    gate = Gate()
    fired = threading.Event()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if (
            threading.current_thread() is gate.thread
            and not fired.is_set()
            and statement.lstrip().upper().startswith("SELECT")
            and table in statement
        ):
            fired.set()
            gate.block()

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield gate
    finally:
        gate.resume()
        event.remove(engine, "after_cursor_execute", after)


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``fn`` in a thread; the list receives its result or the exception it raised."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=target, daemon=True)
    return t, out


def finish(t: threading.Thread, out: list[Any], timeout: float = 30) -> Any:
    t.join(timeout)
    assert not t.is_alive(), "thread did not finish"
    if out and isinstance(out[0], BaseException):
        raise out[0]
    return out[0] if out else None


def make_user(engine: Engine, name: str = "ann", **kw: Any) -> int:
    """Insert one user and return its id."""
    with Session(engine) as s:
        u = User(name=name, **kw)
        s.add(u)
        s.commit()
        return u.id


def user_name(engine: Engine, uid: int) -> str | None:
    """The user's name as a fresh session's get returns it (through the cache when registered)."""
    with Session(engine) as s:
        u = s.get(User, uid)
        return None if u is None else u.name


def rename_user(engine: Engine, uid: int, name: str) -> None:
    """Change the user's name in a committed transaction (through the cache's write path)."""
    with Session(engine) as s:
        u = s.get(User, uid)
        assert u is not None
        u.name = name
        s.commit()


def each_commit_read_back(reader: Engine, writer: Engine, uid: int, rounds: int, reads: int = 3) -> None:
    """``rounds`` times, ``writer`` renames the user (v1, v2, ...) and, as soon as each commit returned,
    ``reader`` reads it ``reads`` times (from Redis, then, with a local tier, from memory): each read
    sees the new name."""
    for n in range(1, rounds + 1):
        rename_user(writer, uid, f"v{n}")
        for _ in range(reads):
            assert user_name(reader, uid) == f"v{n}"


@contextmanager
def durable_cache(engine: Engine, redis_url: str, prefix: str, **kw: Any) -> Iterator[Any]:
    """A cache with durable=True attached to ``engine`` (outbox table created and emptied), User
    registered, strict signals; cleared and closed at the end."""
    from sqlalchemy import MetaData

    from sqlcache import SQLCache, outbox_table

    table = outbox_table(MetaData())
    table.create(engine, checkfirst=True)
    with engine.begin() as c:
        c.execute(table.delete())
    cache = SQLCache(redis_url, prefix=prefix, durable=True, **kw)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    try:
        yield cache
    finally:
        cache.clear()
        cache.close()


def check_failover(
    engine: Engine,
    new_cache: Callable[[], SQLCache],
    lose: Callable[[SQLCache, Callable[[], None]], object],
    reader: str,
    rows: int,
    versions: int,
    rereads: int,
) -> int:
    """A failover that loses acknowledged releases serves nothing stale; returns the reads checked.

    ``rows`` users are filled at "v0" through a first cache (the writer); ``lose(writer, window)`` runs
    ``window`` while the primary's replica receives nothing, then fails over. The window commits
    versions 1..``versions`` of every row, each read back (and filled on the old primary only); with
    ``reader == "late"`` it then closes the writer. Afterwards ``rereads`` rounds of reads, through the
    writer or through a cache made after the failover, must return the last version that returned, and
    must have hit Redis for at least one round's worth (not all misses)."""
    caches: list[SQLCache] = []

    def cache() -> SQLCache:
        c = new_cache()
        c.register(User)
        c.attach(engine)
        caches.append(c)
        return c

    writer = cache()
    checked = 0
    try:
        uids = [make_user(engine, "v0") for _ in range(rows)]
        for uid in uids:
            assert user_name(engine, uid) == "v0"  # filled, then replicated
        last = dict.fromkeys(uids, "v0")

        def window() -> None:
            nonlocal checked
            for n in range(1, versions + 1):
                for uid in uids:
                    with Session(engine) as s:
                        u = s.get(User, uid)
                        assert u is not None
                        u.name = f"v{n}"
                        s.commit()
                    last[uid] = f"v{n}"
                    assert user_name(engine, uid) == last[uid]
                    checked += 1
            if reader == "late":
                writer.close()

        lose(writer, window)
        c = writer if reader == "writer" else cache()
        hits = c.stats()["hits"]
        for _ in range(rereads):
            for uid in uids:
                assert user_name(engine, uid) == last[uid]
                checked += 1
        assert c.stats()["hits"] - hits >= rows  # Redis answered: the reads were not all misses
    finally:
        for c in caches:
            c.close()
    return checked


class AtRelease:
    """A plugin whose store wrapper calls ``action(operation, args)`` as a post-commit release begins
    (``release``, or ``release_after`` for a pipelined lock), whenever ``when()`` says so. The action may
    raise (a release lost as in an outage), await through SQLAlchemy's asyncio bridge, or cancel a task."""

    name = "at-release"

    def __init__(self, action: Callable[[str, tuple[Any, ...]], None], when: Callable[[], bool]) -> None:
        self.action = action
        self.when = when

    def setup(self, host: Any) -> None:
        plugin = self

        class Wrapper:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                attr = getattr(self._inner, name)
                if name not in ("release", "release_after"):
                    return attr

                def hooked(*args: Any, **kwargs: Any) -> Any:
                    if plugin.when():
                        plugin.action(name, args)
                    return attr(*args, **kwargs)

                return hooked

        host.wrap_store(Wrapper)

    def close(self) -> None:
        pass


@contextmanager
def writer_and_reader(engine: Engine, writer: SQLCache, reader: SQLCache) -> Iterator[Engine]:
    """Two processes' caches on one prefix, as two processes would have them: ``writer`` attached to
    ``engine``, ``reader`` to a second engine of the same database (yielded); both with User registered,
    detached and closed afterwards."""
    from .conftest import shareable_url

    other = create_engine(shareable_url(engine))
    for cache, e in ((writer, engine), (reader, other)):
        cache.register(User)
        cache.attach(e)
    try:
        yield other
    finally:
        for cache, e in ((writer, engine), (reader, other)):
            cache.detach(e)
            cache.close()
        other.dispose()


class NoSettler:
    """In place of the settler thread, for a test whose reply must wait for the store's next call."""

    def watch(self, store: Any) -> None:
        pass

    def unwatch(self, store: Any) -> None:
        pass


def check_a_dropped_cache_closes_its_connections(redis_url: str, **options: Any) -> None:
    """A cache dropped without close(), once collected, has closed the socket of every connection its
    store opened to Redis. The connections are kept here (so that only the cache can close them), and
    keeping them keeps nothing else alive."""
    cache = SQLCache(redis_url, prefix=f"d{uuid.uuid4().hex[:10]}", **options)
    cache.register(User)
    cache.invalidate(User, 1)  # a connection opened (on a cluster: a node store's)
    conns = _connections_of(cache._parts.store)
    socks = [c._sock for c in conns if c._sock is not None]
    assert socks and all(s.fileno() != -1 for s in socks)
    tier = cache._parts.local
    if tier is not None:  # its keeper running, with its tracking connection (attach() starts it)
        tier.start()
        _until(lambda: tier._tracking is not None and tier._tracking._sock is not None)
        socks.append(tier._tracking._sock)
    gone = weakref.ref(cache)
    del cache
    gc.collect()
    assert gone() is None
    if tier is not None:
        keeper = tier._thread
        _until(lambda: keeper is None or not keeper.is_alive())
    assert [s for s in socks if s.fileno() != -1] == []
    del conns


def _until(check: Callable[[], object], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _connections_of(store: Any) -> list[Any]:
    """The connections of a store's pools: a server's store, or each node store of a cluster router."""
    clients = [store.client] if hasattr(store, "client") else [s.client for s in store._stores.values()]
    pools = [c.connection_pool for c in clients]
    return [c for p in pools for c in [*p._available_connections, *p._in_use_connections]]
