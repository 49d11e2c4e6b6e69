"""The local tier on a real local Redis Cluster (three primaries, three replicas), unsharded and sharded:
a tracking connection per primary serving one of the cache's slots, and, with every PING, proof that
each still serves them. Writers are other caches on other engines (another process's view)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqlcache import SQLCache, _keys
from sqlcache._ctracking import cluster_tracking

from ..conftest import shareable_url
from ..helpers import check_failover, make_user, rename_user, user_name
from ..models import User
from ..proxy import Proxy
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
            # each round: a fill, a Redis hit kept, then (when the tier may serve) a read from memory
            assert cache.stats()["local_hits"] > 0
            slots = {local_cluster.primary_for(_keys.clock_key(p)) for p in cache._parts.keys.layout.prefixes}
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
            users = cache._parts.keys.layout.at("users")
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
        primary = local_cluster.primary_for(_keys.clock_key(writer._parts.keys.layout.at("users")))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_failover(engine, new_cache, lose, "writer", rows=10, versions=3, rereads=5)
    assert checked == 80


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_tier_finds_the_cluster_when_its_startup_node_is_unreachable(
    engine: Engine, local_cluster: LocalCluster
) -> None:
    """The URL names one node, reached here through a proxy that is then cut: when the tracking
    connections must be made again, the slot table is read from the nodes the last one named, and the
    tier serves again."""
    proxy = Proxy(local_cluster.ports[0])
    url = f"redis+cluster://127.0.0.1:{proxy.port}"
    try:
        with tiered(url, engine, local_bytes=1 << 20) as cache:
            uid = make_user(engine, "ann")
            for _ in range(3):
                assert user_name(engine, uid) == "ann"
            proxy.cut()
            drops = cache.stats()["local_drops"]
            for port in _watched(local_cluster):  # the tracking connections, made again from here
                with admin(port) as node:
                    for c in node.client_list():
                        if "t" in c.get("flags", "") and c.get("sub") == "1":
                            node.client_kill_filter(_id=c["id"])
            wait_for(lambda: cache.stats()["local_drops"] > drops, "the lost tracking connections")
            hits = cache.stats()["local_hits"]

            def served_from_memory() -> bool:
                assert user_name(engine, uid) == "ann"
                return cache.stats()["local_hits"] > hits

            wait_for(served_from_memory, "tracking connections located without the startup node", 10)
    finally:
        proxy.close()


def test_a_rounds_answer_counts_only_once_its_check_passed(
    local_cluster: LocalCluster, redis_url: str
) -> None:
    """On the real cluster: the PINGs of a round are answered, but the tier is handed that round's
    pong only once the round's check (the nodes still serve the cache's slots) has passed."""
    cache = SQLCache(redis_url, prefix=f"r{uuid.uuid4().hex[:10]}", shards=3)
    try:
        layout = cache._parts.keys.layout
        keys = [_keys.clock_key(p) for p in layout.prefixes]
        prefixes = [ns + ":d:" for ns in layout.namespaces]
        store: Any = cache.store
        tracking = cluster_tracking(store.target, keys, prefixes, 1.0)()
        tracking.connect()
        try:
            tracking.ping()
            deadline = time.monotonic() + 5
            answered: list[tuple[str, list[bytes]]] = []
            while min(tracking._pongs) < 1:  # every connection answered its PING
                answered += tracking.poll()
                assert time.monotonic() < deadline
                time.sleep(0.005)
            answered += tracking.poll()
            assert ("pong", []) not in answered  # not before the check
            tracking.verify()
            assert tracking.poll() == [("pong", [])]
            assert tracking.poll() == []  # once
        finally:
            tracking.close()
    finally:
        cache.close()
