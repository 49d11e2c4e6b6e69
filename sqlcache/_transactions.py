"""Where each database transaction's write record lives, and which of them a session's reads see.

The listeners (``_wiring``) fill these records; the read path asks them whether a session wrote what
it reads, which clock bounds its fills, and which connections it uses. No I/O, no Redis. State sits
in ``Connection.info`` and ``Session.info`` under keys of one cache, so two caches never share it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from . import _sa
from ._protocol import Clock, earliest, merge_clocks
from ._txn import ScopeChange, TxnState

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["FillBound", "Scoped", "Transactions"]

_PER_STATEMENT = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


class FillBound:
    """What a session's transaction allows a fill: ``ok`` False refuses it; ``clock`` (if not None) is
    the newest generation a fill may present (repeatable read: the clock before the first statement)."""

    __slots__ = ("clock", "ok")

    def __init__(self, ok: bool, clock: Clock | None) -> None:
        self.ok = ok
        self.clock = clock


# dialects whose USE / SET ROLE take effect whatever the transaction does
_NOT_TRANSACTIONAL = frozenset({"mysql", "mariadb"})
# RESET ALL leaves these alone (PostgreSQL); DISCARD ALL resets them too
_NOT_RESET_BY_ALL = frozenset({"role", "session_authorization", "database", "*"})


class Scoped:
    """The settings that changed name resolution on one DBAPI connection (see ``_txn.scope_changes``).

    Kept in the pool record's ``info``, which follows the DBAPI connection through check-ins and is
    emptied when the pool opens a new one: a session-level SET outlives the checkout that ran it."""

    __slots__ = ("local", "pending", "session", "trying")

    def __init__(self) -> None:
        self.session: set[str] = set()  # until reset
        self.local: set[str] = set()  # until the transaction ends (SET LOCAL)
        self.pending: set[str] = set()  # resets that take effect if the transaction commits
        self.trying: tuple[str, list[ScopeChange]] | None = None  # resets of a statement still running

    def reset(self, settings: Iterable[str]) -> None:
        for s in settings:
            if s == "*":
                self.session.clear()
            elif s == "all":
                self.session &= _NOT_RESET_BY_ALL
            else:
                self.session.discard(s)


class Transactions:
    """The write records of one cache's transactions, per connection and per session."""

    def __init__(self, owner: int) -> None:
        self._txn_key = ("sqlcache.txn", owner)
        self._conns_key = ("sqlcache.conns", owner)
        self._clock_key = ("sqlcache.clock", owner)
        self._routed_key = ("sqlcache.routed", owner)
        self._aside_key = ("sqlcache.aside", owner)
        self._scope_key = ("sqlcache.scope", owner)
        # pools on which a statement changing name resolution was ever seen
        self._switching: weakref.WeakSet[Any] = weakref.WeakSet()

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

    # -- name resolution (SET search_path, USE, ...) --------------------------------------------------

    def scoped(self, conn: Connection) -> bool:
        """Whether ``conn``'s DBAPI connection may resolve names (or rows) unlike the engine's default."""
        return self._scope_key in conn.info

    def switching(self, pool: Any) -> bool:
        """Whether name resolution was ever changed on a connection of ``pool`` (then a read learns which
        connection it runs on, and what that connection's hooks run, before it uses the cache)."""
        return bool(self._switching) and pool in self._switching

    def scope_statement(self, conn: Connection, statement: str, changes: list[ScopeChange]) -> None:
        """A statement about to run changes name resolution: what it sets counts at once (also if it
        fails: a needless bypass at worst); what it resets waits for its success."""
        info = conn.info
        self._switching.add(conn.engine.pool)
        mark: Scoped | None = info.get(self._scope_key)
        default_db = conn.engine.url.database
        resets = []
        for c in changes:
            if c.reset or (c.setting == "database" and c.value is not None and c.value == default_db):
                resets.append(c)
                continue
            if mark is None:
                mark = info[self._scope_key] = Scoped()
            (mark.local if c.local else mark.session).add(c.setting)
        if mark is not None:
            mark.trying = (statement, resets) if resets else None

    def scope_ran(self, conn: Connection, statement: str) -> None:
        """The statement succeeded: its resets apply now (MySQL's USE, autocommit) or at COMMIT (a
        PostgreSQL SET, RESET or set_config() inside a transaction is undone by its rollback)."""
        mark: Scoped | None = conn.info.get(self._scope_key)
        # equal, not the same object: a later before_cursor_execute listener (retval=True) may have
        # rebuilt the string without changing it
        if mark is None or mark.trying is None or mark.trying[0] != statement:
            return
        settings = [c.setting for c in mark.trying[1]]
        mark.trying = None
        if conn.dialect.name in _NOT_TRANSACTIONAL or _sa.is_autocommit(conn):
            mark.reset(settings)
            self._drop_if_clear(conn.info, mark)
        else:
            mark.pending.update(settings)

    def scope_abort(self, conn: Connection) -> None:
        """A savepoint rolled back, or a statement failed (PostgreSQL then rolls back at COMMIT):
        pending resets may be undone, so none of them is believed."""
        mark: Scoped | None = conn.info.get(self._scope_key)
        if mark is not None:
            mark.pending.clear()
            mark.trying = None

    def scope_txn_end(self, info: dict[Any, Any] | None, committed: bool) -> None:
        """The transaction ended: SET LOCAL is over; its resets apply if it committed."""
        if info is None:
            return
        mark: Scoped | None = info.get(self._scope_key)
        if mark is None:
            return
        if committed:
            mark.reset(mark.pending)
        mark.pending.clear()
        mark.local.clear()
        self._drop_if_clear(info, mark)

    def _drop_if_clear(self, info: dict[Any, Any], mark: Scoped) -> None:
        if not (mark.session or mark.local or mark.pending or mark.trying):
            info.pop(self._scope_key, None)

    def flushing(self, conn: Connection) -> bool:
        """Whether a session using ``conn`` is running its unit of work (rows known by the mapper events).
        Only a session whose transaction holds ``conn`` now counts: ``conn.info`` outlives checkouts, and
        a session kept alive flushing elsewhere says nothing of this connection's statements."""
        for ref in conn.info.get(self._conns_key, ()):
            s = ref()
            if s is not None and _sa.is_flushing(s) and conn in s.info.get(self._conns_key, ()):
                return not self._aside(s)
        return False

    def wrote_aside(self, session: Session, flush: SessionTransaction | None) -> None:
        """During ``session``'s flush (``flush``: the flush's transaction), a mapper listener wrote
        through the session (an ORM statement, a ``bulk_*`` method): nothing names those rows, so the
        rest of this flush's statements count as bulk writes of their tables."""
        if flush is not None:
            session.info[self._aside_key] = weakref.ref(flush)

    def wrote_beside(self, session: Session) -> None:
        """``session``, not flushing, wrote through the ORM (ORM DML, a ``bulk_*`` method): on a connection
        another session is flushing on (a mapper listener's own ``Session(bind=conn)``), those rows are
        named by no event of that flush, whose statements from now on count as bulk writes."""
        for conn in self._conns(session):
            if conn.closed or conn.invalidated:
                continue  # a routed connection since closed (kept until the transaction ends)
            for ref in conn.info.get(self._conns_key, ()):
                s = ref()
                if s is not None and s is not session and _sa.is_flushing(s):
                    if conn in s.info.get(self._conns_key, ()):
                        self.wrote_aside(s, _sa.current_transaction(s))

    def _aside(self, session: Session) -> bool:
        """Whether the flush running now is one a listener wrote aside in (see wrote_aside)."""
        ref = session.info.get(self._aside_key)
        if ref is None:
            return False
        marked = ref()
        t = _sa.current_transaction(session)
        while t is not None:
            if t is marked:
                return True
            t = t.parent
        session.info.pop(self._aside_key, None)  # an earlier flush's
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
            session.info.pop(self._routed_key, None)
            session.info.pop(self._aside_key, None)

    def routed(self, session: Session, bind: Any) -> None:
        """A read's ``session.get_bind()`` answered ``bind``: a Connection it answered (an override
        written by the application) is the session's transaction from that read on, as one it is bound
        to is, and may have written already. Called before the read looks at its own writes."""
        if bind is session.bind or not isinstance(bind, Connection):
            return
        seen: list[Connection] | None = session.info.get(self._routed_key)
        if seen is None:
            session.info[self._routed_key] = [bind]
        elif bind not in seen:
            seen[:] = [c for c in seen if not c.closed]
            seen.append(bind)

    def _conns(self, session: Session) -> Sequence[Connection]:
        """The connections of ``session``'s transaction: those it began on, and those it is bound to or
        its ``get_bind()`` answered (their transaction is its own from its first statement on, and may
        have written already)."""
        conns: Sequence[Connection] = session.info.get(self._conns_key, ())
        bound = _sa.bound_connections(session)
        routed = session.info.get(self._routed_key)
        if routed:
            bound = [*bound, *(c for c in routed if not c.closed)]
        if bound:
            conns = [*conns, *(c for c in bound if c not in conns)]
        return conns

    def connection_for(self, session: Session, pool: Any) -> Connection | None:
        """The usable connection (not closed, not invalidated) of ``session``'s transaction on ``pool``:
        one it began on, never merely one it is bound to (of several bound to one pool, the statement's
        own bind decides which runs it)."""
        for c in session.info.get(self._conns_key, ()):
            if c.engine.pool is pool and not (c.closed or c.invalidated):
                return c  # type: ignore[no-any-return]
        return None

    def of_session(self, session: Session) -> list[TxnState]:
        out = []
        for conn in self._conns(session):
            st = conn.info.get(self._txn_key) if not (conn.closed or conn.invalidated) else None
            if st is not None:
                out.append(st)
        return out

    def note_clock(self, session: Session, clock: Clock, txns: list[TxnState]) -> None:
        """Remember a clock reading taken before the transaction's first statement, if it is one (a
        sharded cache's readings of several shards are kept together, the first of each)."""
        if type(clock) is int:  # one clock: the first reading stands
            if not txns:
                session.info.setdefault(self._clock_key, clock)  # handed to the connection by session_began
            for st in txns:
                if not st.began_sql and st.clock0 is None:
                    st.clock0 = clock
            return
        if not txns:
            noted = session.info.get(self._clock_key)
            session.info[self._clock_key] = clock if noted is None else merge_clocks(noted, clock)
        for st in txns:
            if not st.began_sql:
                st.clock0 = clock if st.clock0 is None else merge_clocks(st.clock0, clock)

    def wants_all_clocks(self, session: Session, txns: list[TxnState], shards: int) -> bool:
        """A sharded cache's miss, about to run the SELECT: whether to read every shard's clock first.
        Only before the transaction's first statement (the SELECT may fix its snapshot), unless its
        connections keep per-statement snapshots (READ COMMITTED: no bound is used), and once: not when
        every shard's clock is noted already."""
        if any(st.began_sql for st in txns):
            return False
        fixed = [f for _, f in self._with_isolation(session)]
        if fixed and not any(fixed):
            return False
        noted = [st.clock0 for st in txns] if txns else [session.info.get(self._clock_key)]
        return not all(type(c) is dict and len(c) >= shards for c in noted)

    def wrote(
        self,
        session: Session,
        identity: str | None,
        bulk: Iterable[str],
        tables: Iterable[str],
        txns: list[TxnState] | None = None,
    ) -> bool:
        """Whether this session's transaction wrote something the read depends on (it must not use Redis).
        ``txns``: :meth:`of_session`, if the caller has it already."""
        bulk, tables = tuple(bulk), tuple(tables)
        for st in self.of_session(session) if txns is None else txns:
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
        for conn in self._conns(session):
            if not (conn.closed or conn.invalidated) and self._scope_key in conn.info:
                # the statement ran on a connection whose names resolve elsewhere (a SET search_path
                # left on it by an earlier checkout, say): its rows are not the shared key's
                return FillBound(False, None)
        bound: Clock | None = None
        for st, fixed in self._with_isolation(session):
            if fixed:
                if st.clock0 is None:
                    # the snapshot was fixed by a statement that ran before any clock reading, so a
                    # commit between the two could be invisible to us
                    return FillBound(False, None)
                bound = st.clock0 if bound is None else earliest(bound, st.clock0)
        return FillBound(True, bound)

    def _with_isolation(self, session: Session) -> Iterator[tuple[TxnState, bool]]:
        for conn in self._conns(session):
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
