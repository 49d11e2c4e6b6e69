"""Direct identity reads: ``cache.get(session, Model, pk)`` and ``cache.get_many(session, Model, pks)``.

``Session.get`` pays for SQLAlchemy's statement pipeline before sqlcache sees the read; these skip it
and answer what ``Session.get`` would, through the same protocol (``_readthrough``): the entries of
every key asked in one round trip (``Store.read_many``), hits built into the identity map, misses
loaded by one ``SELECT ... WHERE pk IN (...)`` after their generations were read, and each filled under
the guarded protocol (refused if a dependency moved, the repeatable-read bound applied).

A ``get`` of one key the session does not hold sends its MGET before its last checks (where the
session would read, this transaction's writes) and reads the reply after them: those checks run while
Redis answers. A reply the checks say must not be used is read and dropped, and the model's next
``get`` checks before it sends (:meth:`DirectReader._read_one`). A plugin's store wrapper or the local
tier in front of the store answer ``read`` themselves, after the checks. Operation hooks
see a split read from its reply on, and not at all if it is dropped.

What this fast path does not cover is handed to ``Session.get`` itself, which gives the same answer at
its usual cost: a sharded session, session execution options, an engine the cache is not attached to,
a ``schema_translate_map`` or a connection whose names resolve elsewhere, an expired object in the
identity map, a key given as a dict of attribute values or of the wrong width, a row found under
another spelling of its key (a case-insensitive collation). A key is read as ``Session.get`` reads it
(:func:`key_values`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm.attributes import instance_state

from . import _sa
from ._identity import IdentityReader, entry_of, exact_key
from ._objects import materialize
from ._readreq import Read
from ._readthrough import ReadThrough
from ._registry import Registry, mapper_of
from ._transactions import Transactions
from .config import ModelPolicy
from .errors import CodecError, ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, Session
    from sqlalchemy.sql import Select

    from ._hierarchy import Hierarchy
    from ._protocol import ReadResult
    from ._report import Running
    from ._txn import TxnState

__all__ = ["DirectReader"]

# keys per SELECT ... IN: far below every database's limit on bound parameters (SQLite: 32766)
_IN_BATCH = 1000
_ABSENT = (None,)  # a hit on a cached absence (a served hit is never None)
_UNSENT = object()  # _read_one: a key the codec cannot encode, or own writes: _read answers
_CHECKED_PASSES = 8  # see DirectReader._checks_first


def key_values(raw: Any) -> tuple[Any, ...]:
    """The primary key values of ``raw`` as ``Session.get`` reads a key that is not a dict: any iterable
    but a string or bytes is the values (a tuple, a list, a ``Row``, a named tuple...), anything else
    (None included) the one value."""
    if type(raw) is tuple:
        return raw
    return tuple(_sa.key_list(raw))


def _never_encode(*_args: Any) -> bytes | None:
    raise AssertionError("a direct read fills through fill_after")  # pragma: no cover


def _current(session: Session | scoped_session[Any]) -> Session:
    """The session itself, or a ``scoped_session``'s current one (Flask-SQLAlchemy's ``db.session``)."""
    if isinstance(session, scoped_session):
        current: Session = session()
        return current
    return session


class DirectReader:
    """``get`` and ``get_many`` of one cache.

    :param serves: whether an engine or connection is attached to the cache.
    """

    def __init__(
        self,
        reads: ReadThrough,
        identities: IdentityReader,
        registry: Registry,
        txns: Transactions,
        serves: Callable[[Any], bool],
    ) -> None:
        self._reads = reads
        self._identities = identities
        self._registry = registry
        self._txns = txns
        self._serves = serves
        self._statements: dict[Mapper[Any], tuple[Select[Any], Select[Any]]] = {}
        self._mappers: dict[type[Any], Mapper[Any]] = {}  # inspect() is a good part of a hit
        # models whose get found, after its MGET was sent, that Session.get must answer (a session with
        # listeners, bound elsewhere...), with the gets checked before sending that passed since: a
        # model sends first again after _CHECKED_PASSES of them in a row (sessions of both kinds
        # taking turns do not pay a dropped round trip each)
        self._checks_first: dict[Mapper[Any], int] = {}

    def get(self, session: Session | scoped_session[Any], cls: type[Any], pk: Any) -> Any:
        """What ``session.get(cls, pk)`` returns: :meth:`get_many` of one key, with a shorter way to a
        Redis hit (one key, not in the identity map, nothing to flush first)."""
        session = _current(session)
        mapper, policy = self._registered(cls)
        t = type(pk)
        if (t is int or t is str or t is uuid.UUID) and len(mapper.primary_key) == 1:
            key = (pk,)
            try:
                held = session.identity_map.get(mapper.identity_key_from_primary_key(key))
            except TypeError:  # an unhashable value
                held = True
            if held is None and not _sa.needs_autoflush(session):
                passes = self._checks_first.get(mapper)
                if passes is not None:
                    if not self._plain(session, mapper):
                        self._checks_first[mapper] = 0
                        return session.get(cls, pk)
                    if passes + 1 >= _CHECKED_PASSES:
                        self._checks_first.pop(mapper, None)
                    else:
                        self._checks_first[mapper] = passes + 1
                answered = self._read_one(session, mapper, cls, policy, key, passes is not None)
                if answered is not _UNSENT:
                    return answered
        if not self._plain(session, mapper):
            return session.get(cls, pk)
        return self._answer(session, mapper, cls, policy, [pk])[0]  # see key_values

    def get_many(
        self, session: Session | scoped_session[Any], cls: type[Any], pks: Iterable[Any]
    ) -> list[Any]:
        """Per key asked, in order, what ``session.get(cls, key)`` returns (duplicates allowed)."""
        asked = list(pks)
        session = _current(session)
        mapper, policy = self._registered(cls)
        if not self._plain(session, mapper):
            return [session.get(cls, pk) for pk in asked]
        return self._answer(session, mapper, cls, policy, asked)

    def _registered(self, cls: type[Any]) -> tuple[Mapper[Any], ModelPolicy]:
        mapper = self._mappers.get(cls)
        if mapper is None:
            mapper = mapper_of(cls)
            if len(self._mappers) > 4096:
                self._mappers.clear()
            self._mappers[cls] = mapper
        policy = self._registry.policy_for(mapper)
        if policy is None:
            raise ConfigurationError(
                f"{cls.__name__} is not registered with this cache: call cache.register({cls.__name__}) "
                "first, or use session.get()"
            )
        return mapper, policy

    def _answer(
        self, session: Session, mapper: Mapper[Any], cls: type[Any], policy: ModelPolicy, asked: list[Any]
    ) -> list[Any]:
        """The answers for ``asked`` of a read the fast path covers (:meth:`_plain`)."""
        out: list[Any] = [None] * len(asked)
        items = list(enumerate(asked))
        start = 0
        if _sa.needs_autoflush(session):
            # Session.get, key by key, flushes at the first key the session does not hold: the keys
            # before it are answered from the session as it is, the rest after the flush (which may
            # have deleted an object, or moved it to another key); the flush is recorded as this
            # transaction's writes
            while start < len(items) and not self._lookup(
                session, mapper, cls, items[start : start + 1], out
            ):
                start += 1
            if start == len(items):
                return out
            _sa.autoflush(session)
        wanted = self._lookup(session, mapper, cls, items[start:], out)
        if wanted:
            self._read(session, mapper, cls, self._registry.ttl_ms(policy.ttl), wanted, out)
        return out

    def _plain(self, session: Session, mapper: Mapper[Any]) -> bool:
        """Whether the read is one the fast path answers exactly as Session.get would (see the module)."""
        return self._session_plain(session, mapper) and self._bind_plain(session, mapper)

    def _session_plain(self, session: Session, mapper: Mapper[Any]) -> bool:
        """:meth:`_plain`'s checks of the session and the model (cheap, and rarely changing)."""
        if hasattr(session, "shard_chooser") or getattr(session, "execution_options", None):
            return False
        if _sa.app_listeners(session):  # a listener may change what Session.get runs (a tenant filter)
            return False
        return not self._registry.hierarchy(mapper).unknown_reads  # a column of SQL text (_hierarchy)

    def _bind_plain(self, session: Session, mapper: Mapper[Any]) -> bool:
        """:meth:`_plain`'s checks of where the read would run: an engine the cache is attached to, on a
        connection whose names resolve as the engine's."""
        bind = session.get_bind(mapper=mapper, clause=self._statement(mapper)[0])
        if not self._serves(bind):
            return False
        pool, txns = bind.engine.pool, self._txns
        txns.routed(session, bind)  # a Connection an override answered: its writes are the read's
        conn = txns.connection_for(session, pool)
        if conn is None:
            if isinstance(bind, Connection):
                conn = None if (bind.closed or bind.invalidated) else bind
            elif txns.switching(pool):
                return False  # which connection the session gets, and what it runs first, decides
        if conn is not None and txns.scoped(conn):
            return False
        options = (conn if conn is not None else bind).get_execution_options()
        return not options.get("schema_translate_map")

    def _lookup(
        self,
        session: Session,
        mapper: Mapper[Any],
        cls: type[Any],
        items: Iterable[tuple[int, Any]],
        out: list[Any],
    ) -> dict[tuple[Any, ...], list[int]]:
        """Answer from the identity map what it holds, as Session.get does; the other keys (as tuples)
        with the positions that asked for them."""
        identity_map = session.identity_map
        width = len(mapper.primary_key)
        rest: dict[tuple[Any, ...], list[int]] = {}
        for i, raw in items:
            if isinstance(raw, dict):  # attribute names to values: Session.get's own way
                out[i] = session.get(cls, raw)
                continue
            pk = key_values(raw)  # read once (an iterator is used up): every later use takes pk
            if len(pk) != width or any(v is None for v in pk):
                out[i] = session.get(cls, pk)  # its own answer, or its own error
                continue
            try:
                obj = identity_map.get(mapper.identity_key_from_primary_key(pk))
            except TypeError:  # an unhashable value
                out[i] = session.get(cls, pk)
                continue
            if obj is not None:
                held = isinstance(obj, cls) and not instance_state(obj).expired
                out[i] = obj if held else session.get(cls, pk)  # an expired object reloads its way
                continue
            rest.setdefault(pk, []).append(i)
        return rest

    def _read(
        self,
        session: Session,
        mapper: Mapper[Any],
        cls: type[Any],
        ttl_ms: int,
        wanted: dict[tuple[Any, ...], list[int]],
        out: list[Any],
    ) -> None:
        """Redis for every key the session does not hold, the database for the rest, then the fills."""
        reads, h = self._reads, self._registry.hierarchy(mapper)
        model = mapper.class_.__name__
        rds, keys, uncached = self._requests(session, h, model, ttl_ms, wanted)
        txns = reads.enter(session, rds) if rds else None
        results, runs = reads.fetch(rds) if txns is not None else (None, None)
        self._answered(session, h, cls, wanted, out, (rds, keys, uncached), txns, results, runs)

    def _read_one(
        self,
        session: Session,
        mapper: Mapper[Any],
        cls: type[Any],
        policy: ModelPolicy,
        key: tuple[Any, ...],
        checked: bool,
    ) -> Any:
        """:meth:`_read` of one key the session does not hold, with nothing to flush: its MGET is sent
        first, and what decides whether the reply may be used (:meth:`_plain`, unless ``checked``
        already; this transaction's writes) is looked at while Redis answers (where the store can split
        a read: ``ReadThrough.send``). The answer; :data:`_UNSENT` for a key the codec cannot encode
        (:meth:`_read` answers it)."""
        reads, h = self._reads, self._registry.hierarchy(mapper)
        model = mapper.class_.__name__
        try:
            entry_key, deps, row_writes = self._identities.keys(h, key)
        except CodecError:
            return _UNSENT  # _read bypasses it
        txns = self._txns.of_session(session)
        if txns and self._txns.wrote(session, deps[0], h.tables, h.reads, txns):
            return _UNSENT  # the database answers (_read): nothing to send
        sent = reads.send(entry_key, deps)
        try:
            plain = checked or self._plain(session, mapper)
            if plain:
                _sa.autobegin(session)  # raises as Session.get would
                ttl_ms = self._registry.ttl_ms(policy.ttl)
                rd = self._request(session, h, entry_key, deps, row_writes, ttl_ms, model)
                # again: a Connection the bind check just routed to may have written
                txns = self._txns.of_session(session)
                wrote = bool(txns) and self._txns.wrote(session, deps[0], h.tables, h.reads, txns)
        except BaseException:
            sent.drop()
            raise
        if not plain:  # the reply is not ours to use: Session.get answers
            sent.drop()
            if sent.early:
                self._checks_first[mapper] = 0
            return session.get(cls, key[0])
        uncached: list[tuple[Any, ...]] = []  # the database answers, nothing is filled
        misses: list[tuple[Read, tuple[Any, ...], ReadResult]] = []
        if wrote:
            # this transaction wrote the row or its table: the database holds what it must see
            sent.drop()
            reads.bypass("identity", model)
            uncached.append(key)
        else:
            results, runs = sent.results(rd)
            if results is None:  # an outage (reported): the database answers, as for Session.get
                uncached.append(key)
            else:
                r, run = results[0], (runs[0] if runs is not None else None)
                if r.hit:
                    served = reads.serve(session, rd, r, txns, run)
                    if served is not None:
                        return served[0]
                reads.missed(rd, r, run)
                misses.append((rd, key, reads.snapshot(session, rd, r, txns)))  # see _answered
        out: list[Any] = [None]
        self._loaded(session, h, cls, {key: [0]}, out, uncached, misses)
        return out[0]

    def _request(
        self,
        session: Session,
        h: Hierarchy,
        entry_key: str,
        deps: list[str],
        row_writes: str | None,
        ttl_ms: int,
        model: str,
    ) -> Read:
        """The read of one identity entry; a hit builds its object into ``session``."""
        on_hit = partial(self._built, session, h, entry_key)
        rd = Read("identity", entry_key, deps, ttl_ms, on_hit, _never_encode, model=model)
        rd.row_writes = row_writes
        return rd

    def _requests(
        self, session: Session, h: Hierarchy, model: str, ttl_ms: int, wanted: Iterable[tuple[Any, ...]]
    ) -> tuple[list[Read], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The reads of the keys ``wanted`` (and those keys, in the same order), and the keys the
        database must answer without the cache (bypassed)."""
        reads = self._reads
        rds: list[Read] = []
        keys: list[tuple[Any, ...]] = []
        uncached: list[tuple[Any, ...]] = []  # the database answers, nothing is filled
        for pk in wanted:
            try:
                entry_key, deps, row_writes = self._identities.keys(h, pk)
            except CodecError:  # a key value the codec cannot encode: not cached
                reads.bypass("identity", model)
                uncached.append(pk)
                continue
            if self._txns.wrote(session, deps[0], h.tables, h.reads):
                # this transaction wrote the row or its table: the database holds what it must see
                reads.bypass("identity", model)
                uncached.append(pk)
                continue
            rds.append(self._request(session, h, entry_key, deps, row_writes, ttl_ms, model))
            keys.append(pk)
        return rds, keys, uncached

    def _answered(
        self,
        session: Session,
        h: Hierarchy,
        cls: type[Any],
        wanted: dict[tuple[Any, ...], list[int]],
        out: list[Any],
        asked: tuple[list[Read], list[tuple[Any, ...]], list[tuple[Any, ...]]],
        txns: list[TxnState] | None,
        results: list[ReadResult] | None,
        runs: list[Running] | None,
    ) -> None:
        """The hits served into ``out``, then the database for the misses and for the keys read without
        the cache, and the fills. ``asked``: what :meth:`_requests` returned; ``txns``: the session's
        transactions (None: Redis was not read); ``results``: Redis's answers (None: an outage)."""
        reads = self._reads
        rds, keys, uncached = asked
        misses: list[tuple[Read, tuple[Any, ...], ReadResult]] = []
        if txns is None or results is None:
            uncached.extend(keys)  # Redis unreadable: the database answers, as for Session.get
        else:
            for j, (rd, r) in enumerate(zip(rds, results, strict=True)):
                run = runs[j] if runs is not None else None
                if r.hit:
                    served = reads.serve(session, rd, r, txns, run)
                    if served is not None:
                        for i in wanted[keys[j]]:
                            out[i] = served[0]
                        continue
                reads.missed(rd, r, run)
                misses.append((rd, keys[j], r))
            # t0 every miss's generations are read (here, or by the MGET above); t1 the SELECT below;
            # t2 each fill presents its t0 generations: a commit between t0 and t2 moved one of them,
            # and fill.lua refuses the entry
            misses = [(rd, pk, reads.snapshot(session, rd, r, txns)) for rd, pk, r in misses]
        if uncached or misses:
            self._loaded(session, h, cls, wanted, out, uncached, misses)

    def _loaded(
        self,
        session: Session,
        h: Hierarchy,
        cls: type[Any],
        wanted: dict[tuple[Any, ...], list[int]],
        out: list[Any],
        uncached: list[tuple[Any, ...]],
        misses: list[tuple[Read, tuple[Any, ...], ReadResult]],
    ) -> None:
        """The database for the keys read without the cache and for the misses (each with the snapshot
        its fill presents), then the fills."""
        reads = self._reads
        runid = _sa.new_runid()  # objects the SELECT builds get larger numbers (built_since)
        found = self._load(session, h.mapper, [*uncached, *(pk for _, pk, _ in misses)])
        # a key not found while rows were: it may be another spelling of one of them (a case-insensitive
        # or PAD SPACE collation, '1' for 1), found under that one's key, and only Session.get can tell
        any_found = bool(found)
        for pk in uncached:
            self._place(session, h, cls, pk, found, any_found, wanted, out)
        for rd, pk, r in misses:
            obj = self._place(session, h, cls, pk, found, any_found, wanted, out)
            # entry_of refuses what must not be stored (a row under another spelling of its key, an
            # object the session held before the SELECT)
            reads.fill_after(session, rd, r, partial(entry_of, h, pk, obj, runid))

    def _place(
        self,
        session: Session,
        h: Hierarchy,
        cls: type[Any],
        pk: tuple[Any, ...],
        found: dict[tuple[Any, ...], Any],
        any_found: bool,
        wanted: dict[tuple[Any, ...], list[int]],
        out: list[Any],
    ) -> Any:
        """Put the object loaded for ``pk`` where it was asked; returns it (None: no such row)."""
        positions = wanted[pk]
        obj = found.get(pk)
        if obj is None and any_found and not exact_key(h, pk):
            # perhaps a row found under another spelling: Session.get's own answer, and nothing is filled
            obj = session.get(cls, pk)
            found[pk] = obj
        for i in positions:
            out[i] = obj
        return obj

    def _built(self, session: Session, h: Hierarchy, entry_key: str, payload: bytes) -> tuple[Any]:
        """A hit: the object built into the identity map, as a load builds it (boxed: never None)."""
        decoded = self._identities.decode(entry_key, h, payload)
        if decoded is None:
            return _ABSENT
        shape, mask, values = decoded
        return (materialize(session, shape, mask, values),)

    def _load(
        self, session: Session, mapper: Mapper[Any], pks: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], Any]:
        """The rows of ``pks`` by one ``SELECT ... WHERE pk IN (...)`` (per batch of keys), by key."""
        stmt = self._statement(mapper)[1]
        single = len(mapper.primary_key) == 1
        found: dict[tuple[Any, ...], Any] = {}
        for start in range(0, len(pks), _IN_BATCH):
            batch = pks[start : start + _IN_BATCH]
            values = [pk[0] for pk in batch] if single else batch
            for obj in session.scalars(stmt, {"sqlcache_pks": values}).unique():
                key = instance_state(obj).key
                if key is not None:
                    found[key[1]] = obj
        return found

    def _statement(self, mapper: Mapper[Any]) -> tuple[Select[Any], Select[Any]]:
        """``select(mapper)`` (the clause get_bind sees, as for Session.get) and its ``IN`` by key."""
        stmts = self._statements.get(mapper)
        if stmts is None:
            cols = mapper.primary_key
            keys: Any = bindparam("sqlcache_pks", expanding=True)
            where = cols[0].in_(keys) if len(cols) == 1 else tuple_(*cols).in_(keys)
            plain = select(mapper)
            stmts = self._statements[mapper] = (plain, plain.where(where))
        return stmts
