"""AsyncEngine / AsyncSession on a real local Redis Cluster (three primaries, three replicas).

The asyncio consistency scenarios and the durable outbox's relay run again with every cache on the
cluster (``redis_url`` below replaces the single server's), then the cluster's own cases under asyncio:
one round trip per hit, and a failover that loses acknowledged releases while the same event loop keeps
reading and writing."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio.cluster as acluster
import redis.asyncio.connection as aconnection
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlcache import SQLCache, _keys

from ..models import User
from ..proxy import Proxy
from ..topologies import LocalCluster, local_cluster
from .conftest import run_loop
from .helpers import check_async_failover
from .test_async_durable import *  # noqa: F403  (run again with the fixture below)
from .test_async_local_tier import *  # noqa: F403
from .test_async_scenarios import *  # noqa: F403
from .test_async_scenarios import Run, cached_name, make_user, rename

__all__ = ["local_cluster"]

# its cut-off writer points at a dead single server, whose keys (and so outbox rows) have the single
# server's layout, which a relay on the cluster rightly does not take for its own
del test_a_cut_off_async_writer_leaves_its_row_and_an_async_relay_applies_it  # noqa: F821


@pytest.fixture
def redis_url(local_cluster: LocalCluster) -> str:
    return local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_one_round_trip_per_async_hit_and_two_commands_per_commit(
    run: Run, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the sync world: an AsyncSession hit is one MGET to the slot's primary, a commit that
    changes a row two commands (the pipelined lock and the release) after the hit that loaded it."""
    cache.register(User)
    sent: list[str] = []

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"  # filled; topology read, connections made
        original = aconnection.AbstractConnection.send_command

        async def counting(self: Any, *args: Any, **kw: Any) -> None:
            sent.append(str(args[0]))
            await original(self, *args, **kw)

        monkeypatch.setattr(aconnection.AbstractConnection, "send_command", counting)
        assert await cached_name(ae, uid) == "ann"
        assert sent == ["MGET"] and cache.stats()["hits"] == 1
        sent.clear()
        await rename(ae, uid, "bob")
        assert sent == ["MGET", "EVALSHA", "EVALSHA"]
        monkeypatch.undo()
        assert await cached_name(ae, uid) == "bob"

    run(body)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_async_failover_that_loses_acknowledged_releases_serves_nothing_stale(
    engine: Engine, local_cluster: LocalCluster, redis_url: str
) -> None:
    """In one event loop: rows filled, then commits whose releases the primary of the cache's slot
    acknowledges and never replicates, then that primary dies and its replica takes over with the
    older generations and entries. The loop's store sees another node serve the slot and fences:
    no read afterwards returns a version older than the last commit that returned."""
    prefix = f"f{uuid.uuid4().hex[:10]}"
    cache = SQLCache(redis_url, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1)

    def lose(window: Callable[[], None]) -> None:
        primary = local_cluster.primary_for(_keys.clock_key(cache._parts.kp))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_async_failover(engine, cache, lose, rows=10, versions=3, rereads=5)
    assert checked == 80
    print(f"async cluster failover: {checked} reads checked")


def _clients_on(cluster: LocalCluster, name: str) -> int:
    """The client connections named ``name`` (a test's cache's ``client_name``) the nodes hold."""
    total = 0
    for port in cluster.live_ports():
        with cluster.node(port) as node:
            total += sum(1 for c in node.client_list(_type="normal") if c.get("name") == name)
    return total


def _named(url: str, name: str) -> str:
    """``url`` whose every connection carries the client name ``name``."""
    return f"{url}?client_name={name}"


async def _closed_leaving_no_connection(cache: SQLCache, cluster: LocalCluster, name: str) -> None:
    """``await cache.aclose()`` in the running loop, then wait (polling, with a deadline) until the
    cluster's nodes hold no connection of the cache (named ``name``)."""
    await cache.aclose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while _clients_on(cluster, name):
        assert loop.time() < deadline, (
            f"connections of the closed cache still open: {_named_clients(cluster, name)}"
        )
        await asyncio.sleep(0.01)


def _named_clients(cluster: LocalCluster, name: str) -> list[tuple[int, str, str, str, str]]:
    """(node port, address, last command, age, idle) of each connection named ``name``: which part of
    the cache left it open."""
    out = []
    for port in cluster.live_ports():
        with cluster.node(port) as node:
            for c in node.client_list(_type="normal"):
                if c.get("name") == name:
                    out.append(
                        (port, str(c.get("addr")), str(c.get("cmd")), str(c.get("age")), str(c.get("idle")))
                    )
    return out


def _kill_clients(cluster: LocalCluster) -> None:
    for port in cluster.live_ports():
        with cluster.node(port) as node:
            node.client_kill_filter(_type="normal", skipme=True)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_first_topology_read_that_failed_leaves_no_connection_open(
    engine: Engine, local_cluster: LocalCluster
) -> None:
    """The loop's first topology read fails (its startup node unreachable); later ones succeed, one of
    them after every connection was cut; closing the loop's cache then closes every connection it
    opened. (redis-py's ``RedisCluster.aclose()`` closes nothing for a client whose first
    ``initialize()`` failed: the connections of the later refreshes stayed open until the garbage
    collector warned about them, the failure CI saw under load.)"""
    proxy = Proxy(local_cluster.ports[0])
    proxy.cut()
    name = f"n{uuid.uuid4().hex[:8]}"
    url = _named(f"redis+cluster://127.0.0.1:{proxy.port}", name)
    cache = SQLCache(url, prefix=f"t{uuid.uuid4().hex[:10]}", default_ttl=600, backoff=0.01, max_backoff=0.01)
    cache.register(User)

    async def body(ae: AsyncEngine) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20

        async def until_served(uid: int) -> None:  # once the breaker lets calls through: a fill, a hit
            hits = cache.stats()["hits"]
            while cache.stats()["hits"] == hits:
                assert await cached_name(ae, uid) == "ann"
                assert loop.time() < deadline, cache.stats()
                await asyncio.sleep(0.01)

        uid = await make_user(ae, "ann")
        assert await cached_name(ae, uid) == "ann"  # the database answers
        assert cache.stats()["errors"] >= 1
        proxy.heal()
        await until_served(uid)
        _kill_clients(local_cluster)  # the next call fails, and the one after reads the topology again
        await until_served(uid)
        assert _clients_on(local_cluster, name) >= 1
        await _closed_leaving_no_connection(cache, local_cluster, name)

    try:
        run_loop(engine, cache, body)
    finally:
        cache.close()
        proxy.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_tasks_first_using_the_loops_store_together_read_the_topology_once(
    engine: Engine, local_cluster: LocalCluster, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 tasks whose reads are the first use of the loop's store, all at once: the first reads the
    slot table and the others wait for that read (each used to make a topology client of its own, all
    but one never closed); closing the loop's cache then leaves no connection open."""
    from ..helpers import make_user as make_user_sync

    uids = [make_user_sync(engine, f"u{i}") for i in range(5)]  # without the cache: nothing used yet
    name = f"n{uuid.uuid4().hex[:8]}"
    cache = SQLCache(_named(redis_url, name), prefix=f"t{uuid.uuid4().hex[:10]}", default_ttl=600)
    cache.register(User)
    made: list[object] = []
    original = acluster.RedisCluster.__init__

    @functools.wraps(original)  # the signature sqlcache reads to pick the settings it passes
    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(acluster.RedisCluster, "__init__", counted)

    async def body(ae: AsyncEngine) -> None:
        names = await asyncio.gather(*(cached_name(ae, uids[i % 5]) for i in range(50)))
        assert names == [f"u{i % 5}" for i in range(50)]
        assert len(made) == 1  # one topology client for the loop, however many tasks found it due
        await _closed_leaving_no_connection(cache, local_cluster, name)

    try:
        run_loop(engine, cache, body)
    finally:
        cache.close()
