"""Redis failures and garbage in Redis: callers never see an exception and never get wrong data."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, signals
from sqlcache.errors import CacheUnavailable, ConfigurationError

from ..conftest import RedisServer, SQLCounter, free_port
from ..helpers import AtRelease, make_user, rename_user, user_name, writer_and_reader
from ..models import User


def cached_user(engine: Engine, cache: SQLCache, client: redis.Redis) -> tuple[int, bytes]:
    """A registered user whose entry is in Redis: (its id, its entry key)."""
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    (key,) = client.scan_iter(match=f"{cache.config.prefix}:e:*")
    return uid, key


@pytest.mark.parametrize(
    "garbage",
    [b"", b"garbage", b"1,2,3|\x01\x02", b"|", b"\xff" * 100, "LIST"],
    ids=["empty", "text", "bad-payload", "bare-sep", "binary", "wrong-type"],
)
def test_garbage_entry_is_a_miss(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, garbage: object
) -> None:
    """Garbage, truncated bytes or a wrong Redis type under an entry key are misses, never errors."""
    uid, key = cached_user(engine, cache, redis_client)
    redis_client.delete(key)
    if garbage == "LIST":
        redis_client.rpush(key, b"x")
    else:
        redis_client.set(key, garbage)  # type: ignore[arg-type]
    assert user_name(engine, uid) == "ann"
    assert user_name(engine, uid) == "ann"


def test_truncated_valid_entry_is_a_miss(engine: Engine, cache: SQLCache, redis_client: redis.Redis) -> None:
    """A valid entry cut short (current generations, bad payload) is a miss and is replaced."""
    uid, key = cached_user(engine, cache, redis_client)
    value = redis_client.get(key)
    assert value is not None
    errors: list[str] = []

    @signals.cache_error.connect_via(cache)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    redis_client.set(key, value[:-3])
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"
    assert errors == ["decode"]
    signals.cache_error.disconnect(on_error)
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"


def test_garbage_generation_keys(engine: Engine, cache: SQLCache, redis_client: redis.Redis) -> None:
    """Dependency and clock keys holding the wrong type are repaired into fresh generations."""
    uid, _ = cached_user(engine, cache, redis_client)
    p = cache.config.prefix
    for key in redis_client.scan_iter(match=f"{p}:d:*"):
        redis_client.delete(key)
        redis_client.set(key, b"junk")
    redis_client.delete(f"{p}:clock")
    redis_client.rpush(f"{p}:clock", b"junk")
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"
    with Session(engine) as s:
        u = s.get(User, uid)
        u.name = "bob"
        s.commit()
    with Session(engine) as s:
        assert s.get(User, uid).name == "bob"


def test_entry_of_other_model_definition_is_a_miss(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """An entry whose payload carries another schema fingerprint is never decoded into this model."""
    from sqlcache import _codec

    uid, key = cached_user(engine, cache, redis_client)
    value = redis_client.get(key)
    assert value is not None
    header, payload = value.split(b"|", 1)
    _fp, cid, mask, values = _codec.decode(payload)
    forged = _codec.encode(["0" * 16, cid, mask, ["forged" if v == "ann" else v for v in values]])
    redis_client.set(key, header + b"|" + forged)
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"


def test_redis_unreachable(engine: Engine, sql_count: SQLCounter) -> None:
    """With Redis down, reads use the database, commits succeed, cache_error fires once, then back-off."""
    cache = SQLCache(f"redis://127.0.0.1:{free_port()}/0", prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.2)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    errors: list[str] = []

    @signals.cache_error.connect_via(cache)
    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    try:
        uid = make_user(engine)
        for _ in range(5):
            with Session(engine) as s:
                s.get(User, uid).name = "x"
                s.commit()
        with Session(engine) as s:
            assert s.get(User, uid).name == "x"
        st = cache.stats()
        assert len(errors) == 1, errors  # one cache_error per failure burst, however many calls failed
        assert st["errors"] >= 5
        assert st["backoffs"] >= 1 and st["skipped_backoff"] >= 1
        assert st["invalidations_deferred"] >= 1
    finally:
        signals.cache_error.disconnect(on_error)
        cache.detach(engine)


def test_journal_replayed_after_restart(engine: Engine, private_redis: RedisServer) -> None:
    """Invalidations made while Redis was down are applied before Redis serves anything again."""
    cache = SQLCache(private_redis.url, prefix="journal", timeout=0.3, backoff=0.05, max_backoff=0.05)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine)
        with Session(engine) as s:
            s.get(User, uid)
        private_redis.stop()
        with Session(engine) as s:
            s.get(User, uid).name = "during outage"
            s.commit()
        assert cache.stats()["journal"] >= 1
        private_redis.start()
        # the first call after the back-off notices the restarted server (new run id) and fences; every
        # read, before and after, returns the row as committed
        deadline = time.monotonic() + 10
        while True:
            with Session(engine) as s:
                assert s.get(User, uid).name == "during outage"
            st = cache.stats()
            if st["restarts"] == 1 and st["journal"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.02)  # polling: the back-off (0.05 s) ends
        with Session(engine) as s:
            assert s.get(User, uid).name == "during outage"
        assert cache.stats()["invalidations_replayed"] >= 1
    finally:
        cache.detach(engine)


def test_signal_receiver_error_does_not_break_commit(engine: Engine, redis_url: str) -> None:
    """A receiver that raises is counted, and the user's commit still succeeds."""
    cache = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    cache.register(User)
    cache.attach(engine)

    def boom(sender: Any, **kw: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.invalidated.connect(boom, sender=cache)
    try:
        uid = make_user(engine)
        with Session(engine) as s:
            s.get(User, uid).name = "ok"
            s.commit()
        assert cache.stats()["signal_errors"] >= 1
    finally:
        signals.invalidated.disconnect(boom)
        cache.detach(engine)
        cache.clear()


@pytest.mark.parametrize("through", ["session_get", "cache_get"])
def test_restart_from_old_snapshot_is_fenced(
    engine: Engine, private_redis: RedisServer, through: str
) -> None:
    """Redis restored from a snapshot older than an invalidation it acknowledged serves nothing stale,
    to Session.get or to cache.get (whose reply is read after its last checks)."""
    cache = SQLCache(private_redis.url, prefix="restart", timeout=0.3, backoff=0.05, max_backoff=0.05)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)

    def name_of(engine: Engine, uid: int) -> str | None:
        if through == "session_get":
            return user_name(engine, uid)
        with Session(engine) as s:
            u = cache.get(s, User, uid)
            return None if u is None else u.name

    try:
        uid = make_user(engine, "v1")
        assert name_of(engine, uid) == "v1"  # filled
        private_redis.save()  # the snapshot holds the v1 entry and its generations
        with Session(engine) as s:
            s.get(User, uid).name = "v2"  # invalidated in Redis, acknowledged...
            s.commit()
        private_redis.stop()  # ...then lost: killed before another snapshot
        private_redis.start()  # restores the v1 entry and its old generations
        deadline = time.monotonic() + 10
        while cache.stats()["restarts"] == 0:  # until a read reached it (after the back-off)
            assert name_of(engine, uid) == "v2"
            assert time.monotonic() < deadline, cache.stats()
            time.sleep(0.02)  # polling: the back-off (0.05 s) ends
        for _ in range(3):
            assert name_of(engine, uid) == "v2"
        st = cache.stats()
        assert st["restarts"] == 1 and st["fences"] == 1
    finally:
        cache.close()


def test_restart_from_old_snapshot_is_fenced_for_a_process_that_never_saw_it(
    engine: Engine, private_redis: RedisServer
) -> None:
    """A process that first meets Redis after it was restored from an old snapshot has no run id to
    compare: the lineage key (the run id that vouched for the data) fences for it, before its first
    read. Without it, a process started after the restart served the entry an acknowledged commit had
    invalidated."""
    writer = SQLCache(private_redis.url, prefix="lineage", timeout=0.3, backoff=0.05, max_backoff=0.05)
    writer.register(User)
    writer.attach(engine)
    try:
        uid = make_user(engine, "v1")
        assert user_name(engine, uid) == "v1"  # filled
        private_redis.save()  # the snapshot holds the v1 entry, its generations and the lineage
        with Session(engine) as s:
            s.get(User, uid).name = "v2"  # invalidated in Redis, acknowledged...
            s.commit()
    finally:
        writer.close()
    private_redis.stop()  # ...then lost
    private_redis.start()
    fresh = SQLCache(private_redis.url, prefix="lineage", timeout=0.3, backoff=0.05, max_backoff=0.05)
    fresh.strict_signals = True
    fresh.register(User)
    fresh.attach(engine)
    try:
        for _ in range(3):
            assert user_name(engine, uid) == "v2"
        assert fresh.stats()["lineage_fences"] == 1
    finally:
        fresh.close()


def test_two_caches_on_one_client_both_detect_restarts(engine: Engine, private_redis: RedisServer) -> None:
    """Two caches given one client of the caller's each detect a Redis restart, and the caller's client
    is never changed (no connect hook, no new timeouts on its pool)."""
    client = redis.Redis(port=private_redis.port, socket_timeout=0.2, retry=None)
    before = dict(client.connection_pool.connection_kwargs)
    caches = [
        SQLCache(client, prefix=f"two{i}", timeout=0.3, backoff=0.05, max_backoff=0.05) for i in range(2)
    ]
    try:
        assert client.connection_pool.connection_kwargs == before
        assert all(c.store.client.connection_pool is not client.connection_pool for c in caches)
        for c in caches:
            c.strict_signals = True
            c.register(User)
            c.attach(engine)
        uid = make_user(engine, "v1")
        assert user_name(engine, uid) == "v1"
        private_redis.save()
        with Session(engine) as s:
            s.get(User, uid).name = "v2"
            s.commit()
        private_redis.stop()
        private_redis.start()
        deadline = time.monotonic() + 10
        while any(c.stats()["restarts"] == 0 for c in caches) and time.monotonic() < deadline:
            assert user_name(engine, uid) == "v2"
        assert [c.stats()["restarts"] for c in caches] == [1, 1]
        assert user_name(engine, uid) == "v2"
        assert client.connection_pool.connection_kwargs == before
    finally:
        for c in caches:
            c.detach(engine)
            c.close()
        client.connection_pool.disconnect()


def test_url_options_cannot_loosen_the_protocol() -> None:
    """Query options of a URL (long timeouts, retries, decoded responses) give way to sqlcache's own;
    the server and credentials are kept; a bad URL's message hides its password."""
    cache = SQLCache(
        "redis://:s3cret-pw@127.0.0.1:6379/3?socket_timeout=30&decode_responses=yes&retry_on_timeout=true",
        prefix="urlopts",
        timeout=0.3,
    )
    kwargs = cache.store.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.3 and not kwargs.get("decode_responses")
    assert not kwargs.get("retry_on_timeout") and kwargs["db"] == 3 and kwargs["password"] == "s3cret-pw"
    cache.close()
    with pytest.raises(ConfigurationError) as info:
        SQLCache("http://user:s3cret-pw@127.0.0.1:6379/0", prefix="badurl")
    assert "s3cret-pw" not in str(info.value) and "***" in str(info.value)


def test_fence_asked_for_while_another_is_applied_is_not_lost(engine: Engine, cache: SQLCache) -> None:
    """A second fence (a restart noticed again) asked for while the first is being released stays
    pending and is applied too: the fence is a counter, not a flag cleared after the release."""
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    journal: Any = cache._parts.journal
    store: Any = cache.store
    original = store.release
    asked_again = []

    def release(*args: Any, **kwargs: Any) -> Any:
        if not asked_again:
            asked_again.append(True)
            journal.fence()  # noticed while the first fence is on its way
        return original(*args, **kwargs)

    store.release = release
    try:
        journal.fence()
        assert journal.replay()
    finally:
        store.release = original
    assert cache.stats()["fences"] == 1
    assert journal.replay()  # the second fence was still pending, and is applied now
    assert cache.stats()["fences"] == 2
    assert user_name(engine, uid) == "ann"


def test_release_refused_by_the_breaker_gives_the_locks_connection_back(redis_url: str) -> None:
    """A pipelined lock keeps its connection checked out until the release reads both replies. When the
    breaker refuses the release (Redis skipped after failures elsewhere), that connection must be
    dropped, not left checked out: under load, each such commit leaked one, until the pool ran out."""
    cache = SQLCache(redis_url, prefix=f"leak{uuid.uuid4().hex[:8]}")
    store = cache.store
    pool = store.client.connection_pool  # type: ignore[union-attr]
    try:
        for _ in range(3):
            sent = store.send_lock("k:clock", ["k:d:t:x"], "tok", 1000, 0)
            cache._parts.health.open_until = time.monotonic() + 60  # the breaker opened meanwhile
            with pytest.raises(CacheUnavailable):
                store.release_after(sent, "k:clock", ["k:d:t:x"], "tok", 0)
            cache._parts.health.open_until = 0.0
            assert len(pool._in_use_connections) == 0  # each time: a leaked connection stays checked out
    finally:
        cache.close()


def test_a_replayed_release_drops_the_writers_lock(engine: Engine, cache: SQLCache) -> None:
    """A commit whose release is lost keeps its keys in the journal; the replay releases them as the
    writer would have, its lock included. Before, the lock stayed until lock_ttl (a minute by default) and
    no entry of the row could be filled meanwhile: every read was a miss."""
    cache.register(User)
    uid = make_user(engine, "ann")
    assert user_name(engine, uid) == "ann"
    armed = [True]

    def lose(operation: str, args: tuple[Any, ...]) -> None:  # the release never reaches Redis
        armed[0] = False
        if operation == "release_after":  # the lock's reply is never read: drop its connection
            args[0].conn.disconnect()
        raise CacheUnavailable("release (lost on purpose)")

    cache.add_plugin(AtRelease(lose, lambda: armed[0]))  # type: ignore[arg-type]
    rename_user(engine, uid, "bob")
    assert not armed[0] and cache.stats()["invalidations_deferred"] >= 1
    assert user_name(engine, uid) == "bob"  # the replay first, then a miss that fills
    hits = cache.stats()["hits"]
    assert user_name(engine, uid) == "bob"
    assert cache.stats()["hits"] == hits + 1, {k: v for k, v in cache.stats().items() if v}


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_connections_the_server_closed_while_idle_are_made_again_before_use(
    engine: Engine, redis_url: str, redis_client: redis.Redis
) -> None:
    """Redis closes sqlcache's idle connections (``CLIENT KILL``, as its ``timeout`` setting would): the
    next read and commit check them out connected again, with no error and no outage (a hit stays a
    hit, the commit's invalidation is applied)."""
    name = f"idle{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in redis_url else "?"
    cache = SQLCache(f"{redis_url}{separator}client_name={name}", prefix=name, default_ttl=600)
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine, "v0")
        for _ in range(2):
            assert user_name(engine, uid) == "v0"
        for round_ in range(1, 4):
            killed = [c for c in redis_client.client_list() if c.get("name") == name]
            assert killed
            for c in killed:
                redis_client.client_kill_filter(_id=c["id"])
            hits = cache.stats()["hits"]
            assert user_name(engine, uid) == f"v{round_ - 1}"
            assert cache.stats()["hits"] == hits + 1
            for c in [c for c in redis_client.client_list() if c.get("name") == name]:
                redis_client.client_kill_filter(_id=c["id"])
            rename_user(engine, uid, f"v{round_}")
            assert user_name(engine, uid) == f"v{round_}"
        assert cache.stats()["errors"] == 0
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()


def test_a_commit_invalidates_while_redis_refuses_writes_for_memory(
    engine: Engine, private_redis: RedisServer
) -> None:
    """maxmemory reached under Redis's default policy (noeviction): Redis refuses writes but still answers
    reads. A commit's lock and release still run (their scripts allow it), so another process's next
    read is not served the old row; fills are refused, so nothing new is stored meanwhile."""
    writer = SQLCache(private_redis.url, prefix="oom", timeout=1)
    reader = SQLCache(private_redis.url, prefix="oom", timeout=1)
    client = redis.Redis(port=private_redis.port, socket_timeout=5)
    with writer_and_reader(engine, writer, reader) as other:
        uid = make_user(engine)
        for _ in range(2):
            assert user_name(other, uid) == "ann"
        assert reader.stats()["hits"] == 1
        client.set("ballast", b"x" * 4_000_000)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1mb")
        with pytest.raises(redis.OutOfMemoryError):
            client.set("probe", "x")
        rename_user(engine, uid, "bob")
        assert writer.stats()["journal"] == 0  # applied, not waiting for Redis
        for _ in range(2):
            assert user_name(other, uid) == "bob"


def synced(client: redis.Redis) -> None:
    """Wait (polling, with a deadline) until ``client``'s server is a replica in sync with its primary."""
    deadline = time.monotonic() + 20
    while True:
        info = client.info("replication")
        if info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.02)  # polling the replica's state


def test_a_primary_whose_data_was_replaced_by_a_resync_is_fenced(engine: Engine) -> None:
    """An ABA failover: the replica R is promoted; the old primary P acknowledges a commit's release R
    never gets; P is demoted, fully resynced from R (the v1 entry and its old generations come back,
    with the lineage key P itself wrote), and promoted again: same process, same run id. The new
    replication id fails the lineage check, so no process (the writer included) serves v1."""
    p_server, r_server = RedisServer(), RedisServer()
    p_server.start()
    r_server.start()
    p = redis.Redis(port=p_server.port, socket_timeout=10)
    r = redis.Redis(port=r_server.port, socket_timeout=10)
    writer = SQLCache(p_server.url, prefix="aba", timeout=1)
    reader = SQLCache(p_server.url, prefix="aba", timeout=1)
    try:
        with writer_and_reader(engine, writer, reader) as other:
            r.replicaof("127.0.0.1", p_server.port)
            synced(r)
            uid = make_user(engine, "v1")
            assert [user_name(other, uid), user_name(other, uid)] == ["v1", "v1"]  # filled, then a hit
            p.wait(1, 5000)  # R holds the v1 entry
            r.replicaof("no", "one")  # R promoted while nobody talks to it...
            rename_user(engine, uid, "v2")  # ...and P acknowledges a release R never gets
            p.replicaof("127.0.0.1", r_server.port)  # P demoted: a full resync from R
            synced(p)
            p.client_kill_filter(_type="normal")  # as the sentinels do to a demoted primary
            p.replicaof("no", "one")  # P promoted again
            for e in (other, engine, other):
                assert user_name(e, uid) == "v2"
            assert reader.stats()["lineage_fences"] + writer.stats()["lineage_fences"] >= 1
    finally:
        p_server.cleanup()
        r_server.cleanup()


def test_a_commit_deferred_while_a_fence_is_on_its_way_keeps_its_keys(
    engine: Engine, private_redis: RedisServer
) -> None:
    """A fence (every entry moved: a restart noticed) released in Redis before a commit's COMMIT does
    not cover that commit. Its keys, deferred while the fence's replay is still in flight (Redis away
    again for the commit's lock and release), stay journalled and are released by the next replay:
    dropped as covered by that fence, another process would keep serving the entry it filled between
    the fence and the COMMIT, with the old row, until its TTL."""
    writer = SQLCache(private_redis.url, prefix="fencerace", timeout=1)
    reader = SQLCache(private_redis.url, prefix="fencerace", timeout=1)
    with writer_and_reader(engine, writer, reader) as other:
        uid = make_user(engine)
        journal: Any = writer._parts.journal
        store: Any = writer.store
        release, send_lock = store.release, store.send_lock
        phase = ["fence"]

        def away(*args: Any, **kwargs: Any) -> Any:
            raise CacheUnavailable("away")

        def fence_release(*args: Any, **kwargs: Any) -> Any:
            if phase[0] == "commit":
                raise CacheUnavailable("release")  # Redis away again for the commit's own replay
            out = release(*args, **kwargs)  # the fence is in Redis now
            if phase[0] == "fence":
                phase[0] = "commit"
                for _ in range(2):  # another process fills the row after the fence, and is served it
                    assert user_name(other, uid) == "ann"
                store.send_lock = away
                rename_user(engine, uid, "bob")  # lock and release refused: its keys deferred
                store.send_lock = send_lock
                phase[0] = "done"
            return out

        store.release = fence_release
        try:
            journal.fence()
            assert journal.replay()
        finally:
            store.release = release
            store.send_lock = send_lock
        assert phase[0] == "done"
        assert writer.stats()["journal"] >= 1  # the commit's keys, kept for the next replay
        writer._parts.store.health.retry_now()
        assert journal.replay()
        assert writer.stats()["journal"] == 0
        assert user_name(other, uid) == "bob"


def test_close_waits_for_a_background_replay_in_flight(redis_url: str) -> None:
    """close() returns only once a journal replay already running on the background thread has ended:
    left running, it would reach Redis after the store closed its connections, and open new ones that
    nothing closes."""
    import threading

    # backoff: the journal's own timer must not replay before the thread below does
    cache = SQLCache(redis_url, prefix=f"cw{uuid.uuid4().hex[:8]}", timeout=2, backoff=60, max_backoff=60)
    parts: Any = cache._parts
    journal, store = parts.journal, parts.store
    journal.defer(parts.tag_keys(["t"]))
    release = store.release
    calls: list[str] = []
    inside, go = threading.Event(), threading.Event()

    def held_release(*args: Any, **kwargs: Any) -> Any:
        first = not calls
        calls.append(threading.current_thread().name)
        if first:
            inside.set()
            assert go.wait(30)
        return release(*args, **kwargs)

    store.release = held_release
    background = threading.Thread(target=journal._replay_in_background, name="background")
    closer = threading.Thread(target=cache.close, name="closer")
    try:
        background.start()
        assert inside.wait(10)
        closer.start()
        deadline = time.monotonic() + 10
        while len(calls) < 2:  # its own last replay goes through...
            assert time.monotonic() < deadline, calls
            time.sleep(0.01)  # polling another thread's progress, with a deadline
        closer.join(1)  # ...and then it waits for the background one (up to 10 s)
        assert closer.is_alive()
    finally:
        go.set()
        background.join(30)
        closer.join(30)
    assert not closer.is_alive() and calls == ["background", "closer"]
