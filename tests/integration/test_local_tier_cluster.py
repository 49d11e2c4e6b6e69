"""The local tier on a real local Redis Cluster (three primaries, three replicas), unsharded and sharded:
a tracking connection per primary serving one of the cache's slots, and, with every PING, proof that
each still serves them. Writers are other caches on other engines (another process's view)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqlcache import SQLCache, _keys

from ..conftest import shareable_url
from ..helpers import check_failover, make_user, rename_user, user_name
from ..models import User
from ..topologies import LocalCluster, admin, local_cluster
from .test_local_tier import serving, tiered, wait_for

__all__ = ["local_cluster"]


@pytest.fixture
def redis_url(local_cluster: LocalCluster) -> str:
    return local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)


@pytest.fixture
def other(engine: Engine) -> Iterator[Engine]:
    e = create_engine(shareable_url(engine))
    yield e
    e.dispose()


def _watched(cluster: LocalCluster) -> set[int]:
    """The nodes holding a tracking connection (subscribed, with tracking on)."""
    out = set()
    for port in cluster.live_ports():
        with admin(port) as node:
            if any("t" in c.get("flags", "") and c.get("sub") == "1" for c in node.client_list()):
                out.add(port)
    return out


def _writer(redis_url: str, prefix: str, engine: Engine, shards: int) -> SQLCache:
    c = SQLCache(redis_url, prefix=prefix, default_ttl=600, shards=shards)
    c.register(User)
    c.attach(engine)
    return c


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("shards", [1, 3])
def test_every_read_after_another_process_commit_returned_sees_it(
    engine: Engine, other: Engine, redis_url: str, local_cluster: LocalCluster, shards: int
) -> None:
    """Strict on one host, on a cluster too: 20 rounds of another process renaming 6 users and, as soon
    as each commit returned, reads that always see the new name, served from memory in between. One
    tracking connection per primary serving a slot of the cache: one node unsharded, each shard's
    primary sharded."""
    with tiered(redis_url, engine, local_bytes=1 << 20, shards=shards) as cache:
        writer = _writer(redis_url, cache.config.prefix, other, shards)
        try:
            uids = [make_user(engine, "v0") for _ in range(6)]
            for uid in uids:
                assert user_name(engine, uid) == "v0"
            for n in range(1, 21):
                for uid in uids:
                    rename_user(other, uid, f"v{n}")
                    for _ in range(3):  # from Redis, then from memory
                        assert user_name(engine, uid) == f"v{n}"
            assert cache.stats()["local_hits"] >= 6 * 20
            slots = {local_cluster.primary_for(_keys.clock_key(p)) for p in cache._keys.layout.prefixes}
            assert _watched(local_cluster) >= slots
        finally:
            writer.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("shards", [1, 3])
def test_a_clean_failover_moves_the_tracking_to_the_new_primary(
    engine: Engine, other: Engine, redis_url: str, local_cluster: LocalCluster, shards: int
) -> None:
    """``CLUSTER FAILOVER``: the old primary stays up, as a replica, and would go on answering the
    tracking connection's PINGs. The tier's check sees that it no longer serves the cache's slot and
    drops everything; reads after another process's commit see it, and, once a tracking connection to
    the new primary answered, are served from memory again."""
    with tiered(redis_url, engine, local_bytes=1 << 20, shards=shards, timeout=0.5) as cache:
        writer = _writer(redis_url, cache.config.prefix, other, shards)
        try:
            uid = make_user(engine, "v0")
            for _ in range(3):
                assert user_name(engine, uid) == "v0"
            users = cache._keys.layout.at("users")
            primary = local_cluster.primary_for(_keys.clock_key(users))
            assert primary in _watched(local_cluster)
            drops = cache.stats()["local_drops"]
            promoted = local_cluster.failover(primary)
            wait_for(lambda: cache.stats()["local_drops"] > drops, "the tier to see the move", timeout=10)
            rename_user(other, uid, "v1")
            hits = cache.stats()["local_hits"]

            def served_from_memory() -> bool:  # every read right; until the tier serves again
                assert user_name(engine, uid) == "v1"
                return cache.stats()["local_hits"] > hits

            wait_for(served_from_memory, "a tracking connection to the new primary", timeout=10)
            assert promoted in _watched(local_cluster)
        finally:
            writer.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("shards", [1, 3])
def test_a_failover_that_loses_acknowledged_releases_serves_nothing_stale_from_memory(
    engine: Engine, redis_url: str, local_cluster: LocalCluster, shards: int
) -> None:
    """The users slot's primary acknowledges releases its replica never receives, then dies and the
    replica takes over, while the caches hold those rows in memory: no read afterwards returns a
    version older than the last commit that returned."""
    prefix = f"f{uuid.uuid4().hex[:10]}"

    def new_cache() -> SQLCache:
        return SQLCache(
            redis_url, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1,
            shards=shards, local_bytes=1 << 20,
        )  # fmt: skip

    def lose(writer: SQLCache, window: Callable[[], None]) -> None:
        wait_for(lambda: serving(writer), "the tracking connection")
        primary = local_cluster.primary_for(_keys.clock_key(writer._keys.layout.at("users")))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_failover(engine, new_cache, lose, "writer", rows=10, versions=3, rereads=5)
    assert checked == 80
