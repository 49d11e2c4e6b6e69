"""Issue 12, point 12: the warm-up rule (docs/pages/consistency.md, "Warm-up under repeatable read").

A missing row dependency borrows its table's row-writes generation instead of a fresh one, so that a
repeatable-read transaction on a cold cache stores every row it reads, not only the first. Eviction of
a dependency key is a real ``DEL``: what Redis does when it evicts or expires one.
"""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _keys

from ..helpers import make_user, rename_user, user_name
from ..models import Employee, Engineer, User


def _snapshot_engine(engine: Engine) -> Engine:
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine  # MariaDB defaults to REPEATABLE READ; SQLite keeps a read snapshot in WAL


def _evict_row_key(client: redis.Redis, cache: SQLCache, table: str, pk: int) -> None:
    assert client.delete(_keys.identity_dep_key(cache.config.prefix, table, (pk,))) == 1


def _recreate_without_fill(engine: Engine, cls: type, pk: int) -> None:
    """A read that recreates the row's missing key (generations.lua) but stores nothing: SQL ran first in
    its snapshot transaction, so its snapshot's age is unknown. An old entry still in Redis must not
    match the key it recreates."""
    with Session(_snapshot_engine(engine)) as s:
        s.execute(text("SELECT 1")).all()
        s.get(cls, pk)


def test_cold_cache_fills_every_row_a_snapshot_transaction_reads(engine: Engine, cache: SQLCache) -> None:
    """Three rows read by id in one repeatable-read transaction on a cold cache: all three stored."""
    cache.register(User)
    ids = [make_user(engine, f"u{i}") for i in range(3)]
    cache.clear()  # cold: no entries and no dependency keys at all
    eng = _snapshot_engine(engine)
    with Session(eng) as s:
        assert [s.get(User, i).name for i in ids] == ["u0", "u1", "u2"]
    assert cache.stats()["fills"] == 3
    assert cache.stats()["fills_skipped"] == 0
    hits = cache.stats()["hits"]
    with Session(eng) as s:
        assert [s.get(User, i).name for i in ids] == ["u0", "u1", "u2"]
    assert cache.stats()["hits"] == hits + 3


def test_cold_fill_refused_after_a_commit_to_any_row_of_the_table(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """A commit to row b after the snapshot moves the table's row-writes key: b's old row (its key
    evicted) and even unchanged c cannot prove their age, so neither is stored; both read right later."""
    cache.register(User)
    a, b, c = (make_user(engine, n) for n in ("a", "b", "c"))
    cache.clear()
    eng = _snapshot_engine(engine)
    with Session(eng) as reader:
        assert reader.get(User, a).name == "a"  # a cache call first, then the snapshot's SELECT
        rename_user(engine, b, "b2")  # commits after the snapshot
        _evict_row_key(redis_client, cache, "users", b)  # b's key gone: only the borrowing rule decides
        if engine.dialect.name == "sqlite":
            reader.execute(text("SELECT 1")).all()  # pysqlite holds the snapshot only while a read is open
        fills = cache.stats()["fills"]
        assert reader.get(User, b).name == "b" or engine.dialect.name == "sqlite"
        assert reader.get(User, c).name == "c"
        assert cache.stats()["fills"] == fills  # neither stored
        reader.commit()
    with Session(engine) as s:
        assert s.get(User, b).name == "b2"
        assert s.get(User, c).name == "c"


@pytest.mark.parametrize("how", ["commit", "invalidate"])
def test_an_evicted_row_key_never_revives_an_entry_older_than_a_write(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis, how: str
) -> None:
    """Entry filled with a borrowed generation; the row is written (a commit, or ``invalidate()`` after a
    write the cache did not see); the row's key is evicted; borrowing again must not match the old entry."""
    cache.register(User)
    ids = [make_user(engine, f"u{i}") for i in range(2)]
    cache.clear()
    with Session(_snapshot_engine(engine)) as s:
        for i in ids:
            s.get(User, i)  # the second borrows
    uid = ids[1]
    if how == "commit":
        rename_user(engine, uid, "new")
    else:
        raw = engine.raw_connection()  # a write sqlcache does not see, then the user's call
        try:
            cur = raw.cursor()
            cur.execute(f"UPDATE users SET name = 'new' WHERE id = {uid}")
            cur.close()
            raw.commit()
        finally:
            raw.close()
        cache.invalidate(User, uid)
    _evict_row_key(redis_client, cache, "users", uid)
    _recreate_without_fill(engine, User, uid)
    with Session(engine) as s:
        assert s.get(User, uid).name == "new"
    assert user_name(engine, uid) == "new"


def test_joined_subclass_only_update_moves_the_base_tables_row_writes_key(
    engine: Engine, cache: SQLCache, redis_client: redis.Redis
) -> None:
    """Updating only a joined subclass's own table still moves the row-writes key of the base table,
    which the row's identity key (keyed by the base table) borrows from."""
    cache.register(Employee)
    with Session(engine) as s:
        engineers = [Engineer(name=f"e{i}", language="py") for i in range(2)]
        s.add_all(engineers)
        s.commit()
        ids = [e.id for e in engineers]
    cache.clear()
    with Session(_snapshot_engine(engine)) as s:
        assert [s.get(Engineer, i).language for i in ids] == ["py", "py"]  # both tables in each entry
    with Session(engine) as s:
        s.get(Engineer, ids[1], with_for_update=True).language = "rust"  # UPDATE engineers only
        s.commit()
    _evict_row_key(redis_client, cache, "employees", ids[1])
    _recreate_without_fill(engine, Engineer, ids[1])
    with Session(engine) as s:
        assert s.get(Engineer, ids[1]).language == "rust"
