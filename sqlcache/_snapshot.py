"""Pure-ish: ORM instances <-> plain, msgpack-able structures; the schema fingerprint of a mapper.

This module owns every use of private SQLAlchemy API (``InstanceState`` internals and the identity
map's ``_add_unpresent``), each wrapped in one function with the reason beside it;
tests/integration/test_sqlalchemy_internals.py fails loudly if an upgrade moves them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from sqlalchemy import types as sqltypes
from sqlalchemy.orm import ColumnProperty, Mapper
from sqlalchemy.orm import loading as _loading
from sqlalchemy.orm import strategies as _strategies
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from ._codec import decode, encode
from .errors import CodecError, ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.orm import InstanceState, Session

__all__ = [
    "Hierarchy",
    "Shape",
    "check_supported",
    "decode_entry",
    "encode_absent",
    "encode_instance",
    "fingerprint",
    "hierarchy_for",
    "materialize",
    "materialize_objects",
]

Conv = Callable[[Any], Any]

# Generic types whose ORM values the codec round-trips exactly. Dialect types subclass these.
_SUPPORTED: tuple[type[sqltypes.TypeEngine[Any]], ...] = (
    sqltypes.Integer,
    sqltypes.Numeric,
    sqltypes.Float,  # a Numeric in 2.0, not in 2.1
    sqltypes.String,  # Text, Unicode, UnicodeText, and dialect strings
    sqltypes.Boolean,
    sqltypes.Date,
    sqltypes.DateTime,
    sqltypes.Time,
    sqltypes.Interval,
    sqltypes.Uuid,
    sqltypes.Enum,
    sqltypes.JSON,
    sqltypes._Binary,  # LargeBinary, BINARY, VARBINARY, BLOB
    sqltypes.ARRAY,
)


def _dialect_extras() -> tuple[type[sqltypes.TypeEngine[Any]], ...]:
    extra: list[type[sqltypes.TypeEngine[Any]]] = []
    try:
        from sqlalchemy.dialects import postgresql as pg

        extra += [pg.INET, pg.CIDR, pg.HSTORE, pg.MACADDR, pg.BIT, pg.TSVECTOR, pg.MONEY, pg.OID]
    except ImportError:  # pragma: no cover - ships with SQLAlchemy
        pass
    try:
        from sqlalchemy.dialects import mysql

        extra += [mysql.YEAR, mysql.BIT, mysql.SET]
    except ImportError:  # pragma: no cover
        pass
    return tuple(extra)


_SUPPORTED_EXTRA = _dialect_extras()


def _type_problem(type_: sqltypes.TypeEngine[Any]) -> str | None:
    if isinstance(type_, sqltypes.TypeDecorator):
        # The decorator's own Python values are checked exactly at encode time (an unexpected type is
        # an encode error, never a wrong value), so accept it when its storage type is supported.
        return _type_problem(type_.impl_instance)
    if isinstance(type_, sqltypes.ARRAY):
        item = type_.item_type
        if isinstance(item, sqltypes.Enum) and item.enum_class is not None:
            return "ARRAY of a Python enum"
        return _type_problem(item)
    if isinstance(type_, _SUPPORTED) or isinstance(type_, _SUPPORTED_EXTRA):
        return None
    return f"type {type_!r} is not one sqlcache can round-trip"


def check_supported(mapper: Mapper[Any]) -> None:
    """Raise ConfigurationError naming the first column whose type the codec cannot round-trip."""
    for m in mapper.base_mapper.self_and_descendants:
        for prop in m.column_attrs:
            for col in prop.columns:
                problem = _type_problem(col.type)
                if problem:
                    raise ConfigurationError(
                        f"{m.class_.__name__}.{prop.key} cannot be cached: {problem}; "
                        f"leave {m.class_.__name__} unregistered or change the column type"
                    )


def table_name(table: Any) -> str:
    """Schema-qualified name of a table (or the name of another selectable), as used in keys."""
    if table is None:
        return ""
    return str(getattr(table, "fullname", None) or getattr(table, "name", None) or table)


def _converters(col: Any) -> tuple[Conv | None, Conv | None]:
    """ORM value <-> codec value for one column, where they differ (Python enums, MySQL SET)."""
    return type_converters(col.type, col)


def type_converters(type_: Any, col: Any) -> tuple[Conv | None, Conv | None]:
    """Python value <-> codec value for values of the SQL type ``type_`` (``col`` names it in errors):
    a Python enum member is stored as its name."""
    if isinstance(type_, sqltypes.TypeDecorator):
        return None, None
    if isinstance(type_, sqltypes.Enum) and type_.enum_class is not None:
        cls: type[enum.Enum] = type_.enum_class

        def to_plain(v: Any) -> Any:
            if v is None:
                return None
            if type(v) is not cls:
                raise CodecError(f"{col} holds {v!r}, not a member of {cls.__name__}")
            return v.name

        def from_plain(v: Any) -> Any:
            if v is None:
                return None
            try:
                return cls[v]
            except (KeyError, TypeError) as exc:
                raise CodecError(f"{v!r} is not a member of {cls.__name__}") from exc

        return to_plain, from_plain
    return None, None


def _describe_type(type_: sqltypes.TypeEngine[Any]) -> str:
    text = repr(type_)
    if isinstance(type_, sqltypes.Enum) and type_.enum_class is not None:
        text += repr([m.name for m in type_.enum_class])
    return f"{type(type_).__module__}.{type(type_).__qualname__}:{text}"


def class_id(mapper: Mapper[Any]) -> str:
    cls = mapper.class_
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint(mapper: Mapper[Any]) -> str:
    """Hash of every mapped column, type and class of the hierarchy: an older definition never matches."""
    h = blake2b(digest_size=8)
    for m in sorted(mapper.base_mapper.self_and_descendants, key=class_id):
        h.update(f"class {class_id(m)} {m.polymorphic_identity!r}\n".encode())
        for prop in sorted(m.column_attrs, key=lambda p: p.key):
            cols = ",".join(f"{table_name(getattr(c, 'table', None))}.{c.name}" for c in prop.columns)
            h.update(f"  {prop.key} {cols} {_describe_type(prop.columns[0].type)} {prop.deferred}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Shape:
    """The column attributes of one concrete mapper, in a fixed order, with their converters."""

    mapper: Mapper[Any]
    class_id: str
    keys: tuple[str, ...]
    deferred: tuple[bool, ...]
    to_plain: tuple[Conv | None, ...]
    from_plain: tuple[Conv | None, ...]
    full_mask: int  # every column attribute loaded
    pk_positions: tuple[int, ...]  # where the primary key columns sit in ``keys``
    identity_class: type[Any]  # first item of this mapper's identity keys
    converted: tuple[int, ...]  # positions whose values need a converter
    pk_mask: int  # bits of the primary key columns: a partial load must include them

    def identity_key(self, mask: int, values: list[Any]) -> tuple[Any, ...]:
        """The identity key of a decoded row (values compact by mask)."""
        if mask == self.full_mask:
            pk = tuple(values[i] for i in self.pk_positions)
        else:
            loaded = {}
            it = iter(values)
            for i in range(len(self.keys)):
                if mask >> i & 1:
                    loaded[i] = next(it)
            pk = tuple(loaded[i] for i in self.pk_positions)
        return (self.identity_class, pk, None)


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """Everything needed to store and rebuild entries of one requested mapper."""

    mapper: Mapper[Any]
    fingerprint: str
    entity: str
    base_table: str
    tables: tuple[str, ...]  # every table of every mapper in the inheritance hierarchy
    shapes: dict[str, Shape]  # class id -> shape, for the mapper and its subclasses


def _shape(mapper: Mapper[Any]) -> Shape:
    props: Sequence[ColumnProperty[Any]] = list(mapper.column_attrs)
    convs = [_converters(p.columns[0]) for p in props]
    keys = tuple(p.key for p in props)
    pk_keys = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
    return Shape(
        mapper=mapper,
        class_id=class_id(mapper),
        keys=keys,
        deferred=tuple(bool(p.deferred) for p in props),
        to_plain=tuple(c[0] for c in convs),
        from_plain=tuple(c[1] for c in convs),
        full_mask=(1 << len(props)) - 1,
        pk_positions=tuple(keys.index(k) for k in pk_keys),
        identity_class=mapper.identity_key_from_primary_key(tuple([None] * len(pk_keys)))[0],
        converted=tuple(i for i, c in enumerate(convs) if c[1] is not None),
        pk_mask=sum(1 << keys.index(k) for k in pk_keys),
    )


def hierarchy_for(mapper: Mapper[Any]) -> Hierarchy:
    base = mapper.base_mapper
    tables: list[str] = []
    for m in base.self_and_descendants:
        for t in m.tables:
            if table_name(t) not in tables:
                tables.append(table_name(t))
    return Hierarchy(
        mapper=mapper,
        fingerprint=fingerprint(mapper),
        entity=class_id(mapper),
        base_table=table_name(base.local_table),
        tables=tuple(sorted(tables)),
        shapes={class_id(m): _shape(m) for m in mapper.self_and_descendants},
    )


# -- entries --------------------------------------------------------------------------------------
# payload = encode([fingerprint, class id or None (absent), loaded mask, [values of loaded attributes]])


def encode_instance(h: Hierarchy, state: InstanceState[Any]) -> bytes | None:
    """Payload for a persistent instance as the database returned it; None if it cannot be cached."""
    cid = class_id(state.mapper)
    shape = h.shapes.get(cid)
    if shape is None or state.modified or state.expired:
        return None
    mask, values = plain_values(shape, state.dict)
    return encode([h.fingerprint, cid, mask, values])


def plain_values(shape: Shape, dict_: dict[str, Any]) -> tuple[int, list[Any]]:
    """(loaded mask, codec-ready values of the loaded column attributes) of an instance's dict."""
    mask = 0
    values: list[Any] = []
    for i, key in enumerate(shape.keys):
        if key in dict_:
            v = dict_[key]
            conv = shape.to_plain[i]
            if conv is not None:
                v = conv(v)
            elif type(v) not in _PLAIN_CONTAINERS and isinstance(v, (dict, list, set)):
                v = _plain_container(v)
            values.append(v)
            mask |= 1 << i
    return mask, values


_PLAIN_CONTAINERS = (dict, list, set)


def _plain_container(v: Any) -> Any:
    """sqlalchemy.ext.mutable's MutableDict / MutableList / MutableSet (subclasses the codec refuses)
    as the plain containers they wrap; the ``load`` / ``refresh`` events coerce them back on a hit."""
    if isinstance(v, dict):
        return {k: _plain_container(x) if isinstance(x, (dict, list, set)) else x for k, x in v.items()}
    if isinstance(v, list):
        return [_plain_container(x) if isinstance(x, (dict, list, set)) else x for x in v]
    if isinstance(v, set):
        return set(v)
    return v


def encode_absent(h: Hierarchy) -> bytes:
    return encode([h.fingerprint, None, 0, []])


def decode_entry(h: Hierarchy, payload: bytes) -> tuple[Shape, int, list[Any]] | None:
    """(shape, loaded mask, values), or None for a cached absence. Raises CodecError on anything else."""
    data = decode(payload)
    if type(data) is not list or len(data) != 4:
        raise CodecError("entry is not a 4-item list")
    fp, cid, mask, values = data
    if fp != h.fingerprint:
        raise CodecError("entry was written by another model definition")
    if cid is None:
        return None
    shape = h.shapes.get(cid) if type(cid) is str else None
    if shape is None or type(mask) is not int or type(values) is not list or mask < 0:
        raise CodecError("entry names an unknown class or is malformed")
    if mask >> len(shape.keys) or mask.bit_count() != len(values) or shape.pk_mask & ~mask:
        raise CodecError("entry's loaded mask does not match its values")
    out: list[Any] = []
    j = 0
    for i, conv in enumerate(shape.from_plain):
        if mask >> i & 1:
            v = values[j]
            out.append(conv(v) if conv is not None else v)
            j += 1
    return shape, mask, out


def materialize_objects(
    session: Session,
    shapes: Sequence[Shape | None],
    objects: list[list[Any]],
    load_options: tuple[Any, ...] = (),
    load_path: Any = None,
) -> tuple[list[Any], bytearray]:
    """Instances for validated ``[*values, shape index, mask]`` objects (see _query.decode_rows), in
    order, and a flag per object: 1 if it was built here, 0 if the identity map already held it. New
    objects get ``load_options`` and ``load_path`` as a database load would give them.

    The hot loop of a query hit: per object one identity-key tuple, one instance and its state,
    nothing else that outlives the call.
    """
    instances: list[Any] = []
    new = bytearray(len(objects))
    try:
        _build(session, shapes, objects, load_options, load_path, instances, new, new_runid())
    except BaseException:
        discard_built(session, instances, new)  # nothing half-built stays in the session
        raise
    return instances, new


# The ORM numbers each load ("runid", a process-wide counter) and stamps it on the objects a load builds
# from its rows. Taking a number before a statement runs tells, afterwards, the objects it built (a larger
# number: its own load, its eager loads, and our hits) from those the session already held, whose values
# may be older than the statement. Hits stamp theirs the same way.
new_runid: Callable[[], int] = _loading._new_runid


def built_since(state: Any, runid: int) -> bool:
    """Whether ``state``'s object was built from a row (or an entry) after ``runid`` was taken."""
    r = state.runid
    return r is not None and r > runid


def refresh_unloaded(shape: Shape, obj: Any, mask: int, values: Sequence[Any]) -> bool:
    """An object already in the identity map, found again by a hit: if none of its columns is loaded
    (all expired by a commit), it takes the entry's values, as from a database load; True if so.

    An object holding some columns keeps them and loads the others from the database on access: the
    entry may hold a newer version of the row than the loaded columns came from (another commit, or a
    repeatable-read snapshot), and one object must never mix two versions of its row.
    """
    dict_ = obj.__dict__
    state = instance_state(obj)
    if any(key in dict_ or key in state.committed_state for key in shape.keys):
        return False
    j = 0
    keys = []
    for i, key in enumerate(shape.keys):
        if mask >> i & 1:
            set_committed_value(obj, key, values[j])
            keys.append(key)
            j += 1
    if state.manager.dispatch.refresh:  # as after a reload from the database (ext.mutable listens)
        state.manager.dispatch.refresh(state, None, keys)
    return True


def discard_built(session: Session, instances: list[Any], new: bytearray) -> None:
    """Take the objects a failed hit built back out of the session's identity map."""
    identity_map = session.identity_map
    for n, obj in enumerate(instances):
        if n < len(new) and new[n]:
            state = instance_state(obj)
            identity_map.safe_discard(state)
            state.session_id = None
            state.key = None


def _build(
    session: Session,
    shapes: Sequence[Shape | None],
    objects: list[list[Any]],
    load_options: tuple[Any, ...],
    load_path: Any,
    instances: list[Any],
    new: bytearray,
    runid: int,
) -> None:
    # What loading.py does per row, without the row: the identity map's own dict and weak reference
    # are used directly (WeakInstanceDict.get / _add_unpresent inlined; both are what loading.py calls)
    # and ClassManager.new_instance() is spelled out, to keep the state.
    identity_map = session.identity_map
    states: dict[Any, Any] = identity_map._dict
    lookup = states.get
    wr = identity_map._wr
    hash_key = session.hash_key
    persistent_evt = session.dispatch.loaded_as_persistent if session.dispatch.loaded_as_persistent else None
    append = instances.append
    last_si = -1
    shape: Shape | None = None
    cls: Any = None
    ctor: Any = None
    setter: Any = None
    manager: Any = None
    load: Any = None
    keys: tuple[str, ...] = ()
    full_mask = -1
    pos = -1
    ic: Any = None
    for n, obj in enumerate(objects):
        si = obj[-2]
        if si != last_si:
            shape = shapes[si]
            assert shape is not None
            manager = shape.mapper.class_manager
            cls = manager.class_
            ctor = manager._state_constructor
            setter = manager._state_setter
            load = manager.dispatch.load if manager.dispatch.load else None
            keys = shape.keys
            full_mask = shape.full_mask
            pos = shape.pk_positions[0] if len(shape.pk_positions) == 1 else -1
            ic = shape.identity_class
            last_si = si
        assert shape is not None
        mask = obj[-1]
        full = mask == full_mask
        if full and pos >= 0:
            identity_key: tuple[Any, ...] = (ic, (obj[pos],), None)
        elif full:
            identity_key = (ic, tuple([obj[k] for k in shape.pk_positions]), None)
        else:
            identity_key = shape.identity_key(mask, obj)
        found = lookup(identity_key)
        if found is not None:
            existing = found.obj()
            if existing is not None:
                append(existing)
                refresh_unloaded(shape, existing, mask, obj)
                continue
        instance = cls.__new__(cls)
        state = ctor(instance, manager)
        setter(instance, state)
        state.key = identity_key
        state.session_id = hash_key
        state.runid = runid
        if load_options:
            state.load_options = load_options
        if load_path is not None:
            state.load_path = load_path
        states[identity_key] = state
        state._instance_dict = wr
        append(instance)
        new[n] = 1  # from here on, a failure takes it back out (discard_built)
        if full:
            # stops before the two trailers; no strict= (a keyword argument makes zip() much slower here)
            instance.__dict__.update(zip(keys, obj))  # noqa: B905
        else:
            _fill_partial(shape, state, state.dict, mask, obj)
        if load is not None:
            load(state, None)
        if persistent_evt is not None:
            persistent_evt(session, state)


# -- per-instance loader strategies ---------------------------------------------------------------
# A load leaves a callable in ``state.callables`` for each attribute whose loader strategy differs from
# the mapper's default: raiseload(), lazyload() of an eagerly configured relationship, defer(...,
# raiseload=True). A hit must leave the same, or ``raiseload("*")`` would quietly stop raising. The
# callable classes are private (renamed with a leading underscore in 2.1); this is their only use.
def _strategy_class(name: str) -> Any:
    for candidate in ("_" + name, name):  # 2.1 name first, then 2.0's
        found = getattr(_strategies, candidate, None)
        if found is not None:
            return found
    raise ImportError(f"sqlalchemy.orm.strategies has no {name}: unsupported SQLAlchemy version")


_LazyCallable: Any = _strategy_class("LoadLazyAttribute")
_DeferredCallable: Any = _strategy_class("LoadDeferredColumns")
LAZY_KINDS = frozenset({"select", "raise", "raise_on_sql"})
DEFERRED_KINDS = frozenset({"deferred", "deferred_raise"})


class Unreproducible(Exception):
    """A loaded object carries a loader strategy a hit could not rebuild (e.g. criteria on a lazy load)."""


def loader_marks(state: InstanceState[Any]) -> list[tuple[str, str]]:
    """The per-instance loader strategies a load left on ``state``, as (attribute, kind) pairs."""
    out: list[tuple[str, str]] = []
    for key, fn in state.callables.items():
        if isinstance(fn, _LazyCallable):
            sk = fn.strategy_key
            kind = sk[0][1] if len(sk) == 1 and sk[0][0] == "lazy" else None
            criteria = fn.extra_criteria  # None, a tuple, or a SQL expression (never test its truth)
            has_criteria = criteria is not None and not (type(criteria) is tuple and len(criteria) == 0)
            loadopt = fn.loadopt
            loadopt_criteria = getattr(loadopt, "_extra_criteria", None) if loadopt is not None else None
            if (
                kind not in LAZY_KINDS
                or has_criteria
                or (loadopt_criteria is not None and len(loadopt_criteria) > 0)
            ):
                raise Unreproducible(f"loader strategy {sk!r} on {key!r}")
            out.append((key, kind))
        elif isinstance(fn, _DeferredCallable):
            out.append((key, "deferred_raise" if fn.raiseload else "deferred"))
        else:
            raise Unreproducible(f"loader callable {type(fn).__name__} on {key!r}")
    return out


def apply_marks(instances: list[Any], new: bytearray, marks: list[tuple[int, str, str]]) -> None:
    """Put back, on the objects a hit built, the per-instance loader strategies of their load."""
    for i, key, kind in marks:
        state = instance_state(instances[i])
        if not new[i] and (key in state.dict or (kind in DEFERRED_KINDS and key in state.expired_attributes)):
            # an object the session had: only its unloaded attributes take the strategy, and an expired
            # column stays expired (SQLAlchemy reloads expired columns before any column loader runs;
            # a relationship's loader is consulted whether it expired or not)
            continue
        if kind in LAZY_KINDS:
            prop = state.mapper.relationships[key]
            strategy = prop._get_strategy((("lazy", kind),))
            fn = _LazyCallable(key, strategy, None, None)
        else:
            fn = _DeferredCallable(key, kind == "deferred_raise")
            if new[i]:
                state.expired_attributes.discard(key)
        if "callables" not in state.__dict__:  # the class-level default is a shared empty dict
            state.callables = {}
        state.callables[key] = fn


def _fill_partial(
    shape: Shape, state: InstanceState[Any], dict_: dict[str, Any], mask: int, values: list[Any]
) -> None:
    j = 0
    expired = state.expired_attributes
    for i, key in enumerate(shape.keys):
        if mask >> i & 1:
            dict_[key] = values[j]
            j += 1
        elif not shape.deferred[i]:
            # a column the original load did not fetch (a subclass table): loads on access, as after
            # a polymorphic load of the base class
            expired.add(key)


def materialize(session: Session, shape: Shape, mask: int, values: list[Any]) -> Any:
    """Build one persistent instance exactly as a database load would, in the identity map (an
    identity-cache hit: the query path's builder, for one object of the entry's values)."""
    instances, _ = materialize_objects(session, [shape], [[*values, 0, mask]])
    return instances[0]
