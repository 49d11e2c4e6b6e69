"""The benchmark's tables and its floors (``python -m sqlcache bench``).

- ``BenchUser`` / ``BenchOrder``: the rows every system reads (ten columns of the usual types; an order
  with a lazy many-to-one to its user).
- :class:`Floor`: what any cache at the ORM level must do at least, measured beside sqlcache: one GET,
  a msgpack decode and the objects built (the floor), and the same objects handed out through a real
  Session's ``do_orm_execute`` into its identity map (the ORM floors: get, lazy load, queries).
"""

from __future__ import annotations

import datetime as dt
import decimal
import time
from collections.abc import Callable
from typing import Any

import msgpack
import redis
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    event,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, ORMExecuteState, Session, mapped_column, relationship
from sqlalchemy.orm.attributes import instance_state

from .._pools import Wire, client_for

__all__ = ["COLUMNS", "Base", "BenchOrder", "BenchUser", "Floor"]


class Base(DeclarativeBase):
    pass


class BenchUser(Base):
    __tablename__ = "bench_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2))
    active: Mapped[bool] = mapped_column(Boolean)
    score: Mapped[float] = mapped_column(Float)
    bio: Mapped[str] = mapped_column(Text)
    meta: Mapped[Any] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    rank: Mapped[int] = mapped_column(Integer)


class _FloorSession(Session):
    """The ORM floor's sessions (the answering hook listens on this class only)."""


class BenchOrder(Base):
    __tablename__ = "bench_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("bench_users.id"))
    total: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2))
    note: Mapped[str] = mapped_column(Text)
    user: Mapped[BenchUser] = relationship()


COLUMNS = ["id", "name", "email", "created_at", "balance", "active", "score", "bio", "meta", "rank"]


class Floor:
    """The floor: one GET of an entry the same size + msgpack decode + building the same ORM objects;
    and the ORM floor: the same objects handed out through a real Session as a do_orm_execute answer,
    each in the identity map as a load puts it. What any cache at the ORM level must do at least,
    without keys, dependencies, validation or loader state.

    The floor builds objects equal to the database's, by the cheapest means msgpack offers: datetimes
    as msgpack timestamps (decoded in C to aware UTC datetimes, equal to the database's), the Decimal
    as text turned back into a Decimal; every other column is a native msgpack type.

    Its GET is redis-py's ``client.get`` (what a hand-written cache does). ``of(1, lean=True)`` is the
    same floor with its GET written and read the way sqlcache's store does (its own pool, the command
    straight on the socket: ``_pools.Wire``): the share of the floor that is redis-py's client, which
    sqlcache's reads do not pay.
    """

    def __init__(self, plain: Engine, prefix: str, client: redis.Redis) -> None:
        self.plain = plain
        self.client = client
        self.manager = BenchUser.__mapper__.class_manager
        self.decimal_at = COLUMNS.index("balance")
        self.meta = SimpleResultMetaData(["BenchUser"])
        self.keys: dict[int, str] = {}
        self.held: dict[str, bytes] = {}  # the same bytes in this process's memory (the memory floors)
        self.lean = client_for(client, 5.0)  # sqlcache's transport to the same server
        with Session(plain) as s:
            for n in (1, 20, 200):
                users = s.scalars(select(BenchUser).order_by(BenchUser.id).limit(n)).all()
                self.keys[n] = f"{prefix}:floor{n}"
                self.held[self.keys[n]] = msgpack.packb([_plain_values(u) for u in users])
                client.set(self.keys[n], self.held[self.keys[n]])
        event.listen(_FloorSession, "do_orm_execute", self._answer)

    def close(self) -> None:
        event.remove(_FloorSession, "do_orm_execute", self._answer)
        self.client.delete(*self.keys.values())
        self.lean.close()

    def _lean_get(self, key: str) -> Any:
        pool = self.lean.connection_pool
        conn: Any = pool.get_connection()
        try:
            Wire.send(conn, "GET", key)
            raw = Wire.read(conn)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        pool.release(conn)
        return raw

    def objects(self, key: str, memory: bool = False, lean: bool = False) -> list[Any]:
        out = []
        decimal_at, manager = self.decimal_at, self.manager
        raw: Any = self.held[key] if memory else self._lean_get(key) if lean else self.client.get(key)
        for values in msgpack.unpackb(raw, timestamp=3):
            values[decimal_at] = decimal.Decimal(values[decimal_at])
            obj = manager.new_instance()
            obj.__dict__.update(zip(COLUMNS, values, strict=True))
            out.append(obj)  # kept, as a result keeps them: an object dropped at once is cheaper to make
        return out

    def of(self, n: int, lean: bool = False) -> Callable[[], None]:
        key = self.keys[n]

        def op() -> None:
            self.objects(key, lean=lean)

        return op

    def _answer(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        options = orm_state.execution_options
        key = options.get("sqlcache_bench_floor")
        if key is None and orm_state.is_relationship_load and orm_state.bind_mapper is BenchUser.__mapper__:
            key = self.keys[1]  # the lazy load of order 1's user (orm_lazy): user 1's entry
        if key is None:
            return None  # the database answers (the order the lazy row starts from)
        session = orm_state.session
        identity_map = session.identity_map
        rows = []
        for obj in self.objects(key, options.get("sqlcache_bench_memory", False)):
            state = instance_state(obj)
            state.key = (BenchUser, (obj.id,), None)
            state.session_id = session.hash_key
            identity_map._add_unpresent(state, state.key)
            rows.append((obj,))
        return IteratorResult(self.meta, iter(rows))

    def orm_get(self) -> None:
        with _FloorSession(self.plain) as s:
            s.get(BenchUser, 1, execution_options={"sqlcache_bench_floor": self.keys[1]})

    def orm_get_memory(self) -> None:
        """The ORM floor of a get with the entry's bytes already in memory: the least a local hit
        through ``Session.get`` can cost (the Session, its identity map, decode and build)."""
        options = {"sqlcache_bench_floor": self.keys[1], "sqlcache_bench_memory": True}
        with _FloorSession(self.plain) as s:
            s.get(BenchUser, 1, execution_options=options)

    def orm_lazy(self) -> int:
        """The lazy row's ORM floor: order 1 loaded from the database, then its user (timed) answered
        from the floor's entry by the same hook."""
        with _FloorSession(self.plain) as s:
            order = s.get(BenchOrder, 1)
            assert order is not None
            t0 = time.perf_counter_ns()
            _ = order.user
            return time.perf_counter_ns() - t0

    def orm_of(self, n: int, memory: bool = False) -> Callable[[], None]:
        stmt = (
            select(BenchUser)
            .where(BenchUser.id <= n)
            .order_by(BenchUser.id)
            .execution_options(sqlcache_bench_floor=self.keys[n], sqlcache_bench_memory=memory)
        )

        def op() -> None:
            with _FloorSession(self.plain) as s:
                rows = s.scalars(stmt).all()
                assert len(rows) == n

        return op


def _plain_values(u: BenchUser) -> list[Any]:
    out: list[Any] = []
    for c in COLUMNS:
        v = getattr(u, c)
        if isinstance(v, dt.datetime):
            out.append(msgpack.Timestamp.from_datetime(v))
        elif isinstance(v, decimal.Decimal):
            out.append(str(v))
        else:
            out.append(v)
    return out
