"""Schema fingerprints and entry decoding, without servers."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Integer, MetaData, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm import Mapper as SAMapper

from sqlcache import _codec
from sqlcache._hierarchy import fingerprint, hierarchy_for
from sqlcache._objects import decode_entry
from sqlcache.errors import CodecError


def make(columns: dict[str, Any]) -> SAMapper[Any]:
    class Base(DeclarativeBase):
        metadata = MetaData()

    ns: dict[str, Any] = {"__tablename__": "things", "id": mapped_column(Integer, primary_key=True)}
    ns.update(columns)
    ns["__annotations__"] = {"id": Mapped[int], **{k: Mapped[Any] for k in columns}}
    cls = type("Thing", (Base,), ns)
    return cls.__mapper__  # type: ignore[attr-defined,no-any-return]


def test_fingerprint_tracks_columns_and_types() -> None:
    """Adding a column or changing a type changes the fingerprint; the same definition keeps it."""
    a = fingerprint(make({"name": mapped_column(String(20))}))
    assert a == fingerprint(make({"name": mapped_column(String(20))}))
    assert a != fingerprint(make({"name": mapped_column(String(30))}))
    assert a != fingerprint(make({"name": mapped_column(String(20)), "n": mapped_column(Integer)}))
    assert a != fingerprint(make({"name": mapped_column(Numeric(10, 2))}))


def test_entry_of_another_definition_refused() -> None:
    """An entry carrying another fingerprint, class or shape is refused with CodecError."""
    h = hierarchy_for(make({"name": mapped_column(String(20))}))
    cid = next(iter(h.shapes))
    good = _codec.encode([h.fingerprint, cid, 0b11, [1, "x"]])
    _shape, mask, values = decode_entry(h, good)  # type: ignore[misc]
    assert values == [1, "x"] and mask == 3
    for bad in (
        [("0" * 16), cid, 0b11, [1, "x"]],
        [h.fingerprint, "other.Class", 0b11, [1, "x"]],
        [h.fingerprint, cid, 0b111, [1, "x"]],
        [h.fingerprint, cid, 0b11, [1]],
        [h.fingerprint, cid, -1, []],
        "not a list",
    ):
        with pytest.raises(CodecError):
            decode_entry(h, _codec.encode(bad))
    assert decode_entry(h, _codec.encode([h.fingerprint, None, 0, []])) is None
