"""ORM instances <-> identity entries, and the builder that puts cached rows into a session exactly as
a database load would (identity map, load options and paths, per-instance loader strategies). Private
SQLAlchemy API comes through ``_sa`` only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state, set_committed_value

from . import _sa
from ._codec import decode, encode
from ._hierarchy import Hierarchy, Shape, class_id
from .errors import CodecError

if TYPE_CHECKING:
    from sqlalchemy.orm import InstanceState, Session

__all__ = [
    "DEFERRED_KINDS",
    "LAZY_KINDS",
    "Unreproducible",
    "apply_marks",
    "built_since",
    "decode_entry",
    "discard_built",
    "encode_absent",
    "encode_instance",
    "loader_marks",
    "materialize",
    "materialize_objects",
    "plain_values",
]


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
        _build(session, shapes, objects, load_options, load_path, instances, new, _sa.new_runid())
    except BaseException:
        discard_built(session, instances, new)  # nothing half-built stays in the session
        raise
    return instances, new


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
    states, wr = _sa.identity_map_parts(session)
    lookup = states.get
    set_instance_dict = _sa.set_instance_dict
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
            ctor, setter = _sa.state_factory(manager)
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
        set_instance_dict(state, wr)
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
# the mapper's default. A hit must leave the same, or ``raiseload("*")`` would quietly stop raising.
LAZY_KINDS = frozenset({"select", "raise", "raise_on_sql"})
DEFERRED_KINDS = frozenset({"deferred", "deferred_raise"})


class Unreproducible(Exception):
    """A loaded object carries a loader strategy a hit could not rebuild (e.g. criteria on a lazy load)."""


def loader_marks(state: InstanceState[Any]) -> list[tuple[str, str]]:
    """The per-instance loader strategies a load left on ``state``, as (attribute, kind) pairs."""
    out: list[tuple[str, str]] = []
    for key, fn in state.callables.items():
        if isinstance(fn, _sa.LazyCallable):
            sk = fn.strategy_key
            kind = sk[0][1] if len(sk) == 1 and sk[0][0] == "lazy" else None
            criteria = fn.extra_criteria  # None, a tuple, or a SQL expression (never test its truth)
            has_criteria = criteria is not None and not (type(criteria) is tuple and len(criteria) == 0)
            loadopt = fn.loadopt
            loadopt_criteria = _sa.loader_criteria(loadopt)
            if (
                kind not in LAZY_KINDS
                or has_criteria
                or (loadopt_criteria is not None and len(loadopt_criteria) > 0)
            ):
                raise Unreproducible(f"loader strategy {sk!r} on {key!r}")
            out.append((key, kind))
        elif isinstance(fn, _sa.DeferredCallable):
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
            fn = _sa.LazyCallable(key, _sa.lazy_strategy(prop, kind), None, None)
        else:
            fn = _sa.DeferredCallable(key, kind == "deferred_raise")
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
