"""Results and objects rebuilt from an entry as SQLAlchemy's own loads build them: result metadata,
the unique() guard, and objects put into a session's identity map. The private SQLAlchemy API this
needs, one small function (or name) each, with the reason beside it, as in ``_sa`` (the statements,
sessions and mappers half); tests/unit/test_sa_internals.py fails loudly if an upgrade moves any of
them."""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.util import immutabledict

if TYPE_CHECKING:
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import InstanceState, Session

    from ._hierarchy import Shape

__all__ = [
    "build_objects",
    "build_one",
    "frozen_keys",
    "frozen_single_entity",
    "is_instance",
    "refresh_unloaded",
    "require_unique",
    "result_metadata",
    "take_unique_guard",
    "with_attributes",
]

# -- results ----------------------------------------------------------------------------------------

_RESULT_META_PARAMS = pyinspect.signature(SimpleResultMetaData.__init__).parameters


def result_metadata(
    keys: Sequence[str | None],
    filters: Callable[[], list[Any]],
    extra: list[tuple[Any, ...]] | None = None,
) -> SimpleResultMetaData:
    """Result metadata whose ``unique()`` keys come from ``filters`` (per column: a key function or
    None), as the ORM's do; ``extra`` holds, per column, the objects ``row._mapping[...]`` accepts
    besides the name (entity, attribute, column).

    SQLAlchemy 2.1 takes ``_create_unique_filters`` (asked per result), 2.0 ``_unique_filters``.
    """
    names: Any = keys  # None for an unnamed column, as SQLAlchemy's own ORM results have
    if "_create_unique_filters" in _RESULT_META_PARAMS:
        return SimpleResultMetaData(names, extra=extra, _create_unique_filters=lambda _r: filters())
    return SimpleResultMetaData(names, extra=extra, _unique_filters=filters())  # type: ignore[call-arg]


def with_attributes(result: Result[Any], single_entity: bool, filtered: bool | None = None) -> Result[Any]:
    """Mark a result as the ORM does, so that legacy ``Query`` returns entities, not one-item rows, and
    uniques the rows of any statement returning an entity (``filtered``: an entity among the columns)."""
    result._attributes = immutabledict(
        {"is_single_entity": single_entity, "filtered": single_entity if filtered is None else filtered}
    )
    return result


def take_unique_guard(result: Result[Any]) -> Any:
    """Lift the ORM's "unique() must be invoked" guard (a joined eager load of a collection) off a
    result before freezing it (freezing would trip it on rows of several columns, and drops it)."""
    guard = result._unique_filter_state
    result._unique_filter_state = None
    return guard


class _Uniquing:
    """Stands in for the ORM's QueryContext on a result sqlcache built or froze: SQLAlchemy 2.1's
    selectin loader reads ``result.context.requires_uniquing`` to choose between ``unique()`` and a raw
    read of the rows, and the raw read asserts that no unique() guard is set."""

    requires_uniquing = True


_UNIQUING = _Uniquing()


def require_unique(result: Result[Any], check: Callable[[Any], Any]) -> None:
    """Put the "unique() must be invoked" guard (``check``) on a result, as the ORM does, and say so
    where SQLAlchemy looks for it (``result.context``)."""
    result._unique_filter_state = (set(), check)
    if getattr(result, "context", None) is None:
        cast(Any, result).context = _UNIQUING


def is_instance(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a mapped class (not a Row)."""
    return hasattr(obj, "_sa_instance_state")


def frozen_single_entity(frozen: FrozenResult[Any]) -> bool:
    return bool((getattr(frozen, "_attributes", None) or {}).get("is_single_entity"))


def frozen_keys(frozen: FrozenResult[Any]) -> list[str]:
    """Column names of a frozen result, None for unnamed columns (``.keys`` drops those; typed as str
    as the rows layout stores them). Plain strings: a Core table's column names are ``quoted_name``
    (a str subclass the codec refuses)."""
    keys = getattr(frozen.metadata, "_keys", None) or frozen.metadata.keys
    return [k if k is None or type(k) is str else str(k) for k in keys]  # type: ignore[misc]


# -- building objects as a load does ------------------------------------------------------------------


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


def build_one(session: Session, shape: Shape, mask: int, values: list[Any], runid: int) -> Any:
    """:func:`build_objects` for the one object of an identity entry (``values`` without the two
    trailers, no load options): the object the identity map held, or one built into it.

    The hot path of a direct ``cache.get`` hit: the same steps as build_objects' loop, without its
    setup for many objects of several shapes; what a failure half-built is taken back out."""
    identity_map: Any = session.identity_map
    if mask == shape.full_mask and len(shape.pk_positions) == 1:
        identity_key: tuple[Any, ...] = (shape.identity_class, (values[shape.pk_positions[0]],), None)
    else:
        identity_key = shape.identity_key(mask, values)
    states: dict[Any, Any] = identity_map._dict
    found = states.get(identity_key)
    if found is not None:
        existing = found.obj()
        if existing is not None:
            refresh_unloaded(shape, existing, mask, values)
            return existing
    manager = shape.mapper.class_manager
    cls: Any = manager.class_
    instance = cls.__new__(cls)
    state = manager._state_constructor(instance, manager)
    manager._state_setter(instance, state)
    state.key = identity_key
    state.session_id = session.hash_key
    state.runid = runid
    states[identity_key] = state
    state._instance_dict = identity_map._wr
    try:
        if mask == shape.full_mask:
            instance.__dict__.update(zip(shape.keys, values))  # noqa: B905
        else:
            _fill_partial(shape, state, state.dict, mask, values)
        load = manager.dispatch.load
        if load:
            load(state, None)
        loaded = session.dispatch.loaded_as_persistent
        if loaded:
            loaded(session, state)
    except BaseException:  # nothing half-built stays in the session
        identity_map.safe_discard(state)
        state.session_id = None
        state.key = None
        raise
    return instance


def build_objects(
    session: Session,
    shapes: Sequence[Shape | None],
    objects: list[list[Any]],
    load_options: tuple[Any, ...],
    load_path: Any,
    instances: list[Any],
    new: bytearray,
    runid: int,
) -> None:
    """Objects for validated ``[*values, shape index, mask]`` entries, appended to ``instances``, with
    ``new[n] = 1`` for each one built here (0: the identity map held it already).

    The hot loop of a hit, inlined on purpose (83 lines): per object one identity-key tuple, one
    instance and its state, nothing else that outlives the call; a helper call per object costs more
    than the loop's own work for small objects."""
    # What loading.py does per row, without the row: the identity map's own dict and weak reference
    # are used directly (WeakInstanceDict.get / _add_unpresent inlined; both are what loading.py calls)
    # and ClassManager.new_instance() is spelled out, to keep the state.
    identity_map: Any = session.identity_map
    states: dict[Any, Any] = identity_map._dict
    lookup = states.get
    wr = identity_map._wr
    hash_key = session.hash_key
    listeners = session.dispatch.loaded_as_persistent
    persistent_evt = listeners if listeners else None
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
