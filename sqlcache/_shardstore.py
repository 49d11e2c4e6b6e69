"""The sync store over a Redis Cluster with a cache's keys spread over ``n`` shards: ``_shardsplit``'s
splitting, each node's share carried over redis-py (every node's written before any reply is read), and
:func:`store_for`, which picks the store for what the user passed. How and why the split stays correct:
``_shardsplit``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from . import _keys
from . import _protocol as proto
from ._cluster import ClusterStore, ClusterTarget, cluster_factory, is_cluster_target
from ._health import Health
from ._pools import Wire
from ._protocol import SentLock
from ._shardsplit import Shard, ShardSplit, ShardTable, slot_of
from ._store import RedisStore, client_for, hide_password
from .errors import CacheUnavailable, ConfigurationError

__all__ = ["ShardedClusterStore", "store_for"]

_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


class ShardedClusterStore(ShardSplit, ClusterStore):
    """A :class:`~sqlcache._cluster.ClusterStore` whose calls are split by shard (see the module)."""

    def __init__(self, target: ClusterTarget, health: Health, shards: int) -> None:
        super().__init__(target, health)
        self._n = shards

    @property
    def shards(self) -> int:
        return self._n

    def key_layout(self, prefix: str) -> _keys.Layout:
        layout = _keys.Layout(_keys.shard_prefixes(self.key_prefix(prefix), self._n, slot_of))
        self._table = ShardTable(layout)
        return layout

    def shard_table(self) -> ShardTable:
        """The shards, for the asyncio world's router (known once ``key_layout`` ran)."""
        return self._table

    def _exchange(
        self, operation: str, work: Sequence[tuple[Shard, list[list[Any]]]], wait: bool = False
    ) -> list[list[Any]]:
        """Each shard's commands on the node serving it: every node's share written before any reply is
        read (one round trip of latency), the replies per shard in ``work``'s order. ``wait``: each
        node's share ends with WAIT when the cache asks replicas to acknowledge (its reply checked).
        An error reply or a lost connection fails the whole call (the caller's journal keeps it)."""
        health = self.health
        by_node: dict[RedisStore, list[int]] = {}
        for i, (shard, _) in enumerate(work):
            by_node.setdefault(self._node_at(shard.slot, operation), []).append(i)
        wait_for = health.wait if wait else None
        sent: list[tuple[RedisStore, Any, list[int], int]] = []
        replies: list[list[Any]] = [[] for _ in work]
        try:
            for node, indexes in by_node.items():
                commands = [c for i in indexes for c in work[i][1]]
                if wait_for is not None:
                    commands.append(["WAIT", *wait_for])
                sent.append((node, node.send(commands), indexes, len(commands)))
            while sent:
                node, conn, indexes, count = sent.pop(0)  # receive() drops it if it fails
                got = node.receive(conn, count)
                if wait_for is not None:
                    short = health.short_ack(got.pop())
                    if short is not None:
                        raise redis.RedisError(short)
                at = 0
                for i in indexes:
                    replies[i] = got[at : at + len(work[i][1])]
                    at += len(work[i][1])
        except BaseException as exc:
            for node, conn, _, _ in sent:
                node.drop(conn)
            if not isinstance(exc, _ERRORS):
                raise  # KeyboardInterrupt, a gevent timeout: the connections are dropped, nothing else
            self._refresh = True
            health.failed()
            raise CacheUnavailable(operation) from exc
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
        groups = self._group(lock_keys)
        by_node: dict[RedisStore, list[list[Any]]] = {}
        for shard, keys in groups.items():
            node = self._node_at(shard.slot, "lock")
            keys_, args = proto.lock_call(shard.clock, keys, (), token, lock_ttl_ms, gen_ttl_ms)
            by_node.setdefault(node, []).append(["EVALSHA", node.sha("lock"), len(keys_), *keys_, *args])
        sent: list[tuple[RedisStore, Any, int]] = []
        try:
            for node, commands in by_node.items():
                sent.append((node, node.send(commands), len(commands)))
        except BaseException as exc:
            for node, conn, _ in sent:
                node.drop(conn)
            if not isinstance(exc, _ERRORS):
                raise
            self._refresh = True
            self.health.failed()
            raise CacheUnavailable("lock") from exc
        return SentLock(sent, self)

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """Each node's release behind its lock on the lock's connection (Redis runs them in order);
        returns whether every lock had succeeded.

        As on one server (``RedisStore.release_after``), every lock's reply is read before this
        returns, and the releases' replies are left on their connections for the node's next call
        (:meth:`RedisStore.settle`): several on one connection where a node serves several shards,
        read in order. Read at once instead when nobody listens for a lost release, and with
        ``wait_replicas``."""
        health = self.health
        conns: list[tuple[RedisStore, Any, int]] = sent.conn
        groups = self._group(dep_keys)
        wait_for = health.wait
        later = wait_for is None and health.on_release_lost is not None and bool(dep_keys)
        unread = {id(conn): (node, conn) for node, conn, _ in conns}  # dropped if the release fails
        lock_ok = True
        try:
            health.check("release")
            pending = self._releases(conns, groups, token, gen_ttl_ms, announce, later)
            for _, conn, _, commands, _ in pending:
                # closed under the commit (a pool's disconnect()): redis-py would reconnect, and the
                # release would go out on a connection its lock never went out on
                if not Wire.connected(conn):
                    raise redis.ConnectionError("the lock's connection was closed before its release")
                conn.send_packed_command(conn.pack_commands(commands))
            failed: BaseException | None = None
            while pending:
                node, conn, locks, commands, owed = pending.pop(0)
                count = len(commands)
                del unread[id(conn)]
                if owed:  # the locks' replies now, the releases' later, in order, the last one holding
                    got = node.receive(conn, locks, keep=True)
                    try:
                        if any(isinstance(r, redis.ResponseError) for r in got):
                            # a lock refused (MOVED, READONLY, NOSCRIPT...) applied nothing: neither did
                            # the release behind it, so this fails now and the journal takes it
                            got += node.receive(conn, count)
                        else:
                            node.owe(owed)
                    except BaseException:
                        node.drop(conn)  # interrupted: the connection is not left checked out
                        raise
                else:
                    got = node.receive(conn, locks + count)
                lock_ok = lock_ok and not any(isinstance(r, redis.ResponseError) for r in got[:locks])
                if wait_for is not None:
                    short = health.short_ack(got.pop())
                    failed = failed or (redis.RedisError(short) if short is not None else None)
                failed = failed or next((r for r in got[locks:] if isinstance(r, redis.ResponseError)), None)
            if failed is not None:
                raise failed
        except BaseException as exc:
            for node, conn in unread.values():
                node.drop(conn)
            if not isinstance(exc, _ERRORS):
                raise  # CacheUnavailable (backing off), KeyboardInterrupt: dropped, passed on
            self._refresh = True
            health.failed()
            raise CacheUnavailable("release") from exc
        health.answered("release")
        if groups:  # shards whose node changed since the lock went out: released on their new node
            self.release(clock_key, [k for keys in groups.values() for k in keys], token, gen_ttl_ms)
        return lock_ok


def store_for(target: Any, timeout: float, health: Health, shards: int = 1) -> RedisStore | ClusterStore:
    """The store for what the user passed: a cluster's router (split by shard when ``shards`` > 1), or
    a store over a pool of sqlcache's own (the caller's client is never changed).

    :raises ConfigurationError: ``shards`` > 1 for a target that is not a Redis Cluster."""
    if is_cluster_target(target):
        if shards > 1:
            return ShardedClusterStore(cluster_factory(target, timeout), health, shards)
        return ClusterStore(cluster_factory(target, timeout), health)
    if shards > 1:
        raise ConfigurationError(
            f"shards={shards} spreads keys over a Redis Cluster's nodes; {hide_password(repr(target))} "
            "is a single server (or Sentinel): leave shards at 1"
        )
    return RedisStore(client_for(target, timeout), health)
