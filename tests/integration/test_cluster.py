"""sqlcache on a real local Redis Cluster (three primaries, three replicas; tests/topologies.py).

The consistency scenarios and the identity and query suites run again here with every cache on the
cluster (the ``redis_url`` fixture below replaces the single server's, and so the ``cache`` fixture's),
then the cluster's own cases: one round trip per hit, and failovers that lose acknowledged writes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _keys, cached

from ..helpers import check_a_dropped_cache_closes_its_connections, check_failover, make_user, user_name
from ..models import User
from ..topologies import LocalCluster, local_cluster
from .test_identity import *  # noqa: F403  (run again with the fixtures below)
from .test_query import *  # noqa: F403
from .test_scenarios import *  # noqa: F403

__all__ = ["local_cluster"]

# builds its SCAN pattern from the plain prefix (the single server's layout); hostile contents are the
# same bytes on a cluster node
del test_damaged_query_entries_are_misses  # noqa: F821


@pytest.fixture
def redis_url(local_cluster: LocalCluster) -> str:
    return local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    original = redis.Connection.send_command

    def send_command(self: Any, *args: Any, **kw: Any) -> None:
        sent.append(str(args[0]))
        original(self, *args, **kw)

    monkeypatch.setattr(redis.Connection, "send_command", send_command)
    return sent


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_one_round_trip_per_hit_and_two_commands_per_commit(
    engine: Engine, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the cluster as on one server: an identity hit, a 20-row query hit and a get_many of 21 hits are
    one command each (MGET to the slot's primary), a commit that changes a row two (the pipelined lock
    and the release)."""
    cache.register(User)
    uid = make_user(engine, "ann")
    assert user_name(engine, uid) == "ann"  # filled; connections made
    sent = _counting(monkeypatch)
    assert user_name(engine, uid) == "ann"
    assert sent == ["MGET"] and cache.stats()["hits"] == 1
    sent.clear()
    with Session(engine) as s:
        s.get(User, uid).name = "bob"  # a hit: one MGET
        s.commit()
    assert sent == ["MGET", "EVALSHA", "EVALSHA"]
    monkeypatch.undo()
    for n in range(20):
        make_user(engine, f"q{n}")
    stmt = select(User).where(User.name.like("q%")).order_by(User.id).options(cached())

    def query() -> list[str]:
        with Session(engine) as s:
            return [u.name for u in s.scalars(stmt)]

    assert len(query()) == 20  # filled
    sent = _counting(monkeypatch)
    assert query() == [f"q{n}" for n in range(20)]  # a 20-row query hit: one command too
    assert sent == ["MGET"]
    monkeypatch.undo()
    with Session(engine) as s:
        ids = [u.id for u in s.scalars(select(User).order_by(User.id))]
    with Session(engine) as s:
        cache.get_many(s, User, ids)  # filled (the cache's read first in its transaction: see scenario 9)
    sent = _counting(monkeypatch)
    with Session(engine) as s:
        assert len(cache.get_many(s, User, ids)) == 21  # 21 identity hits: one MGET to the slot's primary
    assert sent == ["MGET"]


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("reader", ["writer", "late"])
def test_failover_that_loses_acknowledged_releases_serves_nothing_stale(
    engine: Engine, local_cluster: LocalCluster, redis_url: str, reader: str
) -> None:
    """The primary of the cache's slot acknowledges commits' releases its replica never receives, then
    dies and the replica takes over with the older generations and entries. Afterwards no read returns
    a version older than the last commit that returned: neither by the process that wrote (``writer``:
    it sees a new primary serve the slot) nor by one that first meets the cluster after the failover,
    the writer gone (``late``: only the lineage check on the node can tell)."""
    prefix = f"f{uuid.uuid4().hex[:10]}"

    def new_cache() -> SQLCache:
        return SQLCache(redis_url, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1)

    def lose(writer: SQLCache, window: Callable[[], None]) -> None:
        primary = local_cluster.primary_for(_keys.clock_key(writer._parts.kp))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_failover(engine, new_cache, lose, reader, rows=20, versions=3, rereads=5)
    assert checked == 160
    print(f"cluster failover ({reader}): {checked} reads checked")


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_threads_first_using_the_router_build_one_client(engine: Engine, redis_url: str) -> None:
    """Eight threads reading through a fresh cluster cache at once: one cluster client is built, one
    store per node, and no spurious change of owner (which would fence the cache)."""
    import threading

    cache = SQLCache(redis_url, prefix=f"r{uuid.uuid4().hex[:10]}", default_ttl=600)
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine, "ann")  # its commit used the router: start again from nothing
        store: Any = cache.store
        store.disconnect()
        store._cluster, store._stores, store._owners = None, {}, {}
        inside, made = threading.Event(), []
        original = store._make

        def make() -> Any:
            made.append(1)
            if len(made) == 1:
                inside.wait(0.5)  # a second thread building a client meanwhile would set it
            else:
                inside.set()
            return original()

        store._make = make
        names: list[str | None] = []
        fences = cache.stats()["fences"]
        threads = [threading.Thread(target=lambda: names.append(user_name(engine, uid))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert names == ["ann"] * 8
        assert len(made) == 1 and len(store._stores) == 1
        assert cache.stats()["fences"] == fences
    finally:
        cache.clear()
        cache.close()


def test_a_cache_dropped_unclosed_closes_its_connections(redis_url: str) -> None:
    """On a cluster too: each node store's connections."""
    check_a_dropped_cache_closes_its_connections(redis_url)
