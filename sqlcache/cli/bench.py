"""``python -m sqlcache bench``: uncached reads, sqlcache hits and the floor, side by side in one process.

Systems run interleaved in short batches, in a shuffled order every round, so that a noisy neighbour
slows them all alike; the report gives medians, p95 and ratios against the targets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import random
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import (
    create_engine,
    event,
    select,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import (
    Session,
)

from sqlcache import SQLCache
from sqlcache import cached as cached_option

from . import bench_plot
from .bench_async import AsyncRows, async_rows
from .bench_cluster import ClusterRows, cluster_rows
from .bench_direct import direct_rows
from .bench_floor import Base, BenchOrder, BenchUser, Floor
from .bench_report import RATIOS, report

SCHEMA = "sqlcache_bench"


def _engine(url: str) -> Engine:
    if url.startswith("postgresql"):
        with create_engine(url).begin() as c:
            c.execute(sql_text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        return create_engine(url, connect_args={"options": f"-csearch_path={SCHEMA}"})
    return create_engine(url)


def _seed(engine: Engine, rows: int) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with Session(engine) as s:
        for i in range(1, rows + 1):
            s.add(
                BenchUser(
                    id=i,
                    name=f"user {i}",
                    email=f"user{i}@example.com",
                    created_at=now + dt.timedelta(minutes=i),
                    balance=decimal.Decimal(i) / 4,
                    active=i % 2 == 0,
                    score=i / 7,
                    bio="lorem ipsum " * 5,
                    meta={"tier": i % 3, "tags": ["a", "b"], "ok": True},
                    rank=i % 97,
                )
            )
        s.flush()
        for i in range(1, rows + 1):
            s.add(BenchOrder(id=i, user_id=i, total=decimal.Decimal(i), note="n"))
        s.commit()


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: Any) -> None:
        self.n += 1


def _local_serving(cache: SQLCache, engine: Engine, ids: list[int]) -> bool:
    """Whether gets through ``cache`` are served from its local tier (waiting for its tracking connection
    to answer, up to a few seconds)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with Session(engine) as s:
            s.get(BenchUser, ids[0])
        if cache.stats()["local_hits"]:
            return True
        time.sleep(0.02)  # the tracking connection's first PING is due within local_max_lag / 4
    return False


def _ns(fn: Callable[[], None]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def run_bench(args: argparse.Namespace) -> int:
    rounds, batch, rows = (3, 10, 200) if args.quick else (args.rounds, args.batch, 1000)
    if args.plot is not None and (missing := bench_plot.matplotlib_missing()):
        print(f"sqlcache bench: {missing}", file=sys.stderr)  # said before a run of minutes, not after
        return 2
    try:
        probe = redis.Redis.from_url(args.redis_url, socket_timeout=2, socket_connect_timeout=2)
        probe.ping()
    except (redis.RedisError, ValueError) as exc:
        print(f"sqlcache bench: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 2
    try:
        plain = _engine(args.database_url)
        cached = _engine(args.database_url)
        _seed(plain, rows)
    except (SQLAlchemyError, ImportError) as exc:
        print(f"sqlcache bench: cannot use the database {args.database_url}: {exc}", file=sys.stderr)
        return 2
    prefix = f"sqlcache-bench-{uuid.uuid4().hex[:8]}"
    cache = SQLCache(args.redis_url, prefix=prefix, default_ttl=3600)
    cache.attach(cached)
    cache.register(BenchUser)
    # the same entries, read by a cache that decodes every hit (decoded results not reused)
    decoding = _engine(args.database_url)
    decoding_cache = SQLCache(args.redis_url, prefix=prefix, default_ttl=3600, decoded_cache_bytes=0)
    decoding_cache.attach(decoding)
    decoding_cache.register(BenchUser)
    # the same entries through a cache with a local tier (served from process memory once read)
    localized = _engine(args.database_url)
    local_cache = SQLCache(args.redis_url, prefix=prefix, default_ttl=3600, local_bytes=256 << 20)
    local_cache.attach(localized)
    local_cache.register(BenchUser)
    rnd = random.Random(7)
    arows = async_rows(args.database_url, cache, BenchUser, SCHEMA, local_cache)
    crows = cluster_rows(args.cluster_url, lambda: _engine(args.database_url), BenchUser)
    srows = None if crows is None else ClusterRows(crows.url, _engine(args.database_url), BenchUser, None, 8)
    try:
        return _run(
            args, plain, cached, cache, probe, rnd, (rounds, batch, rows), decoding, arows, crows, srows,
            (local_cache, localized),
        )  # fmt: skip
    finally:
        local_cache.close()
        cache.clear()
        if arows is not None:
            arows.close()
        if srows is not None:
            srows.close()
        if crows is not None:
            crows.close()
        cache.close()
        decoding_cache.close()
        Base.metadata.drop_all(plain)
        for engine in (plain, cached, decoding, localized):
            engine.dispose()


def _run(
    args: argparse.Namespace,
    plain: Engine,
    cached: Engine,
    cache: SQLCache,
    floor_client: redis.Redis,
    rnd: random.Random,
    sizes: tuple[int, int, int],
    decoding: Engine,
    arows: AsyncRows | None,
    crows: ClusterRows | None,
    srows: ClusterRows | None = None,
    local: tuple[SQLCache, Engine] | None = None,
) -> int:
    rounds, batch, rows = sizes
    ids = list(range(1, rows + 1))
    if crows is not None and not _warm(crows.cache, crows.engine, ids):
        print("sqlcache bench: no cluster rows (the cluster's gets are not served from Redis)")
        crows = None  # closed by the caller
    if crows is None or (srows is not None and not _warm(srows.cache, srows.engine, ids)):
        srows = None  # closed by the caller
    if not _warm(cache, cached, ids) or (arows is not None and not arows.served_from_redis(1)):
        print("sqlcache bench: warm-up failed: gets are not served from Redis", file=sys.stderr)
        return 1
    floor = Floor(plain, cache.config.prefix, floor_client)
    try:
        systems = _systems(plain, cached, decoding, floor, rnd, ids)
        systems.update(direct_rows(cached, cache, BenchUser, rnd, ids))
        if arows is not None:
            systems["async get plain"] = arows.get(arows.plain, rnd, ids)
            systems["async get hit"] = arows.get(arows.cached, rnd, ids)
            systems["async update plain"] = arows.update(arows.plain, rnd, ids)
            systems["async update sqlcache"] = arows.update(arows.cached, rnd, ids)
        if crows is not None:
            systems["cluster get hit"] = lambda: _ns(_get_on(crows.engine, rnd, ids))
            systems["cluster q20 hit"] = lambda: _ns(_query_on(crows.engine, 20, True))
            systems["cluster update"] = lambda: _ns(_update_on(crows.engine, rnd, ids))
        if local is not None and _local_serving(*local, ids):
            lengine = local[1]
            systems["get local hit"] = lambda: _ns(_get_on(lengine, rnd, ids))
            systems["lazy local hit"] = _lazy_on(lengine, rnd, ids)
            systems["q20 local hit"] = lambda: _ns(_query_on(lengine, 20, True))
            systems["q200 local hit"] = lambda: _ns(_query_on(lengine, 200, True))
            local_direct = direct_rows(lengine, local[0], BenchUser, rnd, ids)
            systems["direct local get hit"] = local_direct["direct get hit"]
            if arows is not None:  # the same tier, under AsyncSession
                systems["async get local hit"] = arows.get(arows.local, rnd, ids)
        else:
            print("sqlcache bench: no local tier rows (its tracking connection did not answer)")
            local = None
        if srows is not None:
            systems["sharded get hit"] = lambda: _ns(_get_on(srows.engine, rnd, ids))
            systems["sharded q20 hit"] = lambda: _ns(_query_on(srows.engine, 20, True))
            systems["sharded update"] = lambda: _ns(_update_on(srows.engine, rnd, ids))
        engines = [cached] + [r.engine for r in (crows, srows) if r is not None]
        engines += [] if local is None else [local[1], local[1]]  # twice: Redis, then kept locally

        def rewarm() -> None:
            # updates invalidate entries: warm them again outside the timed part
            for engine in engines:
                for i in ids:
                    with Session(engine) as s:
                        s.get(BenchUser, i)
                for n in (20, 200):
                    _query_on(engine, n, True)()

        samples = _measure(systems, rounds, batch, rnd, rewarm)
        db = plain.dialect.name
        print(f"sqlcache bench: {db}, {rounds} rounds x {batch} ops per system, {rows} rows, interleaved")
        report(samples, rounds)
        if args.plot is not None:
            run = dict(database=db, driver=plain.dialect.driver, rounds=rounds, batch=batch, rows=rows)
            written = bench_plot.write(args.plot, bench_plot.figures(samples, RATIOS, run))
            print(f"chart: {args.plot}, figures: {written}")
        print()
        for n in (1, 50):
            trips = _round_trips(cache, cached, n)
            print(f"redis round trips, update transaction of {n:>2} registered rows: {trips}")
        print(f"redis round trips, read-only transaction: {_round_trips(cache, cached, 0)}")
        if crows is not None:
            on_cluster = [_round_trips(crows.cache, crows.engine, n) for n in (1, 50, 0)]
            print(f"redis round trips on the cluster, update of 1 / 50 rows, read-only: {on_cluster}")
        if srows is not None:
            sharded = [_round_trips(srows.cache, srows.engine, n) for n in (1, 50, 0)]
            print(f"redis round trips sharded (8), update of 1 / 50 rows, read-only: {sharded}")
    finally:
        floor.close()
    return 0


def _warm(cache: SQLCache, cached: Engine, ids: list[int]) -> bool:
    """Fill every entry, then check that a get is a hit with no SQL."""
    for i in ids:
        with Session(cached) as s:
            s.get(BenchUser, i)
    statements = _Counter()
    event.listen(cached, "before_cursor_execute", statements)
    hits0 = cache.stats()["hits"]
    with Session(cached) as s:
        s.get(BenchUser, 1)
    event.remove(cached, "before_cursor_execute", statements)
    return not statements.n and cache.stats()["hits"] == hits0 + 1


def _query_on(engine: Engine, n: int, use_cache: bool) -> Callable[[], None]:
    stmt = select(BenchUser).where(BenchUser.id <= n).order_by(BenchUser.id)
    if use_cache:
        stmt = stmt.options(cached_option())

    def op() -> None:
        with Session(engine) as s:
            rows = s.scalars(stmt).all()
            assert len(rows) == n

    return op


def _get_on(engine: Engine, rnd: random.Random, ids: list[int]) -> Callable[[], None]:
    def op() -> None:
        with Session(engine) as s:
            s.get(BenchUser, rnd.choice(ids))

    return op


def _lazy_on(engine: Engine, rnd: random.Random, ids: list[int]) -> Callable[[], int]:
    def op() -> int:
        with Session(engine) as s:
            order = s.get(BenchOrder, rnd.choice(ids))
            assert order is not None
            t0 = time.perf_counter_ns()
            _ = order.user
            return time.perf_counter_ns() - t0

    return op


def _update_on(engine: Engine, rnd: random.Random, ids: list[int]) -> Callable[[], None]:
    def op() -> None:
        with Session(engine) as s:
            u = s.get(BenchUser, rnd.choice(ids))
            assert u is not None
            u.score += 1
            s.commit()

    return op


def _systems(
    plain: Engine, cached: Engine, decoding: Engine, floor: Floor, rnd: random.Random, ids: list[int]
) -> dict[str, Callable[[], int]]:
    """Each system measured: one call runs one operation and returns its nanoseconds."""
    timed = _ns
    return {
        "get plain": lambda: timed(_get_on(plain, rnd, ids)),
        "get sqlcache hit": lambda: timed(_get_on(cached, rnd, ids)),
        "lazy plain": _lazy_on(plain, rnd, ids),
        "lazy sqlcache hit": _lazy_on(cached, rnd, ids),
        "floor": lambda: timed(floor.of(1)),
        "floor, lean GET": lambda: timed(floor.of(1, lean=True)),
        "q20 plain": lambda: timed(_query_on(plain, 20, False)),
        "q20 sqlcache hit": lambda: timed(_query_on(cached, 20, True)),
        "q20 floor": lambda: timed(floor.of(20)),
        "q200 plain": lambda: timed(_query_on(plain, 200, False)),
        "q200 sqlcache hit": lambda: timed(_query_on(cached, 200, True)),
        "q200 floor": lambda: timed(floor.of(200)),
        "get ORM floor": lambda: timed(floor.orm_get),
        "lazy ORM floor": floor.orm_lazy,
        "q20 ORM floor": lambda: timed(floor.orm_of(20)),
        "q200 ORM floor": lambda: timed(floor.orm_of(200)),
        "get ORM floor, memory": lambda: timed(floor.orm_get_memory),
        "q200 ORM floor, memory": lambda: timed(floor.orm_of(200, memory=True)),
        "q20 hit, no reuse": lambda: timed(_query_on(decoding, 20, True)),
        "q200 hit, no reuse": lambda: timed(_query_on(decoding, 200, True)),
        "update plain": lambda: timed(_update_on(plain, rnd, ids)),
        "update sqlcache": lambda: timed(_update_on(cached, rnd, ids)),
    }


def _measure(
    systems: dict[str, Callable[[], int]],
    rounds: int,
    batch: int,
    rnd: random.Random,
    rewarm: Callable[[], None],
) -> dict[str, list[int]]:
    """Rounds of short batches, systems in a new shuffled order each round (round 0 warms up)."""
    samples: dict[str, list[int]] = {name: [] for name in systems}
    names = list(systems)
    live = sys.stderr.isatty()  # progress on a terminal: a run takes minutes
    for r in range(rounds + 1):
        if live:
            print(f"\rsqlcache bench: round {r}/{rounds} ({len(names)} systems)", end="", file=sys.stderr)
        rnd.shuffle(names)
        for name in names:
            fn = systems[name]
            times = [fn() for _ in range(batch)]
            if r:
                samples[name].extend(times)
        rewarm()
    if live:
        print(file=sys.stderr)
    return samples


def _round_trips(cache: SQLCache, engine: Engine, n: int) -> int:
    """Commands the cache writes to Redis for one committing update of ``n`` rows (pipelined ones too)."""
    calls = _Counter()
    client = getattr(cache.store, "client", None)  # a cluster's node stores use redis.Connection
    conn_class: Any = redis.Connection if client is None else client.connection_pool.connection_class
    original: Callable[..., Any] = conn_class.send_command
    packing: Callable[..., Any] = conn_class.pack_commands

    def counting(self: Any, *a: Any, **kw: Any) -> Any:
        calls()
        return original(self, *a, **kw)

    def counting_packed(self: Any, commands: Any) -> Any:  # several written at once (a sharded exchange)
        for _ in commands:
            calls()
        return packing(self, commands)

    with Session(engine) as s:
        users = [s.get(BenchUser, i) for i in range(1, n + 1)] if n else []
        conn_class.send_command = counting
        conn_class.pack_commands = counting_packed
        try:
            for u in users:
                assert u is not None
                u.score += 1
            s.commit()
        finally:
            conn_class.send_command = original
            conn_class.pack_commands = packing
    return calls.n
