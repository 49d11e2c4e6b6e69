"""A commit returns once Redis has applied its lock; its release's reply is read on the store's next
call. What that reply may still say (NOSCRIPT, a broken connection) is handled then: sent again, or
journalled, and never a stale read meanwhile (the lock keeps every reader on the database)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _settle, signals
from sqlcache._health import Health
from sqlcache._pools import Wire, client_for
from sqlcache._settle import Owed
from sqlcache._store import RedisStore

from ..conftest import RedisServer
from ..helpers import NoSettler, make_user, rename_user, user_name, writer_and_reader
from ..models import User
from ..proxy import Proxy


def row_dependency(cache: SQLCache, uid: int) -> str:
    """The key a commit of the user's row locks and releases."""
    parts: Any = cache._parts
    return str(parts.identity_keys(parts.registry.hierarchy(inspect(User)), (uid,))[0])


@contextmanager
def once_locked(engine: Engine, client: redis.Redis, key: str, then: Callable[[], None]) -> Iterator[None]:
    """During the next commit on ``engine``: once Redis has applied the cache's lock on ``key`` (its
    value changed) and before the database COMMIT, run ``then``."""
    before = client.get(key)
    assert before is not None

    def on_commit(conn: Any) -> None:  # listens after the cache: its lock is on its way
        deadline = time.monotonic() + 10
        while client.get(key) == before:
            assert time.monotonic() < deadline, "the lock never reached Redis"
            time.sleep(0.001)  # polling Redis for the lock, with a deadline
        then()

    event.listen(engine, "commit", on_commit)
    try:
        yield
    finally:
        event.remove(engine, "commit", on_commit)


@pytest.fixture
def attached(engine: Engine, private_redis: RedisServer) -> Iterator[tuple[SQLCache, redis.Redis]]:
    """A cache on a private Redis, User registered, attached to ``engine``; and a client of that Redis."""
    cache = SQLCache(private_redis.url, prefix=f"r{uuid.uuid4().hex[:8]}")
    cache.register(User)
    cache.attach(engine)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    try:
        yield cache, client
    finally:
        cache.detach(engine)
        cache.close()
        client.close()


def served_from_redis(cache: SQLCache, engine: Engine, uid: int, name: str) -> bool:
    """Whether a read of the user, after one that may fill, is a hit with ``name``."""
    assert user_name(engine, uid) == name
    hits = cache.stats()["hits"]
    return user_name(engine, uid) == name and cache.stats()["hits"] == hits + 1


def test_a_release_redis_refused_after_the_commit_returned_is_sent_again(
    engine: Engine, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses its scripts between the lock and the release (SCRIPT FLUSH; a restart is fenced
    besides): the release's reply, read on the writer's next call, is NOSCRIPT. The scripts are loaded
    and the release sent again then. Meanwhile every reader goes to the database."""
    monkeypatch.setattr(_settle, "SETTLER", NoSettler())  # the writer's next call reads it
    prefix = f"rr{uuid.uuid4().hex[:8]}"
    writer = SQLCache(private_redis.url, prefix=prefix, timeout=2)
    reader = SQLCache(private_redis.url, prefix=prefix, timeout=2)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    errors: list[str] = []

    @signals.cache_error.connect_via(writer)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    with writer_and_reader(engine, writer, reader) as other:
        uid = make_user(engine)
        assert user_name(engine, uid) == "ann" and user_name(other, uid) == "ann"
        with once_locked(engine, client, row_dependency(writer, uid), client.script_flush):
            rename_user(engine, uid, "bob")
        assert len(writer._parts.store._owed) == 1  # returned before the release's reply was read
        assert user_name(other, uid) == "bob"  # another process, before the writer's next call
        assert served_from_redis(writer, engine, uid, "bob")  # the release went again on that call
        assert served_from_redis(reader, other, uid, "bob")
        assert errors == [] and writer.stats()["journal"] == 0
    client.close()


def test_a_release_lost_after_the_commit_returned_is_journalled(
    engine: Engine, private_redis: RedisServer
) -> None:
    """The connection breaks after the lock's reply came back but before Redis read the release: the
    writer's next call finds the release's reply missing, reports the release failed and journals
    it. Until Redis is back the lock keeps everyone on the database; the replay then drops it."""
    prefix = f"rl{uuid.uuid4().hex[:8]}"
    proxy = Proxy(private_redis.port)
    writer = SQLCache(proxy.url, prefix=prefix, timeout=0.5, backoff=0.05, max_backoff=0.05)
    reader = SQLCache(private_redis.url, prefix=prefix, timeout=2)  # another process, never cut off
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    errors: list[str] = []

    @signals.cache_error.connect_via(writer)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    try:
        with writer_and_reader(engine, writer, reader) as other:
            uid = make_user(engine)
            assert user_name(engine, uid) == "ann" and user_name(other, uid) == "ann"
            with once_locked(engine, client, row_dependency(writer, uid), proxy.hold):
                rename_user(engine, uid, "bob")  # the release never reaches Redis
            assert errors == []  # returned with the lock applied, the release's reply not read yet
            for _ in range(2):  # the lock holds: read from the database, and not filled
                assert user_name(other, uid) == "bob"
            proxy.cut()
            assert user_name(engine, uid) == "bob"  # the writer's next call: the reply is not there
            assert "release" in errors and writer.stats()["journal"] >= 1
            proxy.heal()
            deadline = time.monotonic() + 10
            while writer.stats()["journal"]:  # replayed before the writer's next read of Redis
                assert time.monotonic() < deadline, "the journal was never replayed"
                assert user_name(engine, uid) == "bob"
            # the replay dropped the lock (a background replay that took the journal before this one
            # emptied it may still move the generations once more: polled, with a deadline)
            while not served_from_redis(reader, other, uid, "bob"):
                assert time.monotonic() < deadline, "the lock was never dropped"
                time.sleep(0.02)
    finally:
        client.close()
        proxy.close()


def test_commits_give_their_connection_back(engine: Engine, attached: tuple[SQLCache, redis.Redis]) -> None:
    """A commit's connection waits out of the pool for its release's reply only until the next call:
    commits and reads in turn keep using the same few connections."""
    _, client = attached
    uid = make_user(engine)
    for i in range(30):
        rename_user(engine, uid, f"v{i}")
        assert user_name(engine, uid) == f"v{i}"
    with Session(engine) as s:  # commits one after the other, nothing read between them
        for i in range(30):
            u = s.get(User, uid)
            assert u is not None
            u.name = f"w{i}"
            s.commit()
    assert user_name(engine, uid) == "w29"
    # the pool's connections and this client's own; far below one per commit
    assert int(client.info("clients")["connected_clients"]) <= 4


def test_a_release_lost_by_a_writer_gone_quiet_is_journalled_by_the_settler(
    engine: Engine, private_redis: RedisServer
) -> None:
    """As above, but the writer makes no further call: its settler thread reads (and misses) the reply
    about a second later, the journal replays the release, and the other process is served from Redis
    again long before the lock would have expired."""
    prefix = f"rq{uuid.uuid4().hex[:8]}"
    proxy = Proxy(private_redis.port)
    writer = SQLCache(proxy.url, prefix=prefix, timeout=0.5, backoff=0.05, max_backoff=0.05, lock_ttl=600)
    reader = SQLCache(private_redis.url, prefix=prefix, timeout=2)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    try:
        with writer_and_reader(engine, writer, reader) as other:
            uid = make_user(engine)
            assert user_name(engine, uid) == "ann" and user_name(other, uid) == "ann"
            with once_locked(engine, client, row_dependency(writer, uid), proxy.hold):
                rename_user(engine, uid, "bob")
            deadline = time.monotonic() + 20
            while not writer.stats()["journal"]:  # the settler found the reply missing
                assert time.monotonic() < deadline, writer.stats()
                time.sleep(0.05)  # polling a background thread's effect, with a deadline
            proxy.heal()  # for the replay; the release itself was never delivered
            while not served_from_redis(reader, other, uid, "bob"):
                assert time.monotonic() < deadline, writer.stats()
                time.sleep(0.05)  # polling another process's view, with a deadline
            assert writer.stats()["invalidations_replayed"] >= 1
    finally:
        client.close()
        proxy.close()


def test_closing_journals_a_lost_release_before_its_last_replay(
    engine: Engine, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """close() reads the replies left unread before the journal's last replay: a release lost on its
    way is journalled, and (Redis still unreachable) reported as not taken, not silently dropped."""
    prefix = f"rz{uuid.uuid4().hex[:8]}"
    proxy = Proxy(private_redis.port)
    writer = SQLCache(proxy.url, prefix=prefix, timeout=0.3, backoff=0.05, max_backoff=0.05)
    writer.register(User)
    writer.attach(engine)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    try:
        uid = make_user(engine)
        assert user_name(engine, uid) == "ann"
        with once_locked(engine, client, row_dependency(writer, uid), proxy.hold):
            rename_user(engine, uid, "bob")
        with caplog.at_level(logging.WARNING, logger="sqlcache"):
            writer.detach(engine)
            writer.close()
        assert "invalidations Redis has not taken" in caplog.text
    finally:
        client.close()
        proxy.close()


def test_one_call_never_waits_out_a_timeout_per_unread_reply(private_redis: RedisServer) -> None:
    """Ten replies owed on connections whose server will not answer (BLPOP on an empty list stands
    for a reply that never comes): the first read times out, the other nine are handed over unread.
    Each is reported lost, and every connection is dropped."""
    timeout = 0.5
    health = Health(failure_threshold=100)
    lost: list[tuple[Sequence[str], str]] = []
    health.on_release_lost = lambda keys, token, exc: lost.append((keys, token))
    store = RedisStore(client_for(private_redis.url, timeout), health)
    pool = store.client.connection_pool
    key = f"never-{uuid.uuid4().hex}"
    for i in range(10):
        conn = pool.get_connection()
        Wire.send(conn, "BLPOP", key, 0)
        store._owed.append(Owed(conn, conn.pid, time.monotonic(), "clock", [f"k{i}"], f"t{i}", 1000, None))
    started = time.monotonic()
    store.settle()
    elapsed = time.monotonic() - started
    assert sorted(lost) == sorted(([f"k{i}"], f"t{i}") for i in range(10))
    assert not store._owed
    assert elapsed < 5 * timeout, elapsed  # one timeout, not ten
    store.client.close()


def test_replies_owed_on_a_connection_closed_on_purpose_are_handed_over_and_the_rest_read(
    private_redis: RedisServer,
) -> None:
    """Two replies owed on one connection (a sharded node's two shards), which was closed on purpose (an
    earlier read on it interrupted), and one on another connection: the closed one's are journalled
    unread without counting against Redis (the breaker, with a threshold of one, stays closed), its
    connection goes back to the pool once, and the other reply is read as usual."""
    health = Health(failure_threshold=1)
    lost: list[str] = []
    health.on_release_lost = lambda keys, token, exc: lost.append(token)
    store = RedisStore(client_for(private_redis.url, 2.0), health)
    pool: Any = store.client.connection_pool
    shared, other = pool.get_connection(), pool.get_connection()
    for token, conn, holds in (("a1", shared, False), ("a2", shared, True), ("b", other, True)):
        Wire.send(conn, "PING")
        store._owed.append(Owed(conn, conn.pid, time.monotonic(), "clock", [token], token, 1000, None, holds))
    shared.disconnect()
    store.settle()
    assert lost == ["a1", "a2"] and not store._owed
    assert not health.backing_off
    assert [c for c in pool._available_connections if c is shared] == [shared]
    assert other in pool._available_connections and not pool._in_use_connections
    store.client.close()


def test_a_release_behind_a_refused_lock_is_awaited(
    engine: Engine, attached: tuple[SQLCache, redis.Redis]
) -> None:
    """A lock Redis refused (its scripts flushed before the commit) says nothing was locked: the
    release's reply is read before the commit returns (NOSCRIPT: loaded and released again)."""
    cache, client = attached
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    client.script_flush()
    rename_user(engine, uid, "bob")
    assert not cache._parts.store._owed
    assert served_from_redis(cache, engine, uid, "bob")


def test_threads_committing_together_each_get_their_release_read(
    engine: Engine, attached: tuple[SQLCache, redis.Redis]
) -> None:
    """Threads commit and read at once: every reply owed is read by some later call, none twice (a
    reply read by the wrong call would put a connection out of step), and the pool stays small."""
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time: SQLite serialises the commits this test overlaps")
    cache, client = attached
    errors: list[BaseException] = []
    uids = [make_user(engine, f"u{i}") for i in range(4)]

    def work(uid: int) -> None:
        try:
            for i in range(15):
                rename_user(engine, uid, f"{uid}-{i}")
                assert user_name(engine, uid) == f"{uid}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(uid,)) for uid in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for uid in uids:
        assert served_from_redis(cache, engine, uid, f"{uid}-14")
    assert not cache._parts.store._owed
    assert cache.stats()["errors"] == 0 and cache.stats()["journal"] == 0
    # at most two per thread (one in use, one waiting for its reply) and this client: not one per commit
    assert int(client.info("clients")["connected_clients"]) <= 2 * len(uids) + 1


def test_disconnect_waits_for_a_reply_another_thread_is_reading(private_redis: RedisServer) -> None:
    """A reply the settler thread is reading when the store closes is read to the end first: closed
    under it, an applied release would be reported lost (and journalled after the journal's last
    replay). BLPOP with a one-second timeout stands for a reply that takes a second to come."""
    health = Health()
    lost: list[Sequence[str]] = []
    health.on_release_lost = lambda keys, token, exc: lost.append(keys)
    store = RedisStore(client_for(private_redis.url, 5.0), health)
    conn = store.client.connection_pool.get_connection()
    Wire.send(conn, "BLPOP", f"never-{uuid.uuid4().hex}", 1)
    store._owed.append(Owed(conn, conn.pid, time.monotonic(), "clock", ["k"], "t", 1000, None))
    reading = threading.Thread(target=store.try_settle)
    reading.start()
    deadline = time.monotonic() + 10
    while store._owed:  # the thread took it and reads it now
        assert time.monotonic() < deadline
        time.sleep(0.001)
    store.disconnect()
    reading.join(10)
    assert lost == [] and not reading.is_alive()
    store.client.close()
