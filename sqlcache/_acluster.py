"""The asyncio store over a Redis Cluster: ``_cluster``'s routing, carried by ``_astore``'s stores.

As in the sync world, every key of a cache is in one hash slot, so each call goes whole to the primary
serving it, through an :class:`~sqlcache._astore.AsyncRedisStore` of that node (a pool of its own, whose
connections run the lineage check first). Which node serves the slot comes from a
``redis.asyncio.cluster.RedisCluster`` of sqlcache's own: asked (awaited on the event loop) when the
store is first used and again after any failed call, read from its slot table (no I/O) otherwise. A
change of primary is a restart for the whole cache (``Health.moved``), whichever world notices it.

One instance per event loop (``AsyncStores``), like every redis.asyncio object.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.asyncio.connection as aconnection
from redis.exceptions import RedisClusterException

from . import _aio
from ._aclient import quietly_closed
from ._astore import AsyncRedisStore
from ._cluster import ClusterTarget, Router
from ._health import Health
from ._pools import AsyncLeanPool
from .errors import CacheUnavailable

__all__ = ["AsyncClusterStore"]

_ERRORS: tuple[type[BaseException], ...] = (
    redis.RedisError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)


def _accepted(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


class AsyncClusterStore(Router):
    """The :class:`~sqlcache._protocol.Store` over a Redis Cluster for one event loop's greenlet."""

    def __init__(self, target: ClusterTarget, slot: int, health: Health) -> None:
        self._target = target
        self._slot = slot
        self.health = health
        self._cluster: acluster.RedisCluster | None = None
        self._stores: dict[str, AsyncRedisStore] = {}
        self._owners: dict[int, str] = {}  # per slot of the cache, the node that served it last
        self._refresh = True  # the slot table is read before the first call
        self._locating = asyncio.Lock()  # one topology read at a time: the loop's tasks wait for it
        self._failed_reads = 0  # topology reads that failed: a task that waited through one gives up
        self.closer: Any = None  # see AsyncStores

    @property
    def backing_off(self) -> bool:
        return self.health.backing_off

    # -- routing -----------------------------------------------------------------------------------

    def _node(self, operation: str) -> AsyncRedisStore:
        """The store of the primary serving the cache's slot now; a new primary fences (Health.moved)."""
        return self._node_at(self._slot, operation)

    def _served(self, name: str) -> Callable[[], list[int]] | None:
        """Which of the cache's shards a new connection to node ``name`` checks the lineage of (None:
        the only one)."""
        return None

    def _node_at(self, slot: int, operation: str) -> AsyncRedisStore:
        """The store of the primary serving ``slot`` now; a new primary fences (Health.moved)."""
        health = self.health
        health.check(operation)
        if not _aio.in_async_greenlet():
            raise CacheUnavailable(f"{operation} (outside the event loop)")
        try:
            if self._refresh or self._cluster is None:  # None: another task's first read is under way
                _aio.await_(self._locate())
            assert self._cluster is not None
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
            store = self._stores.get(node.name)
            if store is None:
                client = self._node_client(node.host, int(node.port))
                store = AsyncRedisStore(client, health, node.name, self._served(node.name))
                self._stores[node.name] = store
        except _ERRORS as exc:
            self._refresh = True
            health.failed()
            raise CacheUnavailable(operation) from exc
        if node.name != self._owners.get(slot):
            if self._owners.get(slot) is not None:
                health.moved()
                # connections from before the move must not carry a read before lineage.lua ran
                try:
                    _aio.await_(store.disconnect())
                except _ERRORS as exc:  # a connection that would not close: an outage, not the app's error
                    self._refresh = True
                    health.failed()
                    raise CacheUnavailable(operation) from exc
            self._owners[slot] = node.name
        return store

    async def _locate(self) -> None:
        """Read the slot table, once for every task of the loop that found it due: the others wait for
        that read rather than start their own (each would make, and leave open, a client of its own)."""
        failed = self._failed_reads
        async with self._locating:
            if not self._refresh and self._cluster is not None:
                return  # read by the task that held the lock
            if self._failed_reads != failed:  # the read it waited for failed: an outage, not one per task
                raise CacheUnavailable("locate (the slot table could not be read)")
            self._refresh = False  # before the read: a failure noticed meanwhile asks for another
            try:
                await self._read_slots()
            except BaseException as exc:
                self._refresh = True
                if isinstance(exc, _ERRORS):  # an outage (a cancelled reader is not one)
                    self._failed_reads += 1
                raise

    async def _read_slots(self) -> None:
        if self._cluster is None:
            kwargs = {k: v for k, v in self._target.kwargs.items() if k in _accepted(acluster.RedisCluster)}
            cluster = acluster.RedisCluster(
                startup_nodes=[acluster.ClusterNode(h, p) for h, p in self._target.nodes],
                require_full_coverage=False,
                **kwargs,
            )
            # kept only once it started: a RedisCluster whose first initialize() failed stays marked
            # uninitialized, and its aclose() then closes nothing (redis-py 8.1), whatever connections
            # the later refreshes made; the next call makes a new one instead
            await cluster.initialize()
            self._cluster = cluster
        else:
            await self._cluster.nodes_manager.initialize()

    def _node_client(self, host: str, port: int) -> aredis.Redis:
        twin = aconnection.SSLConnection if self._target.kwargs.get("ssl") else aconnection.Connection
        accepted = _accepted(twin.__init__) | _accepted(aconnection.AbstractConnection.__init__)
        kwargs = {k: v for k, v in self._target.node_kwargs(host, port).items() if k in accepted}
        kwargs["retry"] = None
        return aredis.Redis(connection_pool=AsyncLeanPool(connection_class=twin, **kwargs))

    # -- operations --------------------------------------------------------------------------------

    def delete_matching(self, pattern: str, batch: int = 500) -> int:
        """Every key of the cache is in its slot, so on one node: SCAN that node."""
        return self._routed("clear", lambda s: int(s.delete_matching(pattern, batch)))

    def pause(self, seconds: float) -> None:
        _aio.await_(asyncio.sleep(seconds))

    async def settle(self) -> None:
        """Read the release replies each node's store has left unread."""
        for store in list(self._stores.values()):
            await store.settle()

    def abandon(self) -> None:
        """Each node's store's unread release replies to the journal (the loop closed unannounced)."""
        for store in list(self._stores.values()):
            store.abandon()

    async def aclose(self) -> None:
        """Close every node's connections and the topology client (the loop is shutting down)."""
        async with self._locating:  # not while a task's topology read may still set the client
            cluster, self._cluster = self._cluster, None
        while self._stores:  # a task still running may add a node's store while these close
            stores, self._stores = list(self._stores.values()), {}
            for store in stores:
                await store.aclose()
        if cluster is not None:
            try:
                await quietly_closed(cluster.aclose())
            finally:
                # and every node it knows, whatever state redis-py thinks the client is in (its aclose()
                # skips a client it has marked for a new initialize() after a failed command)
                try:
                    await quietly_closed(cluster.nodes_manager.aclose())
                finally:
                    await quietly_closed(cluster.nodes_manager.aclose("startup_nodes"))
