"""Identity reads: ``Session.get``, many-to-one lazy loads and reloads of expired objects, served from
one entry per (class, primary key)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData

from . import _keys, _sa, _sabuild
from ._hierarchy import Hierarchy, Shape
from ._objects import built_since, decode_entry, encode_absent, encode_instance, materialize
from ._readreq import Read, Unservable
from ._readthrough import ReadThrough
from ._registry import Registry
from ._transactions import Transactions
from .config import ModelPolicy
from .errors import CodecError

if TYPE_CHECKING:
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from ._keys import Layout

__all__ = ["IdentityReader", "entry_of", "exact_key", "identity_keys", "shared_deps"]


class IdentityReader:
    """Builds the :class:`~sqlcache._readthrough.Read` of a primary-key load and answers it."""

    def __init__(
        self,
        reads: ReadThrough,
        registry: Registry,
        txns: Transactions,
        layout: Layout,
        decode: Callable[[str, Hierarchy, bytes], tuple[Shape, int, list[Any]] | None] | None = None,
    ) -> None:
        self._reads = reads
        # an entry's payload decoded (reused while Redis returns the same bytes: DecodedCache.entry)
        self.decode = decode if decode is not None else lambda _key, h, payload: decode_entry(h, payload)
        self._registry = registry
        self._txns = txns
        self._layout = layout
        self._metas: dict[Mapper[Any], SimpleResultMetaData] = {}
        # per hierarchy, what every key of its reads shares (_KeyParts): built once, not per read
        self._parts: dict[Hierarchy, _KeyParts] = {}

    def read(
        self,
        orm_state: ORMExecuteState,
        mapper: Mapper[Any],
        pk: tuple[Any, ...],
        policy: ModelPolicy,
        translation: str = "",
    ) -> Result[Any] | None:
        """Serve a primary-key load from Redis, or run it and fill; None lets SQLAlchemy run it as usual."""
        session = orm_state.session
        h = self._registry.hierarchy(mapper)
        if h.unknown_reads:  # a column of SQL text: what its entries depend on is unknown
            self._reads.bypass("identity", mapper.class_.__name__)
            return None
        try:
            entry_key, deps, row_writes = self.keys(h, pk, translation)
        except CodecError:
            # a key value the codec cannot encode (a TypeDecorator's own Python type): not cached
            self._reads.bypass("identity", mapper.class_.__name__)
            return None
        if self._txns.wrote(session, deps[0], h.tables, h.reads):
            # this transaction wrote the row (or its table); the cache holds the committed state, which
            # is not what this transaction must see: read the database
            self._reads.bypass("identity", mapper.class_.__name__)
            return None
        if self._reads.seen.loading():  # a load nested in a query's miss (an immediateload)
            self._reads.seen.saw_tables((*h.tables, *h.reads))
        refresh, wanted = _sa.refresh_of(orm_state)  # loading an expired object's attributes
        if refresh is not None:
            obj = refresh.obj()
            if obj is None or any(p.key in obj.__dict__ for p in refresh.mapper.column_attrs):
                # only a whole reload (every column expired, as after a commit) may come from Redis: an
                # object holding some columns must not take others from a newer version of its row.
                # Decided before any Redis call: a deferred column's load costs no round trip here.
                self._reads.bypass("identity", mapper.class_.__name__)
                return None
        rd = Read(
            "identity",
            entry_key,
            deps,
            self._registry.ttl_ms(policy.ttl),
            lambda payload: self._on_hit(orm_state, mapper, h, refresh, wanted, payload, entry_key),
            lambda frozen, _unique, runid, _loaded: _encode(h, pk, refresh, frozen, runid),
            model=mapper.class_.__name__,
            row_writes=row_writes,
        )
        return self._reads.read(orm_state, rd)

    def keys(self, h: Hierarchy, pk: tuple[Any, ...], translation: str = "") -> tuple[str, list[str], str]:
        """(entry key, dependency keys, row-writes key) of the entry of ``pk`` in ``h`` (see
        :func:`identity_keys`); raises CodecError for a key value the codec cannot encode."""
        parts = self._parts.get(h)
        if parts is None:
            if len(self._parts) > 4096:
                self._parts.clear()
            parts = self._parts[h] = _KeyParts(self._layout, h)
        entry_start = parts.entry_starts.get(translation)
        if entry_start is None:
            entry_start = parts.entry_start(translation)
        token = _keys.pk_token(pk)
        return entry_start + token, [parts.dep_start + token, *parts.shared], parts.row_writes

    def _on_hit(
        self,
        orm_state: ORMExecuteState,
        mapper: Mapper[Any],
        h: Hierarchy,
        refresh: Any,
        wanted: Any,
        payload: bytes,
        entry_key: str,
    ) -> Result[Any]:
        decoded = self.decode(entry_key, h, payload)
        if decoded is None:
            return self._one_row(mapper, None)
        shape, mask, values = decoded
        if refresh is not None:
            obj = refresh.obj()
            cached = {k for i, k in enumerate(shape.keys) if mask >> i & 1}
            # the columns asked for (relationships among them stay unloaded, lazy, as after a load)
            asked = wanted if wanted else refresh.expired_attributes
            needed = {k for k in asked if k in shape.keys}
            if obj is None or type(obj) is not shape.mapper.class_ or not needed <= cached:
                raise Unservable  # the database answers
        return self._one_row(mapper, materialize(orm_state.session, shape, mask, values))

    def _one_row(self, mapper: Mapper[Any], obj: Any) -> Result[Any]:
        meta = self._metas.get(mapper)
        if meta is None:
            meta = self._metas[mapper] = _sabuild.result_metadata([mapper.class_.__name__], lambda: [id])
        return IteratorResult(meta, iter(() if obj is None else ((obj,),)))


class _KeyParts:
    """What every identity key of one hierarchy shares: each key of a read is one of these starts and
    the primary key's token (the same strings :func:`identity_keys` builds, by construction: its key
    functions called with an empty key), or a dependency shared by every entry (:func:`shared_deps`)."""

    __slots__ = ("_h", "_prefix", "dep_start", "entry_starts", "row_writes", "shared")

    def __init__(self, layout: Layout, h: Hierarchy) -> None:
        self._h = h
        self._prefix = layout.at(h.base_table)
        self.shared, self.row_writes = shared_deps(layout, h)
        self.dep_start = _keys.identity_dep_key(self._prefix, h.base_table, ())
        self.entry_starts: dict[str, str] = {}

    def entry_start(self, translation: str) -> str:
        if len(self.entry_starts) > 64:
            self.entry_starts.clear()
        h = self._h
        start = self.entry_starts[translation] = _keys.identity_entry_key(
            self._prefix, h.fingerprint + translation, h.entity, ()
        )
        return start


def shared_deps(layout: Layout, h: Hierarchy) -> tuple[tuple[str, ...], str]:
    """The dependencies every identity entry of ``h`` has besides its row (its tables' bulk keys and
    the key of every entry of each shard involved), and its base table's row-writes key."""
    at = layout.at
    bulk = [_keys.bulk_dep_key(at(t), t) for t in h.tables]
    bulk += [_keys.table_dep_key(at(t), t) for t in h.reads]  # any write of a table a column reads
    base = at(h.base_table)
    everything = layout.everything_of([_keys.row_writes_key(base, h.base_table), *bulk])
    return (*bulk, *everything), _keys.row_writes_key(base, h.base_table)


def identity_keys(
    layout: Layout,
    h: Hierarchy,
    pk: tuple[Any, ...],
    translation: str = "",
) -> tuple[str, list[str]]:
    """(entry key, dependency keys) of the entry of ``pk`` in ``h``; the row's own dependency first.
    Raises CodecError for a key value the codec cannot encode. (The identity reader builds the same
    strings from starts it keeps: ``_KeyParts``.)"""
    prefix = layout.at(h.base_table)
    dep_identity = _keys.identity_dep_key(prefix, h.base_table, pk)
    entry_key = _keys.identity_entry_key(prefix, h.fingerprint + translation, h.entity, pk)
    deps_of_all = shared_deps(layout, h)[0]
    return entry_key, [dep_identity, *deps_of_all]


def _encode(
    h: Hierarchy, pk: tuple[Any, ...], refresh: Any, frozen: FrozenResult[Any], runid: int
) -> bytes | None:
    """The entry of what a primary-key load returned; None when it must not be stored."""
    if refresh is not None:
        # a reload's object may hold columns loaded earlier, from an older row: never stored
        return None
    rows = frozen.data
    if not rows:
        return entry_of(h, pk, None, runid)
    obj = rows[0]
    if not _sabuild.is_instance(obj):  # a Row, not a scalar-mode ORM result
        obj = obj[0]
    return entry_of(h, pk, obj, runid)


def exact_key(h: Hierarchy, pk: tuple[Any, ...]) -> bool:
    """Whether the database compares every value of ``pk`` exactly: an int for an integer column, a
    UUID for a native UUID column (``Hierarchy.exact_pk``). No other spelling of the key then finds the
    same row (an int for a string or numeric column may: SQLite's affinity, MySQL's conversions)."""
    exact = h.exact_pk
    return len(exact) == len(pk) and all(
        t is not None and type(v) is t for t, v in zip(exact, pk, strict=True)
    )


def entry_of(h: Hierarchy, pk: tuple[Any, ...], obj: Any, runid: int) -> bytes | None:
    """The entry of ``pk`` for the object a load of it built (None: no row), or None when it must not
    be stored. ``runid``: taken just before the load (:func:`~sqlcache._objects.built_since`)."""
    if obj is None:
        # Absence is cached only for keys the database compares exactly: with a string key a
        # case-insensitive or PAD SPACE collation could match a row inserted under another spelling,
        # whose insert would invalidate that spelling's key, not this one.
        return encode_absent(h) if exact_key(h, pk) else None
    state = sa_inspect(obj)
    # the row found must carry exactly the key asked for (collations, Decimal('1.0') vs Decimal('1.00')):
    # writes invalidate the row's own key, so only that key may be filled
    if state.key is None or _keys.pk_token(state.key[1]) != _keys.pk_token(pk):
        return None
    if not built_since(state, runid):
        return None  # held by the session before: its values may be older than the row read
    return encode_instance(h, state)
