"""Pure-ish: what a cached query depends on, its key, and its rows <-> plain structures."""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from sqlalchemy import Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.interfaces import MapperProperty
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Column

from ._codec import decode, encode, encode_body
from ._snapshot import Hierarchy, Shape, class_id, plain_values, table_name
from .errors import CodecError

__all__ = ["Decoded", "Uncacheable", "decode_rows", "encode_rows", "stable", "tables_read"]


class Uncacheable(Exception):
    """The statement holds something we cannot key stably across processes."""


def stable(o: Any) -> Any:
    """SQLAlchemy's cache key with every process-specific object replaced by a stable name.

    The key holds tables, mappers, types, operator functions and option classes; their reprs carry
    memory addresses, so each is named instead. Anything unknown makes the statement uncacheable
    rather than risk two different statements sharing a key.
    """
    if o is None or isinstance(o, (str, int, float, bool, bytes)):
        return o
    if isinstance(o, (tuple, list)):
        return tuple(stable(x) for x in o)
    if isinstance(o, Table):
        return ("T", table_name(o))
    if isinstance(o, Mapper):
        return ("M", class_id(o))
    if isinstance(o, MapperProperty):
        return ("P", class_id(o.parent), o.key)
    if isinstance(o, Column):
        return ("C", table_name(o.table), o.key)
    if isinstance(o, type):
        return ("Y", f"{o.__module__}.{o.__qualname__}")
    if isinstance(o, types.CodeType):  # lambda statements (the ORM's lazy loaders use them)
        return ("K", f"{o.co_filename}:{o.co_firstlineno}:{o.co_name}")
    if isinstance(o, enum.Enum):
        return ("E", f"{type(o).__qualname__}.{o.name}")
    mod = getattr(o, "__module__", None) or ""
    if callable(o) and (mod == "_operator" or mod == "operator" or mod.startswith("sqlalchemy.")):
        return ("F", f"{mod}.{getattr(o, '__qualname__', repr(o))}")
    raise Uncacheable(type(o).__qualname__)


def digest(parts: Any) -> str:
    try:
        return blake2b(encode_body(parts), digest_size=16).hexdigest()
    except CodecError as exc:
        raise Uncacheable(str(exc)) from exc


def tables_read(compiled: Any, statement: Any) -> tuple[str, ...]:
    """Every table the compiled statement reads: FROMs, joins, subqueries, CTEs, inheritance tables."""
    core = getattr(getattr(compiled, "compile_state", None), "statement", None)
    if core is None:
        core = statement
    return tuple(sorted({table_name(t) for t in visitors.iterate(core) if isinstance(t, Table)}))


HierarchyOf = Callable[[Mapper[Any]], Hierarchy]


class _Encoder:
    """Objects of a result and the relationships loaded on them, flattened into an indexed list."""

    def __init__(self, hier: HierarchyOf) -> None:
        self.hier = hier
        self.index: dict[int, int] = {}
        self.objects: list[list[Any]] = []
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
        idx = len(self.objects)
        self.index[id(obj)] = idx
        self._keep.append(obj)
        entry: list[Any] = [h.fingerprint, cid, 0, [], []]
        self.objects.append(entry)
        dict_ = state.dict
        entry[2], entry[3] = plain_values(shape, dict_)
        rels: list[Any] = []
        for rel in state.mapper.relationships:
            if rel.key not in dict_:
                continue
            target = self.hier(rel.mapper)
            self.tables.update(target.tables)
            if rel.secondary is not None:
                self.tables.add(table_name(rel.secondary))
            value = dict_[rel.key]
            if value is None:
                rels.append([rel.key, None])
            elif rel.uselist:
                if not isinstance(value, list):
                    raise CodecError(f"collection {rel} is not a list")
                rels.append([rel.key, [self.add(target, o) for o in value]])
            else:
                rels.append([rel.key, self.add(target, value)])
        entry[4] = rels
        return idx


def encode_rows(
    columns: Sequence[Hierarchy | None],
    keys: Sequence[str],
    single: bool,
    rows: Sequence[Any],
    hier: HierarchyOf,
) -> tuple[bytes, set[str]]:
    """(payload, tables read through loaded relationships).

    payload = [fingerprints, keys, single-entity flag, rows, objects]; an entity cell is an index into
    objects; an object is [fingerprint, class id, loaded mask, values, [[relationship, ref], ...]] with
    ref None, an index, or a list of indexes.
    """
    enc = _Encoder(hier)
    out = []
    for row in rows:
        cells = tuple(row) if isinstance(row, Row) else (row,)
        if len(cells) != len(columns):
            raise CodecError("row shape does not match the statement")
        out.append(
            [
                enc.add(h, c) if h is not None and c is not None else c
                for h, c in zip(columns, cells, strict=True)
            ]
        )
    fps = [h.fingerprint if h is not None else None for h in columns]
    return encode([fps, list(keys), single, out, enc.objects]), enc.tables


@dataclass(eq=False)
class Decoded:
    """One object of a cached result, ready to materialise; ``rels`` maps relationship key to refs."""

    shape: Shape
    mask: int
    values: list[Any]
    rels: list[tuple[str, Any]]


def _decode_object(h: Hierarchy, raw: Any) -> tuple[Shape, int, list[Any], Any]:
    if type(raw) is not list or len(raw) != 5:
        raise CodecError("malformed object")
    fp, cid, mask, values, rels = raw
    if fp != h.fingerprint:
        raise CodecError("object written by another model definition")
    shape = h.shapes.get(cid) if type(cid) is str else None
    if (
        shape is None
        or type(mask) is not int
        or mask < 0
        or type(values) is not list
        or type(rels) is not list
    ):
        raise CodecError("object names an unknown class or is malformed")
    if mask == shape.full_mask:
        if len(values) != len(shape.keys):
            raise CodecError("object's mask does not match its values")
        for i in shape.converted:
            conv = shape.from_plain[i]
            assert conv is not None
            values[i] = conv(values[i])
        return shape, mask, values, rels
    if mask >> len(shape.keys) or mask.bit_count() != len(values):
        raise CodecError("object's mask does not match its values")
    plain = []
    j = 0
    for i, conv in enumerate(shape.from_plain):
        if mask >> i & 1:
            plain.append(conv(values[j]) if conv is not None else values[j])
            j += 1
    return shape, mask, plain, rels


def decode_rows(
    columns: Sequence[Hierarchy | None], payload: bytes, hier: HierarchyOf
) -> tuple[list[str], bool, list[list[Any]], list[Decoded]]:
    """(keys, single-entity flag, rows whose entity cells are object indexes, the objects)."""
    data = decode(payload)
    if type(data) is not list or len(data) != 5:
        raise CodecError("query entry is not a 5-item list")
    fps, keys, single, rows, objects = data
    if fps != [h.fingerprint if h is not None else None for h in columns]:
        raise CodecError("query entry was written by another model definition")
    if (
        type(keys) is not list
        or type(rows) is not list
        or type(single) is not bool
        or type(objects) is not list
    ):
        raise CodecError("malformed query entry")
    decoded: list[Decoded | None] = [None] * len(objects)
    todo: list[tuple[Hierarchy, int]] = []

    def ref(h: Hierarchy, i: Any) -> int:
        if type(i) is not int or not 0 <= i < len(objects):
            raise CodecError("dangling object reference")
        todo.append((h, i))
        return i

    for row in rows:
        if type(row) is not list or len(row) != len(columns):
            raise CodecError("malformed query row")
        for h, cell in zip(columns, row, strict=True):
            if h is not None and cell is not None:
                ref(h, cell)
    while todo:
        h, i = todo.pop()
        if decoded[i] is not None:
            continue
        shape, mask, values, rels = _decode_object(h, objects[i])
        out_rels: list[tuple[str, Any]] = []
        for item in rels:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
                raise CodecError("malformed relationship")
            key, value = item
            prop = shape.mapper.relationships.get(key) if hasattr(shape.mapper.relationships, "get") else None
            if prop is None:
                raise CodecError(f"unknown relationship {key!r}")
            target = hier(prop.mapper)
            if value is None:
                out_rels.append((key, None))
            elif type(value) is list:
                out_rels.append((key, [ref(target, v) for v in value]))
            else:
                out_rels.append((key, ref(target, value)))
        decoded[i] = Decoded(shape, mask, values, out_rels)
    if any(d is None for d in decoded):
        raise CodecError("unreferenced object in query entry")
    return keys, single, rows, [d for d in decoded if d is not None]
