"""Under AsyncSession, a sharded commit (``shards=4`` on a local cluster of three primaries) returns once
every node has applied its locks; the releases' replies are read on each node's next call, several in
order on one connection where a node serves several of the commit's shards (the sync twin:
tests/integration/test_release_reply_sharded.py)."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _astorelate, signals
from sqlcache._settle import Owed

from ..conftest import shareable_url
from ..integration.test_release_reply import once_locked
from ..integration.test_release_reply_sharded import SHARDS, seed_rows, shared
from ..models import Employee, Manager, Order, User
from ..topologies import LocalCluster, local_cluster
from .conftest import run_loop

__all__ = ["local_cluster"]

pytestmark = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)


class AsyncPair:
    """A writer's cache (attached by the test's loop to an AsyncEngine) and a reader's, another
    process's, on a sync engine; sharded on one prefix; a user, an order and a manager written, each
    table in a shard of its own."""

    def __init__(self, engine: Engine, cluster: LocalCluster) -> None:
        url = cluster.startup_url.replace("redis://", "redis+cluster://", 1)
        prefix = f"as{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.other = create_engine(shareable_url(engine))
        self.writer = SQLCache(url, prefix=prefix, shards=SHARDS, timeout=2)
        self.reader = SQLCache(url, prefix=prefix, shards=SHARDS, timeout=2)
        for cache in (self.writer, self.reader):
            for model in (User, Order, Employee):
                cache.register(model)
        self.reader.attach(self.other)
        self.errors: list[str] = []
        signals.cache_error.connect(self._on_error, sender=self.writer, weak=False)
        self.ids = seed_rows(self.other)

    def _on_error(self, sender: SQLCache, exc: BaseException, operation: str) -> None:
        self.errors.append(operation)

    def run(self, body: Any) -> None:
        try:
            run_loop(self.engine, self.writer, body)
        finally:
            signals.cache_error.disconnect(self._on_error, sender=self.writer)
            self.reader.detach(self.other)
            self.reader.clear()
            self.reader.close()
            self.writer.close()
            self.other.dispose()

    async def write(self, ae: AsyncEngine, n: int) -> None:
        uid, oid, mid = self.ids
        async with AsyncSession(ae) as s:
            user, order, manager = await s.get(User, uid), await s.get(Order, oid), await s.get(Manager, mid)
            assert user is not None and order is not None and manager is not None
            user.name, order.total, manager.reports = f"v{n}", Decimal(n), n
            await s.commit()

    async def versions(self, ae: AsyncEngine) -> tuple[str, Decimal, int]:
        uid, oid, mid = self.ids
        async with AsyncSession(ae) as s:
            user, order, manager = await s.get(User, uid), await s.get(Order, oid), await s.get(Manager, mid)
            assert user is not None and order is not None and manager is not None
            return user.name, order.total, manager.reports

    def reader_versions(self) -> tuple[str, Decimal, int]:
        uid, oid, mid = self.ids
        with Session(self.other) as s:
            user, order, manager = s.get(User, uid), s.get(Order, oid), s.get(Manager, mid)
            assert user is not None and order is not None and manager is not None
            return user.name, order.total, manager.reports

    async def served_from_redis(self, ae: AsyncEngine, n: int) -> bool:
        """Whether the writer's reads of the three rows, after some that may fill, are three hits."""
        assert await self.versions(ae) == (f"v{n}", Decimal(n), n)
        hits = self.writer.stats()["hits"]
        return await self.versions(ae) == (f"v{n}", Decimal(n), n) and self.writer.stats()["hits"] == hits + 3

    def reader_served_from_redis(self, n: int) -> bool:
        assert self.reader_versions() == (f"v{n}", Decimal(n), n)
        hits = self.reader.stats()["hits"]
        return self.reader_versions() == (f"v{n}", Decimal(n), n) and self.reader.stats()["hits"] == hits + 3

    def owed(self) -> dict[int, list[Owed]]:
        """The writer's unread release replies in the running loop, per node's port."""
        stores: Any = self.writer._parts.async_stores
        router = stores._by_loop[asyncio.get_running_loop()]
        return {int(name.rsplit(":", 1)[1]): list(s._owed) for name, s in router._stores.items() if s._owed}


def test_an_async_sharded_commit_leaves_its_releases_for_each_nodes_next_call(
    engine: Engine, local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four shards on three nodes: ``commit()`` returns with one reply owed per shard, two on one
    connection where a node serves two (the last holding it); another process reads the new rows at
    once; the writer's next call reads them all, and both are served from Redis."""
    monkeypatch.setattr(_astorelate, "SETTLE_AFTER", 3600)  # the writer's next call reads them, not the timer
    pair = AsyncPair(engine, local_cluster)

    async def body(ae: AsyncEngine) -> None:
        assert await pair.served_from_redis(ae, 0)
        await pair.write(ae, 1)
        owed = pair.owed()
        assert sum(len(r) for r in owed.values()) == SHARDS
        _, replies = shared(owed)
        assert len({id(o.conn) for o in replies}) == 1
        assert [o.holds for o in replies] == [False] * (len(replies) - 1) + [True]
        assert pair.reader_versions() == ("v1", Decimal(1), 1)  # before the writer's next call
        assert await pair.served_from_redis(ae, 1)
        assert pair.owed() == {}
        assert pair.reader_served_from_redis(1)
        for n in range(2, 32):  # one after the other, nothing read between: connections come back
            await pair.write(ae, n)
        assert await pair.served_from_redis(ae, 31)
        assert sum(len(r) for r in pair.owed().values()) == 0
        assert pair.errors == [] and pair.writer.stats()["journal"] == 0

    pair.run(body)


def test_async_releases_refused_after_a_sharded_commit_returned_are_sent_again(
    engine: Engine, local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every primary loses its scripts between the locks and the releases: each reply, read on its
    node's next call, is NOSCRIPT, and each release goes again then; nothing is journalled."""
    monkeypatch.setattr(_astorelate, "SETTLE_AFTER", 3600)
    pair = AsyncPair(engine, local_cluster)
    primaries: list[redis.Redis] = []
    for port in local_cluster.live_ports():
        node = local_cluster.node(port)
        if node.info("replication")["role"] == "master":
            primaries.append(node)
        else:
            node.close()

    async def body(ae: AsyncEngine) -> None:
        assert await pair.served_from_redis(ae, 0)
        await pair.write(ae, 1)
        port, replies = shared(pair.owed())
        assert await pair.served_from_redis(ae, 1)
        node = next(n for n in primaries if n.connection_pool.connection_kwargs["port"] == port)

        def flush() -> None:
            for n in primaries:
                n.script_flush()

        with once_locked(ae.sync_engine, node, replies[0].dep_keys[0], flush):
            await pair.write(ae, 2)
        assert len(shared(pair.owed())[1]) >= 2  # returned with the refusals unread
        assert pair.reader_versions() == ("v2", Decimal(2), 2)
        assert await pair.served_from_redis(ae, 2)  # sent again on that call
        assert pair.owed() == {}
        assert pair.reader_served_from_redis(2)
        assert pair.errors == [] and pair.writer.stats()["journal"] == 0

    try:
        pair.run(body)
    finally:
        for n in primaries:
            n.close()
