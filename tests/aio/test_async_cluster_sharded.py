"""AsyncEngine / AsyncSession on a cache sharded over a real local Redis Cluster (``shards=4``).

The asyncio consistency scenarios and the durable outbox's relay run again with every ``cache``
sharded (tables of the test models in different shards: see tests/integration/test_cluster_sharded.py),
then the sharded layout's own cases under asyncio: calls per shard, and a failover of one shard's
primary while the same event loop keeps reading and writing."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from sqlcache import SQLCache, _keys

from ..integration.test_cluster_sharded import SHARDS, _Commands, cache, redis_url
from ..models import Employee, Manager, User
from ..topologies import LocalCluster, local_cluster
from .helpers import check_async_failover
from .test_async_durable import *  # noqa: F403  (run again with the fixtures below)
from .test_async_scenarios import *  # noqa: F403
from .test_async_scenarios import Run, cached_name, make_user, rename

__all__ = ["cache", "local_cluster", "redis_url"]  # fixtures: the sharded cache on the cluster

# its cut-off writer points at a dead single server (test_async_cluster.py says why it does not apply)
del test_a_cut_off_async_writer_leaves_its_row_and_an_async_relay_applies_it  # noqa: F821


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_async_calls_go_per_shard(run: Run, cache: SQLCache, local_cluster: LocalCluster) -> None:
    """Under AsyncSession as in sync code: a single-table hit is one MGET, a hit of a class whose
    tables are in two shards one MGET per shard, a commit of one table's row two scripts."""
    cache.register(User)
    cache.register(Employee)
    commands = _Commands(local_cluster)

    async def body(ae: AsyncEngine) -> None:
        uid = await make_user(ae, "ann")
        async with AsyncSession(ae) as s:
            m = Manager(name="boss")
            s.add(m)
            await s.flush()
            mid = m.id
            await s.commit()
        for _ in range(2):  # filled by the second round at the latest
            assert await cached_name(ae, uid) == "ann"
            async with AsyncSession(ae) as s:
                assert (await s.get(Manager, mid)).name == "boss"  # type: ignore[union-attr]
        commands.reset()
        assert await cached_name(ae, uid) == "ann"
        assert commands.counts() == {"mget": 1}
        commands.reset()
        async with AsyncSession(ae) as s:
            assert (await s.get(Manager, mid)).name == "boss"  # type: ignore[union-attr]
        assert commands.counts() == {"mget": 2}
        commands.reset()
        await rename(ae, uid, "bob")
        assert commands.counts() == {"mget": 1, "evalsha": 2}
        assert await cached_name(ae, uid) == "bob"
        async with AsyncSession(ae) as s:
            (await s.get(Manager, mid)).name = "chief"  # type: ignore[union-attr]
            await s.commit()
        async with AsyncSession(ae) as s:
            assert (await s.get(Manager, mid)).name == "chief"  # type: ignore[union-attr]

    run(body)
    assert cache.stats()["errors"] == 0


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_async_failover_of_one_shards_primary_serves_nothing_stale(
    engine: Engine, local_cluster: LocalCluster, redis_url: str
) -> None:
    """In one event loop: rows filled, then commits whose releases the primary of the users shard
    acknowledges and never replicates, then that primary dies and its replica takes over: no read
    afterwards returns a version older than the last commit that returned."""
    prefix = f"f{uuid.uuid4().hex[:10]}"
    cache = SQLCache(
        redis_url, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1, shards=SHARDS
    )

    def lose(window: Callable[[], None]) -> None:
        primary = local_cluster.primary_for(_keys.clock_key(cache._parts.keys.layout.at("users")))
        local_cluster.lose_writes_then_failover(primary, window)

    checked = check_async_failover(engine, cache, lose, rows=10, versions=3, rereads=5)
    assert checked == 80
    print(f"async sharded cluster failover: {checked} reads checked")


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_node_stalling_mid_exchange_costs_a_miss_and_no_connection(
    run: Run, cache: SQLCache, local_cluster: LocalCluster
) -> None:
    """A node that does not answer within the timeout while a miss reads every shard's clock (one
    exchange over every node): the read is answered by the database, nothing but the outage reaches
    the cache's reporting (a connection dropped twice made the pool raise KeyError out of
    ``session.get``), and no connection of any node stays checked out."""
    cache.register(User)
    layout = cache._parts.keys.layout
    paused = local_cluster.primary_for(_keys.clock_key(layout.prefixes[0]))
    if len({local_cluster.primary_for(_keys.clock_key(p)) for p in layout.prefixes}) < 2:
        pytest.skip("this prefix's shards all landed on one node")

    async def body(ae: AsyncEngine) -> None:
        uids = [await make_user(ae, f"u{i}") for i in range(3)]
        assert await cached_name(ae, uids[0]) == "u0"  # connections to every node made
        local_cluster.node(paused).execute_command("CLIENT", "PAUSE", 1000, "ALL")
        assert await cached_name(ae, uids[1]) == "u1"  # a miss: clocks() stalls on the paused node
        stores = cache._parts.async_stores.current()._stores  # type: ignore[union-attr]
        assert all(not s.client.connection_pool._in_use_connections for s in stores.values())

    run(body)
    assert cache.stats()["errors"] >= 1
