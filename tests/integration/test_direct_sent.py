"""cache.get writes its MGET before its last checks (where the session would read, its own writes) and
reads the reply after them: what happens when something between the two says the reply must not be
used, or fails, or when the reply never comes. In every case the answer is Session.get's, and no
connection is left checked out with a reply unread on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache
from sqlcache.plugin import Operation, PluginHost

from ..conftest import RedisServer, SQLCounter, shareable_url
from ..helpers import make_user, user_name
from ..models import User
from ..proxy import Proxy
from .test_direct import _OldWrapper, _Timing
from .test_local_tier import serving, wait_for


def _in_use(cache: SQLCache) -> int:
    """Connections of the cache's pool checked out now (a read's held until its reply is taken)."""
    return len(cache.store.client.connection_pool._in_use_connections)  # type: ignore[attr-defined]


class _Sends:
    """Counts the reads cache.get sends ahead of its checks (the store's own method, wrapped)."""

    def __init__(self, cache: SQLCache, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        original = cache.store.send_read  # type: ignore[attr-defined]

        def counted(*args: Any) -> Any:
            self.n += 1
            return original(*args)

        monkeypatch.setattr(cache.store, "send_read", counted)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


class _Between(Session):
    """A Session whose ``get_bind`` (asked after cache.get's MGET went out, before its reply is read)
    runs ``between`` first."""

    between: Any = None

    def get_bind(self, *args: Any, **kw: Any) -> Any:
        if self.between is not None:
            self.between()
        return super().get_bind(*args, **kw)


def _first_bind_sees(cache: SQLCache, session: _Between) -> list[int]:
    """For each get from now on (cleared by the caller), the connections checked out when the session
    was first asked where it reads: 1 if the get's MGET was already out, 0 if it checked first."""
    seen: list[int] = []
    session.between = lambda: seen.append(_in_use(cache))
    return seen


def test_a_session_bound_elsewhere_is_answered_by_session_get(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session bound to an engine the cache is not attached to: its get is Session.get's (SQL, no hit);
    the reply sent for it is read and dropped, and the model's next gets check before they send. Gets
    on the cache's engine are hits; after 8 of them checked first in a row, the model sends first
    again, and one more session bound elsewhere puts it back."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled
    other = create_engine(shareable_url(engine))
    sends = _Sends(cache, monkeypatch)

    def get(bind: Engine) -> tuple[int, int]:
        """One get in a new session on ``bind``: (sent first?, reads sent)."""
        with _Between(bind) as s:
            seen = _first_bind_sees(cache, s)
            got = cache.get(s, User, uid)
            assert got is not None and got.name == "ann" and s.get(User, uid) is got
        assert _in_use(cache) == 0
        return seen[0], sends.take()

    try:
        assert [get(other) for _ in range(2)] == [(1, 1), (0, 0)]
        assert cache.stats()["hits"] == 0
        sql_count.reset()
        assert [get(engine) for _ in range(9)] == [(0, 1)] * 8 + [(1, 1)]
        assert cache.stats()["hits"] == 9 and sql_count.selects() == 0
        assert [get(other), get(engine)] == [(1, 1), (0, 1)]
    finally:
        other.dispose()


def test_own_writes_are_read_from_the_database_without_redis(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This transaction updated the row's table (a Core statement: nothing to flush): each get is the
    database's, with the transaction's own row, counted as bypassed, and asks Redis nothing; after the
    rollback Redis answers with the committed row."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled
    sends = _Sends(cache, monkeypatch)
    with Session(engine) as s:
        s.execute(update(User).where(User.id == uid).values(name="own"))
        bypassed = cache.stats()["bypassed"]
        sql_count.reset()
        for _ in range(3):
            s.expunge_all()
            assert cache.get(s, User, uid).name == "own"
        assert sql_count.selects() == 3 and cache.stats()["bypassed"] == bypassed + 3
        assert sends.take() == 0 and _in_use(cache) == 0
        s.rollback()
    sql_count.reset()
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"
    assert len(sql_count) == 0 and sends.take() == 1 and _in_use(cache) == 0


def test_with_the_breaker_open_a_read_not_used_reports_nothing(engine: Engine, cache: SQLCache) -> None:
    """Redis backing off: a get that Session.get answers (a session bound elsewhere) or the database
    answers for its own writes counts no error and fires no cache_error; a get that would have used
    Redis counts one."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled
    other = create_engine(shareable_url(engine))
    health = cache._parts.health
    health.open_until = float("inf")  # the breaker open: nothing can be sent
    try:
        errors = cache.stats()["errors"]
        with Session(other) as s:
            assert cache.get(s, User, uid).name == "ann"
        with Session(engine) as s:
            s.execute(update(User).where(User.id == uid).values(name="own"))
            assert cache.get(s, User, uid).name == "own"
            s.rollback()
        assert cache.stats()["errors"] == errors
        with Session(engine) as s:
            assert cache.get(s, User, uid).name == "ann"
        assert cache.stats()["errors"] == errors + 1
    finally:
        health.open_until = 0.0
        other.dispose()


def test_an_error_between_the_send_and_the_reply_is_session_gets_error(
    engine: Engine, cache: SQLCache
) -> None:
    """Where the session would read raises (a bind override failing): cache.get raises what Session.get
    raises, the connection the MGET went out on goes back clean, and the next get is a hit."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled

    def fail() -> None:
        raise RuntimeError("no bind today")

    with _Between(engine) as s:
        s.between = fail
        with pytest.raises(RuntimeError, match="no bind today"):
            s.get(User, uid)
        with pytest.raises(RuntimeError, match="no bind today"):
            cache.get(s, User, uid)
        assert _in_use(cache) == 0
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"
    assert cache.stats()["hits"] == 1 and _in_use(cache) == 0


@pytest.fixture
def behind_proxy(private_redis: RedisServer, engine: Engine) -> Iterator[tuple[SQLCache, Proxy]]:
    proxy = Proxy(private_redis.port)
    cache = SQLCache(proxy.url, prefix=f"s{uuid.uuid4().hex[:8]}", default_ttl=600, timeout=0.5)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    try:
        yield cache, proxy
    finally:
        cache.detach(engine)
        cache.close()
        proxy.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_a_reply_lost_after_the_send_is_an_outage(
    engine: Engine, behind_proxy: tuple[SQLCache, Proxy], sql_count: SQLCounter
) -> None:
    """The MGET written, its reply never comes (the partition begins with it): the database answers
    once the read times out, the failure counts as any outage's (one error), and the connection is
    not put back; once Redis is back the next get connects again and is a hit."""
    cache, proxy = behind_proxy
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled through the proxy
    connections = cache.store.client.connection_pool._available_connections  # type: ignore[attr-defined]
    assert len(connections) == 1
    proxy.hold()
    with Session(engine) as s:
        sql_count.reset()
        assert cache.get(s, User, uid).name == "ann"
        assert sql_count.selects() == 1
    st = cache.stats()
    assert st["errors"] == 1 and st["hits"] == 0 and _in_use(cache) == 0
    assert all(c._sock is None for c in connections)  # the one the read went out on: disconnected
    proxy.heal()
    cache._parts.health.retry_now()  # the back-off after the failure is not what is tested here
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"
    assert cache.stats()["hits"] == 1


def test_a_wrapper_delegating_the_rest_still_answers_each_get(engine: Engine, cache: SQLCache) -> None:
    """A plugin's wrapper whose ``__getattr__`` would hand out the store's ``send_read``: every get
    still goes through the wrapper's ``read``."""
    cache.register(User)
    uid = make_user(engine, "ann")
    wrapper = _OldWrapper(hidden=())  # send_read too would be handed out
    cache.add_plugin(wrapper)
    for _ in range(3):
        with Session(engine) as s:
            assert cache.get(s, User, uid).name == "ann"
    assert wrapper.reads == 3 and cache.stats()["hits"] == 2 and cache.stats()["plugin_errors"] == 0


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_the_local_tier_answers_cache_get(
    redis_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a local tier, cache.get is answered from process memory once Redis served the entry: the
    store's two-step read is never used past the tier."""
    cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}", default_ttl=600, local_bytes=1 << 20)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    try:
        wait_for(lambda: serving(cache), "the tracking connection")
        uid = make_user(engine, "ann")
        user_name(engine, uid)  # filled
        sends: list[Any] = []
        monkeypatch.setattr(type(cache.store), "send_read", lambda *a: sends.append(a))
        for _ in range(3):  # a Redis hit (kept in the tier), then hits from memory
            with Session(engine) as s:
                assert cache.get(s, User, uid).name == "ann"
        assert cache.stats()["local_hits"] == 2 and sends == []
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()


def test_operation_hooks_see_the_reads_whose_reply_is_used(
    engine: Engine, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an operation hook, get still sends first; the hook sees a miss and its fill, then a hit, each
    read once, and nothing of a read whose reply was dropped (a session bound elsewhere: Session.get
    answers); Redis down: the read reports an error."""
    cache.register(User)
    uid = make_user(engine, "ann")
    ops: list[tuple[str, str | None]] = []
    cache.add_plugin(_Timing(ops))
    sends = _Sends(cache, monkeypatch)
    for _ in range(2):
        with Session(engine) as s:
            assert cache.get(s, User, uid).name == "ann"
    assert ops == [("read", "miss"), ("fill", "stored"), ("read", "hit")] and sends.take() == 2
    ops.clear()
    other = create_engine(shareable_url(engine))
    try:
        with Session(other) as s:
            assert cache.get(s, User, uid).name == "ann"
    finally:
        other.dispose()
    assert ops == [] and sends.take() == 1
    cache._parts.health.open_until = float("inf")  # the breaker open: nothing can be sent
    try:
        with Session(engine) as s:
            assert cache.get(s, User, uid).name == "ann"
    finally:
        cache._parts.health.open_until = 0.0
    assert ops == [("read", "error")] and sends.take() == 1


def test_an_interrupt_in_a_hook_leaves_no_reply_unread(engine: Engine, cache: SQLCache) -> None:
    """An operation hook interrupted on entry (KeyboardInterrupt) after the MGET went out: the
    interrupt propagates, the reply is taken off the connection, and the next get is a hit."""
    cache.register(User)
    uid = make_user(engine, "ann")
    user_name(engine, uid)  # filled
    interrupt = [True]

    class Interrupting:
        name = "interrupting"

        def setup(self, host: PluginHost) -> None:
            host.add_operation_hook(self._hook)

        @contextmanager
        def _hook(self, op: Operation) -> Iterator[None]:
            if interrupt[0] and op.name == "read":
                interrupt[0] = False
                raise KeyboardInterrupt
            yield

        def close(self) -> None:
            pass

    cache.add_plugin(Interrupting())
    with Session(engine) as s, pytest.raises(KeyboardInterrupt):
        cache.get(s, User, uid)
    assert _in_use(cache) == 0
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"
    assert cache.stats()["hits"] == 1 and _in_use(cache) == 0
