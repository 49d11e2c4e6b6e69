"""A multi-process consistency checker: K writers, R readers, real PostgreSQL and Redis.

Writers bump a version column (row-locked, so versions per row are strictly increasing) and log each
commit once ``commit()`` has returned. Readers log what they saw and when they started, through
``Session.get`` and through a ``cached()`` query, with random pauses injected between their SELECT and
their fill to widen the race windows. Violations:

- a read that started after version v of a row was committed (commit returned) but saw a lower one;
- at the end, a cached value that differs from the database.

``--mode naive`` runs the usual cache-aside recipe instead (delete after commit, fill on miss), which
the checker must catch; ``--mode durable`` runs sqlcache with ``durable=True`` (outbox rows written by
every commit, relays deleting them; at the end no row may be left); ``--mode async`` mixes sync worker
processes with asyncio ones (AsyncSession on asyncpg, many tasks per process, each process one event
loop; readers' pauses awaited, not slept). Soak: ``python -m tests.concurrency.checker --seconds 300``.
``--cluster`` runs any mode against a local Redis Cluster it starts (tests/topologies.py), ``--shards N``
with the caches sharded over it. ``--local`` gives the readers a local tier (with ``--mode async``,
the asyncio readers' tasks share one per process): reads served from memory are counted (from each
reader's ``stats()``), and so are reads older than its staleness bound allows (``beyond_max_lag``, a subset of
the violations, which count any read older than a commit that returned before it began).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import redis
from sqlalchemy import Integer, MetaData, create_engine, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.util import concurrency

from sqlcache import SQLCache, cached, outbox_table

ROWS = 12
PG_URL = os.environ.get("SQLCACHE_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")


class Base(DeclarativeBase):
    metadata = MetaData()


class Row(Base):
    __tablename__ = "check_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer)


def _engine(pg_url: str, schema: str) -> Engine:
    return create_engine(pg_url, connect_args={"options": f"-csearch_path={schema}"})


def _pauses(engine: Engine, rnd: random.Random) -> None:
    """Sleep now and then right after a SELECT: between a reader's SELECT and its fill."""

    def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and rnd.random() < 0.3:
            time.sleep(rnd.uniform(0, 0.02))

    event.listen(engine, "after_cursor_execute", after)


class Naive:
    """The usual recipe: GET, else SELECT and SET; after commit, DEL. (Deliberately racy.)"""

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix

    def get(self, engine: Engine, rid: int) -> int:
        key = f"{self.prefix}:naive:{rid}"
        raw = self.r.get(key)
        if raw is not None:
            return int(msgpack.unpackb(raw))
        with Session(engine) as s:
            row = s.get(Row, rid)
            assert row is not None
            v = row.version
        self.r.set(key, msgpack.packb(v))
        return v

    def written(self, rid: int) -> None:
        self.r.delete(f"{self.prefix}:naive:{rid}")


#: the readers' local tier (``--local``): its staleness bound, and its size
LOCAL_MAX_LAG = 0.1
LOCAL_BYTES = 64 << 20


def _cache(args: dict[str, Any], **kwargs: Any) -> SQLCache:
    return SQLCache(args["redis_url"], prefix=args["prefix"], shards=args["shards"], **kwargs)


def _query(rid: int, shards: int) -> Any:
    """A reader's cached query of a row's version; sharded, tagged so that its entry spans shards."""
    tags = [f"part{rid % 4}"] if shards > 1 else []
    return select(Row.version).where(Row.id == rid).options(cached(tags=tags))


def _setup(
    args: dict[str, Any], pauses: random.Random | None, reader: bool = False
) -> tuple[Engine, Naive | None, SQLCache | None]:
    """A worker's engine, with sqlcache attached or the naive recipe beside it (readers with a local
    tier under ``--local``)."""
    engine = _engine(args["pg_url"], args["schema"])
    if pauses is not None:
        _pauses(engine, pauses)
    if args["mode"] == "naive":
        return engine, Naive(args["redis_url"], args["prefix"]), None
    durable = args["mode"] == "durable"
    local = {"local_bytes": LOCAL_BYTES, "local_max_lag": LOCAL_MAX_LAG} if reader and args["local"] else {}
    cache = _cache(args, durable=durable, relay_interval=0.2, **local)
    cache.register(Row)
    cache.attach(engine)
    return engine, None, cache


# SQLAlchemy 2.0 calls it await_only, 2.1 await_
_await = getattr(concurrency, "await_", None) or concurrency.await_only
ASYNC_TASKS = {"w": 4, "r": 10}  # tasks per asyncio worker process


def _async_engine(args: dict[str, Any]) -> AsyncEngine:
    url = make_url(args["pg_url"]).set(drivername="postgresql+asyncpg", query={})
    return create_async_engine(url, connect_args={"server_settings": {"search_path": args["schema"]}})


def _async_worker(args: dict[str, Any], role: str, n: int) -> None:
    asyncio.run(_async_main(args, role, n))


async def _async_main(args: dict[str, Any], role: str, n: int) -> None:
    """One asyncio process: ASYNC_TASKS[role] tasks writing (``w``) or reading (``r``) on one loop."""
    rnd = random.Random(n + (0 if role == "w" else 1000))
    engine = _async_engine(args)
    local = role == "r" and args["local"]
    cache = _cache(args, **({"local_bytes": LOCAL_BYTES, "local_max_lag": LOCAL_MAX_LAG} if local else {}))
    cache.register(Row)
    cache.attach(engine)
    if role == "r":

        def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
            # between a reader's SELECT and its fill: the other tasks run meanwhile
            if statement.lstrip().upper().startswith("SELECT") and rnd.random() < 0.3:
                _await(asyncio.sleep(rnd.uniform(0, 0.02)))

        event.listen(engine.sync_engine, "after_cursor_execute", after)
    out = Path(args["dir"], f"{role}{n}.jsonl").open("w")
    stop = args["stop"]

    async def write() -> None:
        while time.time() < stop:
            rid = rnd.randint(1, ROWS)
            async with AsyncSession(engine) as s:
                row = await s.get(Row, rid, with_for_update=True)
                assert row is not None
                row.version += 1
                v = row.version
                await s.commit()
            out.write(json.dumps(["w", rid, v, time.time()]) + "\n")

    async def read() -> None:
        while time.time() < stop:
            rid = rnd.randint(1, ROWS)
            started = time.time()
            async with AsyncSession(engine) as s:
                if rnd.random() < 0.5:
                    row = await s.get(Row, rid)
                    assert row is not None
                    v, kind = row.version, "async get"
                else:
                    stmt = _query(rid, args["shards"])
                    v, kind = (await s.scalars(stmt)).one(), "async query"
            out.write(json.dumps(["r", rid, v, started, kind]) + "\n")

    try:
        await asyncio.gather(*((write if role == "w" else read)() for _ in range(ASYNC_TASKS[role])))
        if local:  # how many reads memory served (the tasks share one tier: counted per process)
            out.write(json.dumps(["s", cache.stats()["local_hits"], "async"]) + "\n")
    finally:
        out.close()
        await cache.aclose()
        await engine.dispose()


def _writer(args: dict[str, Any], n: int) -> None:
    if args["mode"] == "async" and n % 2:
        _async_worker(args, "w", n)
        return
    rnd = random.Random(n)
    engine, naive, cache = _setup(args, None)
    out = Path(args["dir"], f"w{n}.jsonl").open("w")
    stop = args["stop"]
    while time.time() < stop:
        rid = rnd.randint(1, ROWS)
        with Session(engine) as s:
            row = s.get(Row, rid, with_for_update=True)
            assert row is not None
            row.version += 1
            v = row.version
            s.commit()
        if naive is not None:
            naive.written(rid)
        out.write(json.dumps(["w", rid, v, time.time()]) + "\n")
    out.close()
    if cache is not None:
        cache.close()  # durable: the relay deletes the rows this writer applied before it stops


def _reader(args: dict[str, Any], n: int) -> None:
    if args["mode"] == "async" and n % 2:
        _async_worker(args, "r", n)
        return
    rnd = random.Random(1000 + n)
    engine, naive, cache = _setup(args, rnd, reader=True)
    local = cache is not None and args["local"]
    out = Path(args["dir"], f"r{n}.jsonl").open("w")
    stop = args["stop"]
    while time.time() < stop:
        rid = rnd.randint(1, ROWS)
        started = time.time()
        served = cache.stats()["local_hits"] if local else 0  # type: ignore[union-attr]
        if naive is not None:
            v = naive.get(engine, rid)
            kind = "naive"
        elif rnd.random() < 0.5:
            with Session(engine) as s:
                row = s.get(Row, rid)
                assert row is not None
                v, kind = row.version, "get"
        else:
            with Session(engine) as s:
                v = s.scalars(_query(rid, args["shards"])).one()
                kind = "query"
        if local and cache.stats()["local_hits"] > served:  # type: ignore[union-attr]
            kind += " (local)"
        out.write(json.dumps(["r", rid, v, started, kind]) + "\n")
    if local:
        out.write(json.dumps(["s", cache.stats()["local_hits"], "sync"]) + "\n")  # type: ignore[union-attr]
    out.close()
    if cache is not None:
        cache.close()


def run_checker(
    mode: str = "sqlcache",
    seconds: float = 20.0,
    writers: int = 2,
    readers: int = 3,
    pg_url: str = PG_URL,
    redis_url: str = REDIS_URL,
    shards: int = 1,
    local: bool = False,
) -> dict[str, Any]:
    """Run the processes for ``seconds`` and return the figures, violations included. ``shards``: the
    caches' (a cluster's); with more than one, cached queries carry a tag in another shard than their
    table's, so that their entries span shards."""
    schema = f"sqlcache_check_{uuid.uuid4().hex[:8]}"
    prefix = f"check-{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    engine = _engine(pg_url, schema)
    Base.metadata.create_all(engine)
    if mode == "durable":
        outbox_table(MetaData()).create(engine)
    with Session(engine) as s:
        s.add_all(Row(id=i, version=0) for i in range(1, ROWS + 1))
        s.commit()
    work = tempfile.mkdtemp(prefix="sqlcache-check-")
    ctx = multiprocessing.get_context("spawn")
    try:
        # processes start slowly under spawn: every one begins at the same moment, after start-up
        args = {
            "mode": mode,
            "pg_url": pg_url,
            "redis_url": redis_url,
            "shards": shards,
            "local": local,
            "schema": schema,
            "prefix": prefix,
            "dir": work,
            "stop": time.time() + seconds + 3,
        }
        procs = [ctx.Process(target=_writer, args=(args, n)) for n in range(writers)]
        procs += [ctx.Process(target=_reader, args=(args, n)) for n in range(readers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(seconds + 120)
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        commits: dict[int, list[tuple[float, int]]] = {}
        reads: list[list[Any]] = []
        local_reads = {"sync": 0, "async": 0}  # reads served from memory, from the readers' stats()
        for f in Path(work).glob("*.jsonl"):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                if rec[0] == "s":
                    local_reads[rec[2]] += rec[1]
                elif rec[0] == "w":
                    commits.setdefault(rec[1], []).append((rec[3], rec[2]))
                else:
                    reads.append(rec)
        for lst in commits.values():
            lst.sort()
        violations = []
        beyond_lag = 0  # reads older than the local tier's bound allows (a subset of the violations)
        for _, rid, seen, started, kind in reads:
            floor = max((v for t, v in commits.get(rid, []) if t < started), default=0)
            if seen < floor:
                violations.append({"row": rid, "saw": seen, "committed_before_start": floor, "via": kind})
                lagged = max((v for t, v in commits.get(rid, []) if t < started - LOCAL_MAX_LAG), default=0)
                beyond_lag += seen < lagged
        mismatches = _final_check(mode, engine, redis_url, prefix, shards)
        outbox_left = None
        if mode == "durable":
            with engine.connect() as c:
                outbox_left = c.execute(text("SELECT count(*) FROM sqlcache_outbox")).scalar_one()
        return {
            "mode": mode,
            "seconds": seconds,
            "writes": sum(len(v) for v in commits.values()),
            "reads": len(reads),
            "reads_by_kind": {k: sum(1 for r in reads if r[4] == k) for k in sorted({r[4] for r in reads})},
            "operations": len(reads) + sum(len(v) for v in commits.values()),
            "violations": len(violations),
            "local_reads": sum(local_reads.values()) if local else None,
            "local_reads_by_world": local_reads if local else None,
            "beyond_max_lag": beyond_lag if local else None,
            "examples": violations[:5],
            "final_mismatches": mismatches,
            "failed_processes": failed,
            "outbox_left": outbox_left,
        }
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
        if mode == "naive":
            r = redis.Redis.from_url(redis_url)
            for key in r.scan_iter(match=f"{prefix}:*"):
                r.delete(key)
        else:
            leftover = SQLCache(redis_url, prefix=prefix, shards=shards)
            leftover.clear()
            leftover.close()


def _final_check(
    mode: str, engine: Engine, redis_url: str, prefix: str, shards: int = 1
) -> list[dict[str, int]]:
    """Every value the cache would serve now equals the database."""
    truth: dict[int, int] = {}
    with Session(engine) as s:
        for row in s.scalars(select(Row)):
            truth[row.id] = row.version
    out = []
    if mode == "naive":
        naive = Naive(redis_url, prefix)
        for rid, v in truth.items():
            got = naive.get(engine, rid)
            if got != v:
                out.append({"row": rid, "cached": got, "database": v})
        return out
    cache = SQLCache(redis_url, prefix=prefix, shards=shards)
    cache.register(Row)
    cache.attach(engine)
    try:
        for rid, v in truth.items():
            with Session(engine) as s:
                row = s.get(Row, rid)
                assert row is not None
                got_get = row.version
            with Session(engine) as s:
                got_q = s.scalars(_query(rid, shards)).one()
            if got_get != v or got_q != v:
                out.append({"row": rid, "cached_get": got_get, "cached_query": got_q, "database": v})
    finally:
        cache.detach(engine)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["sqlcache", "durable", "naive", "async"], default="sqlcache")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--redis-url", default=REDIS_URL, help="default: $SQLCACHE_REDIS_URL or local")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="start a local Redis Cluster (3 primaries, 3 replicas) for the run and use it",
    )
    parser.add_argument("--shards", type=int, default=1, help="with --cluster: the caches' shards")
    parser.add_argument(
        "--local", action="store_true", help=f"readers with a local tier (local_max_lag={LOCAL_MAX_LAG})"
    )
    a = parser.parse_args()
    if a.cluster:
        from ..topologies import LocalCluster

        with LocalCluster() as cluster:
            url = cluster.startup_url.replace("redis://", "redis+cluster://", 1)
            out = run_checker(
                a.mode, a.seconds, a.writers, a.readers, redis_url=url, shards=a.shards, local=a.local
            )
        out["redis"] = f"local cluster (3 primaries, 3 replicas), shards={a.shards}"
    else:
        out = run_checker(a.mode, a.seconds, a.writers, a.readers, redis_url=a.redis_url, local=a.local)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
