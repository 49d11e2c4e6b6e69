"""Durable invalidation: the outbox row written in the committing transaction, the relay that applies
what a crashed or cut-off writer could not, and the commands around them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
from sqlalchemy import MetaData, create_engine, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sqlcache import ConfigurationError, Relay, SQLCache, SQLCacheError, _keys, outbox_table, signals
from sqlcache._outbox import APPLY_CHUNK, MAX_BODY_CHARS

from ..conftest import RedisServer, free_port, shareable_url
from ..helpers import finish, make_user, run_in_thread, user_name
from ..models import User
from ..proxy import Proxy

OUTBOX = outbox_table(MetaData())


def prefix() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


def dead_redis() -> str:
    """A Redis URL nothing listens on: every call fails at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


def rows(engine: Engine, pfx: str) -> list[dict[str, object]]:
    with engine.connect() as c:
        found = c.execute(select(OUTBOX).where(OUTBOX.c.prefix == pfx)).mappings().all()
        return [dict(r) for r in found]


@pytest.fixture
def outbox(engine: Engine) -> Engine:
    """``engine`` with the outbox table present (created once per database, emptied per test)."""
    OUTBOX.create(engine, checkfirst=True)
    with engine.begin() as c:
        c.execute(OUTBOX.delete())
    return engine


@pytest.fixture
def make_cache() -> Iterator[Callable[..., SQLCache]]:
    made: list[SQLCache] = []

    def make(url: str, pfx: str, **kw: object) -> SQLCache:
        c = SQLCache(url, prefix=pfx, default_ttl=600, **kw)  # type: ignore[arg-type]
        c.strict_signals = True
        c.register(User)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class Scene:
    """A reader process that cached a user, and writers that cannot reach Redis and then crash."""

    def __init__(self, engine: Engine, redis_url: str, make: Callable[..., SQLCache]) -> None:
        self.engine, self.redis_url, self.make = engine, redis_url, make
        self.pfx = prefix()
        self.reader = make(redis_url, self.pfx)
        self.reader.attach(engine)
        self.uid = make_user(engine, "v1")
        assert user_name(engine, self.uid) == "v1"  # cached in Redis

    @contextmanager
    def cut_off_writer(self, engine: Engine | None = None) -> Iterator[SQLCache]:
        """A durable writer whose Redis is unreachable, alone on the engine (the reader, another
        process, sees nothing of its writes), closed at the end as good as a crash: journal gone."""
        self.reader.detach(self.engine)
        writer = self.make(dead_redis(), self.pfx, durable=True, relay_interval=3600, timeout=0.2)
        writer.strict_signals = False
        writer.attach(engine or self.engine)
        try:
            yield writer
        finally:
            writer.close()
            self.reader.attach(self.engine)

    def name(self) -> str | None:
        return user_name(self.engine, self.uid)

    def relay_once(self) -> int:
        relayer = self.make(self.redis_url, self.pfx, durable=True, relay_grace=0, relay_interval=3600)
        return relayer.relay(self.engine, start=False).run_once()


@pytest.fixture
def scene(outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]) -> Scene:
    return Scene(outbox, redis_url, make_cache)


def test_attach_refuses_a_missing_outbox_table(engine: Engine, redis_url: str) -> None:
    cache = SQLCache(redis_url, prefix=prefix(), durable=True, outbox_table="no_such_outbox")
    with pytest.raises(ConfigurationError, match="create_outbox"):
        cache.attach(engine)
    cache.close()


def test_bad_durable_settings_are_refused(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="outbox_table"):
        SQLCache(redis_url, durable=True, outbox_table="x; drop table users")
    with pytest.raises(ConfigurationError, match="relay_interval"):
        SQLCache(redis_url, durable=True, relay_interval=0)
    with pytest.raises(ConfigurationError, match="relay_grace"):
        SQLCache(redis_url, durable=True, relay_grace=-1)
    with pytest.raises(ConfigurationError, match="255"):
        SQLCache(redis_url, prefix="p" * 300, durable=True)
    with pytest.raises(ConfigurationError, match="in-memory"):
        SQLCache(redis_url, durable=True).attach(create_engine("sqlite://"))


def test_commit_writes_its_row_and_the_relay_only_deletes_it(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    pfx = prefix()
    cache = make_cache(redis_url, pfx, durable=True, relay_interval=3600)
    cache.attach(outbox)
    uid = make_user(outbox, "v1")
    relay = cache._parts.outbox.relays[outbox.pool]
    relay.run_once()
    assert rows(outbox, pfx) == []
    assert user_name(outbox, uid) == "v1"  # filled

    with Session(outbox) as s:
        s.get(User, uid).name = "rolled back"
        s.flush()
        s.rollback()
    assert rows(outbox, pfx) == []  # a rolled-back transaction leaves no row

    with Session(outbox) as s:
        s.get(User, uid).name = "v2"
        s.commit()
    [row] = rows(outbox, pfx)  # written in the committing transaction
    body = json.loads(str(row["body"]))
    assert any(k.startswith(f"{pfx}:d:i:users:") for k in body["keys"])
    assert relay.pending_done() == 1  # the writer invalidated Redis itself

    assert user_name(outbox, uid) == "v2"  # refilled
    before = cache.stats()
    assert relay.run_once() == 0  # deleted, not applied again
    assert rows(outbox, pfx) == []
    assert user_name(outbox, uid) == "v2"
    after = cache.stats()
    assert after["hits"] == before["hits"] + 1 and after["invalidations"] == before["invalidations"]


WRITER = textwrap.dedent(
    """
    import os, sys
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlcache import SQLCache
    from tests.models import User

    db_url, redis_url, pfx, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    engine = create_engine(db_url)
    cache = SQLCache(redis_url, prefix=pfx, durable=True, relay_interval=3600, timeout=0.2)
    cache.register(User)
    cache.attach(engine)
    with Session(engine) as s:
        s.get(User, uid).name = "v2"
        s.commit()  # Redis is unreachable: the invalidation waits in this process's journal
    print("committed", flush=True)
    os._exit(0)  # crash: the journal dies with the process
    """
)


def crash_a_writer(scene: Scene) -> None:
    """A separate process, cut off from Redis, commits v2 and dies before Redis comes back."""
    done = subprocess.run(
        [sys.executable, "-c", WRITER, shareable_url(scene.engine), dead_redis(), scene.pfx, str(scene.uid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "committed" in done.stdout, done.stderr
    assert len(rows(scene.engine, scene.pfx)) == 1
    # without the outbox this entry would now be served stale until it expired
    assert scene.name() == "v1"


def test_crash_while_redis_is_unreachable_loses_no_invalidation(scene: Scene) -> None:
    """A writer cut off from Redis commits and dies; the relay still invalidates what it wrote."""
    crash_a_writer(scene)
    assert scene.relay_once() == 1
    assert rows(scene.engine, scene.pfx) == []
    assert scene.name() == "v2"


def test_relay_backs_off_while_redis_is_away_then_applies(
    outbox: Engine, private_redis: RedisServer, make_cache: Callable[..., SQLCache]
) -> None:
    pfx = prefix()
    reader = make_cache(private_redis.url, pfx)
    reader.attach(outbox)
    uid = make_user(outbox, "v1")
    assert user_name(outbox, uid) == "v1"

    reader.detach(outbox)  # the reader stands for another process: it sees nothing of the write
    writer = make_cache(dead_redis(), pfx, durable=True, relay_interval=3600, timeout=0.2)
    writer.strict_signals = False
    writer.attach(outbox)
    with Session(outbox) as s:
        s.get(User, uid).name = "v2"
        s.commit()
    writer.close()  # as good as a crash: its journal is gone
    reader.attach(outbox)
    assert len(rows(outbox, pfx)) == 1
    assert user_name(outbox, uid) == "v1"  # stale in Redis: only the outbox knows

    proxy = Proxy(private_redis.port)
    try:
        proxy.cut()
        relaying = make_cache(
            proxy.url, pfx, durable=True, relay_grace=0, relay_interval=0.05, backoff=0.05, max_backoff=0.2
        )
        errors: list[str] = []

        @signals.cache_error.connect_via(relaying)
        def on_error(sender: SQLCache, exc: BaseException, operation: str) -> None:
            errors.append(operation)

        relay = relaying.relay(outbox)
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "relay" in errors
        assert len(rows(outbox, pfx)) == 1  # kept until Redis takes it
        assert user_name(outbox, uid) == "v1"
        proxy.heal()
        deadline = time.monotonic() + 10
        while rows(outbox, pfx) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rows(outbox, pfx) == []
        assert user_name(outbox, uid) == "v2"
        assert relaying.stats()["outbox_relayed"] == 1
        relay.stop()
        assert not relay.is_alive()
    finally:
        proxy.close()


def test_autocommit_writes_its_row_before_the_statement(scene: Scene) -> None:
    with scene.cut_off_writer(), scene.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(update(User.__table__).where(User.__table__.c.id == scene.uid).values(name="v2"))
        [row] = rows(scene.engine, scene.pfx)
        assert f"{scene.pfx}:d:b:users" in json.loads(str(row["body"]))["keys"]  # table-wide: written first
    assert scene.name() == "v1"  # stale: only the outbox knows
    assert scene.relay_once() == 1
    assert scene.name() == "v2"


def test_a_huge_transaction_keeps_its_row_small(scene: Scene) -> None:
    with scene.cut_off_writer(), Session(scene.engine) as s:
        s.add_all(User(name=f"bulk {'x' * 30} {i}") for i in range(1500))
        s.get(User, scene.uid).name = "v2"  # type: ignore[union-attr]
        s.commit()
    [row] = rows(scene.engine, scene.pfx)
    body = str(row["body"])
    assert len(body) <= MAX_BODY_CHARS
    assert f"{scene.pfx}:d:b:users" in json.loads(body)["keys"]
    assert scene.name() == "v1"
    assert scene.relay_once() == 1
    assert scene.name() == "v2"


def test_a_failed_outbox_write_fails_the_commit(
    engine: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    table = f"outbox_{uuid.uuid4().hex[:8]}"
    doomed = outbox_table(MetaData(), table)
    doomed.create(engine)
    uid = make_user(engine, "v1")
    cache = make_cache(redis_url, prefix(), durable=True, outbox_table=table, relay_interval=3600)
    cache.attach(engine)
    raw = engine.raw_connection()  # the table disappears behind the cache's back
    try:
        raw.cursor().execute(f"DROP TABLE {table}")
        raw.commit()
    finally:
        raw.close()
    with Session(engine) as s:
        s.get(User, uid).name = "v2"
        with pytest.raises(SQLCacheError, match="outbox"):
            s.commit()
    assert user_name(engine, uid) == "v1"  # nothing committed
    # and nothing left open: another connection can write the same row at once
    other = create_engine(shareable_url(engine))
    try:

        def rename() -> str | None:
            with other.begin() as c:
                c.execute(update(User.__table__).where(User.__table__.c.id == uid).values(name="v3"))
            return user_name(other, uid)

        t, out = run_in_thread(rename)
        t.start()
        assert finish(t, out, timeout=10) == "v3"
    finally:
        other.dispose()


def test_unreadable_rows_fence_the_prefix(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    pfx = prefix()
    cache = make_cache(redis_url, pfx, durable=True, relay_grace=0, relay_interval=3600)
    cache.attach(outbox)
    uid = make_user(outbox, "v1")
    assert user_name(outbox, uid) == "v1"
    # behind the cache's back (a raw connection fires no events): the entry is now stale, and two
    # outbox rows appear, an unreadable one of this prefix and one of another prefix
    raw = outbox.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f"UPDATE users SET name = 'v2' WHERE id = {uid}")
        cur.execute(
            "INSERT INTO sqlcache_outbox (id, prefix, created_ms, body) "
            f"VALUES ('g1', '{pfx}', 0, '{{not json'), ('g2', 'other', 0, '[]')"
        )
        cur.close()
        raw.commit()
    finally:
        raw.close()
    assert user_name(outbox, uid) == "v1"
    relay = cache._parts.outbox.relays[outbox.pool]
    assert relay.run_once() >= 1
    assert [r["id"] for r in rows(outbox, pfx)] == []
    assert [r["id"] for r in rows(outbox, "other")] == ["g2"]
    assert user_name(outbox, uid) == "v2"


def test_close_stops_the_relay_and_refuses_attach(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    cache = make_cache(redis_url, prefix(), durable=True, relay_interval=0.05)
    cache.attach(outbox)
    relay = cache._parts.outbox.relays[outbox.pool]
    deadline = time.monotonic() + 5
    while relay.passes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.passes > 0
    cache.close()
    cache.close()
    assert not relay.is_alive()
    with pytest.raises(ConfigurationError, match="closed"):
        cache.attach(outbox)


def test_relay_command_applies_what_a_crashed_writer_left(scene: Scene, redis_url: str) -> None:
    crash_a_writer(scene)
    outbox, pfx, uid = scene.engine, scene.pfx, scene.uid
    cmd = [sys.executable, "-m", "sqlcache", "relay", "--database-url", shareable_url(outbox)]
    cmd += ["--redis-url", redis_url, "--prefix", pfx, "--once"]
    young = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert young.returncode == 0 and "applied 0 outbox rows" in young.stdout, young.stderr  # grace
    applied = subprocess.run([*cmd, "--grace", "0"], capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0 and "applied 1 outbox rows" in applied.stdout, applied.stderr
    assert rows(outbox, pfx) == []
    assert user_name(outbox, uid) == "v2"


def test_outbox_command_prints_and_creates_the_table(engine: Engine) -> None:
    url = shareable_url(engine)
    table = f"outbox_{uuid.uuid4().hex[:8]}"
    shown = subprocess.run(
        [sys.executable, "-m", "sqlcache", "outbox", "--database-url", url, "--table", table],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"CREATE TABLE {table}" in shown.stdout and "CREATE INDEX" in shown.stdout
    assert not inspect(engine).has_table(table)  # printing creates nothing
    created = subprocess.run(
        [sys.executable, "-m", "sqlcache", "outbox", "--database-url", url, "--table", table, "--create"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    assert inspect(engine).has_table(table)
    with engine.begin() as c:
        c.execute(text(f"DROP TABLE {table}"))


def test_autocommit_statement_after_a_failed_one_gets_its_own_row(scene: Scene) -> None:
    """Under AUTOCOMMIT a statement that failed leaves its row behind; the next write writes its own."""
    from sqlalchemy import insert

    from ..models import Tag

    with Session(scene.engine) as s:
        s.add(Tag(id=1, label="taken"))
        s.commit()
    with scene.cut_off_writer(), scene.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        with pytest.raises(DBAPIError):
            c.execute(insert(Tag.__table__).values(id=1, label="duplicate"))
        c.execute(update(User.__table__).where(User.__table__.c.id == scene.uid).values(name="v2"))
    bodies = [json.loads(str(r["body"]))["keys"] for r in rows(scene.engine, scene.pfx)]
    assert any(f"{scene.pfx}:d:b:users" in keys for keys in bodies), bodies
    scene.relay_once()
    assert scene.name() == "v2"


def test_a_commit_that_failed_on_the_wire_keeps_its_row(scene: Scene) -> None:
    """COMMIT reached the server but the client saw an error (a lost connection), and Redis is away:
    the write may well be committed, so its row stays for a relay."""
    engine = create_engine(shareable_url(scene.engine))  # a dialect of its own, to break
    real_commit = engine.dialect.do_commit

    def commit_then_fail(dbapi_connection: object) -> None:
        real_commit(dbapi_connection)
        raise engine.dialect.loaded_dbapi.OperationalError("connection lost after COMMIT")

    engine.dialect.do_commit = commit_then_fail  # type: ignore[method-assign]
    try:
        with scene.cut_off_writer(engine), Session(engine) as s:
            s.get(User, scene.uid).name = "v2"  # type: ignore[union-attr]
            with pytest.raises(DBAPIError):
                s.commit()
    finally:
        engine.dispose()
    assert len(rows(scene.engine, scene.pfx)) == 1  # the write did commit; its row must not be deleted
    assert scene.relay_once() == 1
    assert scene.name() == "v2"


def test_detaching_a_proxy_engine_keeps_the_base_engine_durable(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    """engine.execution_options() proxies share the pool: detaching one leaves the engine attached,
    its relay running and its commits writing rows."""
    pfx = prefix()
    cache = make_cache(redis_url, pfx, durable=True, relay_interval=3600)
    cache.attach(outbox)
    proxy = outbox.execution_options(isolation_level="AUTOCOMMIT")
    cache.attach(proxy)
    cache.detach(proxy)
    uid = make_user(outbox, "v1")
    assert user_name(outbox, uid) == "v1"
    hits = cache.stats()["hits"]
    assert user_name(outbox, uid) == "v1"
    assert cache.stats()["hits"] == hits + 1  # still attached
    assert len(rows(outbox, pfx)) == 1  # the insert's row, marked done
    assert cache._parts.outbox.relays[outbox.pool].is_alive()
    cache._parts.outbox.relays[outbox.pool].run_once()
    assert rows(outbox, pfx) == []


def test_relay_applies_huge_backlogs_in_bounded_calls(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    """Hundreds of rows of a thousand keys each (a long outage of bulk writers) are applied in calls
    of bounded size, within the Redis timeout, and deleted."""
    pfx = prefix()
    keys = [f"{pfx}:d:i:users:{i}" for i in range(1000)]
    with outbox.begin() as c:
        c.execute(
            OUTBOX.insert(),
            [
                {
                    "id": f"bulk{n}",
                    "prefix": pfx,
                    "created_ms": 0,
                    "body": json.dumps({"keys": keys, "tags": []}),
                }
                for n in range(60)
            ],
        )
    cache = make_cache(redis_url, pfx, durable=True, relay_grace=0, relay_interval=3600)
    relay = cache.relay(outbox, start=False)
    assert relay.run_once() == 60
    assert rows(outbox, pfx) == []
    assert cache.stats()["errors"] == 0


def _wait_passes(relay: Relay, n: int, seconds: float = 15) -> None:
    start = relay.passes + relay.failures
    deadline = time.monotonic() + seconds
    while relay.passes + relay.failures < start + n and time.monotonic() < deadline:
        time.sleep(0.02)  # polling the relay thread's pass counter, with a deadline
    assert relay.passes + relay.failures >= start + n, "the relay made no progress"


def test_relay_survives_a_row_nested_too_deep(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache]
) -> None:
    """A row whose JSON body nests too deep (RecursionError killed the relay thread for good) is
    unreadable: the relay fences the prefix instead, deletes the row and keeps running."""
    pfx = prefix()
    cache = make_cache(redis_url, pfx, durable=True, relay_interval=0.05, relay_grace=0)
    cache.attach(outbox)
    uid = make_user(outbox, "v1")
    assert user_name(outbox, uid) == "v1"  # cached
    deep = "[" * 30_000 + "]" * 30_000
    with outbox.begin() as c:
        c.execute(OUTBOX.insert().values(id="deep", prefix=pfx, created_ms=0, body=deep))
    relay = cache._parts.outbox.relays[outbox.pool] if cache._parts.outbox is not None else None
    assert relay is not None
    _wait_passes(relay, 2)
    assert relay.is_alive() and rows(outbox, pfx) == []
    misses = cache.stats()["misses"]
    assert user_name(outbox, uid) == "v1"
    assert cache.stats()["misses"] == misses + 1  # fenced: every entry under the prefix moved


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # killed on purpose
def test_a_dead_relay_thread_is_started_again(
    outbox: Engine, redis_url: str, make_cache: Callable[..., SQLCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay thread that died anyway is noticed by the next commit and started again."""
    pfx = prefix()
    cache = make_cache(redis_url, pfx, durable=True, relay_interval=0.05)
    cache.attach(outbox)
    relay = cache._parts.outbox.relays[outbox.pool] if cache._parts.outbox is not None else None
    assert relay is not None

    def die() -> int:
        raise SystemExit("the thread ends here")

    monkeypatch.setattr(relay, "run_once", die)
    deadline = time.monotonic() + 10
    while relay.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for the thread to end, with a deadline
    assert not relay.is_alive()
    monkeypatch.undo()
    make_user(outbox, "v1")  # a commit: writes its row, notices the dead thread
    assert relay.is_alive() and cache.stats()["relay_restarts"] == 1
    _wait_passes(relay, 1)
    assert rows(outbox, pfx) == []


# -- the warm-up rule meets the relay --------------------------------------------------------------
# A relay pass applies an outbox batch in chunks of APPLY_CHUNK keys, so a row's d:i:T:pk and its d:r:T
# can land in different Redis calls. Were the row key moved first, an evicted row key could borrow the
# old d:r:T generation between the two, and an entry older than the relayed write would match again for
# good. The relay moves every d:r: key first.


def _relay_snapshot_engine(engine: Engine) -> Engine:
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine


def test_relay_chunk_boundary_between_row_key_and_row_writes_key_revives_old_entry(
    scene: Scene, redis_client: redis.Redis
) -> None:
    pfx, uid, engine = scene.pfx, scene.uid, scene.engine
    row_key = _keys.identity_dep_key(pfx, "users", (uid,))
    row_writes = _keys.row_writes_key(pfx, "users")
    scene.reader.clear()
    assert user_name(engine, uid) == "v1"  # cold: the row key borrowed d:r:users
    assert redis_client.get(row_key) == redis_client.get(row_writes)

    crash_a_writer(scene)  # v2 committed; its outbox row is [d:i:users:uid, d:r:users, d:t:users]

    # older rows of other writers cut off by the same outage (ordinary commit bodies), 1999 keys in
    # all: the batch's key 2000 is d:i:users:uid and key 2001 d:r:users, one chunk apart
    def body(table: str, n: int) -> str:
        keys = [_keys.identity_dep_key(pfx, table, (i,)) for i in range(n)]
        keys += [_keys.row_writes_key(pfx, table), _keys.table_dep_key(pfx, table)]
        return json.dumps({"keys": keys, "tags": [f"table:{table}"]})

    with engine.begin() as c:
        c.execute(
            OUTBOX.insert(),
            [
                {"id": "older1", "prefix": pfx, "created_ms": 0, "body": body("orders", 998)},
                {"id": "older2", "prefix": pfx, "created_ms": 1, "body": body("items", 997)},
            ],
        )
    assert APPLY_CHUNK == 2000

    relayer = scene.make(scene.redis_url, pfx, durable=True, relay_grace=0, relay_interval=3600)
    relay = relayer.relay(engine, start=False)
    apply, calls = relay._apply, []

    def between_chunks(keys: list[str], tags: list[str]) -> None:
        apply(keys, tags)
        calls.append(keys)
        if len(calls) == 1:
            assert redis_client.delete(row_key) == 1  # evicted
            # any read of the row now recreates its key (here one that stores nothing: SQL ran first)
            with Session(_relay_snapshot_engine(engine)) as s:
                s.execute(text("SELECT 1")).all()
                assert s.get(User, uid).name == "v2"

    relay._apply = between_chunks  # type: ignore[method-assign]
    assert relay.run_once() == 3
    assert len(calls) == 2
    assert rows(engine, pfx) == []
    # the relay pass is over: a read that starts now must see v2
    assert user_name(engine, uid) == "v2"
