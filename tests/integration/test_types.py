"""Scenario 7: every column type round-trips through the cache with the same value and Python type."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, TypeDecorator, inspect, select
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import ConfigurationError, SQLCache, cached

from ..conftest import SQLCounter
from ..models import Color, Typed

COLUMNS = [c.key for c in inspect(Typed).column_attrs]


def sample(engine: Engine) -> dict[str, Any]:
    tz = dt.timezone(dt.timedelta(hours=2))
    at_tz = dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz)
    if engine.dialect.name != "postgresql":
        at_tz = at_tz.replace(microsecond=0)
    return {
        "id": 1,
        "big": 2**62 + 7,
        "num": decimal.Decimal("12345678901234.123456"),
        "flt": 0.1,
        "s": "héllo ✓",
        "txt": "x" * 5000,
        "flag": True,
        "day": dt.date(1999, 12, 31),
        "at": dt.datetime(2001, 1, 2, 3, 4, 5, 6 if engine.dialect.name != "mariadb" else 0),
        "at_tz": at_tz,
        "clock": dt.time(13, 14, 15),
        "span": dt.timedelta(days=3, seconds=7, microseconds=0),
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "color": Color.green,
        "mood": "sad",
        "doc": {"a": [1, 2.5, None, {"b": "c"}], "n": True},
        "blob": b"\x00\xffbinary",
    }


@pytest.mark.parametrize("with_nulls", [False, True])
def test_typed_row_round_trips(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, with_nulls: bool
) -> None:
    """A hit returns exactly what the database load returned: same values, same types."""
    cache.register(Typed)
    values = sample(engine)
    if with_nulls:
        values = {k: (v if k == "id" else None) for k, v in values.items()}
    with Session(engine) as s:
        s.add(Typed(**values))
        s.commit()
    with Session(engine) as s:
        loaded = {k: getattr(s.get(Typed, 1), k) for k in COLUMNS}
    sql_count.reset()
    with Session(engine) as s:
        cached = {k: getattr(s.get(Typed, 1), k) for k in COLUMNS}
    assert len(sql_count) == 0
    for k in COLUMNS:
        assert cached[k] == loaded[k], k
        assert type(cached[k]) is type(loaded[k]), k
        if isinstance(loaded[k], dt.datetime) and loaded[k].tzinfo is not None:
            assert cached[k].utcoffset() == loaded[k].utcoffset()


class ArrayBase(DeclarativeBase):
    metadata = MetaData()


class WithArray(ArrayBase):
    __tablename__ = "with_array"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ints: Mapped[list[int]] = mapped_column(pg.ARRAY(Integer))
    nums: Mapped[list[decimal.Decimal]] = mapped_column(pg.ARRAY(pg.NUMERIC(10, 2)))
    data: Mapped[dict[str, Any]] = mapped_column(pg.JSONB)
    ip: Mapped[Any] = mapped_column(pg.INET)


def test_postgresql_array_jsonb_inet(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """PostgreSQL ARRAY, JSONB and INET columns round-trip."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL types")
    ArrayBase.metadata.create_all(engine)
    try:
        cache.register(WithArray)
        with Session(engine) as s:
            s.add(
                WithArray(
                    id=1, ints=[1, 2, 3], nums=[decimal.Decimal("1.50")], data={"k": [1]}, ip="10.0.0.1"
                )
            )
            s.commit()
        with Session(engine) as s:
            row = s.get(WithArray, 1)
            loaded = (row.ints, row.nums, row.data, row.ip)
        sql_count.reset()
        with Session(engine) as s:
            row = s.get(WithArray, 1)
            cached = (row.ints, row.nums, row.data, row.ip)
        assert len(sql_count) == 0
        assert cached == loaded
        assert [type(x) for x in cached] == [type(x) for x in loaded]
        assert type(cached[1][0]) is decimal.Decimal
    finally:
        ArrayBase.metadata.drop_all(engine)


def test_unsupported_type_rejected_at_register(redis_url: str) -> None:
    """A model with a column type the codec cannot round-trip fails at register(), naming the column."""

    class Odd(DeclarativeBase):
        metadata = MetaData()

    class Weird(Odd):
        __table__ = Table(
            "weird", Odd.metadata, Column("id", Integer, primary_key=True), Column("r", pg.INT4RANGE)
        )

    cache = SQLCache(redis_url, prefix="reject")
    with pytest.raises(ConfigurationError, match=r"Weird\.r"):
        cache.register(Weird)


class Label(dict[str, str]):
    """A dict that can be a primary key (hashable), as in SQLAlchemy's own UnsortablePKTest."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


class LabelType(TypeDecorator[Label]):
    """Stores a Label as "k=v;..." text: a Python value sqlcache's codec does not know."""

    impl = String(40)
    cache_ok = True

    def process_bind_param(self, value: Label | None, dialect: Any) -> str | None:
        return None if value is None else ";".join(f"{k}={v}" for k, v in sorted(value.items()))

    def process_result_value(self, value: str | None, dialect: Any) -> Label | None:
        return None if value is None else Label(p.split("=", 1) for p in value.split(";"))  # type: ignore[misc]


class LabelBase(DeclarativeBase):
    metadata = MetaData()


class Labelled(LabelBase):
    __tablename__ = "labelled"
    key: Mapped[Label] = mapped_column(LabelType, primary_key=True)
    note: Mapped[str] = mapped_column(String(20))


def test_primary_key_the_codec_cannot_encode(engine: Engine, cache: SQLCache) -> None:
    """A registered class whose primary key is a TypeDecorator's own Python type: commits succeed (they
    raised CodecError out of flush()), get() reads the database, and a change is seen at once."""
    LabelBase.metadata.create_all(engine)
    try:
        cache.register(Labelled)
        k = Label(x="a")
        with Session(engine) as s:
            s.add(Labelled(key=k, note="one"))
            s.commit()
        with Session(engine) as s:
            row = s.get(Labelled, (k,))
            assert row is not None and row.note == "one"
            row.note = "two"
            s.commit()
        with Session(engine) as s:
            assert [r.note for r in s.scalars(select(Labelled).options(cached()))] == ["two"]
            s.get_one(Labelled, (k,)).note = "three"
            s.commit()
        with Session(engine) as s:
            assert s.get_one(Labelled, (k,)).note == "three"
            assert [r.note for r in s.scalars(select(Labelled).options(cached()))] == ["three"]
    finally:
        LabelBase.metadata.drop_all(engine)


class _Pep435:
    """An enum class in PEP 435's minimal form (``__members__``), which SQLAlchemy's Enum accepts."""

    __members__: dict[str, _Pep435] = {}

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value
        self.__members__[name] = self

    def __lt__(self, other: _Pep435) -> bool:
        return self.value < other.value


_LOW, _HIGH = _Pep435("low", 1), _Pep435("high", 2)


def test_an_enum_class_that_is_not_enum_enum_is_cached(engine: Engine, cache: SQLCache) -> None:
    """SQLAlchemy's EnsurePKSortableTest found it: registering a class whose Enum column names a PEP 435
    class that is not an enum.Enum raised TypeError (the fingerprint iterated the class)."""
    from sqlalchemy import Enum

    class Base(DeclarativeBase):
        metadata = MetaData()

    class Level(Base):
        __tablename__ = "pep435_levels"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        level: Mapped[_Pep435] = mapped_column(Enum(_Pep435, create_constraint=False))

    Base.metadata.create_all(engine)
    try:
        cache.register(Level)
        with Session(engine) as s:
            s.add_all([Level(id=1, level=_LOW), Level(id=2, level=_HIGH)])
            s.commit()
        for _ in range(2):
            with Session(engine) as s:
                got = s.get(Level, 2)
                assert got is not None and got.level is _HIGH
        assert cache.stats()["hits"] == 1
    finally:
        Base.metadata.drop_all(engine)
