"""Tenants picked on the connection (SET search_path, USE db): their rows never share entries.

Two schemas (PostgreSQL) or databases (MariaDB) hold the same table with different rows; a third one
is what the engine resolves names to by default.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache, cached

from ..conftest import MARIADB_URL, PG_URL, RUN_ID, SQLCounter, unavailable


class TenantBase(DeclarativeBase):
    pass


class Account(TenantBase):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


NAMES = {"home": "home-1", "a": "alice-a", "b": "bob-b"}


def _spaces() -> dict[str, str]:
    return {k: f"t9{k}_{RUN_ID}" for k in NAMES}


def _pg() -> Iterator[tuple[Engine, dict[str, str]]]:
    spaces = _spaces()
    try:
        admin = create_engine(PG_URL)
        with admin.begin() as c:
            for key, schema in spaces.items():
                c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
                c.execute(
                    text(f"CREATE TABLE IF NOT EXISTS {schema}.accounts (id int PRIMARY KEY, name text)")
                )
                c.execute(text(f"DELETE FROM {schema}.accounts"))
                c.execute(text(f"INSERT INTO {schema}.accounts VALUES (1, '{NAMES[key]}')"))
    except Exception as exc:  # any driver error means "unavailable"
        unavailable("postgresql", exc)
    engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={spaces['home']}"})
    yield engine, spaces
    engine.dispose()
    with admin.begin() as c:
        for schema in spaces.values():
            c.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    admin.dispose()


def _mariadb() -> Iterator[tuple[Engine, dict[str, str]]]:
    spaces = _spaces()
    try:
        admin = create_engine(MARIADB_URL)
        with admin.begin() as c:
            for key, db in spaces.items():
                c.execute(text(f"CREATE DATABASE IF NOT EXISTS {db}"))
                c.execute(text(f"CREATE TABLE IF NOT EXISTS {db}.accounts (id int PRIMARY KEY, name text)"))
                c.execute(text(f"DELETE FROM {db}.accounts"))
                c.execute(text(f"INSERT INTO {db}.accounts VALUES (1, '{NAMES[key]}')"))
    except Exception as exc:
        unavailable("mariadb", exc)
    engine = create_engine(MARIADB_URL.rsplit("/", 1)[0] + "/" + spaces["home"])
    yield engine, spaces
    engine.dispose()
    with admin.begin() as c:
        for db in spaces.values():
            c.execute(text(f"DROP DATABASE IF EXISTS {db}"))
    admin.dispose()


@pytest.fixture(params=["postgresql", "mariadb"])
def tenants(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, dict[str, str]]]:
    """An engine whose default resolution is the "home" space, and the names of the tenants' spaces."""
    yield from (_pg() if request.param == "postgresql" else _mariadb())


@pytest.fixture
def pg_tenants() -> Iterator[tuple[Engine, dict[str, str]]]:
    yield from _pg()


def _cache(redis_url: str, engine: Engine, mode: str = "invalidate") -> SQLCache:
    c = SQLCache(redis_url, prefix=f"t9{uuid.uuid4().hex[:10]}", default_ttl=600)
    c.strict_signals = True
    c.register(Account, mode=mode)
    c.attach(engine)
    return c


@pytest.fixture
def cache_for(redis_url: str) -> Iterator[Any]:
    made: list[tuple[SQLCache, Engine]] = []

    def make(engine: Engine, mode: str = "invalidate") -> SQLCache:
        c = _cache(redis_url, engine, mode)
        made.append((c, engine))
        return c

    yield make
    for c, engine in made:
        c.detach(engine)
        c.clear()
        c.close()


def _pick(s: Session, engine: Engine, space: str) -> None:
    """Choose a tenant on the session's connection, the way the application would."""
    if engine.dialect.name == "postgresql":
        s.execute(text(f"SET search_path TO {space}"))
    else:
        s.execute(text(f"USE {space}"))


def _counter(engine: Engine) -> SQLCounter:
    counter = SQLCounter()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counter.statements.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    counter.on_execute = on_execute  # type: ignore[attr-defined]
    return counter


def _warm(engine: Engine) -> None:
    """Read in fresh sessions until both reads hit (on MariaDB the first transaction's query, which
    runs after SQL, does not fill: repeatable read)."""
    for _ in range(3):
        sql = _counter(engine)
        with Session(engine) as s:
            assert _read(s) == ("home-1", ["home-1"])
        event.remove(engine, "before_cursor_execute", sql.on_execute)
        if not sql.statements:
            return
    raise AssertionError("the default resolution's reads never hit")


def _read(s: Session) -> tuple[str, list[str]]:
    acc = s.get(Account, 1)
    assert acc is not None
    return acc.name, list(s.scalars(select(Account.name).order_by(Account.id).options(cached())))


def test_tenants_picked_inline_never_share_entries(
    tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """A tenant picked with SET search_path / USE inside the session reads its own rows, get() and
    cached queries alike, whatever another tenant (or the default) filled before."""
    engine, spaces = tenants
    cache = cache_for(engine)
    _warm(engine)  # the default resolution fills the shared entries, and hits them
    hits = cache.stats()["hits"]
    for key in ("a", "b", "a"):
        with Session(engine) as s:
            _pick(s, engine, spaces[key])
            assert _read(s) == (NAMES[key], [NAMES[key]])
            s.commit()  # the setting goes back to the pool with the connection
    assert cache.stats()["hits"] == hits
    assert cache.stats()["bypassed"] >= 6


def test_a_setting_left_on_a_pooled_connection_is_remembered(
    tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """A session-level SET / USE outlives the checkout that ran it: a later session that gets that
    connection from the pool neither hits nor fills the shared entries, until the setting is put back
    (RESET search_path, or USE of the engine's own database); then hits resume."""
    engine, spaces = tenants
    engine.pool.dispose()
    cache = cache_for(engine)
    _warm(engine)
    with Session(engine) as s:
        _pick(s, engine, spaces["a"])
        s.commit()
    before = cache.stats()
    with Session(engine) as s:  # no SET: the pooled connection still resolves names to tenant a
        assert _read(s) == ("alice-a", ["alice-a"])
    after = cache.stats()
    assert after["hits"] == before["hits"] and after["fills"] == before["fills"]
    with Session(engine) as s:
        if engine.dialect.name == "postgresql":
            s.execute(text("RESET search_path"))
        else:
            s.execute(text(f"USE {spaces['home']}"))
        s.commit()
    sql = _counter(engine)
    with Session(engine) as s:
        assert _read(s) == ("home-1", ["home-1"])
    assert sql.statements == []


def test_normal_reads_still_hit(tenants: tuple[Engine, dict[str, str]], cache_for: Any) -> None:
    """An application that never changes name resolution (or changes only settings that do not
    matter, such as a timeout) is unaffected: hits send no SQL and nothing is bypassed."""
    engine, _spaces = tenants
    cache = cache_for(engine)
    with Session(engine) as s:
        if engine.dialect.name == "postgresql":
            s.execute(text("SET statement_timeout = 5000"))
        else:
            s.execute(text("SET SESSION wait_timeout = 3600"))
        s.commit()
    _warm(engine)
    assert cache.stats()["bypassed"] == 0


@pytest.mark.parametrize(
    "statement",
    [
        "SET search_path TO {a}",
        "SET SESSION search_path = {a}",
        "SELECT set_config('search_path', '{a}', false)",
        "SET SCHEMA '{a}'",
    ],
)
def test_postgresql_ways_to_set_the_search_path(
    pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any, statement: str
) -> None:
    """Every spelling of a session-level search_path change is seen."""
    engine, spaces = pg_tenants
    cache_for(engine)
    with Session(engine) as s:
        _read(s)
    with Session(engine) as s:
        s.execute(text(statement.format(a=spaces["a"])))
        assert _read(s) == ("alice-a", ["alice-a"])
        s.commit()
    engine.pool.dispose()


def test_set_local_lasts_one_transaction(pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any) -> None:
    """SET LOCAL from an ``after_begin`` listener (a common way to pick a tenant) bypasses the cache
    for that transaction only. The first time, the code picking the tenant takes the connection
    before reading (as docs/pages/consistency.md says); from then on sqlcache does it for every read that
    comes before the session's connection, so its hooks always run first."""
    engine, spaces = pg_tenants
    cache = cache_for(engine)
    _warm(engine)
    tenant: list[str] = []

    @event.listens_for(Session, "after_begin")
    def pick(session: Session, transaction: Any, connection: Any) -> None:
        if tenant:
            connection.exec_driver_sql(f"SET LOCAL search_path TO {tenant[0]}")

    try:
        tenant.append(spaces["b"])
        with Session(engine) as s:
            s.connection()
            assert _read(s) == ("bob-b", ["bob-b"])
        tenant[:] = [spaces["a"]]
        with Session(engine) as s:
            assert _read(s) == ("alice-a", ["alice-a"])
        tenant.clear()
        hits, bypassed = cache.stats()["hits"], cache.stats()["bypassed"]
        with Session(engine) as s:
            assert _read(s) == ("home-1", ["home-1"])
        assert cache.stats()["hits"] == hits + 2
        assert bypassed == 4
    finally:
        event.remove(Session, "after_begin", pick)


def test_a_reset_rolled_back_is_not_believed(
    pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """PostgreSQL undoes a RESET of a transaction that rolls back (or of a savepoint that does): the
    connection keeps the tenant's search_path, and sqlcache keeps bypassing it."""
    engine, spaces = pg_tenants
    engine.pool.dispose()
    cache = cache_for(engine)
    with Session(engine) as s:
        _read(s)
    with Session(engine) as s:
        _pick(s, engine, spaces["a"])
        s.commit()
    with Session(engine) as s:
        s.execute(text("RESET search_path"))
        s.rollback()
    with Session(engine) as s:
        with s.begin_nested():
            s.execute(text("RESET search_path"))
            s.rollback()
        s.commit()
    hits = cache.stats()["hits"]
    with Session(engine) as s:
        assert _read(s) == ("alice-a", ["alice-a"])
    assert cache.stats()["hits"] == hits


def test_a_tenants_write_never_repopulates_the_shared_entry(
    tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """mode="repopulate": a write under a tenant's resolution wrote the tenant's row; the shared entry
    (the default resolution's row) is invalidated, never overwritten with the tenant's values."""
    engine, spaces = tenants
    cache_for(engine, mode="repopulate")
    with Session(engine) as s:
        assert _read(s)[0] == "home-1"
    with Session(engine) as s:
        _pick(s, engine, spaces["a"])
        acc = s.get(Account, 1)
        assert acc is not None
        acc.name = "alice-2"
        s.commit()
    with Session(engine) as s:  # whatever connection it gets: set it back first
        if engine.dialect.name == "postgresql":
            s.execute(text("RESET search_path"))
        else:
            s.execute(text(f"USE {spaces['home']}"))
        s.commit()
    engine.pool.dispose()
    with Session(engine) as s:
        assert _read(s) == ("home-1", ["home-1"])


def test_a_statement_that_sets_the_path_is_not_filled(
    pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """A cached statement whose execution itself changes the search_path (set_config in a SELECT)
    leaves nothing behind: its connection resolves names its own way from then on."""
    engine, spaces = pg_tenants
    cache = cache_for(engine)
    with Session(engine) as s:
        stmt = select(func.set_config("search_path", spaces["a"], False)).options(cached())
        assert s.scalar(stmt) == spaces["a"]
        assert _read(s) == ("alice-a", ["alice-a"])
    assert cache.stats()["fills"] == 0
    engine.pool.dispose()


def test_schema_translate_map_is_the_cacheable_way(
    pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """A tenant chosen with ``schema_translate_map`` (what docs/pages/consistency.md recommends) is part of
    every key: each tenant hits its own entries, none sees another's."""
    engine, spaces = pg_tenants
    cache = cache_for(engine)
    for _ in range(2):
        for key in ("a", "b"):
            with Session(engine.execution_options(schema_translate_map={None: spaces[key]})) as s:
                assert _read(s) == (NAMES[key], [NAMES[key]])
    assert cache.stats()["hits"] == 4
    assert cache.stats()["bypassed"] == 0


def test_bound_connections_of_one_pool_each_resolve_their_own_names(
    pg_tenants: tuple[Engine, dict[str, str]], cache_for: Any
) -> None:
    """A Session bound to two connections of one engine (``binds=``), one of them translated to a
    tenant's schema: a read of the tenant's class keys its entry by the connection that runs it, never
    by the other one, so the default-schema entry never holds the tenant's row."""
    engine, spaces = pg_tenants
    cache = cache_for(engine)
    with engine.connect() as plain, engine.connect() as tenant_conn:
        tenant = tenant_conn.execution_options(schema_translate_map={None: spaces["a"]})
        for _ in range(2):
            with Session(binds={TenantBase: plain, Account: tenant}) as s:
                assert s.get(Account, 1).name == NAMES["a"]  # type: ignore[union-attr]
            with Session(binds={TenantBase: plain, Account: tenant}) as s:
                assert cache.get(s, Account, 1).name == NAMES["a"]
            tenant_conn.rollback()
            plain.rollback()
    for _ in range(2):
        with Session(engine) as s:
            assert s.get(Account, 1).name == NAMES["home"]  # type: ignore[union-attr]
        with Session(engine) as s:
            assert cache.get(s, Account, 1).name == NAMES["home"]
