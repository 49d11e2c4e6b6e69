"""A cached query's rows <-> plain, msgpack-able structures (objects, relationships, loader marks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.collections import collection_adapter

from ._codec import decode, encode
from ._hierarchy import Conv, Hierarchy, Shape, class_id, tables_in
from ._objects import DEFERRED_KINDS, LAZY_KINDS, Unreproducible, built_since, loader_marks, plain_values
from .errors import CodecError

__all__ = [
    "LAYOUT",
    "Decoded",
    "Unreproducible",
    "copy_mutable",
    "decode_rows",
    "encode_rows",
    "is_mutable",
    "pack_exactly",
    "unpack_copy",
]


HierarchyOf = Callable[[Mapper[Any]], Hierarchy]


# Version of the row layout below; part of every query key, so entries of another layout are never read.
LAYOUT = 4


class _Encoder:
    """Objects of a result and the relationships loaded on them, flattened into indexed lists."""

    def __init__(self, hier: HierarchyOf, runid: int | None = None) -> None:
        self.hier = hier
        self.runid = runid
        self.index: dict[int, int] = {}
        self.shape_index: dict[tuple[str, str], int] = {}
        self.shapes: list[list[str]] = []
        self.objects: list[list[Any]] = []
        self.rels: list[Any] = []
        self.marks: list[Any] = []
        self.tables: set[str] = set()
        self._keep: list[Any] = []

    def add(self, h: Hierarchy, obj: Any) -> int:
        found = self.index.get(id(obj))
        if found is not None:
            return found
        state = sa_inspect(obj)
        cid = class_id(state.mapper)
        shape = h.shapes.get(cid)
        if shape is None or state.modified:
            raise CodecError("object of an unexpected class or with pending changes")
        if self.runid is not None and not built_since(state, self.runid):
            # the session held it before the statement ran: the ORM kept its values (and its loaded
            # relationships), which may be older than the rows the statement read
            raise Unreproducible("an object the session already held")
        sk = (h.fingerprint, cid)
        si = self.shape_index.get(sk)
        if si is None:
            si = self.shape_index[sk] = len(self.shapes)
            self.shapes.append([h.fingerprint, cid])
        idx = len(self.objects)
        self.index[id(obj)] = idx
        self._keep.append(obj)
        dict_ = state.dict
        mask, values = plain_values(shape, dict_)
        self.objects.append([*values, si, mask])
        for key, kind in loader_marks(state):
            self.marks += [idx, key, kind]
        for rel in state.mapper.relationships:
            if rel.key not in dict_:
                continue
            target = self.hier(rel.mapper)
            if target.unknown_reads:  # a loaded column of SQL text: what the entry depends on is unknown
                raise Unreproducible(f"{target.entity} has a column of SQL text")
            self.tables.update(target.tables)
            self.tables.update(target.reads)
            if rel.secondary is not None:  # a Table, or a join of several
                self.tables.update(tables_in(rel.secondary))
            value = dict_[rel.key]
            if value is None:
                ref: Any = None
            elif rel.uselist:
                # any collection class (list, set, attribute_keyed_dict, custom): its members in the
                # adapter's order; set_committed_value() rebuilds the same collection class on a hit
                members = value if isinstance(value, list) else collection_adapter(value)
                if members is None:
                    raise CodecError(f"collection {rel} has no collection adapter")
                ref = [self.add(target, o) for o in members]
            else:
                ref = self.add(target, value)
            self.rels += [idx, rel.key, ref]
        return idx


def encode_rows(
    columns: Sequence[Hierarchy | None],
    keys: Sequence[str],
    single: bool,
    rows: Sequence[Any],
    hier: HierarchyOf,
    unique_required: bool = False,
    runid: int | None = None,
    cell_to_plain: Sequence[Conv | None] = (),
) -> tuple[bytes, set[str]]:
    """(payload, tables read through loaded relationships).

    payload = [fingerprints, keys, single-entity flag, flat, rows, shapes, objects, rels, marks,
    unique_required]:

    - rows: one list of cells per row, an entity cell being an index into objects; ``flat`` when the
      statement returns one entity and no row holds None: then rows is just the list of indexes;
    - shapes: [fingerprint, class id] pairs; objects: [*values of the loaded column attributes, shape
      index, loaded mask] (one list per object, nothing else: a hit builds hundreds of them; the two
      trailing items let ``zip(keys, object)`` take the values without a slice);
    - rels: a flat list of (object index, relationship key, ref) triples, ref None, an index, or a list;
    - marks: a flat list of (object index, attribute, kind) triples: the per-instance loader strategies
      the load left (``raiseload``, ``lazyload``, ``defer(raiseload=True)``), rebuilt on a hit;
    - unique_required: the database's result insisted on ``unique()`` (a joined eager load of a
      collection): a hit's result does too.

    Raises Unreproducible if an object carries a strategy a hit could not rebuild, or (given the
    ``runid`` taken before the statement ran) if the session already held one of the objects.
    """
    enc = _Encoder(hier, runid)
    out: list[Any] = []
    flat = len(columns) == 1 and columns[0] is not None
    for row in rows:
        cells = tuple(row) if isinstance(row, Row) else (row,)
        if len(cells) != len(columns):
            raise CodecError("row shape does not match the statement")
        row_out = [
            enc.add(h, c) if h is not None and c is not None else c
            for h, c in zip(columns, cells, strict=True)
        ]
        for i, conv in enumerate(cell_to_plain):
            if conv is not None and columns[i] is None:
                row_out[i] = conv(row_out[i])
        out.append(row_out)
    if flat and all(r[0] is not None for r in out):
        out = [r[0] for r in out]
    else:
        flat = False
    fps = [h.fingerprint if h is not None else None for h in columns]
    payload = encode(
        [fps, list(keys), single, flat, out, enc.shapes, enc.objects, enc.rels, enc.marks, unique_required]
    )
    return payload, enc.tables


@dataclass(eq=False)
class Decoded:
    """A validated query entry: its objects are ``[*values, shape index, mask]`` lists whose values are
    already converted; ``shapes[i]`` is the Shape of shape index i; rels are (object, key, ref)."""

    keys: list[str]
    single: bool
    flat: bool
    rows: list[Any]
    shapes: list[Shape | None]
    objects: list[list[Any]]
    rels: list[tuple[int, str, Any]]
    marks: list[tuple[int, str, str]]
    unique_required: bool = False  # the database's result refused rows until unique() was called
    # where mutable values sit (JSON dicts and lists, ARRAY lists, sets), filled by share(): a shared
    # Decoded hands out fresh copies of those, never the objects it keeps
    mutable_at: list[tuple[int, tuple[int, ...]]] | None = None
    rows_mutable: bool = False
    # the mutable values, in mutable_at order, packed once by share() when msgpack gives them back
    # exactly (dicts, lists and atomic values only): one C-speed unpack per hit copies them all
    mutable_blob: bytes | None = None

    def share(self) -> Decoded:
        """Mark this result as kept for reuse; returns it. Afterwards use :meth:`fresh` per caller."""
        found: list[tuple[int, tuple[int, ...]]] = []
        for n, obj in enumerate(self.objects):
            at = tuple(i for i in range(len(obj) - 2) if is_mutable(obj[i]))
            if at:
                found.append((n, at))
        self.mutable_at = found
        self.rows_mutable = not self.flat and any(is_mutable(cell) for row in self.rows for cell in row)
        if found:
            self.mutable_blob = pack_exactly([self.objects[n][i] for n, at in found for i in at])
        return self

    def fresh(self) -> Decoded:
        """A copy a caller may use and mutate without touching this one: objects holding mutable values
        and the rows are copied, everything immutable is shared."""
        objects = self.objects
        if self.mutable_at:
            objects = list(objects)
            if self.mutable_blob is not None:
                copies = iter(unpack_copy(self.mutable_blob))
                for n, at in self.mutable_at:
                    obj = objects[n] = list(objects[n])
                    for i in at:
                        obj[i] = next(copies)
            else:
                for n, at in self.mutable_at:
                    obj = objects[n] = list(objects[n])
                    for i in at:
                        obj[i] = copy_mutable(obj[i])
        rows = self.rows
        if not self.flat:
            rows = [copy_mutable(row) if self.rows_mutable else list(row) for row in rows]
        return Decoded(
            self.keys,
            self.single,
            self.flat,
            rows,
            self.shapes,
            objects,
            self.rels,
            self.marks,
            self.unique_required,
        )


def pack_exactly(values: list[Any]) -> bytes | None:
    """``values`` packed so that :func:`unpack_copy` gives back equal values of exactly the same types,
    or None if msgpack cannot (tuples, sets, ints past 64 bits, any other type)."""
    try:
        blob: bytes = msgpack.packb(values, strict_types=True, use_bin_type=True)
        return blob if _same(unpack_copy(blob), values) else None
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None  # deeply nested values (the codec allows more than _same recurses): the slow copy


def unpack_copy(blob: bytes) -> list[Any]:
    # an Unpacker, not unpackb, for the codec's reason: unpackb's parse stack is 40 KiB of C stack
    unpacker = msgpack.Unpacker(None, read_size=len(blob), max_buffer_size=len(blob), raw=False)
    unpacker.feed(blob)
    out: list[Any] = unpacker.unpack()
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True would pass ``==`` alone)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return (
            a.keys() == b.keys()
            and all(_same(k, k2) for k, k2 in zip(a, b, strict=True))
            and all(_same(a[k], b[k]) for k in a)
        )
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is float and a != a:
        return bool(b != b)  # NaN
    return bool(a == b)


def is_mutable(v: Any) -> bool:
    t = type(v)
    return t is list or t is dict or t is set or (t is tuple and any(is_mutable(x) for x in v))


# what the codec decodes that holds no mutable container
_ATOMIC = frozenset({str, int, float, bool, type(None), bytes})


def copy_mutable(v: Any) -> Any:
    """A deep copy of the containers the codec decodes to (everything else in them is immutable)."""
    t = type(v)
    if t is dict:
        return {k: x if type(x) in _ATOMIC else copy_mutable(x) for k, x in v.items()}
    if t is list:
        return [x if type(x) in _ATOMIC else copy_mutable(x) for x in v]
    if t is set:
        return set(v)  # set items are hashable: immutable values
    if t is tuple:
        return tuple(copy_mutable(x) for x in v) if is_mutable(v) else v
    return v


def _check_key_value(v: Any) -> None:
    """A primary key value must be usable in an identity key: present and hashable."""
    if v is None:
        raise CodecError("object without its primary key")
    try:
        hash(v)
    except TypeError as exc:
        raise CodecError("unhashable primary key value") from exc


def decode_rows(
    columns: Sequence[Hierarchy | None],
    payload: bytes,
    hier: HierarchyOf,
    cell_from_plain: Sequence[Conv | None] = (),
) -> Decoded:
    """Decode and validate a query entry completely (nothing is built from a payload that fails)."""
    data = decode(payload)
    if type(data) is not list or len(data) != 10:
        raise CodecError("query entry is not a 10-item list")
    fps, keys, single, flat, rows, shape_refs, objects, rels, marks, unique_required = data
    if fps != [h.fingerprint if h is not None else None for h in columns]:
        raise CodecError("query entry was written by another model definition")
    if (
        type(keys) is not list
        or len(keys) != len(columns)
        or not all(k is None or type(k) is str for k in keys)
        or type(rows) is not list
        or type(single) is not bool
        or type(flat) is not bool
        or type(unique_required) is not bool
        or type(shape_refs) is not list
        or type(objects) is not list
        or type(rels) is not list
        or len(rels) % 3
        or type(marks) is not list
        or len(marks) % 3
    ):
        raise CodecError("malformed query entry")
    v = _Validator(shape_refs, objects, rels)
    if flat:
        if len(columns) != 1 or columns[0] is None:
            raise CodecError("flat rows for a statement that does not return one entity")
        h0 = columns[0]
        for cell in rows:
            v.check(h0, cell)
    else:
        for row in rows:
            if type(row) is not list or len(row) != len(columns):
                raise CodecError("malformed query row")
            for h, cell in zip(columns, row, strict=True):
                if h is not None and cell is not None:
                    v.check(h, cell)
            for i, conv in enumerate(cell_from_plain):
                if conv is not None and columns[i] is None:
                    row[i] = conv(row[i])
    out_rels = v.relationships(hier)
    if not all(v.seen):
        raise CodecError("unreferenced object in query entry")
    out_marks = v.marks(marks)
    return Decoded(keys, single, flat, rows, v.shapes, objects, out_rels, out_marks, unique_required)


class _Validator:
    """Validates the objects of one query entry as rows and relationships reach them, each once."""

    def __init__(self, shape_refs: list[Any], objects: list[Any], rels: list[Any]) -> None:
        self.shape_refs = shape_refs
        self.objects = objects
        self.n_objects = n_objects = len(objects)
        self.shapes: list[Shape | None] = [None] * len(shape_refs)
        self.owner: list[Hierarchy | None] = [None] * len(shape_refs)
        self.seen = bytearray(n_objects)
        self.todo: list[int] = []  # objects validated whose relationships are not yet
        self.by_owner: dict[int, list[tuple[str, Any]]] = {}
        for k in range(0, len(rels), 3):
            i, key = rels[k], rels[k + 1]
            if type(i) is not int or not 0 <= i < n_objects or type(key) is not str:
                raise CodecError("malformed relationship")
            self.by_owner.setdefault(i, []).append((key, rels[k + 2]))

    def check(self, h: Hierarchy, i: Any) -> None:
        """Object i, referenced where an instance of ``h`` is expected: validate it once."""
        if type(i) is not int or not 0 <= i < self.n_objects:
            raise CodecError("dangling object reference")
        obj = self.objects[i]
        if type(obj) is not list or len(obj) < 2:
            raise CodecError("malformed object")
        shape = self._shape(h, obj[-2])
        if self.seen[i]:
            return
        self.seen[i] = 1
        if self.by_owner:
            self.todo.append(i)
        mask = obj[-1]
        if type(mask) is int and mask == shape.full_mask:
            if len(obj) != len(shape.keys) + 2:
                raise CodecError("object's mask does not match its values")
            for p in shape.pk_positions:
                _check_key_value(obj[p])
            for j in shape.converted:
                conv = shape.from_plain[j]
                assert conv is not None
                obj[j] = conv(obj[j])
            return
        if (
            type(mask) is not int
            or mask < 0
            or mask >> len(shape.keys)
            or mask.bit_count() != len(obj) - 2
            or shape.pk_mask & ~mask
        ):
            raise CodecError("object's mask does not match its values")
        j = 0
        for pos, conv in enumerate(shape.from_plain):
            if mask >> pos & 1:
                if shape.pk_mask >> pos & 1:
                    _check_key_value(obj[j])
                if conv is not None:
                    obj[j] = conv(obj[j])
                j += 1

    def _shape(self, h: Hierarchy, si: Any) -> Shape:
        """The shape an object names, which must be ``h``'s class or one of its subclasses."""
        shape_refs = self.shape_refs
        if type(si) is not int or not 0 <= si < len(shape_refs):
            raise CodecError("object names an unknown shape")
        shape = self.shapes[si]
        if shape is None:
            ref = shape_refs[si]
            if type(ref) is not list or len(ref) != 2 or ref[0] != h.fingerprint or type(ref[1]) is not str:
                raise CodecError("object written by another model definition")
            shape = h.shapes.get(ref[1])
            if shape is None:
                raise CodecError("object names an unknown class")
            self.shapes[si] = shape
            self.owner[si] = h
        elif self.owner[si] is not h and (
            shape_refs[si][0] != h.fingerprint or not shape.mapper.isa(h.mapper)
        ):
            # the same hierarchy requested as another class: a base-class object where a subclass
            # is expected is not one
            raise CodecError("object of another class than the one expected here")
        return shape

    def relationships(self, hier: HierarchyOf) -> list[tuple[int, str, Any]]:
        """The relationships of every object reached, their targets validated (reaching more)."""
        out: list[tuple[int, str, Any]] = []
        todo, by_owner, objects = self.todo, self.by_owner, self.objects
        while todo:
            i = todo.pop()
            for key, value in by_owner.pop(i, ()):
                shape = self.shapes[objects[i][-2]]
                assert shape is not None
                prop = shape.mapper.relationships.get(key)
                if prop is None:
                    raise CodecError(f"unknown relationship {key!r}")
                target = hier(prop.mapper)
                if type(value) is list:
                    if not prop.uselist:
                        raise CodecError(f"a collection for the scalar relationship {key!r}")
                    for v in value:
                        self.check(target, v)
                elif value is not None:
                    if prop.uselist:
                        raise CodecError(f"a single object for the collection {key!r}")
                    self.check(target, value)
                out.append((i, key, value))
        return out

    def marks(self, marks: list[Any]) -> list[tuple[int, str, str]]:
        """The per-instance loader marks, each naming a known attribute of its object's class."""
        out: list[tuple[int, str, str]] = []
        for k in range(0, len(marks), 3):
            i, key, kind = marks[k], marks[k + 1], marks[k + 2]
            if (
                type(i) is not int
                or not 0 <= i < self.n_objects
                or type(key) is not str
                or type(kind) is not str
            ):
                raise CodecError("malformed loader mark")
            shape = self.shapes[self.objects[i][-2]]
            assert shape is not None
            if not (
                (kind in LAZY_KINDS and key in shape.mapper.relationships)
                or (kind in DEFERRED_KINDS and key in shape.keys)
            ):
                raise CodecError(f"unknown loader mark {kind!r} on {key!r}")
            out.append((i, key, kind))
        return out
