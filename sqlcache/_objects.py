"""ORM instances <-> identity entries, and the builder that puts cached rows into a session exactly as
a database load would (identity map, load options and paths, per-instance loader strategies). Private
SQLAlchemy API comes through ``_sa`` only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from . import _sa, _sabuild
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


def only_written(h: Hierarchy, state: InstanceState[Any], written: set[str]) -> bool:
    """Whether the transaction wrote every loaded column of ``state`` (those its entry would hold) but
    its primary key. A column loaded and not written was read earlier, perhaps before another writer
    committed a change to it, and the database's row holds that writer's value, not the session's: an
    entry repopulated from the session would serve the old one."""
    shape = h.shapes.get(class_id(state.mapper))
    if shape is None:
        return False
    dict_ = state.dict
    pk = {shape.keys[i] for i in shape.pk_positions}
    return all(k in written or k in pk for k in shape.keys if k in dict_)


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
        _sabuild.build_objects(
            session, shapes, objects, load_options, load_path, instances, new, _sa.new_runid()
        )
    except BaseException:
        discard_built(session, instances, new)  # nothing half-built stays in the session
        raise
    return instances, new


def built_since(state: Any, runid: int) -> bool:
    """Whether ``state``'s object was built from a row (or an entry) after ``runid`` was taken."""
    r = state.runid
    return r is not None and r > runid


def discard_built(session: Session, instances: list[Any], new: bytearray) -> None:
    """Take the objects a failed hit built back out of the session's identity map."""
    identity_map = session.identity_map
    for n, obj in enumerate(instances):
        if n < len(new) and new[n]:
            state = instance_state(obj)
            identity_map.safe_discard(state)
            state.session_id = None
            state.key = None


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


def materialize(session: Session, shape: Shape, mask: int, values: list[Any]) -> Any:
    """Build one persistent instance exactly as a database load would, in the identity map (an
    identity-cache hit: the query path's builder, for one object of the entry's values)."""
    return _sabuild.build_one(session, shape, mask, values, _sa.new_runid())
