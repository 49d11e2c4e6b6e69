"""Pure-ish: what a cached query depends on, its key, and its rows <-> plain structures."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Column

from ._codec import decode, encode, encode_body
from ._snapshot import Hierarchy, class_id, table_name
from .errors import CodecError

__all__ = ["Uncacheable", "decode_rows", "encode_rows", "stable", "tables_read"]


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
    if isinstance(o, Column):
        return ("C", table_name(o.table), o.key)
    if isinstance(o, type):
        return ("Y", f"{o.__module__}.{o.__qualname__}")
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


def _object(h: Hierarchy, obj: Any) -> list[Any]:
    from sqlalchemy import inspect

    state = inspect(obj)
    cid = class_id(state.mapper)
    shape = h.shapes.get(cid)
    if shape is None or state.modified:
        raise CodecError("object of an unexpected class or with pending changes")
    dict_ = state.dict
    mask = 0
    values: list[Any] = []
    for i, key in enumerate(shape.keys):
        if key in dict_:
            v = dict_[key]
            conv = shape.to_plain[i]
            values.append(conv(v) if conv is not None else v)
            mask |= 1 << i
    return [cid, mask, values]


def encode_rows(
    columns: Sequence[Hierarchy | None], keys: Sequence[str], single: bool, rows: Sequence[Any]
) -> bytes:
    """payload = [fingerprints, keys, single-entity flag, rows]; entity cells are [class, mask, values]."""
    out = []
    for row in rows:
        cells = tuple(row) if isinstance(row, Row) else (row,)
        if len(cells) != len(columns):
            raise CodecError("row shape does not match the statement")
        out.append(
            [
                _object(h, c) if h is not None and c is not None else c
                for h, c in zip(columns, cells, strict=True)
            ]
        )
    fps = [h.fingerprint if h is not None else None for h in columns]
    return encode([fps, list(keys), single, out])


def decode_rows(
    columns: Sequence[Hierarchy | None], payload: bytes
) -> tuple[list[str], bool, list[list[Any]]]:
    """(keys, single-entity flag, rows of cells); entity cells stay [shape, mask, values] for the caller."""
    data = decode(payload)
    if type(data) is not list or len(data) != 4:
        raise CodecError("query entry is not a 4-item list")
    fps, keys, single, rows = data
    if fps != [h.fingerprint if h is not None else None for h in columns]:
        raise CodecError("query entry was written by another model definition")
    if type(keys) is not list or type(rows) is not list or type(single) is not bool:
        raise CodecError("malformed query entry")
    out = []
    for row in rows:
        if type(row) is not list or len(row) != len(columns):
            raise CodecError("malformed query row")
        cells: list[Any] = []
        for h, cell in zip(columns, row, strict=True):
            if h is None or cell is None:
                cells.append(cell)
                continue
            if type(cell) is not list or len(cell) != 3:
                raise CodecError("malformed entity cell")
            cid, mask, values = cell
            shape = h.shapes.get(cid) if type(cid) is str else None
            if shape is None or type(mask) is not int or mask < 0 or type(values) is not list:
                raise CodecError("entity cell names an unknown class")
            if mask == shape.full_mask:
                if len(values) != len(shape.keys):
                    raise CodecError("entity cell's mask does not match its values")
                for i in shape.converted:
                    conv = shape.from_plain[i]
                    assert conv is not None
                    values[i] = conv(values[i])
                cells.append((shape, mask, values))
                continue
            if mask >> len(shape.keys) or mask.bit_count() != len(values):
                raise CodecError("entity cell's mask does not match its values")
            plain = []
            j = 0
            for i, conv in enumerate(shape.from_plain):
                if mask >> i & 1:
                    plain.append(conv(values[j]) if conv is not None else values[j])
                    j += 1
            cells.append((shape, mask, plain))
        out.append(cells)
    return keys, single, out
