"""One read through the cache, shared by identity and query reads: a hit; or the database and a
guarded fill; with stampede protection and stale-while-revalidate for queries.

The identity and query readers say what to read (a ``Read``, ``_readreq``); this module decides what
happens, using the store, the session's transaction state and the reporter, and never climbs back up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import _sa, _sabuild, signals
from ._journal import Keys
from ._loadreads import LoadReads
from ._protocol import ReadResult, StoreSlot, send_read
from ._readreq import Execution, Read, Sent, Unservable
from ._report import Reporter, Running
from ._seal import Sealer
from ._tokens import new_token
from ._transactions import Transactions
from ._txn import TxnState
from .errors import CacheUnavailable, CodecError

if TYPE_CHECKING:
    from sqlalchemy.engine.result import Result
    from sqlalchemy.orm import Session

__all__ = ["ReadThrough"]


class ReadThrough:
    """The read protocol of one cache.

    :param replay: applies the journal of invalidations Redis has not taken yet; False if it could not
        (then Redis must not be read: it may hold entries those invalidations would have killed).
    """

    def __init__(
        self,
        slot: StoreSlot,
        reporter: Reporter,
        txns: Transactions,
        sealer: Sealer,
        keys: Keys,
        replay: Callable[[], bool],
        *,
        stampede_wait: float,
        max_entry_bytes: int,
    ) -> None:
        self._slot = slot
        self._rep = reporter
        self._txns = txns
        self._sealer = sealer
        self._keys = keys
        self._replay = replay
        self._stampede_wait = stampede_wait
        self._max_entry_bytes = max_entry_bytes
        self._max_read_bytes = max_entry_bytes + sealer.overhead
        # a query's stampede lock outlives the wait of the callers behind it, then expires on its own
        self._fill_lock_ms = int(max(2 * stampede_wait, 5.0) * 1000)
        self.seen = LoadReads()  # what a loading miss reads (its entry's dependencies)

    def bypass(self, kind: str, model: str | None = None, tags: tuple[str, ...] = ()) -> None:
        """A read that could not use the cache (own writes, FOR UPDATE, ...)."""
        self._rep.incr("bypassed")
        if self._rep.hooks:
            self._rep.instant("read", "bypass", kind, None, model, tags)

    def _skipped_fill(self, rd: Read) -> None:
        """A fill not attempted (a dependency locked, the snapshot may predate a commit, ...)."""
        self._rep.incr("fills_skipped")
        if self._rep.hooks:
            self._rep.instant("fill", "skipped", rd.kind, rd.key, rd.model, rd.tags)

    # -- the steps of a direct read (cache.get / get_many: sqlcache._direct), several reads at once --

    def enter(self, session: Session, rds: Sequence[Read]) -> list[TxnState] | None:
        """Before direct reads of ``rds``: the session's transactions, or None if Redis must not be
        read now (see :meth:`read`)."""
        _sa.autobegin(session)
        txns = self._txns.of_session(session)
        if self._replay():
            return txns
        if self._rep.hooks:
            for rd in rds:
                self._rep.instant("read", "error", rd.kind, rd.key, rd.model, rd.tags)
        return None

    def send(self, key: str, deps: list[str]) -> Sent:
        """A direct read of one entry begun: its MGET written now where the store can split a read
        (``Store.send_read``), so that the caller's remaining checks run while Redis answers;
        :meth:`Sent.results` then answers as :meth:`fetch` would, and :meth:`Sent.drop` lets it go
        unused. Through a wrapper or the local tier the store's own ``read`` answers, at
        :meth:`Sent.results`."""
        if not self._replay():  # see read(): the database answers until the journal is applied
            return Sent(self._rep, None)
        try:
            return Sent(self._rep, send_read(self._slot.current, self._keys.clock, key, deps))
        except CacheUnavailable as exc:  # reported if the read is used (Sent.results)
            return Sent(self._rep, None, exc)

    def fetch(self, rds: Sequence[Read]) -> tuple[list[ReadResult] | None, list[Running] | None]:
        """Every read's entry and dependencies in one round trip (``Store.read_many``), and the
        operations begun for the hooks (None without hooks); no results after an outage (reported)."""
        rep = self._rep
        runs = None
        if rep.hooks:
            runs = [rep.begin("read", rd.kind, rd.key, rd.model, rd.tags, len(rd.deps)) for rd in rds]
        store, clock = self._slot.current, self._keys.clock
        try:
            read_many = getattr(store, "read_many", None) if len(rds) > 1 else None
            if read_many is None:  # one read, or a plugin's store wrapper without read_many
                results = [store.read(clock, rd.key, rd.deps) for rd in rds]
            else:
                results = read_many(clock, [(rd.key, rd.deps) for rd in rds])
                if len(results) != len(rds):
                    raise CodecError(f"read_many answered {len(results)} reads of {len(rds)}")
        except (CacheUnavailable, CodecError) as exc:  # degrade("read") spelled out
            for run in runs or ():
                run.end("error", exc)
            rep.report(exc, "read")
            return None, runs
        return results, runs

    def serve(
        self, session: Session, rd: Read, r: ReadResult, txns: list[TxnState], run: Running | None
    ) -> Any:
        """A hit's ``rd.on_hit(payload)``; None if it could not be served (then it is a miss)."""
        return self._serve(session, rd, r, txns, run, "hit")

    def read(self, orm_state: Execution, rd: Read) -> Result[Any] | None:
        """A hit, or the database and a guarded fill. None: not handled (SQLAlchemy runs it as usual)."""
        session = orm_state.session
        # autobegin=False without a transaction: the ORM would refuse to execute the statement; so do we
        _sa.autobegin(session)
        txns = self._txns.of_session(session)
        if not self._replay():
            # invalidations this process could not deliver are pending: Redis may still hold entries
            # they would have killed, so the database answers until they are applied
            if self._rep.hooks:
                self._rep.instant("read", "error", rd.kind, rd.key, rd.model, rd.tags)
            return None
        rep = self._rep
        if not rep.hooks:
            return self._read(orm_state, rd, txns, None)
        run = rep.begin("read", rd.kind, rd.key, rd.model, rd.tags, len(rd.deps))
        try:
            return self._read(orm_state, rd, txns, run)
        finally:
            run.end("error")  # only if something unexpected raised before it ended

    def _read(
        self, orm_state: Execution, rd: Read, txns: list[TxnState], run: Running | None
    ) -> Result[Any] | None:
        session = orm_state.session
        rep = self._rep
        try:  # degrade("read") spelled out: this is the hit path
            r = self._slot.current.read(self._keys.clock, rd.key, rd.deps)
        except (CacheUnavailable, CodecError) as exc:
            if run is not None:
                run.end("error", exc)
            rep.report(exc, "read")
            return None
        token = ""
        if r.hit and r.stale and rd.protect:
            # expired but valid: one caller refreshes; the others keep getting the old entry meanwhile
            with rep.degrade("lock"):
                candidate = new_token()
                if self._slot.current.try_fill_lock(rd.key, candidate, self._fill_lock_ms):
                    token = candidate
            if not token:
                served: Result[Any] | None = self._serve(session, rd, r, txns, run, "stale")
                if served is not None:
                    rep.incr("stale_served")
                    return served
        elif r.hit:
            hit: Result[Any] | None = self._serve(session, rd, r, txns, run, "hit")
            if hit is not None:
                return hit
        self.missed(rd, r, run)
        if rd.protect and not token and not r.hit:
            waited = self._await_fill(session, rd, txns)
            if isinstance(waited, str):
                token = waited
            elif waited is not None:
                return waited
        unlocked = False
        try:
            result, unlocked = self._load_and_fill(orm_state, rd, r, txns, token)
            return result
        finally:
            if token and not unlocked:
                with rep.degrade("unlock"):
                    self._slot.current.unlock_fill(self._keys.clock, rd.key, token)

    def missed(self, rd: Read, r: ReadResult, run: Running | None) -> None:
        """A read the entry did not answer: counted and signalled as a miss if there was no entry."""
        if run is not None:
            run.end("miss")
        if not r.hit:
            self._rep.incr("misses")
            if signals.cache_miss.receivers:
                self._rep.send(signals.cache_miss, key=rd.key, kind=rd.kind)

    def snapshot(self, session: Session, rd: Read, r: ReadResult, txns: list[TxnState]) -> ReadResult:
        """Before the database answers a miss: the generations its fill will present (created or
        repaired by one more round trip if the read could not vouch for them), and the clock noted."""
        if r.generations is None:
            # a dependency was missing, locked or unreadable: one more round trip, before the SELECT,
            # creates or repairs it
            # t0 generations read here; t1 the SELECT; a commit between the two moves a generation
            fresh: ReadResult | None = None
            with self._rep.degrade("read"):
                fresh = self._slot.current.generations(
                    self._keys.clock, rd.deps, self._keys.gen_ttl_ms, rd.row_writes
                )
            r = fresh if fresh is not None else r
        if r.clock:
            self._txns.note_clock(session, r.clock, txns)
        if type(r.clock) is dict and self._txns.wants_all_clocks(session, txns, self._keys.layout.n):
            # a sharded cache: this SELECT may fix the transaction's snapshot (repeatable read), and a
            # later fill in a shard whose clock was not read before it would be refused; read them all
            # now (one more round trip, on a miss that starts a transaction only)
            clocks = getattr(self._slot.current, "clocks", None)
            if clocks is not None:
                with self._rep.degrade("read"):
                    self._txns.note_clock(session, clocks(), txns)
        return r

    def fill_after(
        self, session: Session, rd: Read, r: ReadResult, encode: Callable[[], bytes | None]
    ) -> bool:
        """Store what the database returned after :meth:`snapshot` gave ``r``, if it may be stored;
        True once Redis ran fill.lua."""
        if r.locked or r.generations is None:
            # a writer holds a dependency between its lock and its release: whatever we just read may
            # already be outdated; do not store it
            self._skipped_fill(rd)
            return False
        return self._fill(session, rd, r.generations, encode, "")

    def _load_and_fill(
        self, orm_state: Execution, rd: Read, r: ReadResult, txns: list[TxnState], token: str
    ) -> tuple[Result[Any], bool]:
        """The database answers; what it returned is stored if nothing changed since ``r`` was read.
        Also returns whether fill.lua ran (it drops the stampede lock ``token`` itself)."""
        session = orm_state.session
        r = self.snapshot(session, rd, r, txns)
        runid = _sa.new_runid()  # objects the statement builds get larger numbers (built_since)
        loaded: set[str] = set()
        seen = self.seen
        loading = seen.begin(loaded)
        try:
            result = orm_state.invoke_statement()
            # set before anyone called unique(): lifted for the freeze, put back on what we return, and
            # stored with the entry
            unique_guard = _sabuild.take_unique_guard(result)
            frozen = result.freeze()  # eager loads run here, as the rows are built
        finally:
            seen.end(loading)
        seen.saw_tables(loaded)  # this miss is itself nested in another's load
        out = frozen()
        if unique_guard is not None:
            _sabuild.require_unique(out, unique_guard[1])
        if r.locked or r.generations is None:
            self._skipped_fill(rd)  # see fill_after
            return out, False
        unique = unique_guard is not None
        ran = self._fill(session, rd, r.generations, lambda: rd.encode(frozen, unique, runid, loaded), token)
        return out, ran

    def _serve(
        self,
        session: Session,
        rd: Read,
        r: ReadResult,
        txns: list[TxnState],
        run: Running | None,
        outcome: str,
    ) -> Any:
        """Rebuild a hit (what ``rd.on_hit`` returns); None (and the entry deleted) if its payload
        cannot be decoded."""
        assert r.payload is not None
        rep = self._rep
        result: Any = None
        try:
            if len(r.payload) > self._max_read_bytes:
                # no fill writes more: this one is not ours, and is not worth decoding (a payload bomb)
                raise CodecError(f"entry of {len(r.payload)} bytes, more than max_entry_bytes")
            result = rd.on_hit(self._sealer.unseal(rd.key, r.payload))
        except Unservable:
            rep.incr("bypassed")
            if run is not None:
                run.end("bypass")
            return None
        except (CacheUnavailable, CodecError) as exc:  # degrade("decode") spelled out
            rep.report(exc, "decode")
        except Exception as exc:
            # anything else while rebuilding (a value nested past the interpreter's recursion limit, a
            # defect of ours): the entry is not served and goes; the database answers
            rep.report(CodecError(f"cannot serve the entry: {exc!r}"), "decode")
        if result is None:
            if run is not None:
                run.end("error")
            with rep.degrade("decode"):
                self._slot.current.delete(rd.key)
            return None
        rep.incr("hits")
        if r.clock:
            # if no statement has run in this transaction yet, this clock reading precedes the snapshot
            # a repeatable-read transaction will take
            self._txns.note_clock(session, r.clock, txns)
        if run is not None:
            run.end(outcome)
        if signals.cache_hit.receivers:
            rep.send(signals.cache_hit, key=rd.key, kind=rd.kind)
        return result

    def _await_fill(self, session: Session, rd: Read, txns: list[TxnState]) -> Result[Any] | str | None:
        """Stampede protection: the lock's token if we are the one to query, the other's fill if it
        arrived in time, or None to query the database ourselves after the wait."""
        token = new_token()
        store = self._slot.current
        acquired = False
        with self._rep.degrade("lock"):
            acquired = store.try_fill_lock(rd.key, token, self._fill_lock_ms)
        if acquired:
            return token
        deadline = time.monotonic() + self._stampede_wait
        pause = 0.005
        while time.monotonic() < deadline:
            store.pause(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)
            r: ReadResult | None = None
            with self._rep.degrade("read"):
                r = store.read(self._keys.clock, rd.key, rd.deps)
            if r is None:
                return None
            if r.hit:
                served: Result[Any] | None = self._serve(session, rd, r, txns, None, "hit")
                if served is not None:
                    self._rep.incr("stampede_waits")
                    return served
            # the holder may have died: its lock expires, and the next caller takes over at once
            taken = False
            with self._rep.degrade("lock"):
                taken = store.try_fill_lock(rd.key, token, self._fill_lock_ms)
            if taken:
                # or the holder filled and dropped its lock between our read and our lock: look again
                # before querying the database a second time
                with self._rep.degrade("read"):
                    r = store.read(self._keys.clock, rd.key, rd.deps)
                if r is not None and r.hit:
                    served = self._serve(session, rd, r, txns, None, "hit")
                    if served is not None:
                        with self._rep.degrade("lock"):
                            store.unlock_fill(self._keys.clock, rd.key, token)
                        self._rep.incr("stampede_waits")
                        return served
                return token
        self._rep.incr("stampede_timeouts")
        return None

    def _fill(
        self, session: Session, rd: Read, generations: bytes, encode: Callable[[], bytes | None], token: str
    ) -> bool:
        """Store what the database returned if it may be stored (fill.lua decides, atomically); True
        once Redis ran fill.lua."""
        rep = self._rep
        bound = self._txns.fill_bound(session)
        if not bound.ok:
            self._skipped_fill(rd)
            return False
        payload: bytes | None = None
        with rep.degrade("encode"):
            payload = encode()
        if payload is None:
            if rep.hooks:  # the result may not be stored (or could not be encoded): no fill
                rep.instant("fill", "skipped", rd.kind, rd.key, rd.model, rd.tags)
            return False
        if len(payload) > self._max_entry_bytes:
            rep.incr("too_large")  # a huge result is not worth a Redis value: stays uncached
            if rep.hooks:
                rep.instant("fill", "skipped", rd.kind, rd.key, rd.model, rd.tags)
            return False
        payload = self._sealer.seal(rd.key, payload)
        ttl_ms, swr_ms = rd.ttl_ms, rd.swr_ms
        fresh_until = int(time.time() * 1000) + ttl_ms if swr_ms and ttl_ms else None
        entry_ttl = ttl_ms + swr_ms if ttl_ms else 0
        run = rep.begin("fill", rd.kind, rd.key, rd.model, rd.tags, len(rd.deps)) if rep.hooks else None
        k = self._keys
        try:
            stored = self._slot.current.fill(
                k.clock, rd.key, rd.deps, payload, entry_ttl, generations, bound.clock, k.gen_ttl_ms,
                fresh_until, token,
            )  # fmt: skip
            outcome = "stored" if stored == 1 else "refused" if stored == 0 else "skipped"
            if run is not None:
                run.end(outcome)
        except CacheUnavailable as exc:
            if run is not None:
                run.end("error", exc)
            rep.report(exc, "fill")
            return False
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        rep.incr({"stored": "fills", "refused": "fills_refused", "skipped": "fills_skipped"}[outcome])
        return True
