"""The asyncio twin of ``_shardstore``: a cache sharded over a Redis Cluster, for one event loop.

The splitting by shard and the putting back together are ``_shardstore.ShardSplit``'s, shared with the
sync world; this module only carries each node's share over redis.asyncio, every node's written before
any reply is awaited (one round trip of latency), from SQLAlchemy's asyncio greenlet as every asyncio
store does. A release, once begun, finishes even if the task awaiting the commit is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisClusterException

from . import _aio
from . import _protocol as proto
from ._aclient import async_client_like
from ._acluster import AsyncClusterStore
from ._astore import AsyncRedisStore
from ._aworlds import LoopStore
from ._cluster import ClusterStore, ClusterTarget
from ._health import Health
from ._pools import Wire
from ._protocol import SentLock
from ._shardsplit import Shard, ShardSplit, ShardTable
from ._shardstore import ShardedClusterStore
from ._store import RedisStore
from .errors import CacheUnavailable

__all__ = ["AsyncShardedClusterStore", "async_store_maker"]

T = TypeVar("T")

_ERRORS: tuple[type[BaseException], ...] = (
    redis.RedisError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)


class AsyncShardedClusterStore(ShardSplit, AsyncClusterStore):
    """An :class:`~sqlcache._acluster.AsyncClusterStore` whose calls are split by shard."""

    def __init__(self, target: ClusterTarget, slot: int, health: Health, table: ShardTable) -> None:
        super().__init__(target, slot, health)
        self._table = table

    def _awaited(self, operation: str, make: Callable[[], Awaitable[T]], shield: bool = False) -> T:
        """``make()``'s coroutine awaited on this greenlet's event loop; redis-py's errors an outage."""
        if not _aio.in_async_greenlet():
            raise CacheUnavailable(f"{operation} (outside the event loop)")
        work: Awaitable[T] = make()
        if shield:
            work = asyncio.shield(work)
        try:
            result: T = _aio.await_(work)
        except _ERRORS as exc:
            self._refresh = True
            self.health.failed()
            raise CacheUnavailable(operation) from exc
        return result

    def _exchange(
        self, operation: str, work: Sequence[tuple[Shard, list[list[Any]]]], wait: bool = False
    ) -> list[list[Any]]:
        health = self.health
        by_node: dict[AsyncRedisStore, list[int]] = {}
        for i, (shard, _) in enumerate(work):
            by_node.setdefault(self._node_at(shard.slot, operation), []).append(i)
        wait_for = health.wait if wait else None

        async def run() -> list[list[Any]]:
            sent: list[tuple[AsyncRedisStore, Any, list[int], int]] = []
            replies: list[list[Any]] = [[] for _ in work]
            try:
                for node, indexes in by_node.items():
                    commands = [c for i in indexes for c in work[i][1]]
                    if wait_for is not None:
                        commands.append(["WAIT", *wait_for])
                    sent.append((node, await node.send(commands), indexes, len(commands)))
                while sent:
                    node, conn, indexes, count = sent.pop(0)  # receive() drops it if it fails
                    got = await node.receive(conn, count)
                    if wait_for is not None:
                        short = health.short_ack(got.pop())
                        if short is not None:
                            raise redis.RedisError(short)
                    at = 0
                    for i in indexes:
                        replies[i] = got[at : at + len(work[i][1])]
                        at += len(work[i][1])
            except BaseException:
                for node, conn, _, _ in sent:
                    await node.drop(conn)
                raise
            return replies

        replies = self._awaited(operation, run, shield=operation == "release")
        refused = next((r for rs in replies for r in rs if isinstance(r, redis.ResponseError)), None)
        if refused is not None:  # MOVED, NOSCRIPT, OOM...: the slot may be elsewhere, the scripts gone
            self._refresh = True
            health.failed()
            raise CacheUnavailable(operation) from refused
        health.answered(operation)
        return replies

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        """The lock of each shard written to its node, the replies left for :meth:`release_after`."""
        self.health.check("lock")
        by_node: dict[AsyncRedisStore, list[list[Any]]] = {}
        for shard, keys in self._group(lock_keys).items():
            node = self._node_at(shard.slot, "lock")
            keys_, args = proto.lock_call(shard.clock, keys, (), token, lock_ttl_ms, gen_ttl_ms)
            by_node.setdefault(node, []).append(["EVALSHA", node.sha("lock"), len(keys_), *keys_, *args])

        async def run() -> list[tuple[AsyncRedisStore, Any, int]]:
            sent: list[tuple[AsyncRedisStore, Any, int]] = []
            try:
                for node, commands in by_node.items():
                    sent.append((node, await node.send(commands), len(commands)))
            except BaseException:
                for node, conn, _ in sent:
                    await node.drop(conn)
                raise
            return sent

        return SentLock(self._awaited("lock", run), self)

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """Each node's release behind its lock on the lock's connection; whether every lock succeeded.
        As the sync store's: every lock's reply is read before this returns, the releases' replies are
        left for each node's next call (several in order on one connection), except where they must be
        read at once (no journal, ``wait_replicas``)."""
        health = self.health
        conns: list[tuple[AsyncRedisStore, Any, int]] = sent.conn
        groups = self._group(dep_keys)
        wait_for = health.wait
        later = wait_for is None and health.on_release_lost is not None and bool(dep_keys)
        try:
            health.check("release")
            plan = self._releases(conns, groups, token, gen_ttl_ms, announce, later)
        except CacheUnavailable:
            if _aio.in_async_greenlet():
                for node, conn, _ in conns:
                    _aio.await_(node.drop(conn))
            raise

        async def run() -> bool:
            unread = list(plan)
            lock_ok = True
            failed: BaseException | None = None
            try:
                for _, conn, _, commands, _ in plan:
                    # closed under the commit (a pool's disconnect()): redis-py would reconnect, and
                    # the release would go out on a connection its lock never went out on
                    if not Wire.connected(conn):
                        raise redis.ConnectionError("the lock's connection was closed before its release")
                    await conn.send_packed_command(conn.pack_commands(commands))
                while unread:
                    node, conn, locks, commands, owed = unread.pop(0)  # receive() drops it if it fails
                    if owed:  # the locks' replies now, the releases' later, in order, the last holding
                        got = await node.receive(conn, locks, keep=True)
                        try:
                            if any(isinstance(r, redis.ResponseError) for r in got):
                                # a lock refused applied nothing, nor did the release behind it: this
                                # fails now, and the journal takes it (as the sync store)
                                got += await node.receive(conn, len(commands))
                            else:
                                node.owe(owed)
                        except BaseException:
                            await node.drop(conn)  # interrupted: not left checked out
                            raise
                    else:
                        got = await node.receive(conn, locks + len(commands))
                    lock_ok = lock_ok and not any(isinstance(r, redis.ResponseError) for r in got[:locks])
                    if wait_for is not None:
                        short = health.short_ack(got.pop())
                        failed = failed or (redis.RedisError(short) if short is not None else None)
                    refused = [r for r in got[locks:] if isinstance(r, redis.ResponseError)]
                    failed = failed or (refused[0] if refused else None)
            except BaseException:
                for node, conn, _, _, _ in unread:
                    await node.drop(conn)
                raise
            if failed is not None:
                raise failed
            return lock_ok

        ok = self._awaited("release", run, shield=True)
        health.answered("release")
        if groups:  # shards whose node changed since the lock went out: released on their new node
            self.release(clock_key, [k for keys in groups.values() for k in keys], token, gen_ttl_ms)
        return ok


def async_store_maker(store: object, timeout: float, health: Health) -> Callable[[], LoopStore]:
    """How to make an event loop's store, the asyncio twin of the cache's sync ``store``: a cluster's
    router, or a store of one server (the same server, credentials and TLS settings).

    :raises ConfigurationError: a sync store with no asyncio twin (Sentinel, a custom connection class).
    """
    if isinstance(store, ClusterStore):
        target, slot = store.target, store.slot
        if isinstance(store, ShardedClusterStore):
            table = store.shard_table()
            return lambda: AsyncShardedClusterStore(target, slot, health, table)
        return lambda: AsyncClusterStore(target, slot, health)
    assert isinstance(store, RedisStore)
    client = store.client
    return lambda: AsyncRedisStore(async_client_like(client, timeout), health)
