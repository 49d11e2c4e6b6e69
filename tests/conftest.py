"""Fixtures: real Redis and real SQLite / PostgreSQL / MariaDB, URLs from the environment.

SQLCACHE_REDIS_URL, SQLCACHE_PG_URL and SQLCACHE_MARIADB_URL override the defaults below. A service
that is down skips its tests locally and fails them when SQLCACHE_REQUIRE_SERVICES=1 (CI sets it).
Each test run gets its own PostgreSQL schema and MariaDB database, so runs do not collide.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from sqlcache import SQLCache

from .models import Base

REDIS_URL = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("SQLCACHE_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("SQLCACHE_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REQUIRE = os.environ.get("SQLCACHE_REQUIRE_SERVICES") == "1"
RUN_ID = uuid.uuid4().hex[:8]
BACKENDS = ["sqlite", "postgresql", "mariadb"]


def unavailable(what: str, exc: BaseException) -> None:
    if REQUIRE:
        pytest.fail(f"{what} is required (SQLCACHE_REQUIRE_SERVICES=1) but unavailable: {exc}")
    pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def pg_url() -> str:
    """PostgreSQL's URL, once it answered (skip or fail as for every service)."""
    try:
        probe = create_engine(PG_URL)
        with probe.connect():
            pass
        probe.dispose()
    except Exception as exc:  # any driver error means "unavailable"
        unavailable("postgresql", exc)
    return PG_URL


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=5)


def _sqlite_engine(tmp: str) -> Engine:
    engine = create_engine(f"sqlite:///{tmp}/sqlcache-test.db", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _wal(dbapi_conn: Any, _rec: Any) -> None:
        # WAL: a reader paused mid-transaction must not block a writer's commit
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def _make_engine(backend: str, tmp: str) -> Engine:
    if backend == "sqlite":
        return _sqlite_engine(tmp)
    if backend == "postgresql":
        schema = f"sqlcache_{RUN_ID}"
        admin = create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        admin.dispose()
        return create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    name = f"sqlcache_{RUN_ID}"
    admin = create_engine(MARIADB_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE DATABASE IF NOT EXISTS {name}"))
    admin.dispose()
    return create_engine(MARIADB_URL.rsplit("/", 1)[0] + "/" + name)


def shareable_url(engine: Engine) -> str:
    """A URL another process can use to reach the same test database (PostgreSQL's schema included)."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"options": f"-csearch_path=sqlcache_{RUN_ID}"})
    return url.render_as_string(hide_password=False)


def _drop_namespace(backend: str) -> None:
    if backend == "postgresql":
        admin = create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA IF EXISTS sqlcache_{RUN_ID} CASCADE"))
        admin.dispose()
    elif backend == "mariadb":
        admin = create_engine(MARIADB_URL)
        with admin.begin() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS sqlcache_{RUN_ID}"))
        admin.dispose()


_ENGINES: dict[str, Engine] = {}


@pytest.fixture(scope="session")
def _tmpdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sqlcache-")
    yield d
    for backend, engine in _ENGINES.items():
        engine.dispose()
        try:
            _drop_namespace(backend)
        except Exception:
            pass
    shutil.rmtree(d, ignore_errors=True)


def _engine_for(backend: str, tmp: str) -> Engine:
    engine = _ENGINES.get(backend)
    if engine is None:
        try:
            engine = _make_engine(backend, tmp)
            with engine.connect() as c:
                c.execute(text("SELECT 1"))
            Base.metadata.create_all(engine)
        except Exception as exc:
            unavailable(backend, exc)
        _ENGINES[backend] = engine
    return engine


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, _tmpdir: str) -> Iterator[Engine]:
    """A clean database of each kind: tables created once per run, emptied before each test."""
    eng = _engine_for(request.param, _tmpdir)
    with eng.begin() as c:
        for table in reversed(Base.metadata.sorted_tables):
            c.execute(table.delete())
    yield eng


@pytest.fixture
def cache(redis_url: str, engine: Engine) -> Iterator[SQLCache]:
    """A cache with a fresh random prefix attached to ``engine``; signals strict; cleared afterwards."""
    c = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", default_ttl=600)
    c.strict_signals = True
    c.attach(engine)
    yield c
    c.detach(engine)
    c.clear()
    c.close()


class SQLCounter:
    """Counts statements sent to the database (a hit sends none)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __len__(self) -> int:
        return len(self.statements)

    def reset(self) -> None:
        self.statements.clear()

    def selects(self) -> int:
        return sum(1 for s in self.statements if s.lstrip().upper().startswith("SELECT"))


@pytest.fixture
def sql_count(engine: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counter.statements.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    yield counter
    event.remove(engine, "before_cursor_execute", on_execute)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, stopped by PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sqlcache-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def save(self) -> None:
        """Write a snapshot to disk now (the restart below restores it)."""
        redis.Redis(port=self.port, socket_timeout=5).save()

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("redis-server", FileNotFoundError("redis-server"))
        assert exe is not None
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()
