"""SQLCache: the facade. Holds configuration, the store and the registrations; runs the read and
commit flows that the listeners in _wiring.py hand it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import MetaData, Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.exc import InvalidRequestError, NoInspectionAvailable, SQLAlchemyError
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import InstrumentedAttribute, set_committed_value
from sqlalchemy.sql.schema import Column

from . import _keys, signals
from ._codec import encode_body
from ._listen import Listener
from ._outbox import DEFAULT_TABLE, MAX_BODY_CHARS, OutboxSQL, Relay, check_table, outbox_table
from ._outbox import encode_body as encode_outbox_body
from ._query import LAYOUT as ROWS_LAYOUT
from ._query import (
    Decoded,
    Uncacheable,
    Unreproducible,
    decode_rows,
    digest,
    encode_rows,
    stable,
    tables_read,
)
from ._snapshot import (
    Conv,
    Hierarchy,
    apply_marks,
    built_since,
    check_supported,
    class_id,
    decode_entry,
    discard_built,
    encode_absent,
    encode_instance,
    hierarchy_for,
    materialize_objects,
    new_runid,
    type_converters,
)
from ._snapshot import materialize as _materialize
from ._stats import Stats
from ._store import ReadResult, RepopEntry, SentLock, Store, client_for
from ._txn import IdentityWrite, TxnState, cascade_targets
from ._wiring import Wiring, column_extras, result_metadata, with_attributes
from .config import CacheConfig, Mode, ModelPolicy
from .errors import CacheUnavailable, CodecError, ConfigurationError, SQLCacheError
from .options import QueryPolicy

if TYPE_CHECKING:
    from blinker import NamedSignal
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import ORMExecuteState, Session

__all__ = ["SQLCache"]

log = logging.getLogger("sqlcache")

# Most dependency keys a process keeps while Redis is away before it gives up on them one by one and
# fences the whole prefix instead (a burst of misses, never a stale read).
_JOURNAL_LIMIT = 10_000

_EXACT_KEY_TYPES = frozenset({int, uuid.UUID})

_MAC_SIZE = 16

# Python types a database stores and returns exactly as assigned; a repopulated entry may only carry
# written values of these types (anything else is invalidated and read back from the database)
_STORED_AS_ASSIGNED = frozenset({int, bool, str, bytes, type(None), uuid.UUID})

# what describing an unusual statement may raise; such a statement is simply not cached
_UNDESCRIBABLE = (SQLAlchemyError, ConfigurationError, AttributeError, TypeError, NotImplementedError)


class _Unservable(Exception):
    """A valid entry that cannot answer this particular load (it lacks an attribute asked for)."""


@dataclass(eq=False)
class _QuerySpec:
    """What a statement shape reads and returns, computed once per shape."""

    digest: str
    tables: tuple[str, ...]
    columns: tuple[Hierarchy | None, ...]
    aliased: bool = False  # an entity is an aliased() class: load paths come from the statement itself
    extras: list[tuple[Any, ...]] | None = None  # per column, row._mapping keys besides the name
    types: tuple[Any, ...] = ()  # per column, the SQL type of a non-entity column (None for entities)
    # per column, value <-> codec converters of a non-entity column whose values need one (enums)
    to_plain: tuple[Conv | None, ...] = field(init=False)
    from_plain: tuple[Conv | None, ...] = field(init=False)
    # every extra is an object any statement of this shape names the same way (a mapped class, its
    # attributes, a table's columns); labels and functions are built anew with each statement
    stable_extras: bool = field(init=False)
    any_entity: bool = field(init=False)  # the ORM marks such results "filtered": legacy Query uniques
    # derived once: which columns are entities, their load paths (not for aliased entities, whose paths
    # are the alias's own), and result metadata per (column names, legacy Query) (hits share it, as
    # SQLAlchemy's cached statements share theirs)
    entities: list[bool] = field(init=False)
    paths: list[Any] = field(init=False)
    metas: dict[tuple[tuple[str | None, ...], bool], SimpleResultMetaData] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.entities = [h is not None for h in self.columns]
        self.paths = [h.mapper._path_registry if h is not None else None for h in self.columns]
        self.any_entity = any(self.entities)
        self.stable_extras = all(_shared_object(x) for ex in self.extras or () for x in ex)
        convs = [type_converters(t, t) if t is not None else (None, None) for t in self.types]
        self.to_plain = tuple(c[0] for c in convs) if any(c[0] for c in convs) else ()
        self.from_plain = tuple(c[1] for c in convs) if any(c[1] for c in convs) else ()

    def unique_filters(self, legacy: bool) -> list[Any]:
        """Per column, how ``unique()`` tells rows apart, as the ORM decides it: entities by identity,
        columns of a type producing unhashable values (JSON, ARRAY) refused (by identity for a legacy
        Query), columns of an unknown type by hash where they can be hashed."""
        out: list[Any] = []
        for i, entity in enumerate(self.entities):
            type_ = self.types[i] if i < len(self.types) else None
            if entity:
                out.append(id)
            elif type_ is not None and (type_._isnull or not type_.hashable):
                out.append(_unhashable_filter(type_, legacy, type_._isnull))
            else:
                out.append(None)
        return out

    def metadata(self, keys: Sequence[str | None], stmt: Any, legacy: bool) -> SimpleResultMetaData:
        if self.aliased or not self.stable_extras:
            # the row mapping's keys are this statement's own objects (an alias's attributes, labels,
            # functions): a statement built again has new ones
            return result_metadata(keys, lambda: self.unique_filters(legacy), column_extras(stmt))
        k = (tuple(keys), legacy)
        meta = self.metas.get(k)
        if meta is None:
            meta = result_metadata(keys, lambda: self.unique_filters(legacy), self.extras)
            # a legacy filter for values of unknown type remembers what it met: not shared
            stateful = legacy and any(t is not None and t._isnull for t in self.types)
            if not stateful and len(self.metas) < 8:
                self.metas[k] = meta  # an entry's names are the statement's: one or two in practice
        return meta


def _shared_object(o: Any) -> bool:
    """Whether ``o`` is one object for every statement naming it: a mapped class, a class's own
    attribute, a column of a Table (not of an alias or a subquery)."""
    if isinstance(o, type):
        return True
    if isinstance(o, InstrumentedAttribute):
        return getattr(o, "class_", None) is not None and getattr(o.class_, o.key, None) is o
    if isinstance(o, Column):
        # a table's column, or an annotated copy of it (hashed and matched as the column itself)
        return isinstance(o.table, Table)
    return False


def _require_unique(_row: Any) -> Any:
    raise InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that include "
        "joined eager loads against collections"
    )


def _unhashable_filter(type_: Any, legacy: bool, uncertain: bool) -> Callable[[Any], Any]:
    """unique()'s key for a column whose values may not hash (SQLAlchemy's rule for ORM results)."""
    if legacy and not uncertain:
        return id
    if legacy:
        use_id = False

        def hash_or_id(value: Any) -> Any:
            nonlocal use_id
            if not use_id:
                try:
                    return hash(value)
                except TypeError:
                    use_id = True
            return id(value)

        return hash_or_id

    def refuse(value: Any) -> Any:
        if uncertain:
            try:
                return hash(value)
            except TypeError:
                pass
        produce = "the values returned appear to be" if uncertain else "this datatype produces"
        raise InvalidRequestError(
            f"Can't apply uniqueness to row tuple containing value of type {type_!r}; {produce} "
            "non-hashable values"
        )

    return refuse


def _resolve(instances: list[Any], ref: Any) -> Any:
    if ref is None:
        return None
    if type(ref) is list:
        return [instances[i] for i in ref]
    return instances[ref]


def _load_context(stmt: Any, spec: _QuerySpec) -> tuple[tuple[Any, ...], list[Any]]:
    """(the statement's propagating loader options, the load path of each entity column): what a
    database load leaves on the objects of each column (``state.load_options`` / ``load_path``)."""
    with_options = stmt._with_options
    options = tuple(o for o in with_options if o.propagate_to_loaders) if with_options else ()
    current = getattr(stmt._compile_options, "_current_path", None)  # set on lazy loads' statements
    if spec.aliased:  # the path of an aliased() entity is the alias's own, taken from this very statement
        entities: list[Any] = [
            sa_inspect(d["entity"])._path_registry if h is not None else None
            for h, d in zip(spec.columns, stmt.column_descriptions, strict=True)
        ]
    elif current is None or not current.path:
        return options, spec.paths
    else:
        entities = spec.paths
    tops = [
        (current + e if current is not None and current.path else e) if e is not None else None
        for e in entities
    ]
    return options, tops


def _fix_load_paths(
    tops: list[Any],
    rows: list[Any],
    flat: bool,
    rels: list[tuple[int, str, Any]],
    instances: list[Any],
    new: bytearray,
) -> None:
    """Objects not of the first entity column get their own column's path, objects loaded through a
    relationship the relationship's path beneath their parent's (materialize_objects gave every new
    object the first column's). The first path reaching an object wins, as the first row does."""
    paths: list[Any] = [None] * len(instances)
    if flat:
        for i in rows:
            paths[i] = tops[0]
    else:
        for row in rows:
            for top, cell in zip(tops, row, strict=True):
                if top is not None and cell is not None and paths[cell] is None:
                    paths[cell] = top
    for i, key, ref in rels:
        parent = paths[i]
        if parent is None or ref is None:
            continue
        prop = sa_inspect(instances[i]).mapper.relationships[key]
        child = parent[prop][prop.mapper]
        for c in ref if type(ref) is list else (ref,):
            if paths[c] is None:
                paths[c] = child
    first = next((t for t in tops if t is not None), None)
    for i, path in enumerate(paths):
        if new[i] and path is not None and path is not first:
            sa_inspect(instances[i]).load_path = path


@dataclass(eq=False)
class _PendingRelease:
    """What a pre-commit lock promised to release once the database COMMIT returned."""

    keys: list[str]
    token: str
    entries: list[RepopEntry]
    identities: list[tuple[type[Any], tuple[Any, ...]]]
    tags: list[str]
    sent: SentLock | None = None  # a pipelined lock whose reply is read with the release
    outbox: tuple[Relay, str] | None = None  # durable: the relay to tell once the row is applied


class SQLCache:
    """Redis as a second-level cache for the SQLAlchemy engines it is attached to.

    :param redis_client: a ``redis.Redis`` client or a ``redis://`` URL. A client without a bounded
        socket timeout, with retries or with ``decode_responses=True`` is not changed: sqlcache talks to
        the same server through a pool of its own with ``timeout`` and no retries.
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
        without the secret, or moved to another key, are misses. See docs/operations.md for the threat.
    :param durable: write each transaction's invalidations into an outbox table in the same database
        transaction, and run a relay thread per attached engine that applies what no writer could
        (a crash, an outage); see docs/durability.md. The table must exist (:meth:`create_outbox`).
    :param outbox_table: the outbox table's name.
    :param relay_interval: seconds between two passes of the relay.
    :param relay_grace: age in seconds at which a relay applies a row its writer did not mark done.
    :param decoded_cache_bytes: budget (in bytes of Redis payload; about four times that in memory) for
        keeping decoded query results in process, reused while Redis keeps returning the very same bytes
        for a key; 0 turns it off.
    :raises ConfigurationError: on a bad argument.

    Guarantees: a read that starts after ``commit()`` returned never sees an entry older than that
    commit (see docs/consistency.md for the isolation levels and the limits). Redis failures never
    reach the caller: the database answers and :data:`~sqlcache.signals.cache_error` fires.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        redis_client: redis.Redis | str,
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
    ) -> None:
        self.config = CacheConfig(
            prefix=prefix,
            default_ttl=default_ttl,
            timeout=timeout,
            lock_ttl=lock_ttl,
            generation_ttl=generation_ttl,
            failure_threshold=failure_threshold,
            backoff=backoff,
            max_backoff=max_backoff,
            stampede_wait=stampede_wait,
            max_entry_bytes=max_entry_bytes,
            broadcast=broadcast,
            durable=durable,
            outbox_table=outbox_table,
            relay_interval=relay_interval,
            relay_grace=relay_grace,
        )
        self._channel = _keys.channel(prefix)
        self._node = uuid.uuid4().hex  # tells this cache's own broadcasts from other processes
        # a query's stampede lock outlives the wait of the callers behind it, then expires on its own
        self._fill_lock_ms = int(max(2 * stampede_wait, 5.0) * 1000)
        client = client_for(redis_client, timeout)
        self._owns_client = client is not redis_client  # built from a URL, or derived: ours to close
        self.store = Store(
            client,
            failure_threshold=failure_threshold,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._stats = Stats()
        self._policies: dict[Mapper[Any], ModelPolicy] = {}
        self._policy_memo: dict[Mapper[Any], ModelPolicy | None] = {}
        self._query_memo: dict[Any, _QuerySpec] = {}
        self._hierarchies: dict[Mapper[Any], Hierarchy] = {}
        self._cascades: dict[tuple[Any, bool, bool], set[Any]] = {}
        self._wiring = Wiring(self)
        self._pending: dict[int, _PendingRelease] = {}
        self._journal: set[str] = set()
        self._fence = False
        self._mutex = threading.Lock()
        self._clock_key = _keys.clock_key(prefix)
        self._global_key = _keys.global_dep_key(prefix)
        self._gen_ttl_ms = generation_ttl * 1000
        if secret is not None and (not isinstance(secret, (bytes, str)) or len(secret) < 16):
            raise ConfigurationError("secret must be bytes or str of at least 16 characters")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        if (
            isinstance(decoded_cache_bytes, bool)
            or not isinstance(decoded_cache_bytes, int)
            or decoded_cache_bytes < 0
        ):
            raise ConfigurationError(f"decoded_cache_bytes must be an int >= 0, got {decoded_cache_bytes!r}")
        self._reported_seq = -1  # Store.ok_seq when the last outage was signalled
        self._replay_timer: threading.Timer | None = None
        self._relays: dict[Any, Relay] = {}  # engine.pool -> its relay (durable)
        # decoded query results by entry key, reused while Redis returns the same bytes (bounded LRU)
        self._decoded_max = decoded_cache_bytes
        self._decoded_bytes = 0
        self._decoded_lru: OrderedDict[str, tuple[bytes, Any, Decoded]] | None = (
            OrderedDict() if decoded_cache_bytes > 0 else None
        )
        self._closed = False
        self.store.on_restart = self._redis_restarted
        #: when True, an exception raised by a signal receiver propagates (the test suite sets it)
        self.strict_signals = False

    def __repr__(self) -> str:
        return f"<SQLCache prefix={self.config.prefix!r}>"

    # -- public API ----------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Collect writes through ``engine`` and serve its reads of registered models from Redis.

        Idempotent. Several engines per cache and several caches per engine are allowed (use different
        prefixes for different databases).

        :raises ConfigurationError: if ``engine`` is not a SQLAlchemy :class:`~sqlalchemy.engine.Engine`.
        """
        if not isinstance(engine, Engine):
            raise ConfigurationError(f"attach() takes a sqlalchemy Engine, got {engine!r}")
        if self._closed:
            raise ConfigurationError("this SQLCache was closed")
        if self.config.durable and engine.pool not in self._relays:
            check_table(engine, self.config.outbox_table)
            relay = self._new_relay(engine)
            self._relays[engine.pool] = relay
            relay.start()
        self._wiring.attach(engine)

    def detach(self, engine: Engine) -> None:
        """Undo :meth:`attach`; idempotent. Transactions in flight on ``engine`` still release their locks."""
        if not isinstance(engine, Engine):
            raise ConfigurationError(f"detach() takes a sqlalchemy Engine, got {engine!r}")
        self._wiring.detach(engine)
        if any(e.pool is engine.pool for e in self._wiring.engines()):
            return  # engine.execution_options() proxies share the pool, its relay and its writes
        relay = self._relays.pop(engine.pool, None)
        if relay is not None:
            relay.stop()

    def close(self) -> None:
        """Detach every engine, stop the relays (after deleting the outbox rows already applied) and the
        journal's replay timer, and close the connections this cache opened to Redis. Idempotent."""
        self._closed = True
        for engine in self._wiring.engines():
            self._wiring.detach(engine)
        relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.stop()
        with self._mutex:
            timer, self._replay_timer = self._replay_timer, None
        if timer is not None:
            timer.cancel()
        if self._owns_client:
            self.store.client.connection_pool.disconnect()

    # -- durable invalidation ------------------------------------------------------------------------

    def outbox_table(self, metadata: MetaData | None = None) -> Table:
        """The outbox table of this cache (``outbox_table`` name), defined in ``metadata``: pass your
        models' metadata to have Alembic autogenerate create it in a migration."""
        return outbox_table(metadata if metadata is not None else MetaData(), self.config.outbox_table)

    def create_outbox(self, engine: Engine) -> None:
        """Create the outbox table in ``engine``'s database if it is not there (``CREATE TABLE``)."""
        self.outbox_table().create(engine, checkfirst=True)

    def relay(self, engine: Engine, *, start: bool = True) -> Relay:
        """A relay for ``engine``'s outbox without attaching the engine: for a process whose only job is
        to apply what crashed or cut-off writers left (``sqlcache relay`` runs one). ``relay.stop()``
        ends it; ``relay.run_once()`` runs one pass in the calling thread.

        :raises ConfigurationError: if the outbox table does not exist.
        """
        check_table(engine, self.config.outbox_table)
        relay = self._new_relay(engine)
        if start:
            relay.start()
        return relay

    def _new_relay(self, engine: Engine) -> Relay:
        sql = OutboxSQL(self.outbox_table(), engine.dialect, batch=500)
        return Relay(self, engine, sql, self.config.relay_interval, self.config.relay_grace)

    def apply_relayed(self, keys: list[str], tags: list[str]) -> None:
        """Give ``keys`` fresh generations (a relay's batch); raises CacheUnavailable if Redis is away."""
        self.store.release(self._clock_key, keys, "", self._gen_ttl_ms, announce=self._announce([], tags))
        self._stats.incr("invalidations", len(keys))

    def _outbox_write(
        self, st: TxnState, conn: Connection, keys: list[str], tags: list[str]
    ) -> tuple[Relay, str]:
        """Insert the transaction's outbox row on its own connection, before its COMMIT; returns the
        relay to tell once the invalidation is applied, and the row's id.

        :raises SQLCacheError: the row could not be written; the transaction was rolled back.
        """
        dbapi_connection = conn.connection.dbapi_connection
        relay = self._relays.get(conn.engine.pool)
        problem: BaseException | None = None
        if relay is None:  # detached or closed while this transaction ran
            problem = ConfigurationError("durable=True but this engine is not attached (or the cache closed)")
        else:
            body = encode_outbox_body(keys, tags)
            if len(body) > MAX_BODY_CHARS:
                body = encode_outbox_body(self._coarse_keys(st), tags)
            try:
                return relay, relay.sql.write(dbapi_connection, self.config.prefix, body)
            except relay.sql.dbapi_error as exc:
                problem = exc
        # SQLAlchemy neither commits nor resets a connection whose commit event raised: roll the
        # transaction back here, or its locks would outlive it in the pool
        try:
            dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:  # the driver's own error: the connection is unusable, drop it
            conn.invalidate()
        raise SQLCacheError(
            f"durable invalidation: writing the outbox row failed ({problem}); the transaction was "
            "rolled back"
        ) from problem

    def _coarse_keys(self, st: TxnState) -> list[str]:
        """Table-wide keys covering everything ``st`` wrote (an outbox row of bounded size)."""
        p = self.config.prefix
        if st.everything:
            return [self._global_key]
        tables = set(st.tables) | set(st.bulk)
        for w in st.identities.values():
            tables.update(w.hierarchy.tables)
        out = []
        for name in sorted(tables):
            out += [_keys.bulk_dep_key(p, name), _keys.table_dep_key(p, name)]
        return out

    def outbox_early(self, st: TxnState, conn: Connection) -> None:
        """AUTOCOMMIT: a write is about to be committed by the statement itself, with no COMMIT to
        write the outbox row before; write a row with the statement's table-wide keys first."""
        st.outbox = self._outbox_write(st, conn, self._coarse_keys(st), [])

    def register(self, cls: type[Any], ttl: int | None = None, mode: Mode = "invalidate") -> None:
        """Serve ``session.get(cls, pk)`` and many-to-one lazy loads of ``cls`` (and subclasses) from Redis.

        :param ttl: seconds an entry lives; ``None`` uses the cache's ``default_ttl``.
        :param mode: ``"invalidate"`` drops entries a commit wrote; ``"repopulate"`` writes the committed
            state instead, when that is provably the newest (otherwise it invalidates).
        :raises ConfigurationError: if ``cls`` is not mapped, or a column type cannot round-trip.
        """
        mapper = self._mapper_of(cls)
        policy = ModelPolicy(ttl=ttl, mode=mode)
        check_supported(mapper)
        with self._mutex:
            self._policies[mapper] = policy
            self._policy_memo.clear()
            self._hierarchies.clear()
        self._wiring.watch_mapper(mapper)

    def invalidate(self, cls: type[Any], pk: Any) -> None:
        """Invalidate the entry of one row now (outside any transaction)."""
        h = self._hierarchy(self._mapper_of(cls))
        pk_t = pk if isinstance(pk, tuple) else (pk,)
        key = _keys.identity_dep_key(self.config.prefix, h.base_table, pk_t)
        self._invalidate_now([key], [(h.mapper.class_, pk_t)], [])

    def invalidate_model(self, cls: type[Any]) -> None:
        """Invalidate every entry of ``cls`` and of the tables of its inheritance hierarchy."""
        h = self._hierarchy(self._mapper_of(cls))
        p = self.config.prefix
        keys = [k for t in h.tables for k in (_keys.bulk_dep_key(p, t), _keys.table_dep_key(p, t))]
        self._invalidate_now(keys, [], [f"table:{t}" for t in h.tables])

    def clear(self) -> int:
        """Delete every key under this cache's prefix (SCAN, never KEYS); returns how many were deleted.

        A fill in flight when this runs is refused, since the generations it saw are gone.
        """
        with self._degrade("clear"):
            return self.store.delete_matching(_keys.scan_pattern(self.config.prefix))
        return 0

    def stats(self) -> dict[str, int]:
        """Counters since this cache was created (see ``sqlcache._stats.COUNTERS`` for each meaning)."""
        out = self._stats.snapshot()
        out["backoffs"] = self.store.backoffs
        out["skipped_backoff"] = self.store.skipped
        out["journal"] = len(self._journal)
        return out

    # -- registrations -------------------------------------------------------------------------------

    @staticmethod
    def _mapper_of(cls: type[Any]) -> Mapper[Any]:
        try:
            mapper = sa_inspect(cls)
        except NoInspectionAvailable:
            mapper = None
        if not isinstance(mapper, Mapper):
            raise ConfigurationError(f"{cls!r} is not a mapped class")
        return mapper

    def policy_for(self, mapper: Mapper[Any]) -> ModelPolicy | None:
        try:
            return self._policy_memo[mapper]
        except KeyError:
            pass
        found = None
        for m in mapper.iterate_to_root():
            found = self._policies.get(m)
            if found is not None:
                break
        self._policy_memo[mapper] = found
        return found

    def _hierarchy(self, mapper: Mapper[Any]) -> Hierarchy:
        h = self._hierarchies.get(mapper)
        if h is None:
            h = hierarchy_for(mapper)
            self._hierarchies[mapper] = h
        return h

    def _ttl_ms(self, policy: ModelPolicy) -> int:
        ttl = policy.ttl if policy.ttl is not None else self.config.default_ttl
        return (ttl or 0) * 1000

    # -- signed entries ---------------------------------------------------------------------------------

    def _seal(self, entry_key: str, payload: bytes) -> bytes:
        """With a secret: a keyed MAC over the entry's key and payload, in front of the payload."""
        if self._secret is None:
            return payload
        return self._mac(entry_key, payload) + payload

    def _unseal(self, entry_key: str, data: bytes) -> bytes:
        if self._secret is None:
            return data
        tag, payload = data[:_MAC_SIZE], data[_MAC_SIZE:]
        if len(tag) != _MAC_SIZE or not hmac.compare_digest(tag, self._mac(entry_key, payload)):
            raise CodecError("entry not signed with this cache's secret")
        return payload

    def _mac(self, entry_key: str, payload: bytes) -> bytes:
        assert self._secret is not None
        mac = hmac.new(self._secret, entry_key.encode(), hashlib.sha256)
        mac.update(b"\0")
        mac.update(payload)
        return mac.digest()[:_MAC_SIZE]

    # -- degradation and signals ---------------------------------------------------------------------

    @contextmanager
    def _degrade(self, operation: str) -> Iterator[None]:
        """The one place Redis and codec failures are absorbed: count, signal, let the caller go on."""
        try:
            yield
        except (CacheUnavailable, CodecError) as exc:
            self._report(exc, operation)

    def _report(self, exc: Exception, operation: str) -> None:
        """Count a failure; signal it, but an outage only once per burst (until Redis answers again)."""
        self._stats.incr("errors")
        log.debug("sqlcache %s failed: %s", operation, exc)
        if isinstance(exc, CacheUnavailable):
            seq = self.store.ok_seq
            if seq == self._reported_seq:
                return  # same burst: Redis has not answered since the last cache_error
            self._reported_seq = seq
        self._send(signals.cache_error, exc=exc, operation=operation)

    def _send(self, signal: NamedSignal, **kwargs: Any) -> None:
        """Call each receiver; one that raises is logged and counted, never undoes the caller's work."""
        for receiver in signal.receivers_for(self):
            try:
                receiver(self, **kwargs)
            except Exception:
                if self.strict_signals:
                    raise
                self._stats.incr("signal_errors")
                log.exception("sqlcache: receiver of %s raised", signal.name)

    # -- journal of invalidations Redis did not take -------------------------------------------------

    def _defer(self, keys: list[str]) -> None:
        self._schedule_replay()
        with self._mutex:
            if self._fence:
                self._stats.incr("invalidations_lost", len(keys))
                return
            self._journal.update(keys)
            self._stats.incr("invalidations_deferred", len(keys))
            if len(self._journal) > _JOURNAL_LIMIT:
                self._stats.incr("invalidations_lost", len(self._journal))
                self._journal.clear()
                self._fence = True

    def _schedule_replay(self) -> None:
        """Retry the journal in the background too, so an idle process does not leave other processes
        reading entries it could not invalidate once Redis is back."""
        with self._mutex:
            if self._replay_timer is not None:
                return
            timer = threading.Timer(self.config.backoff, self._replay_in_background)
            timer.daemon = True
            self._replay_timer = timer
        timer.start()

    def _replay_in_background(self) -> None:
        with self._mutex:
            self._replay_timer = None
        if (self._journal or self._fence) and not self.store.backing_off:
            self._replay()
        if self._journal or self._fence:
            self._schedule_replay()

    def _redis_restarted(self) -> None:
        # a restarted Redis may hold a snapshot older than invalidations it acknowledged: every entry
        # under the prefix is fenced (d:* moves) before this process reads Redis again
        with self._mutex:
            self._fence = True
        self._stats.incr("restarts")

    def _replay(self) -> bool:
        """Apply the journal before anything is read from Redis again; False if Redis is still away."""
        if not self._journal and not self._fence:
            return True
        with self._mutex:
            keys = sorted(self._journal)
            fence = self._fence
        if fence:
            keys = [self._global_key]
        try:
            self.store.release(
                self._clock_key, keys, "", self._gen_ttl_ms, announce=self._announce([], ["*"])
            )
        except CacheUnavailable as exc:
            self._report(exc, "replay")
            return False
        with self._mutex:
            if fence:  # the fence supersedes every journalled key
                self._journal.clear()
                self._fence = False
                self._stats.incr("fences")
            else:
                self._journal.difference_update(keys)
        self._stats.incr("invalidations_replayed", len(keys))
        for relay in list(self._relays.values()):
            relay.wake()  # Redis is back: the outbox rows left meanwhile need not wait for a back-off
        return True

    def _invalidate_now(
        self, keys: list[str], identities: list[tuple[type[Any], tuple[Any, ...]]], tags: list[str]
    ) -> None:
        try:
            self.store.release(
                self._clock_key, keys, "", self._gen_ttl_ms, announce=self._announce(identities, tags)
            )
            self._stats.incr("invalidations", len(keys))
        except CacheUnavailable as exc:
            self._report(exc, "invalidate")
            self._defer(keys)
        if signals.invalidated.receivers:
            self._send(signals.invalidated, identities=identities, tags=tags, remote=False)

    def _announce(
        self, identities: list[tuple[type[Any], tuple[Any, ...]]], tags: list[str]
    ) -> tuple[str, bytes] | None:
        """The pub/sub message a release publishes when ``broadcast`` is on (inside the same script)."""
        if not self.config.broadcast:
            return None
        try:
            body = [[class_id(sa_inspect(cls)), list(pk)] for cls, pk in identities]
            message = encode_body([self._node, body, tags])
        except CodecError:
            message = encode_body([self._node, [], [*tags, "*"]])
        return self._channel, message

    def listen(self) -> Listener:
        """Re-emit other processes' invalidations as ``signals.invalidated(remote=True)``.

        Starts a daemon thread subscribed to this prefix's channel (requires ``broadcast=True`` on the
        publishing caches) and returns it; ``listener.stop()`` ends it. A lost connection is reported as
        ``cache_error`` with ``operation="listen"`` (messages may have been missed) and re-established.
        """
        listener = Listener(self)
        listener.start()
        return listener

    def remote_identity(self, cid: str, pk: list[Any]) -> tuple[type[Any], tuple[Any, ...]] | None:
        """A (class, pk) from a broadcast message, if the class is one this cache knows."""
        for mapper in list(self._policies):
            for m in mapper.self_and_descendants:
                if class_id(m) == cid:
                    return m.class_, tuple(pk)
        return None

    # -- read path ---------------------------------------------------------------------------------

    def _read_through(
        self,
        orm_state: ORMExecuteState,
        kind: str,
        entry_key: str,
        deps: list[str],
        ttl_ms: int,
        on_hit: Callable[[bytes], Result[Any]],
        encode: Callable[[FrozenResult[Any], bool, int], bytes | None],
        protect: bool = False,
        swr_ms: int = 0,
    ) -> Result[Any] | None:
        """One read through the cache: a hit, or the database and a guarded fill. None: not handled.

        ``on_hit`` rebuilds the result from a payload (raising CodecError if it cannot); ``encode`` turns
        the database's result into a payload, or None when it must not be stored. ``protect``: callers
        that miss together elect one to query (a lock with a token) while the others wait a bounded time
        for its fill. ``swr_ms``: an entry past its TTL but not invalidated may be served that much
        longer while one caller refreshes it.
        """
        session = orm_state.session
        txns = self._wiring.session_txns(session)
        if not self._replay():
            return None
        try:  # _degrade("read") spelled out: this is the hit path
            r = self.store.read(self._clock_key, entry_key, deps)
        except (CacheUnavailable, CodecError) as exc:
            self._report(exc, "read")
            return None
        token = ""
        if r.hit and r.stale and protect:
            # expired but valid: one caller refreshes; the others keep getting the old entry meanwhile
            with self._degrade("lock"):
                candidate = uuid.uuid4().hex
                if self.store.try_fill_lock(entry_key, candidate, self._fill_lock_ms):
                    token = candidate
            if not token:
                served = self._serve(session, kind, entry_key, r, txns, on_hit)
                if served is not None:
                    self._stats.incr("stale_served")
                    return served
        elif r.hit:
            served = self._serve(session, kind, entry_key, r, txns, on_hit)
            if served is not None:
                return served
        if not r.hit:
            self._stats.incr("misses")
            if signals.cache_miss.receivers:
                self._send(signals.cache_miss, key=entry_key, kind=kind)
        if protect and not token and not r.hit:
            waited = self._await_fill(session, kind, entry_key, deps, txns, on_hit)
            if isinstance(waited, str):
                token = waited
            elif waited is not None:
                return waited
        try:
            if r.generations is None:
                # a dependency was missing, locked or unreadable: one more round trip, before the
                # SELECT, creates or repairs it (t0 snapshot here, t1 SELECT: a commit between the two
                # moves a generation)
                snap: ReadResult | None = None
                with self._degrade("read"):
                    snap = self.store.snapshot(self._clock_key, deps, self._gen_ttl_ms)
                r = snap if snap is not None else r
            if r.clock:
                self._wiring.note_clock(session, r.clock, txns)
            runid = new_runid()  # objects the statement builds get larger numbers (built_since)
            result = orm_state.invoke_statement()
            # set before anyone called unique(): the ORM's "unique() must be invoked" guard (a joined
            # eager load of a collection). Freezing would trip it on rows of several columns, and drops
            # it: lifted for the freeze, put back on what we return, and stored with the entry
            unique_guard = result._unique_filter_state
            result._unique_filter_state = None
            frozen = result.freeze()

            def answer() -> Result[Any]:
                out = frozen()
                if unique_guard is not None:
                    out._unique_filter_state = (set(), unique_guard[1])
                return out

            if r.locked or r.generations is None:
                # a writer holds a dependency between its lock and its release: whatever we just read
                # may already be outdated; do not store it
                self._stats.incr("fills_skipped")
                return answer()
            fresh_until = int(time.time() * 1000) + ttl_ms if swr_ms and ttl_ms else None
            entry_ttl = ttl_ms + swr_ms if ttl_ms else 0
            if self._fill(
                session,
                entry_key,
                deps,
                entry_ttl,
                r.generations,
                frozen,
                encode,
                fresh_until,
                token,
                unique_guard is not None,
                runid,
            ):
                token = ""  # fill.lua dropped the lock
            return answer()
        finally:
            if token:
                with self._degrade("unlock"):
                    self.store.unlock_fill(self._clock_key, entry_key, token)

    def _serve(
        self,
        session: Session,
        kind: str,
        entry_key: str,
        r: ReadResult,
        txns: list[TxnState],
        on_hit: Callable[[bytes], Result[Any]],
    ) -> Result[Any] | None:
        """Rebuild a hit; None (and the entry deleted) if its payload cannot be decoded."""
        assert r.payload is not None
        result: Result[Any] | None = None
        try:
            result = on_hit(self._unseal(entry_key, r.payload))
        except _Unservable:
            self._stats.incr("bypassed")
            return None
        except (CacheUnavailable, CodecError) as exc:  # _degrade("decode") spelled out
            self._report(exc, "decode")
        except Exception as exc:
            # anything else while rebuilding (a value nested past the interpreter's recursion limit, a
            # defect of ours): the entry is not served and goes; the database answers
            self._report(CodecError(f"cannot serve the entry: {exc!r}"), "decode")
        if result is None:
            with self._degrade("decode"):
                self.store.delete(entry_key)
            return None
        self._stats.incr("hits")
        if r.clock:
            # if no statement has run in this transaction yet, this clock reading precedes the snapshot
            # a repeatable-read transaction will take
            self._wiring.note_clock(session, r.clock, txns)
        if signals.cache_hit.receivers:
            self._send(signals.cache_hit, key=entry_key, kind=kind)
        return result

    def _await_fill(
        self,
        session: Session,
        kind: str,
        entry_key: str,
        deps: list[str],
        txns: list[TxnState],
        on_hit: Callable[[bytes], Result[Any]],
    ) -> Result[Any] | str | None:
        """Stampede protection: the lock's token if we are the one to query, the other's fill if it
        arrived in time, or None to query the database ourselves after the wait."""
        token = uuid.uuid4().hex
        acquired = False
        with self._degrade("lock"):
            acquired = self.store.try_fill_lock(entry_key, token, self._fill_lock_ms)
        if acquired:
            return token
        deadline = time.monotonic() + self.config.stampede_wait
        pause = 0.005
        while time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)
            r: ReadResult | None = None
            with self._degrade("read"):
                r = self.store.read(self._clock_key, entry_key, deps)
            if r is None:
                return None
            if r.hit:
                served = self._serve(session, kind, entry_key, r, txns, on_hit)
                if served is not None:
                    self._stats.incr("stampede_waits")
                    return served
            # the holder may have died: its lock expires, and the next caller takes over at once
            with self._degrade("lock"):
                if self.store.try_fill_lock(entry_key, token, self._fill_lock_ms):
                    return token
        self._stats.incr("stampede_timeouts")
        return None

    def _fill(
        self,
        session: Session,
        entry_key: str,
        deps: list[str],
        ttl_ms: int,
        generations: bytes,
        frozen: FrozenResult[Any],
        encode: Callable[[FrozenResult[Any], bool, int], bytes | None],
        fresh_until: int | None = None,
        token: str = "",
        unique_required: bool = False,
        runid: int = 0,
    ) -> bool:
        """Store a fill if it may be stored; True once Redis ran fill.lua (which drops our lock)."""
        bound: int | None = None
        for st, snapshot_fixed in self._wiring.session_txns_isolation(session):
            if snapshot_fixed:
                if st.clock0 is None:
                    # repeatable read / SQLite: the snapshot was fixed by a statement that ran before any
                    # clock reading, so a commit between the two could be invisible to us
                    self._stats.incr("fills_skipped")
                    return False
                bound = st.clock0 if bound is None else min(bound, st.clock0)
        payload: bytes | None = None
        with self._degrade("encode"):
            payload = encode(frozen, unique_required, runid)
        if payload is None:
            return False
        if len(payload) > self.config.max_entry_bytes:
            self._stats.incr("too_large")  # a huge result is not worth a Redis value: stays uncached
            return False
        payload = self._seal(entry_key, payload)
        ran = False
        with self._degrade("fill"):
            stored = self.store.fill(
                self._clock_key,
                entry_key,
                deps,
                payload,
                ttl_ms,
                generations,
                bound,
                self._gen_ttl_ms,
                fresh_until,
                token,
            )
            ran = True
            if stored == 1:
                self._stats.incr("fills")
            elif stored == 0:
                self._stats.incr("fills_refused")
            else:
                self._stats.incr("fills_skipped")
        return ran

    def note_bypass(self) -> None:
        self._stats.incr("bypassed")

    def _own_writes(
        self, session: Session, identity: str | None, bulk: Iterable[str], tables: Iterable[str]
    ) -> bool:
        """Whether this session's transaction wrote something the read depends on (it must not use Redis)."""
        for st in self._wiring.session_txns(session):
            if st.everything or (identity is not None and identity in st.identities):
                return True
            if any(t in st.bulk for t in bulk) or any(t in st.tables for t in tables):
                return True
        return False

    def read_identity(
        self,
        orm_state: ORMExecuteState,
        mapper: Mapper[Any],
        pk: tuple[Any, ...],
        policy: ModelPolicy,
        translation: str = "",
    ) -> Result[Any] | None:
        """Serve a primary-key load from Redis, or run it and fill; None lets SQLAlchemy run it as usual."""
        session = orm_state.session
        h = self._hierarchy(mapper)
        p = self.config.prefix
        dep_identity = _keys.identity_dep_key(p, h.base_table, pk)
        if self._own_writes(session, dep_identity, h.tables, ()):
            # this transaction wrote the row (or its table); the cache holds the committed state, which
            # is not what this transaction must see: read the database
            self._stats.incr("bypassed")
            return None
        entry_key = _keys.identity_entry_key(p, h.fingerprint + translation, h.entity, pk)
        deps = [dep_identity, *(_keys.bulk_dep_key(p, t) for t in h.tables), self._global_key]

        refresh = orm_state.load_options._refresh_state  # loading an expired object's attributes
        wanted = getattr(orm_state.statement._compile_options, "_only_load_props", None)
        if refresh is not None:
            obj = refresh.obj()
            if obj is None or any(p.key in obj.__dict__ for p in refresh.mapper.column_attrs):
                # only a whole reload (every column expired, as after a commit) may come from Redis: an
                # object holding some columns must not take others from a newer version of its row.
                # Decided before any Redis call: a deferred column's load costs no round trip here.
                self._stats.incr("bypassed")
                return None

        def on_hit(payload: bytes) -> Result[Any]:
            decoded = decode_entry(h, payload)
            if decoded is None:
                return self._wiring.one_row_result(mapper, None)
            shape, mask, values = decoded
            if refresh is not None:
                obj = refresh.obj()
                cached = {k for i, k in enumerate(shape.keys) if mask >> i & 1}
                # the columns asked for (relationships among them stay unloaded, lazy, as after a load)
                asked = wanted if wanted else refresh.expired_attributes
                needed = {k for k in asked if k in shape.keys}
                if obj is None or type(obj) is not shape.mapper.class_ or not needed <= cached:
                    raise _Unservable  # the database answers
            return self._wiring.one_row_result(mapper, _materialize(session, shape, mask, values))

        def encode(frozen: FrozenResult[Any], _unique_required: bool, runid: int) -> bytes | None:
            if refresh is not None:
                # a reload's object may hold columns loaded earlier, from an older row: never stored
                return None
            rows = frozen.data
            if not rows:
                # Absence is cached only for keys the database compares exactly: with a string key a
                # case-insensitive or PAD SPACE collation could match a row inserted under another
                # spelling, whose insert would invalidate that spelling's key, not this one.
                return encode_absent(h) if all(type(v) in _EXACT_KEY_TYPES for v in pk) else None
            obj = rows[0]
            if not hasattr(obj, "_sa_instance_state"):  # a Row, not a scalar-mode ORM result
                obj = obj[0]
            state = sa_inspect(obj)
            # the row found must carry exactly the key asked for (collations, Decimal('1.0') vs
            # Decimal('1.00')): writes invalidate the row's own key, so only that key may be filled
            if state.key is None or _keys.pk_token(state.key[1]) != _keys.pk_token(pk):
                return None
            if not built_since(state, runid):
                return None  # held by the session before: its values may be older than the row read
            return encode_instance(h, state)

        return self._read_through(
            orm_state, "identity", entry_key, deps, self._ttl_ms(policy), on_hit, encode
        )

    def read_query(
        self,
        orm_state: ORMExecuteState,
        qp: QueryPolicy,
        engine: Engine,
        translation: str = "",
        relationship: bool = False,
    ) -> Result[Any] | None:
        """Serve a ``cached()`` statement from Redis, or run it and fill; None: run it as usual."""
        stmt: Any = orm_state.statement
        opts = orm_state.load_options
        if (
            getattr(stmt, "_for_update_arg", None) is not None
            or opts._populate_existing
            or opts._yield_per
            or orm_state.execution_options.get("populate_existing")
            or orm_state.execution_options.get("yield_per")
            or orm_state.execution_options.get("stream_results")
            or (orm_state.is_relationship_load and not relationship)
            or orm_state.is_column_load
        ):
            self._stats.incr("bypassed")
            return None
        try:
            ck = stmt._generate_cache_key()
            if ck is None:
                raise Uncacheable("no cache key")
            spec_key, spec = self._query_spec(stmt, ck, engine)
            extra = orm_state.parameters
            if extra and not isinstance(extra, dict):
                raise Uncacheable("executemany")
            given: dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
            # by position, not by name: anonymous parameter names embed process-specific ids
            params: list[Any] = [given.pop(bp.key, bp.effective_value) for bp in ck.bindparams]
            params.append(sorted(given.items()))
            key = _keys.query_key(
                self.config.prefix, digest([spec.digest, params, list(qp.tags), translation])
            )
        except Uncacheable:
            self._stats.incr("bypassed")
            return None
        if spec.aliased and any(o.propagate_to_loaders for o in stmt._with_options):
            # loader options bound to an alias are matched against the statement SQLAlchemy compiled
            # first; a hit cannot line them up with this one's alias: the database answers
            self._stats.incr("bypassed")
            return None
        session = orm_state.session
        if self._own_writes(session, None, (), spec.tables):
            self._stats.incr("bypassed")
            return None
        p = self.config.prefix
        deps = [
            *(_keys.table_dep_key(p, t) for t in spec.tables),
            *(_keys.tag_dep_key(p, t) for t in qp.tags),
            self._global_key,
        ]
        columns = spec.columns

        def on_hit(payload: bytes) -> Result[Any]:
            d = self._decoded(key, payload, columns, spec.from_plain)
            options, tops = _load_context(stmt, spec)
            first_path = next((t for t in tops if t is not None), None)
            try:
                instances, new = materialize_objects(session, d.shapes, d.objects, options, first_path)
            except Exception as exc:  # validated above, so a bug or an exotic mapping: not a hit
                raise CodecError(f"cannot build the cached objects: {exc!r}") from exc
            touched: list[tuple[Any, str]] = []  # relationships set on objects the session already had
            try:
                for i, attr, ref in d.rels:
                    obj = instances[i]
                    # as an eager load does: new objects get the loaded relationship, existing ones only
                    # where theirs is not loaded yet
                    if new[i] or attr not in obj.__dict__:
                        if not new[i]:
                            touched.append((obj, attr))
                        set_committed_value(obj, attr, _resolve(instances, ref))
                if d.rels or not d.flat:
                    _fix_load_paths(tops, d.rows, d.flat, d.rels, instances, new)
                if d.marks:
                    apply_marks(instances, new, d.marks)
            except Exception as exc:
                for obj, attr in touched:
                    session.expire(obj, [attr])  # unloaded again, as before this hit
                discard_built(session, instances, new)
                raise CodecError(f"cannot build the cached objects: {exc!r}") from exc
            if d.flat:
                out = [(instances[i],) for i in d.rows]
            else:
                entity_at = [i for i, h in enumerate(columns) if h is not None]
                out = []
                for row in d.rows:
                    for i in entity_at:
                        if row[i] is not None:
                            row[i] = instances[row[i]]
                    out.append(tuple(row))
            legacy = bool(orm_state.load_options._legacy_uniquing)
            result: IteratorResult[Any] = IteratorResult(spec.metadata(d.keys, stmt, legacy), iter(out))
            if d.unique_required:
                result._unique_filter_state = (set(), _require_unique)
            return with_attributes(result, d.single, spec.any_entity)

        def encode(frozen: FrozenResult[Any], unique_required: bool, runid: int) -> bytes | None:
            single = bool((getattr(frozen, "_attributes", None) or {}).get("is_single_entity"))
            # _keys keeps the None of unnamed columns (an anonymous aliased(), with_polymorphic), which
            # .keys drops: the names must line up with the columns
            keys = list(getattr(frozen.metadata, "_keys", None) or frozen.metadata.keys)
            if len(keys) != len(columns):
                self._stats.incr("fills_skipped")
                return None
            try:
                payload, through = encode_rows(
                    columns, keys, single, frozen.data, self._hierarchy, unique_required, runid, spec.to_plain
                )
            except Unreproducible:
                # e.g. lazyload(User.orders.and_(...)): a hit could not give its objects that loader
                self._stats.incr("fills_skipped")
                return None
            if not through <= set(spec.tables):
                # eager loads read tables the statement itself does not name; the generations taken
                # before this SELECT did not cover them. Learn them for the next miss, store nothing now.
                tables = tuple(sorted(through | set(spec.tables)))
                self._query_memo[spec_key] = _QuerySpec(
                    spec.digest, tables, spec.columns, spec.aliased, spec.extras, spec.types
                )
                self._stats.incr("fills_skipped")
                return None
            return payload

        ttl = qp.ttl if qp.ttl is not None else self.config.default_ttl
        return self._read_through(
            orm_state,
            "query",
            key,
            deps,
            (ttl or 0) * 1000,
            on_hit,
            encode,
            protect=True,
            swr_ms=(qp.swr or 0) * 1000,
        )

    def _decoded(
        self,
        entry_key: str,
        payload: bytes,
        columns: tuple[Hierarchy | None, ...],
        from_plain: Sequence[Conv | None] = (),
    ) -> Decoded:
        """The decoded, validated result of a query entry: reused while Redis returns the very same bytes
        for the key (decoding is most of a large hit), decoded afresh otherwise. Never a source of data
        of its own: Redis answered with these bytes just now."""
        kept = self._decoded_lru
        if kept is None:
            return decode_rows(columns, payload, self._hierarchy, from_plain)
        with self._mutex:
            found = kept.get(entry_key)
            if found is not None and found[0] == payload and found[1] is columns:
                kept.move_to_end(entry_key)
                shared = found[2]
            else:
                shared = None
        if shared is not None:
            self._stats.incr("decodes_reused")
            return shared.fresh()
        d = decode_rows(columns, payload, self._hierarchy, from_plain).share()
        size = len(payload)
        if size * 8 <= self._decoded_max:  # one result may take at most an eighth of the budget
            with self._mutex:
                old = kept.pop(entry_key, None)
                if old is not None:
                    self._decoded_bytes -= len(old[0])
                kept[entry_key] = (payload, columns, d)
                self._decoded_bytes += size
                while self._decoded_bytes > self._decoded_max:
                    _, (p, _c, _d) = kept.popitem(last=False)
                    self._decoded_bytes -= len(p)
        return d.fresh()

    def _query_spec(self, stmt: Any, ck: Any, engine: Engine) -> tuple[Any, _QuerySpec]:
        memo_key = (ck.key, engine.dialect.name, engine.dialect.driver)
        spec = self._query_memo.get(memo_key)
        if spec is None:
            try:
                spec = self._new_query_spec(stmt, ck, engine)
            except (
                SQLAlchemyError,
                ConfigurationError,
                AttributeError,
                TypeError,
                NotImplementedError,
            ) as exc:
                # a statement sqlcache cannot describe (an unsupported column type, a textual or exotic
                # construct) is simply not cached: the database answers it as usual
                raise Uncacheable(str(exc)) from exc
            if len(self._query_memo) > 4096:
                self._query_memo.clear()
            self._query_memo[memo_key] = spec
        return memo_key, spec

    def _new_query_spec(self, stmt: Any, ck: Any, engine: Engine) -> _QuerySpec:
        """Tables, result columns and shape digest of a statement (computed once per shape)."""
        compiled = stmt.compile(dialect=engine.dialect)
        columns: list[Hierarchy | None] = []
        aliased = False
        for desc in stmt.column_descriptions:
            entity, expr = desc.get("entity"), desc.get("expr")
            if entity is not None and expr is entity:
                insp = sa_inspect(entity)
                mapper = insp if isinstance(insp, Mapper) else getattr(insp, "mapper", None)
                if not isinstance(mapper, Mapper):
                    raise Uncacheable("entity without a mapper")
                aliased = aliased or insp is not mapper
                check_supported(mapper)
                columns.append(self._hierarchy(mapper))
            else:
                columns.append(None)
        fps = [h.fingerprint if h is not None else None for h in columns]
        # the driver too: two drivers of one database may return other Python types for a column
        dialect = f"{engine.dialect.name}+{engine.dialect.driver}"
        shape_digest = digest([ROWS_LAYOUT, stable(ck.key), dialect, fps])
        extras = column_extras(stmt)
        if len(extras) != len(columns):
            raise Uncacheable("result columns do not match the column descriptions")
        types = tuple(
            None if h is not None else d.get("type")
            for h, d in zip(columns, stmt.column_descriptions, strict=True)
        )
        return _QuerySpec(shape_digest, tables_read(compiled, stmt), tuple(columns), aliased, extras, types)

    def invalidate_tags(self, *tags: str) -> None:
        """Invalidate every cached query tagged with any of ``tags``: one O(1) step per tag."""
        for t in tags:
            if not isinstance(t, str) or not t:
                raise ConfigurationError(f"tags must be non-empty strings, got {t!r}")
        keys = [_keys.tag_dep_key(self.config.prefix, t) for t in tags]
        self._invalidate_now(keys, [], list(tags))

    # -- write path ----------------------------------------------------------------------------------

    def record_identity(self, st: TxnState, mapper: Mapper[Any], state: Any, deleted: bool) -> None:
        h = self._hierarchy(mapper.base_mapper)
        obj = state.obj()
        pk = tuple(mapper.primary_key_from_instance(obj))
        key = _keys.identity_dep_key(self.config.prefix, h.base_table, pk)
        written = set(state.dict) if state.key is None else set(state.committed_state)
        previous = st.identities.get(key)
        if previous is not None:
            written |= previous.written
        st.identities[key] = IdentityWrite(h, pk, None if deleted else state, mapper.class_, obj, written)
        old = state.key
        if old is not None and tuple(old[1]) != pk:
            # the primary key itself changed: the row is gone from its old key too
            old_pk = tuple(old[1])
            old_key = _keys.identity_dep_key(self.config.prefix, h.base_table, old_pk)
            st.identities[old_key] = IdentityWrite(h, old_pk, None, mapper.class_)

    def cascades(self, table: Any, deleted: bool, updated: bool) -> set[Any]:
        k = (table, deleted, updated)
        out = self._cascades.get(k)
        if out is None:
            out = cascade_targets(table, deleted, updated)
            self._cascades[k] = out
        return out

    def precommit(self, st: TxnState, dbapi_key: int, conn: Connection | None = None) -> None:
        """Before the database COMMIT: lock every dependency the transaction wrote (one round trip);
        with ``durable``, write its outbox row on ``conn`` first."""
        p = self.config.prefix
        keys: list[str] = list(st.identities)
        tags: list[str] = []
        for name in st.tables:
            keys.append(_keys.table_dep_key(p, name))
            tags.append(f"table:{name}")
        for name in st.bulk:
            keys.append(_keys.bulk_dep_key(p, name))
        if st.everything:
            keys.append(self._global_key)
            tags.append("*")
        identities = [(w.cls, w.pk) for w in st.identities.values()]
        outbox: tuple[Relay, str] | None = None
        if self.config.durable and conn is not None:
            # before the lock: if the row cannot be written, the commit fails and nothing is locked
            outbox = st.outbox or self._outbox_write(st, conn, keys, tags)
        token = uuid.uuid4().hex
        # repopulate: entries whose new state we know; their other dependencies are watched, not locked
        repop: list[tuple[str, list[str], int, bytes]] = []
        watch: list[str] = []
        if not st.everything and not st.translated:
            for dep_key, w in st.identities.items():
                if w.state is None:
                    continue
                policy = self.policy_for(w.state.mapper)
                if policy is None or policy.mode != "repopulate":
                    continue
                if any(t in st.bulk for t in w.hierarchy.tables):
                    continue  # a statement changed rows of this table behind the unit of work's back
                dict_ = w.state.dict
                if any(type(dict_.get(k)) not in _STORED_AS_ASSIGNED for k in w.written if k in dict_):
                    # e.g. Decimal("3") comes back as Decimal("3.00"), a +05:00 datetime in UTC or without
                    # microseconds: only the database knows the stored value, so invalidate instead
                    continue
                h = self._hierarchy(w.state.mapper)
                payload: bytes | None = None
                with self._degrade("encode"):
                    payload = encode_instance(h, w.state)
                if payload is None:
                    continue
                others = [_keys.bulk_dep_key(p, t) for t in h.tables] + [self._global_key]
                entry_key = _keys.identity_entry_key(p, h.fingerprint, h.entity, w.pk)
                payload = self._seal(entry_key, payload)
                repop.append((entry_key, [dep_key, *others], self._ttl_ms(policy), payload))
                watch.extend(o for o in others if o not in watch)
        seen: list[str] = []
        sent: SentLock | None = None
        try:
            if repop:
                seen = self.store.lock(
                    self._clock_key, keys, watch, token, self.config.lock_ttl * 1000, self._gen_ttl_ms
                )
            else:
                sent = self.store.send_lock(
                    self._clock_key, keys, token, self.config.lock_ttl * 1000, self._gen_ttl_ms
                )
        except CacheUnavailable as exc:
            # the commit goes ahead; the release after it (or the journal) still invalidates
            self._report(exc, "lock")
            repop = []
        watched = dict(zip(watch, seen, strict=False))
        entries: list[RepopEntry] = []
        for entry_key, deps, ttl_ms, payload in repop:
            marks = tuple("=" if i == 0 else watched.get(d, "") for i, d in enumerate(deps))
            if all(marks):
                entries.append(RepopEntry(entry_key, tuple(deps), ttl_ms, payload, marks))
        self._pending[dbapi_key] = _PendingRelease(keys, token, entries, identities, tags, sent, outbox)

    def postcommit(self, dbapi_key: int, committed: bool) -> None:
        """After the database COMMIT: fresh generations, locks dropped, repopulated entries written."""
        pending = self._pending.pop(dbapi_key, None)
        if pending is None:
            return
        released = False
        if pending.sent is not None:
            try:
                announce = self._announce(pending.identities, pending.tags)
                if not self.store.release_after(
                    pending.sent, self._clock_key, pending.keys, pending.token, self._gen_ttl_ms, announce
                ):
                    self._stats.incr("errors")
                self._stats.incr("invalidations", len(pending.keys))
                released = True
            except CacheUnavailable as exc:
                self._report(exc, "release")
                self._defer(pending.keys)
            self._replay()
        elif not self._replay():
            self._defer(pending.keys)
        else:
            try:
                written = self.store.release(
                    self._clock_key,
                    pending.keys,
                    pending.token,
                    self._gen_ttl_ms,
                    pending.entries if committed else (),
                    announce=self._announce(pending.identities, pending.tags),
                )
                self._stats.incr("invalidations", len(pending.keys))
                self._stats.incr("repopulated", written)
                released = True
            except CacheUnavailable as exc:
                self._report(exc, "release")
                self._defer(pending.keys)
        if pending.outbox is not None and released:
            # applied: the row only needs deleting. Otherwise a relay applies it, even when the COMMIT
            # raised: a COMMIT that reached the server before the connection broke may have committed
            # (and a transaction that truly rolled back left no row to apply).
            pending.outbox[0].mark_done(pending.outbox[1])
        if signals.invalidated.receivers:
            self._send(signals.invalidated, identities=pending.identities, tags=pending.tags, remote=False)

    def dbapi_key(self, dbapi_connection: DBAPIConnection | Connection) -> int:
        return id(dbapi_connection)
