"""Identity cache: Session.get and many-to-one lazy loads served from Redis, on all three databases."""

from __future__ import annotations

import decimal
import uuid
from typing import Any

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, signals

from ..conftest import SQLCounter
from ..helpers import make_user, rename_user, user_name
from ..models import Car, Employee, Engineer, Manager, Membership, Order, Product, Truck, User, Vehicle


def test_get_miss_then_hit_without_sql(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """The first get reads the database and fills; a get in a fresh session sends no SQL."""
    cache.register(User)
    uid = make_user(engine)
    cache.clear()  # make_user's access to the id after its commit filled it already
    before = cache.stats()
    with Session(engine) as s:
        assert s.get(User, uid).name == "ann"
    sql_count.reset()
    with Session(engine) as s:
        u = s.get(User, uid)
        assert u is not None and u.name == "ann"
    assert len(sql_count) == 0
    st = cache.stats()
    assert (st["hits"] - before["hits"], st["misses"] - before["misses"], st["fills"] - before["fills"]) == (
        1,
        1,
        1,
    )


def test_cached_object_is_like_a_loaded_one(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """An object from the cache is persistent, clean, in the identity map, and lazy-loads as usual."""
    cache.register(User)
    uid = make_user(engine, bio="long text")
    with Session(engine) as s:
        s.add(Order(user_id=uid, total=decimal.Decimal("9.50")))
        s.commit()
    with Session(engine) as s:
        s.get(User, uid)
    with Session(engine) as s:
        sql_count.reset()
        u = s.get(User, uid)
        assert len(sql_count) == 0
        state = inspect(u)
        assert state.persistent and not state.modified and not s.dirty
        assert s.get(User, uid) is u
        assert "bio" in state.unloaded  # deferred column stays deferred
        assert u.bio == "long text"  # ... and loads on access
        assert [o.total for o in u.orders] == [decimal.Decimal("9.50")]  # relationship lazy-loads
        assert u.orders[0].user is u
        u.name = "bob"
        s.commit()
        assert u.name == "bob"  # expired after commit, reloaded
    with Session(engine) as s:
        assert s.get(User, uid).name == "bob"


def test_commit_invalidates_and_signals(engine: Engine, cache: SQLCache) -> None:
    """An ORM update invalidates the entry before commit() returns and fires ``invalidated``."""
    cache.register(User)
    uid = make_user(engine)
    seen: list[tuple[list[object], list[str], bool]] = []

    @signals.invalidated.connect_via(cache)
    def on_invalidated(sender: SQLCache, identities: list[object], tags: list[str], remote: bool) -> None:
        seen.append((identities, tags, remote))

    with Session(engine) as s:
        s.get(User, uid)
    with Session(engine) as s:
        u = s.get(User, uid)
        u.name = "new"
        s.commit()
    assert seen and seen[-1][0] == [(User, (uid,))] and seen[-1][2] is False
    assert "table:users" in seen[-1][1]
    with Session(engine) as s:
        assert s.get(User, uid).name == "new"
    signals.invalidated.disconnect(on_invalidated)


def test_absent_row_cached_then_insert_seen(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """A cached 'not found' never outlives the row's creation."""
    cache.register(User)
    with Session(engine) as s:
        assert s.get(User, 777) is None
    sql_count.reset()
    with Session(engine) as s:
        assert s.get(User, 777) is None
    assert len(sql_count) == 0
    with Session(engine) as s:
        s.add(User(id=777, name="late"))
        s.commit()
    with Session(engine) as s:
        assert s.get(User, 777).name == "late"


def test_composite_primary_key(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """Composite keys (int, str) are cached and invalidated per row."""
    cache.register(Membership)
    with Session(engine) as s:
        s.add_all(
            [Membership(org_id=1, user_key="a:b c", role="x"), Membership(org_id=1, user_key="b", role="y")]
        )
        s.commit()
    with Session(engine) as s:
        assert s.get(Membership, (1, "a:b c")).role == "x"
        assert s.get(Membership, {"org_id": 1, "user_key": "b"}).role == "y"
    sql_count.reset()
    with Session(engine) as s:
        assert s.get(Membership, (1, "a:b c")).role == "x"
        assert s.get(Membership, (1, "b")).role == "y"
    assert len(sql_count) == 0
    with Session(engine) as s:
        s.get(Membership, (1, "b")).role = "z"
        s.commit()
    sql_count.reset()
    with Session(engine) as s:
        assert s.get(Membership, (1, "a:b c")).role == "x"
        assert len(sql_count) == 0
        assert s.get(Membership, (1, "b")).role == "z"


def test_many_to_one_lazy_load_from_cache(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """order.user is served from Redis once cached."""
    cache.register(User)
    uid = make_user(engine)
    with Session(engine) as s:
        s.add(Order(user_id=uid, total=decimal.Decimal("1")))
        s.commit()
    with Session(engine) as s:
        s.get(User, uid)
    with Session(engine) as s:
        order = s.scalars(select(Order)).one()
        sql_count.reset()
        assert order.user.name == "ann"
        assert len(sql_count) == 0


def test_populate_existing_and_for_update_bypass(
    engine: Engine, cache: SQLCache, sql_count: SQLCounter
) -> None:
    """populate_existing and with_for_update always read the database."""
    cache.register(User)
    uid = make_user(engine)
    with Session(engine) as s:
        s.get(User, uid)
    with Session(engine) as s:
        sql_count.reset()
        s.get(User, uid, populate_existing=True)
        assert sql_count.selects() == 1
    with Session(engine) as s:
        sql_count.reset()
        s.get(User, uid, with_for_update=True)
        assert sql_count.selects() == 1


def test_joined_inheritance(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """An Engineer entry is never served as a Manager, and get(Employee) returns the Engineer."""
    cache.register(Employee)
    with Session(engine) as s:
        e = Engineer(name="eve", language="py")
        m = Manager(name="max", reports=3)
        s.add_all([e, m])
        s.commit()
        eid, mid = e.id, m.id
    for _ in range(2):
        with Session(engine) as s:
            got = s.get(Employee, eid)
            assert type(got) is Engineer and got.language == "py"
            assert s.get(Manager, eid) is None
        with Session(engine) as s:
            assert s.get(Manager, eid) is None
            m2 = s.get(Manager, mid)
            assert type(m2) is Manager and m2.reports == 3
            eng = s.get(Engineer, eid)
            assert type(eng) is Engineer and eng.language == "py"
    sql_count.reset()
    with Session(engine) as s:
        assert type(s.get(Engineer, eid)) is Engineer
    assert len(sql_count) == 0
    with Session(engine) as s:
        s.get(Engineer, eid).language = "rust"
        s.commit()
    with Session(engine) as s:
        assert s.get(Employee, eid).language == "rust"
        assert s.get(Engineer, eid).language == "rust"


def test_single_table_inheritance(engine: Engine, cache: SQLCache) -> None:
    """Single-table subclasses: get(Truck) of a Car is None, get(Vehicle) of a Car is a Car."""
    cache.register(Vehicle)
    with Session(engine) as s:
        c = Car(wheels=4)
        t = Truck(wheels=6, payload=10)
        s.add_all([c, t])
        s.commit()
        cid, tid = c.id, t.id
    for _ in range(2):
        with Session(engine) as s:
            assert s.get(Truck, cid) is None
            assert type(s.get(Vehicle, cid)) is Car
            assert s.get(Truck, tid).payload == 10
            assert s.get(Car, tid) is None


def test_repopulate_mode_writes_new_state(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """mode='repopulate': a commit whose UPDATE wrote every column of a row stores its new state; the
    next get is a hit with the committed values. An insert is read back from the database first."""
    cache.register(User, mode="repopulate")
    with Session(engine) as s:
        u = User(name="ann", email="a@x", version=1)
        s.add(u)
        s.commit()
        uid = u.id
    with Session(engine) as s:
        got = s.get(User, uid)
        assert (got.name, got.email, got.version) == ("ann", "a@x", 1)
    with Session(engine) as s:
        got = s.get(User, uid)
        got.name, got.email, got.version = "bob", "b@x", 2  # every column loaded is written
        s.commit()
    sql_count.reset()
    with Session(engine) as s:
        got = s.get(User, uid)
        assert (got.name, got.email, got.version) == ("bob", "b@x", 2)
    assert len(sql_count) == 0, sql_count.statements
    assert cache.stats()["repopulated"] == 1


@pytest.mark.parametrize("assign", ["name-only", "email-unchanged"])
@pytest.mark.parametrize("other", ["before-load", "after-load"])
def test_repopulate_never_stores_a_column_the_commit_did_not_write(
    engine: Engine, cache: SQLCache, other: str, assign: str
) -> None:
    """A session loads a user; another commits a new email; the first renames the user and commits,
    leaving the email alone or assigning it the value it loaded (the UPDATE leaves it out either way).
    Its entry would hold the email it loaded, older than the database's: the row is invalidated
    instead, and a read returns both the new name and the new email."""
    cache.register(User, mode="repopulate")
    uid = make_user(engine, "v1")
    with Session(engine) as r:
        if other == "before-load":
            rename_user(engine, uid, "v1")  # a commit of its own first (nothing changes)
        u = r.get(User, uid)
        assert u is not None and u.email is None
        with Session(engine) as w:
            w.get(User, uid).email = "new@x"
            w.commit()
        u.name = "v2"
        if assign == "email-unchanged":
            u.email, u.version = None, u.version  # "copy every form field": assigned, not changed
        r.commit()
    for _ in range(2):  # a miss and its fill, then a hit
        with Session(engine) as s:
            got = s.get(User, uid)
            assert (got.name, got.email) == ("v2", "new@x")


def test_repopulate_never_stores_a_row_a_savepoint_rolled_back(engine: Engine, cache: SQLCache) -> None:
    """A row inserted in a savepoint that rolled back is not cached as if it existed."""
    cache.register(User, mode="repopulate")
    with Session(engine) as s:
        s.add(User(name="outer"))
        sp = s.begin_nested()
        ghost = User(name="ghost")
        s.add(ghost)
        s.flush()
        gid = ghost.id
        sp.rollback()
        s.commit()
    for _ in range(2):
        with Session(engine) as s:
            assert s.get(User, gid) is None


def _pen(engine: Engine, price: decimal.Decimal) -> int:
    """A committed product "pen" at ``price`` (stock 1); its id."""
    with Session(engine) as s:
        p = Product(name="pen", price=price, stock=1)
        s.add(p)
        s.commit()
        return p.id


def test_repopulate_refuses_values_the_database_stores_differently(engine: Engine, cache: SQLCache) -> None:
    """An int assigned to a Numeric column comes back a Decimal: the commit invalidates, and reads return
    what the database holds, type included."""
    cache.register(Product, mode="repopulate")
    pid = _pen(engine, decimal.Decimal("1.25"))
    with Session(engine) as s:
        got = s.get(Product, pid)
        got.name, got.price, got.stock = "ink", 2, 5  # type: ignore[assignment]
        s.commit()
    for _ in range(2):
        with Session(engine) as s:
            got = s.get(Product, pid)
            assert (got.name, got.stock) == ("ink", 5)
            assert type(got.price) is decimal.Decimal and got.price == 2
    assert cache.stats()["repopulated"] == 0


def test_unregistered_models_untouched(engine: Engine, cache: SQLCache, sql_count: SQLCounter) -> None:
    """A class that was not registered always reads the database."""
    uid = make_user(engine)
    for _ in range(2):
        with Session(engine) as s:
            sql_count.reset()
            s.get(User, uid)
            assert sql_count.selects() == 1


@pytest.mark.parametrize("mode", ["invalidate", "repopulate"])
def test_delete_invalidates(engine: Engine, cache: SQLCache, mode: str) -> None:
    """A deleted row is not served after commit."""
    cache.register(User, mode=mode)  # type: ignore[arg-type]
    uid = make_user(engine)
    with Session(engine) as s:
        s.get(User, uid)
    with Session(engine) as s:
        s.delete(s.get(User, uid))
        s.commit()
    with Session(engine) as s:
        assert s.get(User, uid) is None


def test_key_spelled_differently_from_the_row(engine: Engine, cache: SQLCache) -> None:
    """A get whose key matches a row only through the collation (MariaDB: 'B' = 'b') never goes stale."""
    cache.register(Membership)
    with Session(engine) as s:
        s.add(Membership(org_id=1, user_key="b", role="x"))
        s.commit()
    for _ in range(2):
        with Session(engine) as s:
            got = s.get(Membership, (1, "B"))
            assert got is None or got.role == "x"
    with Session(engine) as s:
        s.get(Membership, (1, "b")).role = "y"
        s.commit()
    with Session(engine) as s:
        got = s.get(Membership, (1, "B"))
        assert got is None or got.role == "y"
    with Session(engine) as s:
        s.add(Membership(org_id=1, user_key="C", role="z"))
        s.get(Membership, (1, "c"))  # absent before the insert commits? not cached: string key
        s.commit()
    with Session(engine) as s:
        got = s.get(Membership, (1, "c"))
        assert got is None or got.role == "z"


def test_repopulate_never_caches_unnormalised_values(engine: Engine, cache: SQLCache) -> None:
    """A repopulated entry never holds what the writer assigned where the database stores it differently."""
    cache.register(Product, mode="repopulate")
    pid = _pen(engine, decimal.Decimal("3"))
    with Session(engine) as s:
        got = s.get(Product, pid)
        assert str(got.price) == "3.00"  # as the database returns it, not the assigned Decimal("3")
    repopulated = cache.stats()["repopulated"]
    with Session(engine) as s:
        got = s.get(Product, pid)
        got.name, got.price, got.stock = "ink", decimal.Decimal("4.5"), 2  # every column written
        s.commit()
    assert cache.stats()["repopulated"] == repopulated  # a Decimal: invalidated, not repopulated
    with Session(engine) as s:
        got = s.get(Product, pid)
        assert (got.name, str(got.price), got.stock) == ("ink", "4.50", 2)
    with Session(engine) as s:
        p = Product(name="cup", price=decimal.Decimal("2.00"), stock=7)
        s.add(p)
        s.flush()
        p.price = decimal.Decimal("2")  # assigned unnormalised after the insert: the whole row written
        s.commit()
        cid = p.id
    with Session(engine) as s:
        got = s.get(Product, cid)
        assert str(got.price) == "2.00" and got.stock == 7


def test_mutable_json_is_cached_and_still_tracked(engine: Engine, cache: SQLCache) -> None:
    """MutableDict.as_mutable(JSON) values are cached as plain JSON and come back as MutableDict (the
    load and refresh events coerce them), so in-place changes are still flushed."""
    from sqlalchemy.ext.mutable import MutableDict

    from ..models import Settings

    cache.register(Settings)
    with Session(engine) as s:
        s.add(Settings(id=1, prefs={"theme": "dark", "tags": ["a"]}))
        s.commit()
    for _ in range(2):
        with Session(engine) as s:
            st = s.get(Settings, 1)
            assert st is not None and isinstance(st.prefs, MutableDict)
    assert cache.stats()["hits"] >= 1 and cache.stats()["errors"] == 0
    with Session(engine) as s:
        st = s.get(Settings, 1)
        assert st is not None
        st.prefs["theme"] = "light"  # in place: tracked by MutableDict
        assert st in s.dirty
        s.commit()  # expires st; the next access reloads it (from the entry once refilled)
        assert isinstance(st.prefs, MutableDict) and st.prefs["theme"] == "light"
    with Session(engine) as s:
        s.get(Settings, 1)
    with Session(engine) as s:
        st = s.get(Settings, 1)
        assert st is not None
        s.commit()
        hits = cache.stats()["hits"]
        assert isinstance(st.prefs, MutableDict) and st.prefs["theme"] == "light"  # reload from a hit
        assert cache.stats()["hits"] == hits + 1
        st.prefs["theme"] = "blue"
        assert st in s.dirty


def test_a_session_that_may_not_autobegin_refuses_a_hit_as_sqlalchemy_does(
    engine: Engine, cache: SQLCache
) -> None:
    """A session with autobegin=False and no transaction raises on get() even on a hit, as SQLAlchemy
    does (found by the transparency suite, test_autobegin_execute). A session that may autobegin is not
    begun by a hit: docs/pages/transparency.md, known differences."""
    from sqlalchemy.exc import InvalidRequestError

    cache.register(User)
    uid = make_user(engine, "ann")
    assert user_name(engine, uid) == "ann"  # filled
    hits = cache.stats()["hits"]
    with Session(engine) as s:
        assert s.get(User, uid) is not None
    assert cache.stats()["hits"] == hits + 1
    with Session(engine, autobegin=False) as s, pytest.raises(InvalidRequestError, match=r"[Aa]utobegin"):
        s.get(User, uid)
    with Session(engine, autobegin=False) as s, s.begin():
        assert s.get(User, uid) is not None


@pytest.mark.parametrize("direct", [False, True])
def test_reused_entry_decodes_never_share_mutable_values(
    engine: Engine, cache: SQLCache, direct: bool
) -> None:
    """Identity hits whose Redis bytes are unchanged reuse the decoded entry (``decodes_reused``), but
    every hit's object gets its own JSON dicts and lists: mutating one in place reaches no other hit,
    through ``Session.get`` or ``cache.get``; a changed row is decoded afresh."""
    from ..models import Typed

    cache.register(Typed)
    with Session(engine) as s:
        s.add(Typed(id=1, doc={"tags": ["a"], "n": 1}, s="one"))
        s.commit()

    def get(s: Session) -> Any:
        return cache.get(s, Typed, 1) if direct else s.get(Typed, 1)

    with Session(engine) as s:
        get(s)  # miss, fill
    reused = cache.stats()["decodes_reused"]
    with Session(engine) as s1, Session(engine) as s2:
        first = get(s1)
        first.doc["tags"].append("mutated in place")
        first.doc["n"] = 99
        second = get(s2)
        assert second.doc == {"tags": ["a"], "n": 1} and second.s == "one"
        assert second.doc is not first.doc and second.doc["tags"] is not first.doc["tags"]
    assert cache.stats()["decodes_reused"] >= reused + 1
    with Session(engine) as s:
        row = s.get(Typed, 1)
        assert row is not None
        row.s = "two"
        s.commit()
    for _ in range(2):
        with Session(engine) as s:
            again = get(s)
            assert (again.s, again.doc) == ("two", {"tags": ["a"], "n": 1})


@pytest.mark.parametrize("budget", [0, 64])
def test_no_entry_decode_is_reused_without_a_budget(engine: Engine, redis_url: str, budget: int) -> None:
    """``decoded_cache_bytes=0``, or an entry larger than an eighth of the budget: every identity hit
    decodes its bytes."""
    c = SQLCache(redis_url, prefix=f"b{uuid.uuid4().hex[:8]}", decoded_cache_bytes=budget)
    c.register(User)
    c.attach(engine)
    try:
        uid = make_user(engine, "ann")
        for _ in range(3):
            assert user_name(engine, uid) == "ann"
        assert c.stats()["hits"] == 2 and c.stats()["decodes_reused"] == 0
    finally:
        c.detach(engine)
        c.clear()
        c.close()
