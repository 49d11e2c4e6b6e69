"""The parts of one cache, built and wired together: what the facade's verbs (``cache.SQLCache``) use, and
what must happen to all of them at once when asyncio arrives, in a forked child and at close. Each part
gets only the narrow pieces it needs (docs/pages/architecture.md has the table of who gets what)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, cast

from . import _aio, _keys
from ._ashardstore import async_store_maker
from ._aworlds import AsyncStores, Worlds
from ._broadcast import Announcer
from ._commit import Commits
from ._direct import DirectReader
from ._health import Health
from ._identity import IdentityReader
from ._journal import Journal, Keys
from ._local import LocalTier
from ._localstore import LocalStore, in_front, local_tier_for
from ._outbox import OutboxSQL, OutboxWriter, check_table, outbox_table
from ._plugins import Plugins
from ._protocol import Store, StoreSlot
from ._publish import Publisher
from ._queryread import DecodedCache, QueryReader
from ._readthrough import ReadThrough
from ._registry import Registry
from ._relay import Relay, relay_engine
from ._report import Reporter
from ._seal import Sealer
from ._shardstore import store_for
from ._transactions import Transactions
from ._wiring import Wiring
from .config import CacheConfig

if TYPE_CHECKING:
    from sqlalchemy import MetaData, Table
    from sqlalchemy.engine import Engine

    from .errors import CacheUnavailable

__all__ = ["Parts"]


P = ParamSpec("P")


def _weakly(method: Callable[P, None]) -> Callable[P, None]:
    """``method`` with its object held weakly; once the object is gone, a call does nothing."""
    ref = weakref.WeakMethod(method)

    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        live = ref()
        if live is not None:
            live(*args, **kwargs)

    return call


class Parts:
    """Every part of one cache.

    :param sender: what signals name as their sender (the facade).
    :param redis_client: what the user passed: a client or URL (``store_for`` makes the cache's own).
    """

    def __init__(
        self,
        sender: Any,
        redis_client: Any,
        c: CacheConfig,
        sealer: Sealer,
    ) -> None:
        self.config = c
        self.health = health = Health(
            failure_threshold=c.failure_threshold, backoff=c.backoff, max_backoff=c.max_backoff
        )
        # the caller's client is untouched; a cluster's router is split by shard when shards > 1
        self.store = store_for(redis_client, c.timeout, health, c.shards)
        # a cache dropped without close(): its connections are closed when it is collected, not left
        # to the collector socket by socket (a ResourceWarning each, wherever it runs); at exit, as
        # before, the process's end closes them (daemon threads may still be using them)
        weakref.finalize(sender, self.store.closer()).atexit = False
        self.async_stores: AsyncStores | None = None  # the asyncio world, once an AsyncEngine is attached
        self.rep = rep = Reporter(sender, lambda: health.ok_seq)
        self.local = self._local_tier(sender)
        # the store the parts use (with the local tier in front of its reads, when asked for)
        self.sync_store: Store = (
            self.store if self.local is None else cast(Store, LocalStore(self.store, self.local))
        )
        self.slot = slot = StoreSlot(self.sync_store)
        self.plugins = Plugins(rep, slot, self.store.server)
        # which prefix starts every key (a hash tag on a cluster; one per shard on a sharded cluster)
        layout = self.store.key_layout(c.prefix)
        self.kp = p = layout.base
        self.keys = keys = Keys(layout, _keys.clock_key(p), c.generation_ttl * 1000)
        self.announcer = announcer = Announcer(p, c.broadcast, sealer)
        self.journal = journal = Journal(
            slot, rep, keys, announcer.announce, lambda: health.backing_off, c.backoff
        )
        # held weakly: the stores and the local tier hold health, and must not keep the cache alive
        health.on_restart = _weakly(journal.fence)
        health.on_release_lost = _weakly(self._release_lost)
        if c.wait_replicas:
            health.wait = (c.wait_replicas, max(1, round(c.wait_timeout * 1000)))
        health.lineage = [
            (_keys.clock_key(s), _keys.lineage_key(s), _keys.global_dep_key(s), _keys.layout_key(s),
             keys.gen_ttl_ms, str(layout.n))
            for s in layout.prefixes
        ]  # fmt: skip
        self.registry = registry = Registry(c.default_ttl)
        self.txns = txns = Transactions(id(sender))
        self.outbox = OutboxWriter(layout, c.outbox_table, self.new_relay) if c.durable else None
        if self.outbox is not None:
            journal.on_replayed.append(self.outbox.wake_all)
        reads = ReadThrough(
            slot, rep, txns, sealer, keys, journal.replay, stampede_wait=c.stampede_wait,
            max_entry_bytes=c.max_entry_bytes,
        )  # fmt: skip
        commits = Commits(
            slot, rep, registry, sealer, journal, keys, announcer.announce, c.lock_ttl * 1000, self.outbox,
            lambda: health.conflict,
        )  # fmt: skip
        # its thread holds stats() weakly (it must not keep the cache alive), and may call it at once
        stats = weakref.WeakMethod(self.stats)
        self.publisher = Publisher(self.store, rep, p, c.prefix, c.publish_stats, stats)
        self.decoded = decoded = DecodedCache(c.decoded_cache_bytes, registry.hierarchy, rep)
        identities = IdentityReader(reads, registry, txns, layout, decoded.entry)
        queries = QueryReader(reads, registry, txns, rep, layout, c.default_ttl, decoded)
        self.wiring = Wiring(txns, registry, commits, identities, queries, reads, self.outbox)
        self.direct = DirectReader(reads, identities, registry, txns, self.wiring.serves)

    def _release_lost(self, keys: Sequence[str], token: str, failure: CacheUnavailable) -> None:
        """A release whose reply, read after its commit returned, says Redis may not have applied it:
        reported as a failed release, and journalled as one (the lock it follows keeps readers off the
        old rows meanwhile)."""
        self.journal.defer(list(keys), token)
        self.rep.report(failure, "release")

    def _local_tier(self, owner: Any) -> LocalTier | None:
        """The local tier asked for (``local_bytes``), its keeper not started yet (``attach`` starts it)."""
        if not self.config.local_bytes:
            return None
        tier = local_tier_for(self.store, self.config, self.health, self.rep.stats.incr)
        weakref.finalize(owner, tier.abandon)  # a cache dropped without close(): its keeper stops
        return tier

    def attach(self, engine: Engine) -> None:
        """Serve and watch ``engine`` (its sync engine): the local tier's keeper, the asyncio world for an
        asyncio driver, the outbox's relay, the listeners."""
        if self.local is not None:
            self.local.start()
        if engine.dialect.is_async:
            self.enable_asyncio()
        if self.outbox is not None:
            table = self.config.outbox_table
            self.outbox.start(engine, lambda: _aio.blocking(engine, lambda e: check_table(e, table)))
        self.wiring.attach(engine)

    def detach(self, engine: Engine) -> None:
        """Undo :meth:`attach` for ``engine`` (its sync engine)."""
        self.wiring.detach(engine)
        if any(e.pool is engine.pool for e in self.wiring.engines()):
            return  # engine.execution_options() proxies share the pool, its relay and its writes
        if self.outbox is not None:
            self.outbox.stop(engine)

    def enable_asyncio(self) -> None:
        """From now on, code SQLAlchemy runs for asyncio reaches Redis through redis.asyncio."""
        if self.async_stores is not None:
            return
        make = async_store_maker(self.store, self.config.timeout, self.health)
        self.async_stores = AsyncStores(in_front(make, self.local))
        self.slot.base = cast(Store, Worlds(self.sync_store, self.async_stores))
        self.plugins.rebase()

    def table(self, metadata: MetaData) -> Table:
        """The outbox table of this cache, defined in ``metadata``."""
        return outbox_table(metadata, self.config.outbox_table)

    def new_relay(self, engine: Engine) -> Relay:
        """A relay (not started) applying ``engine``'s outbox."""
        from sqlalchemy import MetaData

        c, stores = self.config, self.async_stores
        own, runner = relay_engine(engine, None if stores is None else stores.aclose_current)
        return Relay(
            own, OutboxSQL(self.table(MetaData()), own.dialect, batch=500), c.relay_interval,
            c.relay_grace, prefix=self.kp, apply=self.journal.apply, reporter=self.rep,
            layout=self.keys.layout, backoff=c.backoff, max_backoff=c.max_backoff, source=engine,
            runner=runner,
        )  # fmt: skip

    def after_fork(self) -> None:
        """In a forked child: fresh locks everywhere, the journal's replay and the relays running again."""
        self.rep.stats.after_fork()
        self.health.after_fork()
        if self.async_stores is not None:
            self.async_stores.after_fork()
        self.registry.after_fork()
        self.decoded.after_fork()
        self.journal.after_fork()
        if self.outbox is not None:
            self.outbox.after_fork()
        self.publisher.after_fork()

    def close(self) -> None:
        """Detach every engine, stop the relays, the publisher, the journal's timer and the local tier,
        and close the connections the cache opened to Redis (plugins are the facade's to close first)."""
        self.wiring.close()
        if self.outbox is not None:
            self.outbox.stop_all()
        self.publisher.stop()
        self.health.retry_now()  # the journal's last replay is tried even while backing off
        self.store.settle()  # a release Redis did not apply is journalled before that replay
        self.journal.close()
        if self.local is not None:
            self.local.close()
        self.store.disconnect()

    def stats(self) -> dict[str, int]:
        """Every counter (``stats()``): the reporter's, the breaker's, the journal's, the local tier's."""
        out = self.rep.stats.snapshot()
        out["backoffs"] = self.health.backoffs
        out["lineage_fences"] = self.health.lineage_fences
        out["skipped_backoff"] = self.health.skipped
        out["loop_stalls"] = self.health.stalls
        out["journal"] = len(self.journal)
        out["local_bytes"] = 0 if self.local is None else self.local.bytes
        return out

    def identity_keys(self, h: Any, pk: tuple[Any, ...]) -> list[str]:
        """The keys ``invalidate(cls, pk)`` moves: the row's dependency and its table's row-writes key."""
        p = self.keys.layout.at(h.base_table)
        return [_keys.identity_dep_key(p, h.base_table, pk), _keys.row_writes_key(p, h.base_table)]

    def model_keys(self, tables: Sequence[str]) -> list[str]:
        """The keys ``invalidate_model`` moves: each table's bulk and table dependencies."""
        at = self.keys.layout.at
        return [k for t in tables for k in (_keys.bulk_dep_key(at(t), t), _keys.table_dep_key(at(t), t))]

    def tag_keys(self, tags: Sequence[str]) -> list[str]:
        return [_keys.tag_dep_key(self.keys.layout.at(t), t) for t in tags]
