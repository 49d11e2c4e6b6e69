"""The Store over a Redis Cluster, with every key of a cache in one hash slot.

``_keys.slot_prefix`` makes the cache's prefix a hash tag, so every script and every read touches keys
of one slot and runs, whole and atomic, on the one primary that serves it: the protocol is exactly the
single server's. This module finds that primary, carries each call to a ``RedisStore`` of its own for
that node, and treats a change of primary (a replica promoted by a failover, a slot migrated) like a
restart of a single server: what the new primary holds may be older than what the old one acknowledged,
so the cache fences its prefix before it trusts a read again (docs/pages/deployment.md).

No sharding yet: one cache lives on one node at a time (several caches, with their own prefixes, spread
over the cluster's nodes).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis
import redis.cluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from . import _keys
from . import _protocol as proto
from ._health import Health
from ._pools import Subscription
from ._protocol import ReadResult, SentLock
from ._store import KEPT_CONNECTION_KWARGS, LeanPool, RedisStore, hide_password
from .errors import CacheUnavailable, ConfigurationError

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterStore",
    "ClusterTarget",
    "cluster_factory",
    "is_cluster_target",
]

T = TypeVar("T")

#: URL schemes that name a Redis Cluster (any one node of it): ``redis+cluster://host:port``
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


def is_cluster_target(target: object) -> bool:
    if isinstance(target, redis.cluster.RedisCluster):
        return True
    return isinstance(target, str) and target.lower().startswith(CLUSTER_SCHEMES)


@dataclass(frozen=True)
class ClusterTarget:
    """How sqlcache reaches a Redis Cluster with clients of its own (bounded timeouts, bytes replies):
    the startup nodes and the connection settings kept from the user's URL or ``RedisCluster``, which
    is never changed. Building a client connects, so each is built on first use, where an outage is
    handled."""

    nodes: tuple[tuple[str, int], ...]
    kwargs: dict[str, Any] = field(hash=False)

    def sync_client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in self.nodes],  # type: ignore[no-untyped-call]
            require_full_coverage=False,
            **self.kwargs,
        )

    def node_kwargs(self, host: str, port: int) -> dict[str, Any]:
        """Connection settings of a client of one node (the protocol's own pool: see ClusterStore)."""
        kwargs = {k: v for k, v in self.kwargs.items() if k != "ssl"}
        kwargs.update(host=host, port=port)
        return kwargs


def cluster_factory(target: redis.cluster.RedisCluster | str, timeout: float) -> ClusterTarget:
    """The :class:`ClusterTarget` of ``target``: a ``redis+cluster://`` URL or the caller's
    ``RedisCluster``.

    :raises ConfigurationError: a URL redis-py cannot read (the password is not echoed).
    """
    if isinstance(target, str):
        url = target[: target.index("+")] + target[target.index("://") :]
        try:
            kwargs = dict(redis.ConnectionPool.from_url(url).connection_kwargs)
        except ValueError as exc:
            message = hide_password(str(exc))
            raise ConfigurationError(f"invalid Redis URL {hide_password(target)!r}: {message}") from None
        nodes: tuple[tuple[str, int], ...] = (
            (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))),
        )
        ssl = url.lower().startswith("rediss://")
    else:
        kwargs = dict(target.nodes_manager.connection_kwargs)
        nodes = tuple((n.host, int(n.port)) for n in target.nodes_manager.startup_nodes.values())
        ssl = bool(kwargs.get("ssl")) or kwargs.get("connection_class") is redis.SSLConnection
    kept = {
        k: v
        for k, v in kwargs.items()
        if (k in KEPT_CONNECTION_KWARGS or k.startswith("ssl_")) and k not in ("host", "port", "db", "path")
    }
    kept.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    if ssl:
        kept["ssl"] = True
    return ClusterTarget(nodes, kept)


def _fresh_mutex(ref: weakref.ref[ClusterStore]) -> None:
    store = ref()
    if store is not None:  # a forked child: another thread of the parent may have held it
        store._mutex = threading.RLock()


class Router(proto.ScriptCalls):
    """What a cluster's router does the same in both I/O worlds: each operation goes whole to the store
    of the node serving the cache's slot (``_node``, the sync or the asyncio one), and a failed call
    makes the router ask the cluster again before the next (MOVED, a dead node, a restart: the slot may
    be elsewhere now)."""

    _refresh: bool

    def _node(self, operation: str) -> Any:  # a RedisStore or an AsyncRedisStore
        raise NotImplementedError

    def _routed(self, operation: str, fn: Callable[[Any], T]) -> T:
        store = self._node(operation)
        try:
            return fn(store)
        except CacheUnavailable:
            self._refresh = True
            raise

    def _eval(
        self, operation: str, script: str, keys: list[Any], args: list[Any], shield: bool = False
    ) -> Any:
        return self._routed(operation, lambda s: s._eval(operation, script, keys, args, shield))

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        return cast(ReadResult, self._routed("read", lambda s: s.read(clock_key, entry_key, dep_keys)))

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        """Every key of the cache is in its slot: one MGET on one node."""
        return self._routed("read", lambda s: list[ReadResult](s.read_many(clock_key, entries)))

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        return self._routed("lock", lambda s: bool(s.try_fill_lock(entry_key, token, ttl_ms)))

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        def send(s: Any) -> SentLock:
            sent = s.send_lock(clock_key, lock_keys, token, lock_ttl_ms, gen_ttl_ms)
            return SentLock(sent.conn, s)  # its release reads the reply on that node's connection

        return self._routed("lock", send)

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """Release on the node the lock went to (its reply waits on that connection)."""
        node = sent.store
        assert node is not None and node is not self
        try:
            return bool(node.release_after(sent, clock_key, dep_keys, token, gen_ttl_ms, announce))
        except CacheUnavailable:
            self._refresh = True
            raise

    def delete(self, *keys: str) -> None:
        self._routed("delete", lambda s: s.delete(*keys))


class ClusterStore(Router):
    """The :class:`~sqlcache._protocol.Store` over a Redis Cluster: each call goes to the primary of
    the cache's slot, through a ``RedisStore`` of that node (its scripts, its run id)."""

    def __init__(self, target: ClusterTarget, health: Health) -> None:
        self.target = target
        self._make = target.sync_client
        self.health = health
        self._cluster: redis.cluster.RedisCluster | None = None
        self._slot = -1  # set by key_prefix()
        self._stores: dict[str, RedisStore] = {}
        # what closes each node store's sockets: see closer()
        self._closers: list[Callable[[], None]] = []
        self._owners: dict[int, str] = {}  # per slot of the cache, the node that served it last
        self._refresh = False  # a call failed: ask the cluster again which node serves the slot
        # threads share the router: building the client, refreshing the topology and taking a new owner
        # happen under it (the common case, the owner's store, reads no shared state it changes)
        # reentrant: a garbage-collector callback may close the cache (its publisher deletes its key,
        # which routes) on a thread inside _route
        self._mutex = threading.RLock()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _fresh_mutex(me))

    def key_prefix(self, prefix: str) -> str:
        tagged = _keys.slot_prefix(prefix)
        self._slot = key_slot(_keys.clock_key(tagged).encode())
        return tagged

    def key_layout(self, prefix: str) -> _keys.Layout:
        """Every key of the cache in one slot: one shard."""
        return _keys.Layout([self.key_prefix(prefix)])

    @property
    def backing_off(self) -> bool:
        return self.health.backing_off

    @property
    def shards(self) -> int:
        """How many shards the cache's keys are spread over (1: one slot)."""
        return 1

    @property
    def slot(self) -> int:
        """The hash slot of every key of the cache (known once ``key_prefix`` ran)."""
        return self._slot

    # -- routing -----------------------------------------------------------------------------------

    def _node(self, operation: str) -> RedisStore:
        """The store of the primary serving the cache's slot now; a new primary fences (Health.moved)."""
        return self._node_at(self._slot, operation)

    def _node_at(self, slot: int, operation: str) -> RedisStore:
        """The store of the primary serving ``slot`` now; a new primary fences (Health.moved)."""
        health = self.health
        health.check(operation)
        cluster = self._cluster
        if cluster is not None and not self._refresh:
            try:
                node = cluster.nodes_manager.get_node_from_slot(slot)  # its slot table: no I/O
            except _ERRORS:
                node = None  # the slow path says why
            store = None if node is None else self._stores.get(node.name)
            if store is not None and node is not None and node.name == self._owners.get(slot):
                return store
        with self._mutex:
            return self._route(slot, operation)

    def _served(self, name: str) -> Callable[[], list[int]] | None:
        """Which of the cache's shards a new connection to node ``name`` checks the lineage of (None:
        the only one)."""
        return None

    def _route(self, slot: int, operation: str) -> RedisStore:
        health = self.health
        try:
            cluster = self._cluster
            if cluster is None:
                cluster = self._cluster = self._make()
            elif self._refresh:
                self._refresh = False
                cluster.nodes_manager.initialize()
            node = cluster.nodes_manager.get_node_from_slot(slot)
            store = self._stores.get(node.name)
            if store is None:
                store = RedisStore(self._node_client(node), health, node.name, self._served(node.name))
                self._stores[node.name] = store
                self._closers.append(store.closer())
        except _ERRORS as exc:
            self._refresh = True
            health.failed()
            raise CacheUnavailable(operation) from exc
        owner = self._owners.get(slot)
        if node.name != owner:
            if owner is not None:
                health.moved()
                # a node taking the slot (back) may keep connections from before: none may carry a
                # read before lineage.lua ran on it, so every connection to it is made anew
                store.disconnect()
            self._owners[slot] = node.name
        return store

    def _node_client(self, node: redis.cluster.ClusterNode) -> redis.Redis:
        """A client of the node with a pool of its own: every connection in it is made by the store's
        connect hook (run id, lineage check). The cluster client's own pool to the node holds
        connections its topology queries opened without that hook, which must never carry a read."""
        kwargs: dict[str, Any] = self.target.node_kwargs(node.host, int(node.port))
        if self.target.kwargs.get("ssl"):
            kwargs["connection_class"] = redis.SSLConnection
        return redis.Redis(connection_pool=LeanPool(**kwargs))

    # -- operations --------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, ttl_ms: int) -> None:
        self._routed("publish", lambda s: s.put(key, value, ttl_ms))

    def slot_client(self, key: str | None = None) -> redis.Redis:
        """A client of the primary serving the cache's slot now, or ``key``'s (the commands' SCAN,
        GET, UNLINK).

        :raises CacheUnavailable: if the cluster cannot tell."""
        if key is None:
            return self._node("inspect").client
        return self._node_at(key_slot(key.encode()), "inspect").client

    def delete_matching(
        self, pattern: str, batch: int = 500, on_batch: Callable[[int], None] | None = None
    ) -> int:
        """Every key of the cache is in its slot, so on one node: SCAN that node."""
        return self._routed("clear", lambda s: int(s.delete_matching(pattern, batch, on_batch)))

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def server(self) -> dict[str, str | int]:
        """The node serving the cache's slot, as last seen (``{}`` before the first call)."""
        store = self._stores.get(self._owners.get(self._slot, ""))
        return {} if store is None else store.server()

    def subscribe(self, channel: str) -> Subscription:
        """Classic pub/sub reaches every node of a cluster: subscribe on the slot's primary."""
        return self._node("listen").subscribe(channel)

    def settle(self) -> None:
        """Each node's :meth:`RedisStore.settle`: the replies of the releases left unread."""
        for store in list(self._stores.values()):
            store.settle()

    def closer(self) -> Callable[[], None]:
        """What closes the sockets of every node store, now and later (as :meth:`RedisStore.closer`).
        The cluster client's own connections (topology queries, made without the store's hook) are
        redis-py's, left to it."""
        return functools.partial(_close_each, self._closers)

    def disconnect(self) -> None:
        for store in list(self._stores.values()):
            store.disconnect()
        if self._cluster is not None:
            self._cluster.close()


def _close_each(closers: list[Callable[[], None]]) -> None:
    for close in list(closers):
        close()
