"""The local tier (``local_bytes=``): hits from process memory, invalidated by Redis's own tracking, with
the staleness bound enforced. Writers are other caches on other engines (another process's view: no
local tier, no shared Python state), against real Redis and databases."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.sentinel
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, cached
from sqlcache.errors import ConfigurationError

from ..conftest import RedisServer, shareable_url
from ..helpers import make_user, user_name
from ..models import User
from ..proxy import Proxy


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # polling with a deadline


def serving(cache: SQLCache) -> bool:
    """Whether the tier's tracking connection has answered a PING (it serves from then on)."""
    tier: Any = cache._parts.local
    return bool(tier._alive > float("-inf"))


def keeper_wakes(tier: Any, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When the tier's keeper woke from now on (appended to as it does)."""
    woken: list[float] = []
    wake = tier._wake

    class Counting:
        def wait(self, timeout: float) -> bool:
            woken.append(time.monotonic())
            return bool(wake.wait(timeout))

        def __getattr__(self, name: str) -> Any:
            return getattr(wake, name)

    monkeypatch.setattr(tier, "_wake", Counting())
    return woken


@contextlib.contextmanager
def tiered(redis_url: str, engine: Engine, **kwargs: Any) -> Iterator[SQLCache]:
    """A cache of User with a local tier whose tracking connection answers, attached to ``engine``;
    detached, cleared and closed afterwards."""
    cache = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}", default_ttl=600, **kwargs)
    cache.register(User)
    cache.attach(engine)
    try:
        wait_for(lambda: serving(cache), "the tracking connection")
        yield cache
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()


@pytest.fixture
def local(redis_url: str, engine: Engine) -> Iterator[SQLCache]:
    c = SQLCache(redis_url, prefix=f"l{uuid.uuid4().hex[:10]}", default_ttl=600, local_bytes=1 << 20)
    c.strict_signals = True
    c.register(User)
    c.attach(engine)
    wait_for(lambda: serving(c), "the tracking connection")
    yield c
    c.detach(engine)
    c.clear()
    c.close()


@pytest.fixture
def writer(redis_url: str, engine: Engine, local: SQLCache) -> Iterator[tuple[SQLCache, Engine]]:
    """Another cache on another engine to the same database, without a local tier: another process."""
    other = create_engine(shareable_url(engine))
    c = SQLCache(redis_url, prefix=local.config.prefix, default_ttl=600)
    c.register(User)
    c.attach(other)
    yield c, other
    c.detach(other)
    c.close()
    other.dispose()


def _commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    original = redis.Connection.send_command

    def send_command(self: Any, *args: Any, **kw: Any) -> None:
        sent.append(str(args[0]))
        original(self, *args, **kw)

    monkeypatch.setattr(redis.Connection, "send_command", send_command)
    return sent


def _rename(engine: Engine, uid: int, name: str) -> None:
    with Session(engine) as s:
        s.get(User, uid).name = name  # type: ignore[union-attr]
        s.commit()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_a_local_hit_needs_no_round_trip_and_no_sql(
    engine: Engine, local: SQLCache, sql_count: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once Redis served an entry, the next reads of it are served from memory: no command to Redis, no
    SQL, objects of their own in each session."""
    uid = make_user(engine, "ann")
    assert user_name(engine, uid) == "ann"  # miss, fill
    assert user_name(engine, uid) == "ann"  # Redis hit: kept locally
    sent = _commands(monkeypatch)
    sql_count.reset()
    with Session(engine) as s1, Session(engine) as s2:
        a, b = s1.get(User, uid), s2.get(User, uid)
        assert a is not None and b is not None and a is not b and a.name == b.name == "ann"
    assert sent == [] and len(sql_count) == 0
    st = local.stats()
    assert st["local_hits"] >= 2 and st["local_bytes"] > 0


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_every_read_after_another_process_commit_returned_sees_it(
    engine: Engine, local: SQLCache, writer: tuple[SQLCache, Engine]
) -> None:
    """Strict on one host: 100 times, another process commits a new name and, as soon as its commit()
    returned, the local-tier process reads: it always sees the new name (the commit's lock moved the
    dependency before the COMMIT, and Redis pushed its name before the commit returned)."""
    _, other = writer
    uid = make_user(engine, "v0")
    for _ in range(2):
        assert user_name(engine, uid) == "v0"
    for n in range(1, 101):
        _rename(other, uid, f"v{n}")
        for _ in range(3):  # again: from Redis, then from memory
            assert user_name(engine, uid) == f"v{n}"
    assert local.stats()["local_hits"] > 0


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_an_invalidation_arriving_while_a_read_is_in_flight_is_not_lost(
    engine: Engine, local: SQLCache, writer: tuple[SQLCache, Engine]
) -> None:
    """t0 a read notes the tier and asks Redis; t1 Redis answers generation g; t2 another process
    commits, moving g (its name reaches the tier); t3 the reply is to be kept: g is already stale and
    is not kept, so the next read does not serve the old row from memory."""
    _, other = writer
    uid = make_user(engine, "old")
    assert user_name(engine, uid) == "old"  # filled
    store: Any = local.store
    original = store.read
    armed = [True]

    def read(clock_key: str, entry_key: str, dep_keys: Any) -> Any:
        r = original(clock_key, entry_key, dep_keys)
        if armed[0] and r.hit:
            armed[0] = False
            _rename(other, uid, "new")  # between Redis's answer and the tier keeping it
        return r

    store.read = read
    try:
        assert user_name(engine, uid) == "old"  # begun before the commit: the old row is right
    finally:
        del store.read
    assert not armed[0]
    assert user_name(engine, uid) == "new"
    assert user_name(engine, uid) == "new"


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_deleted_dependency_drops_what_depends_on_it(
    engine: Engine, local: SQLCache, redis_client: redis.Redis
) -> None:
    """A dependency key evicted (deleted here) is named by Redis's tracking: entries depending on it
    are not served from memory, and the database answers."""
    uid = make_user(engine, "ann")
    for _ in range(3):
        assert user_name(engine, uid) == "ann"
    hits = local.stats()["local_hits"]
    deps = [k for k in redis_client.scan_iter(match=f"{local.config.prefix}:d:i:*")]
    assert deps
    redis_client.delete(*deps)
    wait_for(lambda: local.stats()["local_invalidations"] > 0, "the invalidation")
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"  # type: ignore[union-attr]
    assert local.stats()["local_hits"] == hits


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_killed_tracking_connection_drops_the_tier_until_it_is_back(
    engine: Engine, local: SQLCache, writer: tuple[SQLCache, Engine], redis_client: redis.Redis
) -> None:
    """CLIENT KILL of the tracking connection: nothing is served locally until a new one answered, and
    what changed meanwhile is never served old."""
    _, other = writer
    uid = make_user(engine, "v1")
    for _ in range(3):
        assert user_name(engine, uid) == "v1"
    tracking = [c for c in redis_client.client_list() if "t" in c.get("flags", "") and c.get("sub") == "1"]
    assert tracking
    drops = local.stats()["local_drops"]
    for c in tracking:
        redis_client.client_kill_filter(_id=c["id"])
    _rename(other, uid, "v2")
    assert user_name(engine, uid) == "v2"
    wait_for(lambda: local.stats()["local_drops"] > drops and serving(local), "a new tracking connection")
    for _ in range(3):
        assert user_name(engine, uid) == "v2"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_flushed_or_restarted_redis_drops_the_tier(
    engine: Engine, private_redis: RedisServer, sql_count: Any
) -> None:
    """FLUSHDB (a null invalidation) drops everything; so does a restart (the tracking connection is
    lost): the next reads are answered by the database, and hits resume afterwards."""
    cache = SQLCache(private_redis.url, prefix="flush", default_ttl=600, local_bytes=1 << 20, timeout=0.5)
    cache.register(User)
    cache.attach(engine)
    try:
        wait_for(lambda: serving(cache), "the tracking connection")
        uid = make_user(engine, "ann")
        for _ in range(3):
            assert user_name(engine, uid) == "ann"
        redis.Redis(port=private_redis.port).flushdb()
        wait_for(lambda: cache.stats()["local_drops"] >= 1, "the flush's invalidation")
        sql_count.reset()
        assert user_name(engine, uid) == "ann"
        assert len(sql_count) == 1  # the database answered
        private_redis.stop()
        private_redis.start()
        wait_for(lambda: cache.stats()["local_drops"] >= 2, "the lost tracking connection")
        wait_for(lambda: serving(cache), "a new tracking connection", timeout=10)
        for _ in range(4):
            assert user_name(engine, uid) == "ann"
    finally:
        cache.detach(engine)
        cache.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_nothing_is_served_locally_past_max_lag_without_an_answered_ping(
    engine: Engine, private_redis: RedisServer
) -> None:
    """The bound is enforced: once the PINGs on the tracking connection go unanswered (a proxy that
    stops passing what the process sends, whoever sends it: the keeper or a reader), the tier stops
    serving when ``local_max_lag`` has passed since the last PING that may still be answered."""
    proxy = Proxy(private_redis.port)
    cache = SQLCache(proxy.url, prefix="lag", default_ttl=600, local_bytes=1 << 20, local_max_lag=0.05,
                     timeout=0.2, failure_threshold=1, backoff=30)  # fmt: skip
    cache.register(User)
    cache.attach(engine)
    try:
        wait_for(lambda: serving(cache), "the tracking connection")
        uid = make_user(engine, "ann")
        wait_for(lambda: user_name(engine, uid) == "ann" and cache.stats()["local_hits"] >= 1, "a local hit")
        tier: Any = cache._parts.local
        with tier._lock:
            proxy.hold()
            # a PING already written may still be answered (a read drains its PONG, as it must): the
            # bound then runs from when that one was sent; nothing written from here on is answered
            last = max([tier._alive, *tier._pings])
        wait_for(lambda: time.monotonic() - last > 0.05, "max_lag to pass")
        hits = cache.stats()["local_hits"]
        for _ in range(3):
            assert user_name(engine, uid) == "ann"  # the database answers: Redis is out of reach too
        assert cache.stats()["local_hits"] == hits
    finally:
        proxy.close()
        cache.detach(engine)
        cache.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_keeper_stays_out_of_the_way_of_busy_readers(
    engine: Engine, local: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While reads go on, the PINGs are the readers' and the keeper's thread sleeps: a thread waking
    every ``local_max_lag / 4`` would contend with them for the GIL, and make every call of theirs that
    releases it (a socket read, a poll) cost a thread switch."""
    uid = make_user(engine, "v1")
    tier: Any = local._parts.local
    by: list[str] = []
    ping = tier._ping

    def recording(tracking: Any) -> None:
        by.append(threading.current_thread().name)
        ping(tracking)

    monkeypatch.setattr(tier, "_ping", recording)
    woken = keeper_wakes(tier, monkeypatch)
    until = time.monotonic() + 40 * tier._interval  # 40 of the keeper's rounds while idle
    while time.monotonic() < until:
        assert user_name(engine, uid) == "v1"
        time.sleep(0.002)
    keeper = by.count("sqlcache-local-tier")
    assert len(by) - keeper >= 20  # the readers pinged, about once per interval
    assert keeper <= 2  # its rounds before the readers took over
    assert len(woken) <= 10  # a few rounds until it sees they did, then once a second


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_keeper_of_a_tier_nobody_reads_sleeps_until_a_read_wakes_it(
    engine: Engine, local: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no read through the tier for a second, the keeper wakes once a second (its wake-ups would
    slow whatever else the process does); the first read after that, answered by Redis, wakes it, and
    the reads after it are served from memory again."""
    uid = make_user(engine, "v1")
    wait_for(lambda: user_name(engine, uid) == "v1" and local.stats()["local_hits"] >= 1, "a local hit")
    tier: Any = local._parts.local
    wait_for(lambda: tier._idle, "the keeper to find the tier idle")
    woken = keeper_wakes(tier, monkeypatch)
    idle_until = time.monotonic() + 40 * tier._interval  # 40 of its rounds when it is awake
    while time.monotonic() < idle_until:
        time.sleep(0.01)
    assert len(woken) <= 3
    hits = local.stats()["local_hits"]
    # stale by now, unless the keeper's last ping was within max_lag: Redis answers, and wakes the keeper
    assert user_name(engine, uid) == "v1"
    wait_for(lambda: user_name(engine, uid) == "v1" and local.stats()["local_hits"] > hits, "a local hit")
    wait_for(lambda: not tier._idle, "the keeper back at its cadence")


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_readers_keep_the_tier_proven_without_the_keeper(
    engine: Engine, local: SQLCache, writer: tuple[SQLCache, Engine]
) -> None:
    """While reads go on, the readers ping the tracking connection themselves (the keeper sleeps, out of
    their way): with the keeper gone, reads spread over many times ``local_max_lag`` are still served
    locally, and another process's commit is still seen at once."""
    _, other = writer
    uid = make_user(engine, "v1")
    for _ in range(3):
        assert user_name(engine, uid) == "v1"
    tier: Any = local._parts.local
    tier._stop.set()
    tier._wake.set()
    tier._thread.join()
    hits = local.stats()["local_hits"]
    until = time.monotonic() + 5 * local.config.local_max_lag
    reads = 0
    while time.monotonic() < until:
        assert user_name(engine, uid) == "v1"
        reads += 1
        time.sleep(0.002)  # reads a few milliseconds apart, as a busy process's are
    assert local.stats()["local_hits"] - hits >= reads - 2  # at most the first after a late PONG
    _rename(other, uid, "v2")
    assert user_name(engine, uid) == "v2"
    for _ in range(3):
        assert user_name(engine, uid) == "v2"
    assert local.stats()["local_hits"] > hits + reads - 2


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_memory_stays_within_local_bytes(engine: Engine, redis_url: str) -> None:
    """A stream of large query results: what the tier holds stays within ``local_bytes``."""
    budget = 64 * 1024
    with tiered(redis_url, engine, local_bytes=budget) as cache:
        for n in range(40):
            make_user(engine, "x" * 40 + str(n))
        for n in range(60):
            stmt = select(User).where(User.id > n % 30).options(cached(tags=[f"page{n}"]))
            for _ in range(2):
                with Session(engine) as s:
                    s.scalars(stmt).all()
            assert cache.stats()["local_bytes"] <= budget
        assert cache.stats()["local_hits"] == 0 or cache.stats()["local_bytes"] > 0


def test_what_the_local_tier_cannot_watch_is_refused(tmp_path: Any) -> None:
    """Bad values, TLS settings its tracking connection cannot use (on one server or a cluster) and a
    Sentinel pool of replicas are configuration errors, and say which."""
    with pytest.raises(ConfigurationError, match="local_bytes"):
        SQLCache("redis://127.0.0.1:6379/0", local_bytes=-1)
    with pytest.raises(ConfigurationError, match="local_max_lag"):
        SQLCache("redis://127.0.0.1:6379/0", local_bytes=1, local_max_lag=0)
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ConfigurationError, match=r"TLS settings \(no such file: ssl_ca_certs=.*no-such-ca"):
        SQLCache(f"rediss+cluster://127.0.0.1:1?ssl_ca_certs={missing}", local_bytes=1 << 20)
    with pytest.raises(ConfigurationError, match=r"TLS settings \(no such file: ssl_ca_certs=.*no-such-ca"):
        SQLCache(redis.Redis(ssl=True, ssl_ca_certs=str(missing)), local_bytes=1 << 20)
    with pytest.raises(ConfigurationError, match=r"ssl_cert_reqs='sometimes' is none of"):
        SQLCache(redis.Redis(ssl=True, ssl_cert_reqs="sometimes"), local_bytes=1 << 20)
    with pytest.raises(ConfigurationError, match="OCSP"):
        SQLCache(redis.Redis(ssl=True, ssl_validate_ocsp=True), local_bytes=1 << 20)
    replicas = redis.sentinel.Sentinel([("127.0.0.1", 1)]).slave_for("svc")
    with pytest.raises(ConfigurationError, match="replicas"):
        SQLCache(replicas, local_bytes=1 << 20)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_an_entry_that_expires_in_redis_goes_from_memory_too(
    engine: Engine, local: SQLCache, redis_client: redis.Redis
) -> None:
    """Writes that bypass every attached engine are covered by the entry's TTL only: when the entry
    expires in Redis, Redis names its key and the tier drops it, so the next read sees the database."""
    uid = make_user(engine, "old")
    stmt = select(User.name).where(User.id == uid).options(cached(ttl=1))

    def name() -> str:
        with Session(engine) as s:
            return str(s.scalars(stmt).one())

    for _ in range(3):
        assert name() == "old"
    assert local.stats()["local_hits"] >= 1
    plain = create_engine(shareable_url(engine))  # not attached: no invalidation
    with plain.begin() as c:
        c.execute(User.__table__.update().where(User.id == uid).values(name="new"))
    plain.dispose()
    keys = list(redis_client.scan_iter(match=f"{local.config.prefix}:q:*"))  # none if expired already
    if keys:
        # EXISTS expires it in Redis (lazily), which names it to the tier
        wait_for(lambda: redis_client.exists(*keys) == 0, "the entry's expiry", timeout=10)
    wait_for(lambda: name() == "new", "the database's row", timeout=5)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_another_process_filling_other_entries_leaves_ours_in_memory(
    engine: Engine, local: SQLCache, writer: tuple[SQLCache, Engine]
) -> None:
    """A fill elsewhere moves no dependency (it extends their lifetime only when it runs low), so it
    does not empty every other process's tier."""
    _, other = writer
    mine, theirs = make_user(engine, "mine"), [make_user(engine, f"t{i}") for i in range(10)]
    for _ in range(3):
        assert user_name(engine, mine) == "mine"
    hits = local.stats()["local_hits"]
    for uid in theirs:
        assert user_name(other, uid) is not None  # misses and fills by the other process
    for _ in range(3):
        assert user_name(engine, mine) == "mine"
    assert local.stats()["local_hits"] == hits + 3


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_string_published_on_the_tracking_channel_is_ignored(
    engine: Engine, local: SQLCache, redis_client: redis.Redis
) -> None:
    """Redis's own invalidations are arrays or null; a string on the channel can only come from PUBLISH:
    ignored, so that anyone allowed to publish cannot keep emptying the tier."""
    uid = make_user(engine, "ann")
    for _ in range(3):
        assert user_name(engine, uid) == "ann"
    drops, hits = local.stats()["local_drops"], local.stats()["local_hits"]
    for _ in range(5):
        redis_client.publish("__redis__:invalidate", b"junk")
    redis_client.ping()
    for _ in range(3):
        assert user_name(engine, uid) == "ann"
    assert local.stats()["local_drops"] == drops and local.stats()["local_hits"] == hits + 3


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_generations_are_kept_only_for_entries_held(engine: Engine, redis_url: str) -> None:
    """Entries evicted to stay within local_bytes take their dependencies' generations with them: the
    tables stay within what the entries held need."""
    with tiered(redis_url, engine, local_bytes=16 * 1024) as cache:
        uids = [make_user(engine, f"u{i}") for i in range(200)]
        for uid in uids:
            for _ in range(2):
                assert user_name(engine, uid) is not None
        tier: Any = cache._parts.local
        held = len(tier._entries)
        assert 0 < held < 200 and cache.stats()["local_bytes"] <= 16 * 1024
        assert len(tier._gens) <= held + 3  # each row's key, and the dependencies they share


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_forked_child_has_a_tier_of_its_own(engine: Engine, local: SQLCache) -> None:
    """Attach in the parent, fork (a prefork server's workers): the child starts with an empty tier
    and a tracking connection of its own, and serves from memory once it has one."""
    import os

    uid = make_user(engine, "ann")
    for _ in range(3):
        assert user_name(engine, uid) == "ann"
    pid = os.fork()
    if pid == 0:  # the child: exit 0 once it served a read from its own tier
        code = 1
        try:
            engine.dispose(close=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and code:
                if user_name(engine, uid) == "ann" and local.stats()["local_hits"] > 0 and serving(local):
                    before = local.stats()["local_hits"]
                    user_name(engine, uid)
                    code = 0 if local.stats()["local_hits"] > before else 1
                time.sleep(0.01)  # polling with a deadline
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert user_name(engine, uid) == "ann"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_an_abandoned_tier_stops_without_waiting_or_locking(local: SQLCache) -> None:
    """What a cache dropped unclosed runs (on whichever thread collected it, the keeper's own perhaps,
    inside the tier's lock) neither waits for the keeper nor takes the lock: the keeper stops and
    closes its tracking connection once the lock is free. close() from inside the lock would hang."""
    tier: Any = local._parts.local
    keeper, sock = tier._thread, tier._tracking._sock
    returned = threading.Event()

    def abandon_inside_the_lock() -> None:
        with tier._lock:
            tier.abandon()
            returned.set()
            assert sock.fileno() != -1  # the keeper closes it once the lock is free

    t = threading.Thread(target=abandon_inside_the_lock, daemon=True)
    t.start()
    assert returned.wait(5)
    t.join(5)
    wait_for(lambda: not keeper.is_alive(), "the keeper to stop")
    assert sock.fileno() == -1
