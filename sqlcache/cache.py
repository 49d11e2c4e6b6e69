"""SQLCache: the facade. Its public verbs, over the parts of one cache (built and wired in ``_parts``);
the work itself happens in the parts (see docs/pages/architecture.md)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Engine

from . import _aio, _keys
from ._broadcast import Listener
from ._outbox import DEFAULT_TABLE, check_table
from ._parts import Parts
from ._registry import mapper_of
from ._relay import Relay
from ._seal import Sealer
from .config import CacheConfig, Mode, ModelPolicy
from .errors import ConfigurationError
from .plugin import Plugin

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.cluster
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session, scoped_session

__all__ = ["SQLCache"]


class SQLCache:
    """Redis as a second-level cache for the SQLAlchemy engines it is attached to.

    Guarantees: a read that starts after ``commit()`` returned never sees an entry older than that
    commit (see docs/pages/consistency.md for the isolation levels and the limits). Redis failures never
    reach the caller: the database answers and :data:`~sqlcache.signals.cache_error` fires.

    :param redis_client: a ``redis.Redis`` or ``redis.asyncio.Redis`` client, or a ``redis://`` URL:
        from any of them sqlcache makes both a sync and an asyncio client. A ``RedisCluster`` client
        or a ``redis+cluster://host:port`` URL puts the cache on a Redis Cluster (docs/pages/deployment.md).
        A client without a bounded socket timeout, with retries or with ``decode_responses=True`` is not
        changed: sqlcache talks to the same server through a pool of its own with ``timeout`` and no
        retries.
    :param prefix: every key lives under ``prefix + ":"``; use one prefix per database.
    :param default_ttl: seconds an entry lives unless its model or query says otherwise; ``None``: no
        expiry (entries still go when a dependency's generation expires, see ``generation_ttl``).
    :param timeout: seconds a Redis call may take before the database answers instead.
    :param lock_ttl: seconds a pre-commit lock outlives a writer that never released it.
    :param generation_ttl: seconds a dependency generation lives after it was last written.
    :param stampede_wait: seconds a cached query's callers wait for another caller's fill.
    :param max_entry_bytes: results whose encoded entry is larger are not cached (``stats()["too_large"]``).
    :param broadcast: publish every invalidation on a pub/sub channel under the prefix, inside the
        release script (no extra round trip); other processes hear them through :meth:`listen`.
    :param secret: sign every entry (HMAC-SHA256 over its key and payload); entries written by anyone
        without the secret, or moved to another key, are misses. See docs/pages/operations.md for the threat.
    :param durable: write each transaction's invalidations into an outbox table in the same database
        transaction, and run a relay thread per attached engine that applies what no writer could
        (a crash, an outage); see docs/pages/durability.md. The table must exist (:meth:`create_outbox`).
    :param outbox_table: the outbox table's name.
    :param relay_interval: seconds between two passes of the relay.
    :param relay_grace: age in seconds at which a relay applies a row its writer did not mark done.
    :param decoded_cache_bytes: budget (in bytes of Redis payload; about four times that in memory) for
        keeping decoded query results and identity entries in process, reused while Redis keeps returning
        the very same bytes for a key; 0 turns it off.
    :param wait_replicas: replicas of the Redis primary that must acknowledge each release (``WAIT``)
        before ``commit()`` returns; fewer in ``wait_timeout`` seconds is treated as an outage (the
        journal keeps the invalidation). 0 (the default) asks none; see docs/pages/deployment.md.
    :param wait_timeout: seconds the release's ``WAIT`` may take (below ``timeout``).
    :param publish_stats: publish :meth:`stats` under the prefix every so many seconds, from a daemon
        thread, for ``sqlcache stats`` (docs/pages/cli.md); None (the default): not published.
    :param shards: on a Redis Cluster, spread the cache's keys over this many shards, each a hash tag
        of its own (a table's or a tag's keys in one), so that the cache's load spreads over the
        cluster's primaries; 1 (the default): every key in one slot. Every process sharing a prefix must
        use the same number (a process that does not is refused the cache). docs/pages/deployment.md.
    :param local_bytes: keep up to this many bytes of entries in this process's memory and serve them
        with no round trip while Redis's own tracking says nothing they depend on changed (the local
        tier, docs/pages/local-tier.md); 0 (the default): off. Sync and asyncio reads; one server, a Redis
        Cluster or a Sentinel-managed primary, over TLS or not.
    :param local_max_lag: the local tier's staleness bound in seconds: nothing is served locally unless
        Redis's tracking connection answered a PING sent at most this long ago.
    :param plugins: plugins to set up now, in order (see :meth:`add_plugin`).
    :raises ConfigurationError: on a bad argument.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4 ``shards``.
    """

    def __init__(
        self,
        redis_client: redis.Redis | redis.asyncio.Redis | redis.cluster.RedisCluster | str,
        prefix: str = "sqlcache",
        default_ttl: int | None = 3600,
        *,
        timeout: float = 0.25,
        lock_ttl: int = 60,
        generation_ttl: int = 7 * 24 * 3600,
        failure_threshold: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stampede_wait: float = 2.0,
        max_entry_bytes: int = 8 * 1024 * 1024,
        secret: bytes | str | None = None,
        broadcast: bool = False,
        durable: bool = False,
        outbox_table: str = DEFAULT_TABLE,
        relay_interval: float = 1.0,
        relay_grace: float = 10.0,
        decoded_cache_bytes: int = 4 * 1024 * 1024,
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
        publish_stats: float | None = None,
        shards: int = 1,
        local_bytes: int = 0,
        local_max_lag: float = 0.1,
        plugins: Sequence[Plugin] = (),
    ) -> None:
        self.config = CacheConfig(
            prefix=prefix, default_ttl=default_ttl, timeout=timeout, lock_ttl=lock_ttl,
            generation_ttl=generation_ttl, failure_threshold=failure_threshold, backoff=backoff,
            max_backoff=max_backoff, stampede_wait=stampede_wait, max_entry_bytes=max_entry_bytes,
            broadcast=broadcast, durable=durable, outbox_table=outbox_table, relay_interval=relay_interval,
            relay_grace=relay_grace, decoded_cache_bytes=decoded_cache_bytes, wait_replicas=wait_replicas,
            wait_timeout=wait_timeout, publish_stats=publish_stats, shards=shards, local_bytes=local_bytes,
            local_max_lag=local_max_lag,
        )  # fmt: skip
        self._parts = parts = Parts(self, redis_client, self.config, Sealer(secret))  # every part, wired
        #: the redis-py store (connection health, restarts); plugins may wrap what the parts use
        self.store = parts.store
        self._closed = False
        # Gunicorn, uWSGI, Celery prefork: a forked child must not inherit locks held by other threads
        # at the fork, nor count on threads that did not survive it (a weak reference: the hook cannot be
        # unregistered, and must not keep the cache alive)
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(me))
        try:
            for plugin in plugins:
                self.add_plugin(plugin)
        except BaseException:
            self.close()  # the plugins set up so far, and the pool built for this cache
            raise

    def _after_fork(self) -> None:
        """In a forked child: fresh locks everywhere, the journal's replay and the relays running again."""
        if not self._closed:
            self._parts.after_fork()

    def __repr__(self) -> str:
        return f"<SQLCache prefix={self.config.prefix!r}>"

    @property
    def strict_signals(self) -> bool:
        """When True, an exception raised by a signal receiver propagates (the test suite sets it)."""
        return self._parts.rep.strict_signals

    @strict_signals.setter
    def strict_signals(self, value: bool) -> None:
        self._parts.rep.strict_signals = value

    # -- engines ------------------------------------------------------------------------------------

    def attach(self, engine: Engine | AsyncEngine) -> None:
        """Collect writes through ``engine`` and serve its reads of registered models from Redis.

        ``engine`` may be an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (or its ``sync_engine``): its
        sessions and connections then reach Redis through redis.asyncio, on their own event loop
        (docs/pages/asyncio.md). Idempotent. Several engines per cache, sync and async mixed, and several
        caches per engine are allowed (use different prefixes for different databases).

        :raises ConfigurationError: if ``engine`` is not a SQLAlchemy Engine or AsyncEngine, or
            ``durable=True`` and its database has no outbox table.

        .. versionchanged:: 0.3 an AsyncEngine is accepted.
        """
        sync_engine: Engine | None = _aio.engine_of(engine)
        if sync_engine is None:
            raise ConfigurationError(f"attach() takes a sqlalchemy Engine or AsyncEngine, got {engine!r}")
        if self._closed:
            raise ConfigurationError("this SQLCache was closed")
        self._parts.attach(sync_engine)

    def detach(self, engine: Engine | AsyncEngine) -> None:
        """Undo :meth:`attach`; idempotent. Transactions in flight on ``engine`` still release their locks."""
        sync_engine: Engine | None = _aio.engine_of(engine)
        if sync_engine is None:
            raise ConfigurationError(f"detach() takes a sqlalchemy Engine or AsyncEngine, got {engine!r}")
        self._parts.detach(sync_engine)

    def close(self) -> None:
        """Close the plugins (last added first), detach every engine, stop the relays (after deleting the
        outbox rows already applied) and the journal's replay timer, and close the connections this
        cache opened to Redis. Idempotent."""
        self._closed = True
        try:
            self._parts.plugins.close()
        finally:
            self._parts.close()

    async def aclose(self) -> None:
        """:meth:`close`, and then close this event loop's asyncio connections to Redis. Call it from
        the loop that used the cache (an app's shutdown). A loop's connections also close when it shuts
        down its async generators (``asyncio.run()`` and ``asyncio.Runner`` do).

        .. versionadded:: 0.3
        """
        if self._parts.async_stores is not None:  # a release found lost is journalled before close()'s replay
            await self._parts.async_stores.settle_current()
        self.close()
        await self.release_loop()

    async def release_loop(self) -> None:
        """Close this event loop's asyncio connections to Redis; the cache stays usable (the next
        asyncio read or commit in a loop opens new ones). For a loop that ends while the cache lives on:
        ``asyncio.run()`` per job, a test's loop.

        .. versionadded:: 0.3
        """
        if self._parts.async_stores is not None:
            await self._parts.async_stores.aclose_current()

    # -- plugins ------------------------------------------------------------------------------------

    def add_plugin(self, plugin: Plugin) -> None:
        """Set ``plugin`` up on this cache: it hears this cache's signals, reads its stats, wraps its
        timed operations and its store through a :class:`~sqlcache.plugin.PluginHost`.

        :raises ConfigurationError: if ``plugin`` is not a :class:`~sqlcache.plugin.Plugin`, a plugin of
            the same name was added already, the cache is closed, or ``plugin.setup()`` raised (what it
            had set up through its host is undone).

        .. versionadded:: 0.2
        """
        if self._closed:
            raise ConfigurationError("this SQLCache was closed")
        self._parts.plugins.add(self, plugin)

    def remove_plugin(self, name: str) -> Plugin:
        """Remove the plugin called ``name``: its receivers, hooks and store wrapper go, then its
        ``close()`` runs (an exception it raises is counted in ``plugin_errors``). Returns the plugin.

        :raises ConfigurationError: if no plugin of that name was added.

        .. versionadded:: 0.2
        """
        return self._parts.plugins.remove(name)

    def plugins(self) -> list[Plugin]:
        """The plugins of this cache, in the order they were added.

        .. versionadded:: 0.2
        """
        return self._parts.plugins.all()

    # -- models and invalidation ----------------------------------------------------------------------

    def register(self, cls: type[Any], ttl: int | None = None, mode: Mode = "invalidate") -> None:
        """Serve ``session.get(cls, pk)`` and many-to-one lazy loads of ``cls`` (and subclasses) from Redis.

        :param ttl: seconds an entry lives; ``None`` uses the cache's ``default_ttl``.
        :param mode: ``"invalidate"`` drops entries a commit wrote; ``"repopulate"`` writes the committed
            state instead, when that is provably the newest (otherwise it invalidates).
        :raises ConfigurationError: if ``cls`` is not mapped, or a column type cannot round-trip.
        """
        mapper = mapper_of(cls)
        self._parts.registry.register(mapper, ModelPolicy(ttl=ttl, mode=mode))
        self._parts.wiring.watch_mapper(mapper)

    # -- direct reads -------------------------------------------------------------------------------

    def get(self, session: Session | scoped_session[Any], cls: type[Any], pk: Any) -> Any:
        """What ``session.get(cls, pk)`` returns (the object, in the session's identity map, or None),
        without SQLAlchemy's statement pipeline in front of a Redis hit (docs/pages/direct.md).

        As ``Session.get`` through the cache: an object the session holds is returned with no Redis
        call, a row this transaction wrote comes from the database, pending changes are flushed first
        (autoflush). What the fast path does not cover is handed to ``session.get`` itself.

        :param session: a Session, or a ``scoped_session`` (Flask-SQLAlchemy's ``db.session``): its
            current session.
        :param pk: the primary key, a tuple for a composite key (as ``Session.get`` takes it).
        :raises ConfigurationError: if ``cls`` is not mapped, or not registered with this cache.

        .. versionadded:: 0.4
        """
        return self._parts.direct.get(session, cls, pk)

    def get_many(
        self, session: Session | scoped_session[Any], cls: type[Any], pks: Iterable[Any]
    ) -> list[Any]:
        """:meth:`get` of every key in ``pks``, in order (None for a missing row; duplicates allowed):
        one Redis round trip for every key the session does not hold, and one ``SELECT ... IN`` (per
        1000 keys) for the misses, filled as single misses are.

        :raises ConfigurationError: if ``cls`` is not mapped, or not registered with this cache.

        .. versionadded:: 0.4
        """
        return self._parts.direct.get_many(session, cls, pks)

    async def aget(self, session: AsyncSession, cls: type[Any], pk: Any) -> Any:
        """:meth:`get` for an :class:`~sqlalchemy.ext.asyncio.AsyncSession` (through ``run_sync``).

        .. versionadded:: 0.4
        """
        return await session.run_sync(self._parts.direct.get, cls, pk)

    async def aget_many(self, session: AsyncSession, cls: type[Any], pks: Iterable[Any]) -> list[Any]:
        """:meth:`get_many` for an :class:`~sqlalchemy.ext.asyncio.AsyncSession` (through ``run_sync``).

        .. versionadded:: 0.4
        """
        return await session.run_sync(self._parts.direct.get_many, cls, list(pks))

    def invalidate(self, cls: type[Any], pk: Any) -> None:
        """Invalidate the entry of one row now (outside any transaction)."""
        p = self._parts
        h = p.registry.hierarchy(mapper_of(cls))
        pk_t = pk if isinstance(pk, tuple) else (pk,)
        p.journal.invalidate_now(p.identity_keys(h, pk_t), [(h.mapper.class_, pk_t)], [])

    def invalidate_model(self, cls: type[Any]) -> None:
        """Invalidate every entry of ``cls`` and of the tables of its inheritance hierarchy."""
        p = self._parts
        h = p.registry.hierarchy(mapper_of(cls))
        p.journal.invalidate_now(p.model_keys(h.tables), [], [f"table:{t}" for t in h.tables])

    def invalidate_tags(self, *tags: str) -> None:
        """Invalidate every cached query tagged with any of ``tags``: one O(1) step per tag."""
        for t in tags:
            if not isinstance(t, str) or not t:
                raise ConfigurationError(f"tags must be non-empty strings, got {t!r}")
        self._parts.journal.invalidate_now(self._parts.tag_keys(tags), [], list(tags))

    def clear(self) -> int:
        """Delete every key under this cache's prefix (SCAN, never KEYS); returns how many were deleted.

        A fill in flight when this runs is refused, since the generations it saw are gone.
        """
        removed = 0
        with self._parts.rep.degrade("clear"):
            for prefix in self._parts.keys.layout.prefixes:  # each shard's keys, on the node serving it
                removed += self._parts.slot.current.delete_matching(_keys.scan_pattern(prefix))
        return removed

    def stats(self) -> dict[str, int]:
        """Counters since this cache was created (see ``sqlcache._stats.COUNTERS`` for each meaning)."""
        return self._parts.stats()

    def listen(self) -> Listener:
        """Re-emit other processes' invalidations as ``signals.invalidated(remote=True)``.

        Starts a daemon thread subscribed to this prefix's channel (requires ``broadcast=True`` on the
        publishing caches) and returns it; ``listener.stop()`` ends it. A lost connection is reported as
        ``cache_error`` with ``operation="listen"`` (messages may have been missed) and re-established.
        """
        c = self.config
        channel = self._parts.announcer.channel
        listener = Listener(
            lambda: self.store.subscribe(channel),
            self._parts.announcer,
            self._parts.rep,
            self._parts.registry.class_for,
            c.backoff,
            c.max_backoff,
        )
        listener.start()
        return listener

    # -- durable invalidation ------------------------------------------------------------------------

    def outbox_table(self, metadata: MetaData | None = None) -> Table:
        """The outbox table of this cache (``outbox_table`` name), defined in ``metadata``: pass your
        models' metadata to have Alembic autogenerate create it in a migration."""
        return self._parts.table(metadata if metadata is not None else MetaData())

    def create_outbox(self, engine: Engine | AsyncEngine) -> None:
        """Create the outbox table in ``engine``'s database if it is not there (``CREATE TABLE``).
        An AsyncEngine is used through a connection of its own, on an event loop of its own."""
        sync_engine: Engine | None = _aio.engine_of(engine)
        if sync_engine is None:
            raise ConfigurationError(f"create_outbox() takes an Engine or AsyncEngine, got {engine!r}")
        table = self.outbox_table()
        _aio.blocking(sync_engine, lambda e: table.create(e, checkfirst=True))

    def relay(self, engine: Engine, *, start: bool = True) -> Relay:
        """A relay for ``engine``'s outbox without attaching the engine: for a process whose only job is
        to apply what crashed or cut-off writers left (``sqlcache relay`` runs one). ``relay.stop()``
        ends it; ``relay.run_once()`` runs one pass in the calling thread.

        :raises ConfigurationError: if the outbox table does not exist, or ``engine`` uses an asyncio
            driver (give this command a sync driver's URL for the same database).
        """
        sync_engine: Engine | None = _aio.engine_of(engine)
        if sync_engine is not engine or sync_engine.dialect.is_async:
            raise ConfigurationError(
                "relay() takes an Engine with a sync driver (the relay runs in the calling thread); for an "
                "AsyncEngine's database, create_engine() with a sync driver's URL"
            )
        check_table(engine, self.config.outbox_table)
        relay = self._parts.new_relay(engine)
        if start:
            relay.start()
        return relay


def _after_fork(ref: weakref.ref[SQLCache]) -> None:
    cache = ref()
    if cache is not None:
        cache._after_fork()
