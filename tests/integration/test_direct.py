"""cache.get / cache.get_many: what Session.get returns, from one Redis round trip, through the same
protocol (hits, misses, guarded fills, transaction state, outages)."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from sqlcache import ConfigurationError, SQLCache, signals
from sqlcache.plugin import Operation, PluginHost, ReadResult, Store

from ..conftest import SQLCounter, free_port
from ..helpers import finish, pause_after_select, rename_user, run_in_thread, user_name
from ..models import Car, Employee, Engineer, Manager, Membership, Product, Truck, User, Vehicle
from .test_scenarios import _snapshot_engine


class Calls:
    """Store calls of one cache, counted by wrapping the store's own methods (no plugin in between)."""

    def __init__(self, cache: SQLCache, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        for name in ("read", "read_many", "generations", "fill"):
            monkeypatch.setattr(cache.store, name, self._counted(name, getattr(cache.store, name)))
        # a get's read in two steps (its MGET sent before the last checks): one read all the same
        monkeypatch.setattr(cache.store, "send_read", self._counted("read", cache.store.send_read))

    def _counted(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.names.append(name)
            return fn(*args, **kwargs)

        return call

    def take(self) -> list[str]:
        out, self.names = self.names, []
        return out


@pytest.fixture
def calls(cache: SQLCache, monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(cache, monkeypatch)


def users(engine: Engine, *names: str) -> list[int]:
    with Session(engine) as s:
        made = [User(name=n) for n in names]
        s.add_all(made)
        s.flush()
        ids = [u.id for u in made]
        s.commit()
        return ids


def test_get_miss_then_hit_is_what_session_get_returns(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, calls: Calls
) -> None:
    """A miss loads and fills; a hit sends no SQL, one read, and builds the object into the identity
    map (session.get then returns it, repeated calls the same object)."""
    cache.register(User)
    (uid,) = users(engine, "ann")
    cache.clear()
    calls.take()
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"
    assert sql_count.selects() == 1 and cache.stats()["fills"] == 1
    assert calls.take()[0] == "read"
    sql_count.reset()
    with Session(engine) as s:
        got = cache.get(s, User, uid)
        assert calls.take() == ["read"]
        assert len(sql_count) == 0
        assert (got.id, got.name, got.email, got.version) == (uid, "ann", None, 1)
        assert cache.get(s, User, uid) is got and s.get(User, uid) is got
        assert calls.take() == [] and len(sql_count) == 0  # the identity map answered, as Session.get
        assert got in s and not s.dirty
        assert got.bio is None  # a deferred column still loads on access
    assert cache.stats()["hits"] == 1


def test_a_hit_that_fails_while_building_leaves_nothing_in_the_session(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter
) -> None:
    """A ``load`` listener raising while a hit builds its object: the half-built object is taken back
    out of the identity map, the entry goes, and the database answers with an object of its own load
    (the ORM finds no object of that key to reuse: the listener runs again)."""
    cache.register(User)
    (uid,) = users(engine, "ann")
    with Session(engine) as s:
        cache.get(s, User, uid)  # filled
    loads: list[object] = []

    def listener(target: object, _context: object) -> None:
        loads.append(target)
        if len(loads) == 1:
            raise RuntimeError("listener failed")

    event.listen(User, "load", listener)
    try:
        sql_count.reset()
        with Session(engine) as s:
            got = cache.get(s, User, uid)
            assert got is not None and got.name == "ann" and s.get(User, uid) is got
            assert len(loads) == 2 and loads[1] is got and loads[0] is not got
            assert sql_count.selects() == 1
        assert cache.stats()["errors"] >= 1
    finally:
        event.remove(User, "load", listener)
    with Session(engine) as s:
        assert cache.get(s, User, uid).name == "ann"  # filled again by that load


def test_get_missing_row_is_none_and_cached(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """A missing row is None; its absence is cached (an integer key), and an insert is seen after."""
    cache.register(User)
    for _ in range(2):
        with Session(engine) as s:
            assert cache.get(s, User, 424242) is None
    assert sql_count.selects() == 1
    with Session(engine) as s:
        s.add(User(id=424242, name="late"))
        s.commit()
    with Session(engine) as s:
        assert cache.get(s, User, 424242).name == "late"


def test_get_many_order_duplicates_missing_in_one_round_trip(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, calls: Calls
) -> None:
    """Results in the order asked, duplicates as the same object, None for missing rows; the misses
    cost one read and one SELECT ... IN, the hits afterwards one read and no SQL."""
    cache.register(User)
    a, b, c = users(engine, "a", "b", "c")
    cache.clear()
    calls.take()
    asked = [b, a, 999_999, b, c]
    with Session(engine) as s:
        got = cache.get_many(s, User, asked)
        assert [u and u.name for u in got] == ["b", "a", None, "b", "c"]
        assert got[0] is got[3]
    assert sql_count.selects() == 1 and " IN " in sql_count.statements[-1].upper()
    assert calls.take().count("read_many") == 1
    assert cache.stats()["misses"] == 4 and cache.stats()["fills"] == 4
    sql_count.reset()
    with Session(engine) as s:
        got = cache.get_many(s, User, asked)
        assert [u and u.name for u in got] == ["b", "a", None, "b", "c"]
        assert got[0] is got[3] and s.get(User, a) is got[1]
    assert len(sql_count) == 0 and calls.take() == ["read_many"]
    assert cache.stats()["hits"] == 4
    with Session(engine) as s:
        assert cache.get_many(s, User, []) == []


def test_get_many_hits_and_misses_mixed(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """Cached keys are served, the others loaded by one SELECT and filled; a generator is accepted."""
    cache.register(User)
    ids = users(engine, *[f"u{n}" for n in range(6)])
    cache.clear()
    with Session(engine) as s:
        cache.get_many(s, User, ids[:3])
    sql_count.reset()
    with Session(engine) as s:
        assert [u.name for u in cache.get_many(s, User, (i for i in ids))] == [f"u{n}" for n in range(6)]
    assert sql_count.selects() == 1
    sql_count.reset()
    with Session(engine) as s:
        assert [u.name for u in cache.get_many(s, User, reversed(ids))] == [f"u{n}" for n in range(5, -1, -1)]
    assert len(sql_count) == 0


def test_objects_the_session_holds_are_returned_as_they_are(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter, calls: Calls
) -> None:
    """An object in the identity map, with unflushed changes, is returned untouched and costs no read;
    an expired one is reloaded as Session.get reloads it."""
    cache.register(User)
    a, b = users(engine, "a", "b")
    with Session(engine, autoflush=False) as s:
        held = s.get(User, a)
        held.name = "local"
        calls.take()
        assert cache.get(s, User, a) is held and held.name == "local"
        assert calls.take() == []
        got = cache.get_many(s, User, [a, b])
        assert got[0] is held and held.name == "local" and got[1].name == "b"
    rename_user(engine, b, "b2")
    with Session(engine) as s:
        held = s.get(User, b)
        s.commit()  # expires it
        assert cache.get(s, User, b) is held and held.name == "b2"


def test_pending_changes_are_flushed_first_and_own_writes_read_from_the_database(
    engine: Engine, cache: SQLCache
) -> None:
    """Autoflush runs before the read, as for Session.get: a pending object is found; rows and tables
    this transaction wrote come from the database (bypassed), the others from Redis; a rollback leaves
    the cache with the committed rows."""
    cache.register(User)
    a, b = users(engine, "a", "b")
    for uid in (a, b):
        user_name(engine, uid)  # cached
    with Session(engine) as s:
        s.add(User(id=777_777, name="pending"))
        assert cache.get(s, User, 777_777).name == "pending"
        bypassed = cache.stats()["bypassed"]
        s.execute(update(User).where(User.id == a).values(name="a-own"))  # a Core write: the whole table
        assert [u.name for u in cache.get_many(s, User, [a, b])] == ["a-own", "b"]
        assert cache.stats()["bypassed"] == bypassed + 2
        s.rollback()
    with Session(engine) as s:
        assert [u and u.name for u in cache.get_many(s, User, [a, b, 777_777])] == ["a", "b", None]


def test_stale_fill_race_on_get_many_is_refused(engine: Engine, cache: SQLCache) -> None:
    """Scenario 1 for get_many: a writer commits between the generations read and the fill; the
    stale entry is refused (never stored, never served), the untouched row is filled."""
    cache.register(User)
    a, b = users(engine, "v1", "b")
    cache.clear()
    with pause_after_select(engine, "users") as gate:

        def reader() -> list[str]:
            with Session(engine) as s:
                return [u.name for u in cache.get_many(s, User, [a, b])]

        t, out = run_in_thread(reader)
        gate.thread = t
        t.start()
        gate.wait_paused()
        rename_user(engine, a, "v2")  # its own read goes through the cache too
        refused = cache.stats()["fills_refused"]
        gate.resume()
        assert finish(t, out) == ["v1", "b"]
    assert cache.stats()["fills_refused"] == refused + 1
    for _ in range(2):
        with Session(engine) as s:
            assert [u.name for u in cache.get_many(s, User, [a, b])] == ["v2", "b"]


def test_repeatable_read_old_snapshot_not_stored(engine: Engine, cache: SQLCache) -> None:
    """Scenario 9 for get_many: a transaction that ran SQL before a commit to row r loads r from its
    snapshot and must not store it; a later transaction reads the new row."""
    cache.register(User)
    r, other = users(engine, "v1", "other")
    cache.clear()
    with Session(_snapshot_engine(engine)) as reader:
        reader.execute(select(User.id).where(User.id == other)).all()  # fixes the snapshot
        rename_user(engine, r, "v2")
        got = cache.get_many(reader, User, [r, other])
        assert got[0].name == "v1" or engine.dialect.name == "sqlite"
        reader.commit()
    with Session(engine) as s:
        assert [u.name for u in cache.get_many(s, User, [r, other])] == ["v2", "other"]


def test_composite_keys(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """Tuples as composite keys (tuple IN on every database), cached per row, in the order asked."""
    cache.register(Membership)
    with Session(engine) as s:
        s.add_all(
            [Membership(org_id=1, user_key="a", role="x"), Membership(org_id=2, user_key="b", role="y")]
        )
        s.commit()
    keys = [(2, "b"), (1, "zz"), (1, "a")]
    with Session(engine) as s:
        assert [m and m.role for m in cache.get_many(s, Membership, keys)] == ["y", None, "x"]
    # one SELECT ... IN; then (1, "zz"), not found while rows were, is asked of Session.get: its string
    # might be another spelling of a key found, under the column's collation
    assert sql_count.selects() == 2
    sql_count.reset()
    with Session(engine) as s:
        assert cache.get(s, Membership, (1, "a")).role == "x"
        assert cache.get(s, Membership, [2, "b"]).role == "y"  # a list, as Session.get takes it
    assert len(sql_count) == 0
    with Session(engine) as s:
        with pytest.raises(Exception, match="primary key"):
            cache.get(s, Membership, 1)  # Session.get's own error for a key of the wrong length


class _HashableDict(dict[str, Any]):
    __hash__ = object.__hash__  # type: ignore[assignment]


def test_keys_are_read_as_session_get_reads_them(engine: Engine, cache: SQLCache) -> None:
    """Any iterable but a string is the key's values (a Row, a named tuple, a frozenset, an iterator, as
    Session.get takes them), a dict of any class maps attribute names to values: get and get_many
    answer each as Session.get does, hits from Redis included."""
    cache.register(User)
    (uid,) = users(engine, "ann")
    with Session(engine) as s:
        row = s.execute(select(User.id).where(User.id == uid)).one()

    def keys() -> list[Any]:
        one = collections.namedtuple("one", "id")
        return [row, one(uid), frozenset({uid}), iter([uid]), range(uid, uid + 1), _HashableDict(id=uid)]

    for _ in range(2):  # a miss, then Redis's hits
        for key in keys():
            with Session(engine) as s:
                assert cache.get(s, User, key).name == "ann", key
        with Session(engine) as s:
            assert [u.name for u in cache.get_many(s, User, keys())] == ["ann"] * 6
    assert cache.stats()["hits"] >= 6
    with Session(engine) as s:
        with pytest.raises(Exception, match="primary key"):
            cache.get(s, User, (uid, 1))  # Session.get's own error for a key of the wrong length


def test_inheritance_returns_the_right_subclass(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter
) -> None:
    """Joined and single-table hierarchies: the row's class comes back, and a subclass asked for a row
    of another class gets None, as Session.get answers; both cached."""
    cache.register(Employee)
    cache.register(Vehicle)
    with Session(engine) as s:
        eng, mgr, car = Engineer(name="e", language="py"), Manager(name="m"), Car()
        s.add_all([eng, mgr, car])
        s.commit()
        e_id, m_id, c_id = eng.id, mgr.id, car.id
    for round_ in range(2):
        sql_count.reset()
        with Session(engine) as s:
            assert [type(o) for o in cache.get_many(s, Employee, [e_id, m_id])] == [Engineer, Manager]
        with Session(engine) as s:
            assert cache.get(s, Engineer, m_id) is None
            assert type(cache.get(s, Vehicle, c_id)) is Car
        with Session(engine) as s:
            assert cache.get_many(s, Truck, [c_id]) == [None]
        assert len(sql_count) == (0 if round_ else 4), sql_count.statements  # one SELECT per miss
    with Session(engine) as s:
        assert cache.get(s, Engineer, e_id).language == "py"


def test_unregistered_and_unmapped_classes_are_refused(engine: Engine, cache: SQLCache) -> None:
    """A class not registered with the cache is a configuration error, named in the message."""
    with Session(engine) as s:
        with pytest.raises(ConfigurationError, match="Product is not registered"):
            cache.get(s, Product, 1)
        with pytest.raises(ConfigurationError, match="not a mapped class"):
            cache.get_many(s, int, [1])


def test_signals_stats_and_operations_per_entry(engine: Engine, cache: SQLCache) -> None:
    """Each entry of a get_many reports as a single read does: signals, counters and the plugin
    operations read and fill."""
    cache.register(User)
    a, b = users(engine, "a", "b")
    cache.clear()
    heard: list[tuple[str, str]] = []
    ops: list[tuple[str, str | None]] = []
    cache.add_plugin(_Timing(ops))
    for name in ("cache_hit", "cache_miss"):

        def receiver(sender: SQLCache, key: str, kind: str, name: str = name) -> None:
            heard.append((name, kind))

        getattr(signals, name).connect(receiver, sender=cache, weak=False)
    with Session(engine) as s:
        cache.get_many(s, User, [a, b])
    with Session(engine) as s:
        cache.get_many(s, User, [a, b])
    assert heard == [("cache_miss", "identity")] * 2 + [("cache_hit", "identity")] * 2
    assert ops == [("read", "miss")] * 2 + [("fill", "stored")] * 2 + [("read", "hit")] * 2
    st = cache.stats()
    assert (st["misses"], st["fills"], st["hits"]) == (2, 2, 2)


class _Timing:
    name = "timing"

    def __init__(self, ops: list[tuple[str, str | None]]) -> None:
        self.ops = ops

    def setup(self, host: PluginHost) -> None:
        host.add_operation_hook(self._hook)

    @contextmanager
    def _hook(self, op: Operation) -> Iterator[None]:
        yield
        if op.name in ("read", "fill"):
            self.ops.append((op.name, op.result))

    def close(self) -> None:
        pass


class _OldWrapper:
    """A store wrapper written before read_many existed: it answers read itself, and hands the rest to
    the store it wraps (``__getattr__``) but for ``hidden`` (read_many by default)."""

    name = "old-wrapper"

    def __init__(self, hidden: tuple[str, ...] = ("read_many",)) -> None:
        self.reads = 0
        self.hidden = hidden

    def setup(self, host: PluginHost) -> None:
        host.wrap_store(self._wrap)

    def _wrap(self, inner: Store) -> Store:
        owner = self

        class Wrapped:
            def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
                owner.reads += 1
                return inner.read(clock_key, entry_key, dep_keys)

            def __getattr__(self, name: str) -> Any:
                if name in owner.hidden:
                    raise AttributeError(name)
                return getattr(inner, name)

        return Wrapped()  # type: ignore[return-value]

    def close(self) -> None:
        pass


def test_a_store_wrapper_without_read_many_still_reads_each_entry(engine: Engine, cache: SQLCache) -> None:
    """A plugin's wrapper that predates read_many is read through, one read per entry."""
    cache.register(User)
    ids = users(engine, "a", "b", "c")
    wrapper = _OldWrapper()
    cache.add_plugin(wrapper)
    for _ in range(2):
        with Session(engine) as s:
            assert [u.name for u in cache.get_many(s, User, ids)] == ["a", "b", "c"]
    assert wrapper.reads == 6 and cache.stats()["hits"] == 3 and cache.stats()["plugin_errors"] == 0


def test_redis_down_the_database_answers(engine: Engine, sql_count: SQLCounter) -> None:
    """Redis unreachable (then the breaker open): get and get_many answer from the database, one
    cache_error per burst, counted as errors."""
    cache = SQLCache(f"redis://127.0.0.1:{free_port()}/0", prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.2)
    cache.strict_signals = True
    cache.register(User)
    cache.attach(engine)
    errors: list[str] = []

    def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
        errors.append(operation)

    signals.cache_error.connect(on_error, sender=cache, weak=False)
    try:
        a, b = users(engine, "a", "b")
        for _ in range(5):
            with Session(engine) as s:
                assert cache.get(s, User, a).name == "a"
                assert [u and u.name for u in cache.get_many(s, User, [b, 123_456, a])] == ["b", None, "a"]
        assert len(errors) == 1, errors  # one per failure burst
        st = cache.stats()
        assert st["errors"] >= 3 and st["skipped_backoff"] >= 1 and st["hits"] == 0
    finally:
        signals.cache_error.disconnect(on_error, sender=cache)
        cache.detach(engine)
        cache.close()


def test_other_spellings_of_a_key_are_answered_as_session_get_answers_them(
    engine: Engine, cache: SQLCache
) -> None:
    """Keys the database may match to one row ('1' for 1, 'A' or 'a ' for 'a' under MariaDB's
    collation): get_many answers each as Session.get does, also when the row came under another key
    of the same call, from the database or from Redis."""
    cache.register(Membership)
    with Session(engine) as s:
        s.add(Membership(org_id=1, user_key="a", role="x"))
        s.commit()
    keys: list[Any] = [(1, "a"), ("1", "a"), (1, "A"), (1, "a "), ("1", "A")]

    def answers(objs: list[Any]) -> list[Any]:
        return [o and (o.org_id, o.user_key) for o in objs]

    with Session(engine) as s:
        want = answers([s.get(Membership, k) for k in keys])
    for _ in range(2):  # the row from the database, then from Redis
        with Session(engine) as s:
            assert answers(cache.get_many(s, Membership, keys)) == want
        with Session(engine) as s:
            assert [answers([cache.get(s, Membership, k)])[0] for k in keys] == want


def test_no_absence_is_stored_under_a_key_the_database_compares_loosely(
    engine: Engine, cache: SQLCache
) -> None:
    """An int for a string key column finds the row stored as its digits (SQLite's affinity, MySQL's
    conversion): the absence of one is not stored, or the row inserted later under its own key would
    never invalidate it."""
    if engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL refuses to compare a varchar with an integer")
    cache.register(Membership)
    for _ in range(2):
        with Session(engine) as s:
            assert cache.get(s, Membership, (1, 5)) is None
            assert s.get(Membership, (1, 5)) is None
    with Session(engine) as s:
        s.add(Membership(org_id=1, user_key="5", role="x"))
        s.commit()
    with Session(engine) as s:
        assert cache.get(s, Membership, (1, 5)).role == "x"
        assert cache.get_many(s, Membership, [(1, 5)])[0].role == "x"
    with Session(engine) as s:
        assert s.get(Membership, (1, 5)).role == "x"


@pytest.mark.parametrize("change", ["delete", "new_key"])
def test_get_many_flushes_where_session_get_would(engine: Engine, cache: SQLCache, change: str) -> None:
    """Session.get key by key flushes at the first key the session does not hold: a key after it is
    answered after the flush (an object deleted, or moved to another key, is no longer its answer)."""
    cache.register(User)
    first, second = users(engine, "one", "two")
    for sequential in (True, False):
        with Session(engine) as s:
            held = s.get(User, second)
            assert held is not None
            if change == "delete":
                s.delete(held)
            else:
                held.id = second + 1000
            keys = [first, second]  # first is not held: the flush happens there
            got = [s.get(User, k) for k in keys] if sequential else cache.get_many(s, User, keys)
            assert [u and u.name for u in got] == ["one", None]
            s.rollback()


def test_a_scoped_session_is_its_current_session(engine: Engine, cache: SQLCache) -> None:
    """Flask-SQLAlchemy's db.session is a scoped_session: cache.get reads through its current session."""
    cache.register(User)
    (uid,) = users(engine, "ann")
    scoped = scoped_session(sessionmaker(engine))
    try:
        for _ in range(2):
            got = cache.get(scoped, User, uid)
            assert got is scoped.get(User, uid) and got.name == "ann"
            assert cache.get_many(scoped, User, [uid]) == [got]
            scoped.remove()
        assert cache.stats()["hits"] >= 1
    finally:
        scoped.remove()
