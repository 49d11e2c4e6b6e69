"""sqlcache sharded over a real local Redis Cluster (``shards=4``: three primaries, three replicas).

The consistency scenarios and the identity and query suites run again with every ``cache`` fixture
sharded; with four shards the test models' tables land on different shards (users 2, orders 1,
employees 0, managers and engineers 3), so joined-inheritance entries and queries over users and orders
span shards. Then the sharded layout's own cases: keys spread over the primaries, calls per shard,
repeatable read across shards, a process laid out otherwise refused, and a failover."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _keys, cached, signals

from ..helpers import check_failover, make_user, user_name
from ..models import Employee, Manager, Order, User
from ..topologies import LocalCluster, local_cluster
from .test_identity import *  # noqa: F403  (run again with the fixtures below)
from .test_query import *  # noqa: F403
from .test_scenarios import *  # noqa: F403

__all__ = ["local_cluster"]

SHARDS = 4

# builds its SCAN pattern from the plain prefix (the single server's layout)
del test_damaged_query_entries_are_misses  # noqa: F821


@pytest.fixture
def redis_url(local_cluster: LocalCluster) -> str:
    return local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)


@pytest.fixture
def cache(redis_url: str, engine: Engine) -> Iterator[SQLCache]:
    """As conftest's ``cache``, sharded."""
    c = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", default_ttl=600, shards=SHARDS)
    c.strict_signals = True
    c.attach(engine)
    yield c
    c.detach(engine)
    c.clear()
    c.close()


def test_the_test_tables_span_shards() -> None:
    """The premise of this module: its tables are not all in one shard."""
    shard = {t: _keys.shard_of(t, SHARDS) for t in ("users", "orders", "employees", "managers")}
    assert shard["users"] != shard["orders"] and shard["employees"] != shard["managers"]


class _Commands:
    """Commands the cluster's primaries ran (INFO commandstats), summed, since the last reset."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._nodes = [cluster.node(p) for p in cluster.live_ports()]

    def reset(self) -> None:
        for n in self._nodes:
            n.config_resetstat()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self._nodes:
            if n.info("replication")["role"] != "master":
                continue
            for name, stat in n.info("commandstats").items():
                name = name.removeprefix("cmdstat_")
                if name in ("mget", "evalsha", "eval"):  # the others run inside scripts too
                    out[name] = out.get(name, 0) + int(stat["calls"])
        return out


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_keys_spread_over_the_primaries_and_calls_go_per_shard(
    engine: Engine, cache: SQLCache, local_cluster: LocalCluster
) -> None:
    """A single-table hit is one MGET and a commit of one table's row two scripts (one shard); a hit of
    a class whose tables are in two shards is one MGET per shard, and so is a query joining users and
    orders; the cache's keys sit on more than one primary."""
    cache.register(User)
    cache.register(Employee)
    uid = make_user(engine, "ann")
    with Session(engine) as s:
        m = Manager(name="boss")
        s.add(m)
        s.add(Order(user_id=uid))
        s.commit()
        mid = m.id
    stmt = select(User).join(Order, Order.user_id == User.id).options(cached())

    def reads() -> None:
        with Session(engine) as s:
            s.get(User, uid)
        with Session(engine) as s:
            s.get(Manager, mid)
        with Session(engine) as s:
            s.scalars(stmt).all()

    reads()
    reads()  # filled, by now (SQLite fixes its snapshot: a first session may skip a shard's fill)
    commands = _Commands(local_cluster)
    commands.reset()
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"
    assert commands.counts() == {"mget": 1}
    commands.reset()
    with Session(engine) as s:
        assert s.get(Manager, mid).name == "boss"
    assert commands.counts() == {"mget": 2}
    commands.reset()
    with Session(engine) as s:
        assert [u.name for u in s.scalars(stmt)] == ["ann"]
    assert commands.counts() == {"mget": 2}
    assert cache.stats()["hits"] >= 3
    commands.reset()
    with Session(engine) as s:
        s.get(User, uid).name = "bob"  # a hit (one MGET), then the commit: lock and release, one shard
        s.commit()
    assert commands.counts() == {"mget": 1, "evalsha": 2}
    assert user_name(engine, uid) == "bob"
    nodes = set()
    for port in local_cluster.live_ports():
        node = local_cluster.node(port)
        if node.info("replication")["role"] == "master" and any(node.scan_iter(match="*", count=1000)):
            nodes.add(port)
    assert len(nodes) >= 2


@pytest.mark.parametrize("engine", ["mariadb"], indirect=True)
def test_repeatable_read_fill_across_shards_waits_for_a_clock_read_before_the_snapshot(
    engine: Engine, cache: SQLCache
) -> None:
    """Scenario 9 across shards. A transaction reads a user (shard 2: that shard's clock noted), runs a
    statement (the snapshot), and after another transaction's committed change misses on a manager
    (shards 0 and 3, whose clocks it never read before its snapshot): the old row it loads is not
    stored, and a later transaction reads the new one."""
    cache.register(User)
    cache.register(Employee)
    uid = make_user(engine, "ann")
    with Session(engine) as s:
        m = Manager(name="v1")
        s.add(m)
        s.commit()
        mid = m.id
    with Session(engine) as s:
        s.get(User, uid)  # filled
    with Session(engine) as t1:
        assert t1.get(User, uid).name == "ann"  # a hit: no statement yet, the users shard's clock noted
        t1.execute(text("SELECT COUNT(*) FROM employees")).all()  # the snapshot (a read of a table)
        with Session(engine) as t2:
            t2.get(Manager, mid).name = "v2"
            t2.commit()
        assert t1.get(Manager, mid).name == "v1"  # its snapshot's row, not stored
    assert cache.stats()["fills_skipped"] >= 1
    with Session(engine) as s:
        assert s.get(Manager, mid).name == "v2"
    with Session(engine) as s:
        assert s.get(Manager, mid).name == "v2"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("first", [1, SHARDS])
def test_a_process_laid_out_otherwise_is_refused(engine: Engine, redis_url: str, first: int) -> None:
    """Whichever layout reaches a prefix first, a cache with another number of shards under it would
    miss its invalidations: its first connection finds the claim, its reads go to the database, and its
    writing commits are refused before the database COMMIT (nothing is changed that the other would go
    on serving)."""
    from sqlcache.errors import ConfigurationError

    prefix = f"l{uuid.uuid4().hex[:10]}"
    claimant = SQLCache(redis_url, prefix=prefix, shards=first)
    other = SQLCache(redis_url, prefix=prefix, shards=SHARDS if first == 1 else 1)
    other_engine = create_engine(engine.url)
    try:
        claimant.register(User)
        claimant.attach(engine)
        uid = make_user(engine, "ann")
        for _ in range(2):
            assert user_name(engine, uid) == "ann"
        other.register(User)
        other.attach(other_engine)
        for _ in range(2):
            assert user_name(other_engine, uid) == "ann"
        assert other.stats()["hits"] == 0
        with Session(other_engine) as s:
            s.get(User, uid).name = "bob"
            with pytest.raises(ConfigurationError, match="commit refused"):
                s.commit()
        assert user_name(engine, uid) == "ann" and user_name(other_engine, uid) == "ann"
    finally:
        claimant.detach(engine)
        claimant.clear()
        claimant.close()
        other.detach(other_engine)
        other.close()
        other_engine.dispose()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_conflict_found_later_refuses_the_commits_that_would_miss(
    engine: Engine, cache: SQLCache, redis_url: str, local_cluster: LocalCluster
) -> None:
    """A process laid out otherwise that got past attach() (here: the claims were deleted behind its back
    and the sharded cache claimed the prefix again) finds the conflict on its next new connection: it
    stops using Redis, reports cache_error, and its commits that write cached tables are refused before
    the database COMMIT, so the sharded cache never serves what it would have changed."""
    from sqlcache.errors import ConfigurationError

    cache.register(User)
    uid = make_user(engine, "ann")
    ns = [_keys.namespace(p) for p in cache._parts.keys.layout.prefixes]
    client = local_cluster.client()
    for n in ns:
        client.delete(n + ":layout")
    other = SQLCache(redis_url, prefix=cache.config.prefix, default_ttl=600)
    errors: list[BaseException] = []

    def on_error(sender: Any, exc: BaseException, operation: str) -> None:
        if sender is other:
            errors.append(exc)

    signals.cache_error.connect(on_error)
    try:
        other.register(User)
        other.attach(engine)  # claims "1"
        client.delete(ns[0] + ":layout")
        cache.store.disconnect()
        assert user_name(engine, uid) == "ann"  # the sharded cache claims shard 0 again: its fill
        other.store.disconnect()  # the other's next connection meets the sharded claim
        assert user_name(engine, uid) == "ann"
        with Session(engine) as s:
            s.get(User, uid).name = "bob"
            with pytest.raises(ConfigurationError, match="commit refused"):
                s.commit()
        assert any("laid out for" in str(e) for e in errors)
        assert user_name(engine, uid) == "ann"  # nothing changed: nothing to serve stale
    finally:
        signals.cache_error.disconnect(on_error)
        other.detach(engine)
        other.close()


def test_shards_need_a_cluster(redis_url: str) -> None:
    """shards > 1 on a single server is a configuration error, and so is a count out of range."""
    from sqlcache.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="single server"):
        SQLCache("redis://127.0.0.1:6379/0", shards=2)
    with pytest.raises(ConfigurationError, match="shards"):
        SQLCache(redis_url, shards=0)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("reader", ["writer", "late"])
def test_failover_of_one_shards_primary_serves_nothing_stale(
    engine: Engine, local_cluster: LocalCluster, redis_url: str, reader: str
) -> None:
    """The primary of the users shard acknowledges releases its replica never receives, then dies and
    its replica takes over; no read afterwards returns a version older than the last commit that
    returned, through the writer or through a cache made after the failover."""
    prefix = f"f{uuid.uuid4().hex[:10]}"

    def new_cache() -> SQLCache:
        return SQLCache(
            redis_url, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1,
            shards=SHARDS,
        )  # fmt: skip

    def lose(writer: SQLCache, window: Callable[[], None]) -> None:
        users = writer._parts.keys.layout.at("users")
        primary = local_cluster.primary_for(_keys.clock_key(users))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_failover(engine, new_cache, lose, reader, rows=20, versions=3, rereads=5)
    assert checked == 160
    print(f"sharded cluster failover ({reader}): {checked} reads checked")


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_threads_commit_and_read_across_shards(engine: Engine, cache: SQLCache) -> None:
    """Writers of users and orders in one transaction and readers of a query joining them, at once:
    after the writers stop, every read returns the last committed names."""
    cache.register(User)
    uid = make_user(engine, "n0")
    with Session(engine) as s:
        s.add(Order(user_id=uid))
        s.commit()
    stmt = select(User.name).join(Order, Order.user_id == User.id).where(User.id == uid).options(cached())
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                with Session(engine) as s:
                    s.get(User, uid).name = f"n{n}"
                    s.add(Order(user_id=uid))
                    s.commit()
        except BaseException as exc:
            failures.append(exc)

    def read() -> None:
        try:
            while not stop.is_set():
                with Session(engine) as s:
                    s.execute(stmt).all()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    done = threading.Event()
    done.wait(1.5)  # a bounded run of the threads above, not a synchronisation
    stop.set()
    for t in threads:
        t.join()
    assert not failures
    with Session(engine) as s:
        last = s.get(User, uid).name
    with Session(engine) as s:
        assert {row.name for row in s.execute(stmt)} == {last}
    assert user_name(engine, uid) == last


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_clear_removes_every_shards_keys(
    engine: Engine, cache: SQLCache, local_cluster: LocalCluster
) -> None:
    """clear() SCANs each shard's node: nothing of the cache is left on any primary but the layout."""
    cache.register(User)
    cache.register(Employee)
    uid = make_user(engine, "ann")
    assert user_name(engine, uid) == "ann"
    with Session(engine) as s:
        s.add(Manager(name="m"))
        s.commit()
    assert cache.clear() > 0
    ns = [_keys.namespace(p) for p in cache._parts.keys.layout.prefixes]
    for port in local_cluster.live_ports():
        node: redis.Redis = local_cluster.node(port)
        for key in node.scan_iter(match="*", count=1000):
            name = key if isinstance(key, str) else key.decode()
            # each shard's layout claim stays (RedisStore.delete_matching)
            assert not any(name.startswith(n + ":") and name != n + ":layout" for n in ns), name


@pytest.mark.parametrize("engine", ["mariadb"], indirect=True)
def test_a_fill_the_snapshot_bound_refuses_drops_its_stampede_lock(engine: Engine, cache: SQLCache) -> None:
    """A cached query's fill refused by a shard's repeatable-read bound (before any script runs) still
    drops the caller's stampede lock, as fill.lua would have: the next caller does not wait
    ``stampede_wait`` for a fill that never comes."""
    cache.register(User)
    u1, u2 = make_user(engine, "ann"), make_user(engine, "bo")
    stmt = select(User).where(User.id == u1).options(cached())
    with Session(engine) as t1:
        t1.get(User, u2)  # a miss starting the transaction: every shard's clock noted, then the snapshot
        with Session(engine) as t2:
            t2.get(User, u1).name = "ann2"
            t2.commit()
        assert [u.name for u in t1.scalars(stmt)] == ["ann"]  # its snapshot's row: the fill refused
    assert cache.stats()["fills_skipped"] >= 1
    with Session(engine) as t3:
        assert [u.name for u in t3.scalars(stmt)] == ["ann2"]
    assert cache.stats()["stampede_timeouts"] == 0 and cache.stats()["stampede_waits"] == 0


@pytest.mark.parametrize("engine", ["mariadb"], indirect=True)
def test_every_shards_clock_is_read_once_per_transaction(
    engine: Engine, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get_many of cold ids misses once per id, but reads every shard's clock once: before its first
    statement, not again for each miss."""
    cache.register(User)
    ids = [make_user(engine, f"u{i}") for i in range(10)]
    calls: list[int] = []
    original = cache.store.clocks  # type: ignore[union-attr]

    def counted() -> dict[str, int]:
        calls.append(1)
        return original()  # type: ignore[no-any-return]

    monkeypatch.setattr(cache.store, "clocks", counted)
    with Session(engine) as s:
        assert [u.name for u in cache.get_many(s, User, ids)] == [f"u{i}" for i in range(10)]
    assert len(calls) == 1
