"""Where each database transaction's write record lives, and which of them a session's reads see.

The listeners (``_wiring``) fill these records; the read path asks them whether a session wrote what
it reads, which clock bounds its fills, and which connections it uses. No I/O, no Redis. State sits
in ``Connection.info`` and ``Session.info`` under keys of one cache, so two caches never share it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _sa
from ._txn import TxnState

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["FillBound", "Transactions"]

_PER_STATEMENT = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


class FillBound:
    """What a session's transaction allows a fill: ``ok`` False refuses it; ``clock`` (if not None) is
    the newest generation a fill may present (repeatable read: the clock before the first statement)."""

    __slots__ = ("clock", "ok")

    def __init__(self, ok: bool, clock: int | None) -> None:
        self.ok = ok
        self.clock = clock


class Transactions:
    """The write records of one cache's transactions, per connection and per session."""

    def __init__(self, owner: int) -> None:
        self._txn_key = ("sqlcache.txn", owner)
        self._conns_key = ("sqlcache.conns", owner)
        self._clock_key = ("sqlcache.clock", owner)

    # -- per connection (engine events) ---------------------------------------------------------------

    def of(self, conn: Connection) -> TxnState:
        """The write record of ``conn``'s transaction (created on first use)."""
        info = conn.info
        st: TxnState | None = info.get(self._txn_key)
        if st is None:
            st = TxnState()
            info[self._txn_key] = st
        return st

    def peek(self, conn: Connection) -> TxnState | None:
        st: TxnState | None = conn.info.get(self._txn_key)
        return st

    def begin(self, conn: Connection, st: TxnState | None = None) -> None:
        conn.info[self._txn_key] = st if st is not None else TxnState()

    def end(self, conn: Connection) -> TxnState | None:
        """Take the record away (commit or rollback); None if there was none, or if the connection was
        invalidated (its info is gone with it, and a rollback must succeed as it does without us)."""
        if conn.invalidated:
            return None
        st: TxnState | None = conn.info.pop(self._txn_key, None)
        return st

    def flushing(self, conn: Connection) -> bool:
        """Whether a session using ``conn`` is running its unit of work (rows known by the mapper events)."""
        for ref in conn.info.get(self._conns_key, ()):
            s = ref()
            if s is not None and _sa.is_flushing(s):
                return True
        return False

    # -- per session (session events, reads) ------------------------------------------------------------

    def session_began(self, session: Session, conn: Connection) -> None:
        """``conn`` joined ``session``'s transaction; a clock noted before it started goes to its record."""
        conns: list[Connection] = session.info.setdefault(self._conns_key, [])
        if conn not in conns:
            conns.append(conn)
        refs: list[weakref.ref[Session]] = conn.info.setdefault(self._conns_key, [])
        refs[:] = [r for r in refs if r() is not None and r() is not session]
        refs.append(weakref.ref(session))
        clock = session.info.get(self._clock_key)
        st = self.of(conn)
        if clock is not None and not st.began_sql:
            st.clock0 = clock

    def session_ended(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            session.info.pop(self._conns_key, None)
            session.info.pop(self._clock_key, None)

    def connection_for(self, session: Session, pool: Any) -> Connection | None:
        """The usable connection (not closed, not invalidated) of ``session``'s transaction on ``pool``."""
        for c in session.info.get(self._conns_key, ()):
            if c.engine.pool is pool and not (c.closed or c.invalidated):
                return c  # type: ignore[no-any-return]
        return None

    def of_session(self, session: Session) -> list[TxnState]:
        out = []
        for conn in session.info.get(self._conns_key, ()):
            st = conn.info.get(self._txn_key) if not (conn.closed or conn.invalidated) else None
            if st is not None:
                out.append(st)
        return out

    def note_clock(self, session: Session, clock: int, txns: list[TxnState]) -> None:
        """Remember a clock reading taken before the transaction's first statement, if it is one."""
        if not txns:
            session.info.setdefault(self._clock_key, clock)  # handed to the connection by session_began
        for st in txns:
            if not st.began_sql and st.clock0 is None:
                st.clock0 = clock

    def wrote(
        self, session: Session, identity: str | None, bulk: Iterable[str], tables: Iterable[str]
    ) -> bool:
        """Whether this session's transaction wrote something the read depends on (it must not use Redis)."""
        bulk, tables = tuple(bulk), tuple(tables)
        for st in self.of_session(session):
            if st.everything or (identity is not None and identity in st.identities):
                return True
            if any(t in st.bulk for t in bulk) or any(t in st.tables for t in tables):
                return True
        return False

    def fill_bound(self, session: Session) -> FillBound:
        """Whether, and under which clock, ``session`` may fill what it just read.

        Under repeatable read (and SQLite) the database snapshot is fixed by the transaction's first
        statement: a fill is safe only against generations no newer than a clock read before it.
        """
        bound: int | None = None
        for st, fixed in self._with_isolation(session):
            if fixed:
                if st.clock0 is None:
                    # the snapshot was fixed by a statement that ran before any clock reading, so a
                    # commit between the two could be invisible to us
                    return FillBound(False, None)
                bound = st.clock0 if bound is None else min(bound, st.clock0)
        return FillBound(True, bound)

    def _with_isolation(self, session: Session) -> Iterator[tuple[TxnState, bool]]:
        for conn in session.info.get(self._conns_key, ()):
            if conn.closed or conn.invalidated:
                continue
            st = conn.info.get(self._txn_key)
            if st is None:
                continue
            yield st, snapshot_fixed(conn)


def snapshot_fixed(conn: Connection) -> bool:
    """Whether the transaction keeps the database snapshot of its first statement (repeatable read
    and up, and SQLite)."""
    if conn.dialect.name == "sqlite":
        return True
    level = conn.get_execution_options().get("isolation_level") or conn.default_isolation_level
    return str(level).upper() not in _PER_STATEMENT
