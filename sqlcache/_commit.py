"""The commit protocol: what a transaction wrote is locked before its database COMMIT and released
with fresh generations after it (repopulated entries written where this writer's lock is the newest).

The listeners call :meth:`Commits.record` as rows are flushed, :meth:`Commits.before` from the
engine's ``commit`` event and :meth:`Commits.after` right after the DBAPI COMMIT, success or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import CHAR, Table, TypeDecorator

from . import _keys, _sa, signals
from ._hierarchy import table_name
from ._journal import Journal, Keys
from ._objects import encode_instance, only_written
from ._protocol import RepopEntry, SentLock, StoreSlot
from ._registry import Registry
from ._report import Reporter
from ._seal import Sealer
from ._tokens import new_token
from ._txn import IdentityWrite, TxnState, coarse_keys
from .errors import CacheUnavailable, CodecError, ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper

    from ._outbox import OutboxRow, OutboxWriter

__all__ = ["Commits"]

Identity = tuple[type[Any], tuple[Any, ...]]

# Most dependency keys one commit sends to Redis. A transaction that wrote more rows than this locks and
# releases its tables instead (two keys each): one script over 100,000 keys would block Redis for every
# client, outlast the timeout and end in a fence of the whole cache.
MAX_COMMIT_KEYS = 1000

# Python types a database stores and returns exactly as assigned; a repopulated entry may only carry
# written values of these types (anything else is invalidated and read back from the database)
_STORED_AS_ASSIGNED = frozenset({int, bool, str, bytes, type(None), uuid.UUID})


def _stored_as_assigned(column: Any, old: Sequence[Any], new: Any) -> bool:
    """Whether the database returns ``new`` exactly as assigned to ``column`` (whose value loaded before
    was ``old``, the history's deleted values): a plain type it loaded the old value as, through no
    TypeDecorator (which may rewrite it) and no CHAR (which pads it); or NULL."""
    if new is None:
        return True
    if isinstance(column.type, (TypeDecorator, CHAR)) or type(new) not in _STORED_AS_ASSIGNED:
        return False
    # an int assigned to a Numeric comes back a Decimal: the column's own Python type is the one the
    # database returned for the value loaded before
    return len(old) == 1 and type(old[0]) is type(new)


@dataclass(eq=False)
class _Pending:
    """What a pre-commit lock promised to release once the database COMMIT returned."""

    keys: list[str]
    token: str
    entries: list[RepopEntry]
    identities: list[Identity]
    tags: list[str]
    sent: SentLock | None = None  # a pipelined lock whose reply is read with the release
    outbox: OutboxRow | None = None  # durable: the row to mark done once the invalidation is applied
    locked: bool = False  # an awaited lock that Redis took (a pipelined one's reply is in ``sent``)


class _RowKeys:
    """What the keys of a mapper's written rows are built from, under one key layout and one set of
    registrations: its hierarchy, the attributes of its primary key columns (read from the state), the
    start of every row key, and whether it is registered itself."""

    __slots__ = ("attrs", "discriminators", "hierarchy", "layout", "registered", "start", "version")

    def __init__(self, registry: Registry, mapper: Mapper[Any], layout: _keys.Layout) -> None:
        self.layout, self.version = layout, registry.version
        self.hierarchy = h = registry.hierarchy(mapper.base_mapper)
        self.attrs = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        self.registered = registry.policy_for(mapper) is not None  # else a class of its hierarchy
        self.discriminators = _sa.discriminator_columns(mapper)
        # identity_dep_key(prefix, table, pk) is this followed by pk_token(pk)
        self.start = _keys.identity_dep_key(layout.at(h.base_table), h.base_table, ())


class Commits:
    """The commit protocol of one cache.

    :param announce: the broadcast message of a release (None when broadcast is off).
    :param outbox: the durable outbox writer, or None without ``durable=True``.
    """

    def __init__(
        self,
        slot: StoreSlot,
        reporter: Reporter,
        registry: Registry,
        sealer: Sealer,
        journal: Journal,
        keys: Keys,
        announce: Callable[[list[Identity], list[str]], tuple[str, bytes] | None],
        lock_ttl_ms: int,
        outbox: OutboxWriter | None,
        conflict: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._conflict = conflict
        self._slot = slot
        self._rep = reporter
        self._registry = registry
        self._sealer = sealer
        self._journal = journal
        self._keys = keys
        self._announce = announce
        self._lock_ttl_ms = lock_ttl_ms
        self._outbox = outbox
        self._pending: dict[int, _Pending] = {}
        # per mapper, what record() builds its rows' keys from
        self._rows: dict[Mapper[Any], _RowKeys] = {}

    def record(self, st: TxnState, mapper: Mapper[Any], state: Any, deleted: bool) -> None:
        """A row the unit of work wrote (``after_insert/update/delete`` of a registered class)."""
        layout = self._keys.layout
        row = self._rows.get(mapper)
        if row is None or row.layout is not layout or row.version != self._registry.version:
            row = self._rows[mapper] = _RowKeys(self._registry, mapper, layout)
        h = row.hierarchy
        obj = state.obj()
        values = state.dict
        attrs = row.attrs
        if len(attrs) == 1:
            pk = (values[attrs[0]],) if attrs[0] in values else tuple(mapper.primary_key_from_instance(obj))
        elif all(a in values for a in attrs):
            pk = tuple([values[a] for a in attrs])  # what primary_key_from_instance reads, without its ~2 µs
        else:
            pk = tuple(mapper.primary_key_from_instance(obj))
        old = state.key
        moved = old is not None and old[1] != pk  # the primary key itself changed
        try:
            v = pk[0]
            key = row.start + (str(v) if len(pk) == 1 and type(v) is int else _keys.pk_token(pk))
            if moved:
                old_key = row.start + _keys.pk_token(old[1])
        except CodecError:
            # a key value the codec cannot encode (a TypeDecorator's own Python type): reads of it are
            # not cached either (they cannot be keyed), but queries and other rows' entries read its
            # tables: they are invalidated whole, as for a bulk statement
            for m in mapper.base_mapper.self_and_descendants:
                for t in m.tables:
                    if isinstance(t, Table):
                        st.bulk[table_name(t)] = t
                    else:
                        st.everything = True  # mapped to a selectable: its tables are not known here
            return
        written = self._written(mapper, state, row.discriminators) if self._registry.repopulating else None
        previous = st.identities.get(key)
        if previous is not None:
            written = None if written is None or previous.written is None else written | previous.written
        cls = mapper.class_ if row.registered else None
        st.identities[key] = IdentityWrite(h, pk, None if deleted else state, cls, obj, written)
        if moved:  # the row is gone from its old key too
            st.identities[old_key] = IdentityWrite(h, tuple(old[1]), None, cls)

    def _written(self, mapper: Mapper[Any], state: Any, discriminators: frozenset[Any]) -> set[str] | None:
        """The columns an UPDATE of ``state`` sends, if the database will store each exactly as assigned;
        None if the row's new state cannot be known without reading it back: an insert (a savepoint
        may roll it back while the session keeps the object; a server default or a type may rewrite
        what was assigned), a class that does not repopulate, or a changed column whose stored value
        may differ from the assigned one, or a column the discriminator is read from (the row is
        another class's now). Called from ``after_update``, while the history is there."""
        policy = self._registry.policy_for(mapper)
        if state.key is None or policy is None or policy.mode != "repopulate":
            return None
        columns = mapper.columns
        changed: set[str] = set()
        for name in state.committed_state:
            column = columns.get(name)
            if column is None:
                continue  # a relationship: not part of the row's entry
            history = state.attrs[name].history
            if not history.added:
                continue  # assigned its own value: the UPDATE leaves the column out
            if not _stored_as_assigned(column, history.deleted, history.added[0]):
                return None
            if column in discriminators:
                return None  # the row is another class's now: this object's entry is not its new state
            changed.add(name)
        return changed

    def check_layout(self) -> None:
        """Refuse a commit that writes what the cache holds when this cache cannot invalidate it: the
        prefix's keys are laid out for another number of shards (this process's setting is wrong), so
        the other processes would go on serving what it changes.

        :raises ConfigurationError: before the database COMMIT, which then does not happen."""
        conflict = self._conflict()
        if conflict is not None:
            raise ConfigurationError(f"commit refused: {conflict}")

    def before(self, st: TxnState, dbapi_key: int, conn: Connection | None = None) -> None:
        """Before the database COMMIT: lock every dependency the transaction wrote (one round trip);
        with ``durable``, write its outbox row on ``conn`` first."""
        keys, tags = self._dependencies(st)
        coarse = len(keys) > MAX_COMMIT_KEYS
        if coarse:
            keys = coarse_keys(self._keys.layout, st)
            self._rep.incr("commits_coarsened")
        # the registered classes' rows (a row written through an unregistered class of a registered
        # one's hierarchy is invalidated, not reported: listen() in another process reports registered
        # classes only, and the tables are in the tags)
        identities = [(w.cls, w.pk) for w in st.identities.values() if w.cls is not None]
        row: OutboxRow | None = None
        if self._outbox is not None and conn is not None:
            # before the lock: if the row cannot be written, the commit fails and nothing is locked
            row = st.outbox or self._outbox.write(st, conn, keys, tags)
        token = new_token()
        # repopulate: entries whose new state we know; their other dependencies are watched, not locked
        repop, watch = self._repopulations(st) if not coarse else ([], [])
        k = self._keys
        run = self._rep.begin("lock", keys=len(keys), tags=tuple(tags)) if self._rep.hooks else None
        seen: list[str] = []
        sent: SentLock | None = None
        locked = False
        try:  # run.end() below in each branch; an unexpected exception still ends the operation
            if repop:
                seen = self._slot.current.lock(k.clock, keys, watch, token, self._lock_ttl_ms, k.gen_ttl_ms)
                locked = True
            else:
                sent = self._slot.current.send_lock(k.clock, keys, token, self._lock_ttl_ms, k.gen_ttl_ms)
            if run is not None:
                run.end("ok")
        except CacheUnavailable as exc:
            # the commit goes ahead; the release after it (or the journal) still invalidates
            if run is not None:
                run.end("error", exc)
            self._rep.report(exc, "lock")
            repop = []
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        watched = dict(zip(watch, seen, strict=False))
        entries: list[RepopEntry] = []
        for entry_key, deps, ttl_ms, payload in repop:
            marks = tuple("=" if i == 0 else watched.get(d, "") for i, d in enumerate(deps))
            if all(marks):
                entries.append(RepopEntry(entry_key, tuple(deps), ttl_ms, payload, marks))
        self._pending[dbapi_key] = _Pending(keys, token, entries, identities, tags, sent, row, locked)

    def _dependencies(self, st: TxnState) -> tuple[list[str], list[str]]:
        """(dependency keys, tags) of everything ``st`` wrote."""
        at = self._keys.layout.at
        keys: list[str] = list(st.identities)
        # every row dependency moves with its table's row-writes key (the warm-up rule depends on it)
        bases = dict.fromkeys(w.hierarchy.base_table for w in st.identities.values())
        keys += dict.fromkeys(_keys.row_writes_key(at(t), t) for t in bases)
        tags: list[str] = []
        for name in st.tables:
            keys.append(_keys.table_dep_key(at(name), name))
            tags.append(f"table:{name}")
        for name in st.bulk:
            keys.append(_keys.bulk_dep_key(at(name), name))
        if st.everything:
            keys.extend(self._keys.everything)
            tags.append("*")
        return keys, tags

    def _repopulations(self, st: TxnState) -> tuple[list[tuple[str, list[str], int, bytes]], list[str]]:
        """(entry key, dependencies, ttl ms, sealed payload) of every row this commit may write as the
        new state (``mode="repopulate"``), and the dependencies to watch besides the locked ones."""
        repop: list[tuple[str, list[str], int, bytes]] = []
        watch: list[str] = []
        if st.everything or st.translated or not self._registry.repopulating:
            return repop, watch
        layout = self._keys.layout
        for dep_key, w in st.identities.items():
            payload = self._new_state(st, w)
            if payload is None:
                continue
            h = self._registry.hierarchy(w.state.mapper)  # type: ignore[union-attr]
            others = [_keys.bulk_dep_key(layout.at(t), t) for t in h.tables]
            entry_key = _keys.identity_entry_key(layout.at(h.base_table), h.fingerprint, h.entity, w.pk)
            others += layout.everything_of([entry_key, *others])
            policy = self._registry.policy_for(h.mapper)
            ttl_ms = self._registry.ttl_ms(policy.ttl if policy is not None else None)
            repop.append((entry_key, [dep_key, *others], ttl_ms, self._sealer.seal(entry_key, payload)))
            watch.extend(o for o in others if o not in watch)
        return repop, watch

    def _new_state(self, st: TxnState, w: IdentityWrite) -> bytes | None:
        """The entry of a written row's new state, if it may be repopulated; None otherwise."""
        if w.state is None:
            return None
        policy = self._registry.policy_for(w.state.mapper)
        if policy is None or policy.mode != "repopulate":
            return None
        if any(t in st.bulk for t in w.hierarchy.tables):
            return None  # a statement changed rows of this table behind the unit of work's back
        if w.written is None or not w.state.persistent:
            return None  # see _written; a row whose insert a savepoint rolled back is not persistent
        h = self._registry.hierarchy(w.state.mapper)
        if not only_written(h, w.state, w.written):
            return None  # a column loaded, not written, may be older than the row (see only_written)
        payload: bytes | None = None
        with self._rep.degrade("encode"):
            payload = encode_instance(h, w.state)
        return payload

    def after(self, dbapi_key: int, committed: bool | None) -> None:
        """After the database COMMIT: fresh generations, locks dropped, repopulated entries written.

        ``committed`` None: the COMMIT raised and the database may still apply it (a cancelled asyncio
        task's COMMIT goes on in the driver, a COMMIT sent before the connection broke may be applied
        later). Released now, its fresh generations would let a reader fill the old row before the
        COMMIT lands. So a lock that Redis holds is left to expire (``lock_ttl``) into fresh
        generations, as a crashed writer's is; until then those rows are read from the database.
        False: the database refused it (nothing applied): released at once."""
        pending = self._pending.pop(dbapi_key, None)
        if pending is None:
            return
        rep = self._rep
        run = rep.begin("release", keys=len(pending.keys), tags=tuple(pending.tags)) if rep.hooks else None
        left = False  # the locks left to expire
        try:
            try:
                if committed is None and self._lock_holds(pending):
                    failure, left = None, True
                else:
                    failure = self._release(pending, committed is True)
            except BaseException:
                # interrupted (an asyncio task cancelled while its release was awaited; a
                # KeyboardInterrupt): the journal keeps the invalidation, whatever the release did
                self._journal.defer(pending.keys, pending.token)
                raise
            if run is not None:
                run.end("expiring" if left else "ok" if failure is None else "deferred", failure)
        finally:
            if run is not None:
                run.end("error")  # only if something unexpected raised before it ended
        if pending.outbox is not None and failure is None and not left:
            # applied: the row only needs deleting. Otherwise a relay applies it, even when the COMMIT
            # raised: a COMMIT that reached the server before the connection broke may have committed
            # (and a transaction that truly rolled back left no row to apply).
            pending.outbox.done()
        if signals.invalidated.receivers:
            rep.send(signals.invalidated, identities=pending.identities, tags=pending.tags, remote=False)

    def _lock_holds(self, pending: _Pending) -> bool:
        """After a COMMIT whose outcome is unknown: whether Redis holds this writer's lock. A pipelined
        lock's reply is read now, behind a release of no key on its connection (nothing announced: the
        outcome is unknown). If Redis cannot say, the release takes over, as after any outage (the
        journal keeps it)."""
        sent, pending.sent = pending.sent, None
        if sent is None:
            return pending.locked
        k = self._keys
        try:
            held = self._slot.current.release_after(sent, k.clock, (), pending.token, k.gen_ttl_ms)
        except CacheUnavailable as exc:
            self._rep.report(exc, "release")
            return False
        if not held:
            self._rep.incr("errors")
        return held

    def _release(self, pending: _Pending, committed: bool) -> CacheUnavailable | None:
        """The one release path: None if Redis took it, else why it went to the journal."""
        k = self._keys
        store = self._slot.current
        announce = self._announce(pending.identities, pending.tags)
        failure: CacheUnavailable | None = None
        if pending.sent is not None:
            try:
                if not store.release_after(
                    pending.sent, k.clock, pending.keys, pending.token, k.gen_ttl_ms, announce
                ):
                    self._rep.incr("errors")
                self._rep.incr("invalidations", len(pending.keys))
            except CacheUnavailable as exc:
                self._rep.report(exc, "release")
                self._journal.defer(pending.keys, pending.token)
                failure = exc
            self._journal.replay()
            return failure
        if not self._journal.replay():
            self._journal.defer(pending.keys, pending.token)
            return CacheUnavailable("release (journal not replayed yet)")
        try:
            written = store.release(
                k.clock, pending.keys, pending.token, k.gen_ttl_ms,
                pending.entries if committed else (), announce=announce,
            )  # fmt: skip
        except CacheUnavailable as exc:
            self._rep.report(exc, "release")
            self._journal.defer(pending.keys, pending.token)
            return exc
        self._rep.incr("invalidations", len(pending.keys))
        self._rep.incr("repopulated", written)
        return None
