"""Models shared by the integration tests."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Time,
    Uuid,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    attribute_keyed_dict,
    deferred,
    mapped_column,
    relationship,
)


class Base(AsyncAttrs, DeclarativeBase):  # AsyncAttrs: the asyncio suite's awaitable_attrs
    metadata = MetaData()


class Color(enum.Enum):
    red = "r"
    green = "g"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str | None] = mapped_column(String(100), default=None)
    version: Mapped[int] = mapped_column(Integer, default=1)
    bio: Mapped[str | None] = deferred(mapped_column(Text, default=None))
    orders: Mapped[list[Order]] = relationship(back_populates="user", cascade="all, delete-orphan")
    tags: Mapped[list[Tag]] = relationship(secondary="user_tags")
    # the same rows through other collection classes (read-only views for the query cache's tests)
    order_set: Mapped[set[Order]] = relationship(collection_class=set, viewonly=True)
    orders_by_id: Mapped[dict[int, Order]] = relationship(
        collection_class=attribute_keyed_dict("id"), viewonly=True
    )


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    total: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2), default=decimal.Decimal("0"))
    user: Mapped[User | None] = relationship(back_populates="orders")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label: Mapped[str] = mapped_column(String(30))


user_tags = Table(
    "user_tags",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(50))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    stock: Mapped[int] = mapped_column(Integer, default=0)


class Membership(Base):
    __tablename__ = "memberships"
    org_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_key: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))


class Employee(Base):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: Any = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "engineers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    language: Mapped[str | None] = mapped_column(String(30))
    __mapper_args__: Any = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    reports: Mapped[int] = mapped_column(Integer, default=0)
    __mapper_args__: Any = {"polymorphic_identity": "manager"}


class Vehicle(Base):
    __tablename__ = "vehicles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20))
    wheels: Mapped[int] = mapped_column(Integer, default=4)
    payload: Mapped[int | None] = mapped_column(Integer, default=None)
    __mapper_args__: Any = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Car(Vehicle):
    __mapper_args__: Any = {"polymorphic_identity": "car"}


class Truck(Vehicle):
    __mapper_args__: Any = {"polymorphic_identity": "truck"}


class Typed(Base):
    """One column of each generic type the codec must round-trip."""

    __tablename__ = "typed"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    big: Mapped[int | None] = mapped_column(BigInteger)
    num: Mapped[decimal.Decimal | None] = mapped_column(Numeric(20, 6))
    flt: Mapped[float | None] = mapped_column(Float)
    s: Mapped[str | None] = mapped_column(String(100))
    txt: Mapped[str | None] = mapped_column(Text)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    day: Mapped[dt.date | None] = mapped_column(Date)
    at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    at_tz: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    clock: Mapped[dt.time | None] = mapped_column(Time)
    span: Mapped[dt.timedelta | None] = mapped_column(Interval)
    uid: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    color: Mapped[Color | None] = mapped_column(Enum(Color, name="color"))
    mood: Mapped[str | None] = mapped_column(Enum("happy", "sad", name="mood"))
    doc: Mapped[Any] = mapped_column(JSON)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)


class Settings(Base):
    """A JSON column tracked by sqlalchemy.ext.mutable."""

    __tablename__ = "settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    prefs: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSON))
