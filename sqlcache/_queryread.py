"""Query reads: a ``cached()`` statement (or a lazy load of a registered collection) keyed by its
shape and parameters, answered from one entry, its rows rebuilt into the session as a load would."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm.attributes import set_committed_value

from . import _keys, _sa, _sabuild
from ._fkactions import metadata_in
from ._hierarchy import Conv, Hierarchy, Shape
from ._loadreads import UNKNOWN_TABLES
from ._objects import apply_marks, decode_entry, discard_built, materialize_objects
from ._querykey import Uncacheable, digest
from ._queryspec import QuerySpec, describe, refuse_rows_before_unique
from ._readreq import Read
from ._readthrough import ReadThrough
from ._registry import Registry
from ._report import Reporter
from ._rows import (
    Decoded,
    Unreproducible,
    copy_mutable,
    decode_rows,
    encode_rows,
    is_mutable,
    pack_exactly,
    unpack_copy,
)
from ._transactions import Transactions
from .errors import CodecError, ConfigurationError
from .options import QueryPolicy

if TYPE_CHECKING:
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import ORMExecuteState

    from ._keys import Layout

__all__ = ["DecodedCache", "QueryReader"]

# what describing an unusual statement may raise; such a statement is simply not cached
_UNDESCRIBABLE = (SQLAlchemyError, ConfigurationError, AttributeError, TypeError, NotImplementedError)


class QueryReader:
    """Builds the :class:`~sqlcache._readthrough.Read` of a cached statement and answers it."""

    def __init__(
        self,
        reads: ReadThrough,
        registry: Registry,
        txns: Transactions,
        reporter: Reporter,
        layout: Layout,
        default_ttl: int | None,
        decoded: DecodedCache,
    ) -> None:
        self._reads = reads
        self._registry = registry
        self._txns = txns
        self._rep = reporter
        self._layout = layout
        self._default_ttl = default_ttl
        self._decoded = decoded
        self._specs: dict[Any, QuerySpec] = {}

    def read(
        self,
        orm_state: ORMExecuteState,
        qp: QueryPolicy,
        engine: Engine,
        translation: str = "",
        relationship: bool = False,
    ) -> Result[Any] | None:
        """Serve a ``cached()`` statement from Redis, or run it and fill; None: run it as usual."""
        stmt: Any = orm_state.statement
        xo = orm_state.execution_options
        if (
            _sa.bypasses_query_cache(orm_state)
            or xo.get("populate_existing")
            or xo.get("yield_per")
            or xo.get("stream_results")
            or (orm_state.is_relationship_load and not relationship)
            or orm_state.is_column_load
        ):
            self._reads.bypass("query", None, qp.tags)
            return None
        try:
            spec_key, spec, key = self._key(orm_state, stmt, qp, engine, translation)
        except Uncacheable:
            self._reads.bypass("query", None, qp.tags)
            return None
        if spec.aliased and any(o.propagate_to_loaders for o in _sa.statement_options(stmt)):
            # loader options bound to an alias are matched against the statement SQLAlchemy compiled
            # first; a hit cannot line them up with this one's alias: the database answers
            self._reads.bypass("query", spec.model, qp.tags)
            return None
        if self._txns.wrote(orm_state.session, None, (), spec.tables):
            self._reads.bypass("query", spec.model, qp.tags)
            return None
        self._reads.seen.saw_tables(spec.tables)  # an eager load nested in another query's miss
        at = self._layout.at
        deps = [
            *(_keys.table_dep_key(at(t), t) for t in spec.tables),
            *(_keys.tag_dep_key(at(t), t) for t in qp.tags),
        ]
        deps += self._layout.everything_of([key, *deps])
        ttl = qp.ttl if qp.ttl is not None else self._default_ttl
        rd = Read(
            "query",
            key,
            deps,
            (ttl or 0) * 1000,
            lambda payload: self._on_hit(orm_state, stmt, spec, key, payload),
            lambda frozen, unique_required, runid, loaded: self._encode(
                spec_key, spec, frozen, unique_required, runid, loaded
            ),
            protect=True,
            swr_ms=(qp.swr or 0) * 1000,
            model=spec.model,
            tags=qp.tags,
        )
        return self._reads.read(orm_state, rd)

    def _key(
        self, orm_state: ORMExecuteState, stmt: Any, qp: QueryPolicy, engine: Engine, translation: str
    ) -> tuple[Any, QuerySpec, str]:
        """(memo key of the shape, its spec, the entry key); Uncacheable if it cannot be keyed."""
        ck = _sa.cache_key(stmt)
        if ck is None:
            raise Uncacheable("no cache key")
        spec_key, spec = self._spec(stmt, ck, engine)
        extra = orm_state.parameters
        if extra and not isinstance(extra, dict):
            raise Uncacheable("executemany")
        given: dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
        # by position, not by name: anonymous parameter names embed process-specific ids
        try:
            params: list[Any] = [given.pop(bp.key, bp.effective_value) for bp in ck.bindparams]
        except SQLAlchemyError as exc:
            # a parameter computed from an object's state (a relationship compared to a detached or
            # transient object) that cannot be computed now: SQLAlchemy runs the statement and raises
            # its own error the way it would without the cache
            raise Uncacheable(f"a parameter's value: {exc!r}") from exc
        params.append(sorted(given.items()))
        # an entry lives in the shard of its first table (of its first tag if it reads none)
        first = spec.tables[0] if spec.tables else qp.tags[0] if qp.tags else ""
        entry_prefix = self._layout.at(first) if first else self._layout.base
        key = _keys.query_key(entry_prefix, digest([spec.digest, params, list(qp.tags), translation]))
        return spec_key, spec, key

    def _spec(self, stmt: Any, ck: Any, engine: Engine) -> tuple[Any, QuerySpec]:
        memo_key = (ck.key, engine.dialect.name, engine.dialect.driver)
        spec = self._specs.get(memo_key)
        if spec is None:
            try:
                spec = describe(stmt, ck, engine, self._registry.hierarchy)
            except _UNDESCRIBABLE as exc:
                # a statement sqlcache cannot describe (an unsupported column type, a textual or exotic
                # construct) is simply not cached: the database answers it as usual
                raise Uncacheable(str(exc)) from exc
            # a write to a table this shape reads may reach it through FK actions declared beside it
            self._registry.fk_actions.learn(metadata_in(stmt))
            if len(self._specs) > 4096:
                self._specs.clear()
            self._specs[memo_key] = spec
        return memo_key, spec

    def _on_hit(
        self, orm_state: ORMExecuteState, stmt: Any, spec: QuerySpec, key: str, payload: bytes
    ) -> Result[Any]:
        """The result a hit answers with: objects in the session as a database load leaves them."""
        session = orm_state.session
        columns = spec.columns
        d = self._decoded.get(key, payload, columns, spec.from_plain)
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
        legacy = _sa.legacy_uniquing(orm_state)
        result: IteratorResult[Any] = IteratorResult(spec.metadata(d.keys, stmt, legacy), iter(out))
        if d.unique_required:
            _sabuild.require_unique(result, refuse_rows_before_unique)
        return _sabuild.with_attributes(result, d.single, spec.any_entity)

    def _encode(
        self,
        spec_key: Any,
        spec: QuerySpec,
        frozen: FrozenResult[Any],
        unique_required: bool,
        runid: int,
        loaded: set[str],
    ) -> bytes | None:
        """The entry of what the database returned; None when it must not be stored."""
        columns = spec.columns
        single = _sabuild.frozen_single_entity(frozen)
        # None for unnamed columns (an anonymous aliased(), with_polymorphic): the names must line up
        # with the columns
        keys = _sabuild.frozen_keys(frozen)
        if len(keys) != len(columns):
            self._rep.incr("fills_skipped")
            return None
        try:
            payload, through = encode_rows(
                columns,
                keys,
                single,
                frozen.data,
                self._registry.hierarchy,
                unique_required,
                runid,
                spec.to_plain,
            )
        except Unreproducible:
            # e.g. lazyload(User.orders.and_(...)): a hit could not give its objects that loader
            self._rep.incr("fills_skipped")
            return None
        if UNKNOWN_TABLES in loaded:
            # the load ran SQL text (a listener's, a loader's): what it read is unknown
            self._rep.incr("fills_skipped")
            return None
        through |= loaded
        if not through <= set(spec.tables):
            # eager loads (and subclass loads, loader criteria, a relationship's join) read tables the
            # statement itself does not name; the generations taken before this SELECT did not cover
            # them. Learn them for the next miss, store nothing now.
            tables = tuple(sorted(through | set(spec.tables)))
            self._specs[spec_key] = QuerySpec(
                spec.digest, tables, spec.columns, spec.aliased, spec.extras, spec.types
            )
            self._rep.incr("fills_skipped")
            return None
        return payload


class DecodedCache:
    """Decoded query results by entry key, reused while Redis returns the very same bytes for the key
    (decoding is most of a large hit). Never a source of data of its own: Redis answered with these
    bytes just now. Bounded in bytes of payload (LRU); ``max_bytes`` 0 turns it off."""

    def __init__(self, max_bytes: int, hierarchy: Any, reporter: Reporter) -> None:
        self._max = max_bytes
        self._hierarchy = hierarchy
        self._rep = reporter
        self._bytes = 0
        self._mutex = threading.Lock()
        self._lru: OrderedDict[str, tuple[bytes, Any, Any]] | None = OrderedDict() if max_bytes > 0 else None

    def after_fork(self) -> None:
        self._mutex = threading.Lock()

    def get(
        self,
        entry_key: str,
        payload: bytes,
        columns: tuple[Hierarchy | None, ...],
        from_plain: Sequence[Conv | None] = (),
    ) -> Decoded:
        """The decoded, validated result of ``payload`` (fresh mutable values every time)."""
        if self._lru is None or not self._keeps(payload):
            return decode_rows(columns, payload, self._hierarchy, from_plain)
        shared = self._found(entry_key, payload, columns)
        if shared is None:
            shared = decode_rows(columns, payload, self._hierarchy, from_plain).share()
            self._keep(entry_key, payload, columns, shared)
        return cast(Decoded, shared).fresh()

    def entry(self, entry_key: str, h: Hierarchy, payload: bytes) -> tuple[Shape, int, list[Any]] | None:
        """:func:`~sqlcache._objects.decode_entry` of an identity entry, reused like a query's while
        Redis returns the very same bytes for the key: the values list is the caller's own, and so is
        every mutable value in it (JSON dicts and lists, ARRAY lists, sets are copied)."""
        if self._lru is None or not self._keeps(payload):
            return decode_entry(h, payload)  # fresh values of its own
        shared = self._found(entry_key, payload, h)
        if shared is None:
            decoded = decode_entry(h, payload)  # CodecError: nothing kept
            if decoded is None:
                return None
            shape, mask, values = decoded
            mutable = tuple(i for i, v in enumerate(values) if is_mutable(v))
            blob = pack_exactly([values[i] for i in mutable]) if mutable else None
            shared = (shape, mask, values, mutable, blob)
            self._keep(entry_key, payload, h, shared)
        shape, mask, values, mutable, blob = shared
        fresh = list(values)
        if blob is not None:  # one C-speed unpack copies them all (see Decoded.share)
            for i, copy in zip(mutable, unpack_copy(blob)):  # noqa: B905
                fresh[i] = copy
        else:
            for i in mutable:
                fresh[i] = copy_mutable(fresh[i])
        return shape, mask, fresh

    def _found(self, entry_key: str, payload: bytes, decoder: Any) -> Any:
        """What was kept for ``entry_key`` if it was decoded from these very bytes by ``decoder`` (a
        query's columns, an identity entry's hierarchy), else None."""
        kept = self._lru
        assert kept is not None
        with self._mutex:
            found = kept.get(entry_key)
            if found is None or found[0] != payload or found[1] is not decoder:
                return None
            kept.move_to_end(entry_key)
        self._rep.incr("decodes_reused")
        return found[2]

    def _keeps(self, payload: bytes) -> bool:
        """Whether a result decoded from ``payload`` may be kept: at most an eighth of the budget (a
        larger one is decoded each time, with nothing to prepare for sharing)."""
        return len(payload) * 8 <= self._max

    def _keep(self, entry_key: str, payload: bytes, decoder: Any, shared: Any) -> None:
        size = len(payload)
        kept = self._lru
        if kept is None or not self._keeps(payload):
            return
        with self._mutex:
            old = kept.pop(entry_key, None)
            if old is not None:
                self._bytes -= len(old[0])
            kept[entry_key] = (payload, decoder, shared)
            self._bytes += size
            while self._bytes > self._max:
                _, (p, _c, _d) = kept.popitem(last=False)
                self._bytes -= len(p)


def _resolve(instances: list[Any], ref: Any) -> Any:
    if ref is None:
        return None
    if type(ref) is list:
        return [instances[i] for i in ref]
    return instances[ref]


def _load_context(stmt: Any, spec: QuerySpec) -> tuple[tuple[Any, ...], list[Any]]:
    """(the statement's propagating loader options, the load path of each entity column): what a
    database load leaves on the objects of each column (``state.load_options`` / ``load_path``)."""
    with_options = _sa.statement_options(stmt)
    options = tuple(o for o in with_options if o.propagate_to_loaders) if with_options else ()
    current = _sa.current_path(stmt)  # set on lazy loads' statements
    if spec.aliased:  # the path of an aliased() entity is the alias's own, taken from this very statement
        entities: list[Any] = [
            _sa.path_registry(sa_inspect(d["entity"])) if h is not None else None
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
