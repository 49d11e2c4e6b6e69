"""``python -m sqlcache demo``: a small shop that shows what sqlcache does, measured live."""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from sqlcache import SQLCache, signals

from .demo_async import async_step
from .private_redis import PrivateRedisError, hide_password, private_redis, problem_with


class _Base(DeclarativeBase):
    metadata = MetaData()


class Customer(_Base):
    __tablename__ = "demo_customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2))


class Product(_Base):
    __tablename__ = "demo_products"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    price_cents: Mapped[int] = mapped_column(Integer)  # stored exactly as assigned (mode='repopulate')
    stock: Mapped[int] = mapped_column(Integer)


class Order(_Base):
    __tablename__ = "demo_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("demo_customers.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("demo_products.id"))
    qty: Mapped[int] = mapped_column(Integer)
    customer: Mapped[Customer] = relationship()
    product: Mapped[Product] = relationship()


class _Out:
    """Plain lines, or rich panels and a live progress table when rich is there and wanted."""

    def __init__(self, plain: bool) -> None:
        self.console: Any = None
        if not plain:
            try:
                from rich.console import Console

                self.console = Console()
            except ImportError:
                print("(rich is not installed: plain output; pip install 'sqlcache[demo]' for the live view)")

    def title(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(f"[bold]{text}")
        else:
            print(f"\n== {text}")

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            print(text)

    @contextmanager
    def progress(
        self, label: str, total: int, cache: SQLCache, sql: _SQLCounter
    ) -> Iterator[Callable[[], None]]:
        """Yields a step() callable; shows hits, misses and SQL statements as they climb."""
        start = cache.stats()
        sql0 = sql.n

        def summary() -> str:
            now = cache.stats()
            return (
                f"hits {now['hits'] - start['hits']:>4}  misses {now['misses'] - start['misses']:>4}  "
                f"SQL statements {sql.n - sql0:>4}"
            )

        if self.console is None:
            yield lambda: None
            print(f"{label}: {summary()}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        ) as bar:
            task = bar.add_task(label, total=total, info=summary())

            def step() -> None:
                bar.update(task, advance=1, info=summary())

            yield step


class _SQLCounter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: Any) -> None:
        self.n += 1


def run_demo(args: argparse.Namespace, explicit: bool) -> int:
    """Run the demo against ``args.redis_url``; against a private redis-server if asked to
    (``--private-redis``), or if nothing answers at a URL the user did not give (``explicit`` is False:
    neither ``--redis-url`` nor ``SQLCACHE_REDIS_URL``). A URL the user gave is used or reported, never
    replaced: the demo must not pass for a check of a server it did not talk to."""
    received: list[int] = []

    def on_int(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_int) if main else None
    previous = signal.default_int_handler if previous is None else previous
    try:
        code = _with_redis(args, explicit)
    except KeyboardInterrupt:  # Ctrl-C: everything was undone on the way out; no traceback
        code = 130
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if code == 130 or received:
        # (a Ctrl-C raised inside a finalizer is reported and swallowed by Python, and the demo ran on:
        # it was still asked to stop)
        print("\nsqlcache demo: interrupted", file=sys.stderr)
        return 130
    return code


def _with_redis(args: argparse.Namespace, explicit: bool) -> int:
    shown, why = hide_password(args.redis_url), ""
    if args.private_redis:
        reason = "--private-redis"
    else:
        problem = problem_with(args.redis_url)
        if problem is None:
            return _demo(args, args.redis_url)
        why, silent = problem
        if explicit or not silent:
            hint = (
                "Start Redis, fix the URL, or pass --private-redis"
                if explicit
                else "Pass --redis-url (or set SQLCACHE_REDIS_URL), or --private-redis"
            )
            print(f"sqlcache demo: cannot reach Redis at {shown}: {why}. {hint}.", file=sys.stderr)
            return 2
        reason = f"nothing answers at {shown}"
    try:
        with private_redis() as server:
            # flushed: a user (or a test) watching for it learns the PID before the demo's first step
            print(
                f"sqlcache demo: {reason}; started a private redis-server (pid {server.pid}) on "
                f"127.0.0.1:{server.port} for this demo, stopped when it ends",
                flush=True,
            )
            code = _demo(args, server.url)
        print(f"sqlcache demo: stopped the private redis-server (pid {server.pid})")
        return code
    except PrivateRedisError as exc:
        if args.private_redis:
            print(f"sqlcache demo: cannot start a private redis-server: {exc}.", file=sys.stderr)
        else:
            print(
                f"sqlcache demo: cannot reach Redis at {shown}: {why}; and cannot start a private "
                f"redis-server: {exc}. Start Redis or pass --redis-url.",
                file=sys.stderr,
            )
        return 2


def _demo(args: argparse.Namespace, redis_url: str) -> int:
    tmpdir = None
    url = args.database_url
    if url is None:
        tmpdir = tempfile.mkdtemp(prefix="sqlcache-demo-")
        url = f"sqlite:///{os.path.join(tmpdir, 'shop.db')}"
    try:
        engine = create_engine(url)
        plain_engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            for e in (engine, plain_engine):
                event.listen(e, "connect", _sqlite_wal)
        _Base.metadata.drop_all(engine)
        _Base.metadata.create_all(engine)
    except (SQLAlchemyError, ImportError) as exc:
        print(hide_password(f"sqlcache demo: cannot use the database {url}: {exc}"), file=sys.stderr)
        return 2
    cache = SQLCache(redis_url, prefix=f"sqlcache-demo-{uuid.uuid4().hex[:8]}", default_ttl=600)
    try:
        return _run(args, engine, plain_engine, cache, _Out(args.plain))
    finally:
        cache.clear()
        cache.detach(engine)
        _Base.metadata.drop_all(engine)
        engine.dispose()
        plain_engine.dispose()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    # WAL: the paused reader of the stale-fill step must not block the writer's commit
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _run(args: argparse.Namespace, engine: Engine, plain: Engine, cache: SQLCache, out: _Out) -> int:
    rows = max(10, args.rows)
    cache.attach(engine)
    cache.register(Customer)
    cache.register(Product, mode="repopulate")
    sql = _SQLCounter()
    event.listen(engine, "before_cursor_execute", sql)

    out.title(
        f"1. A shop of {rows} customers and products "
        f"({engine.dialect.name}, Redis prefix {cache.config.prefix})"
    )
    _seed(engine, rows)
    out.line(f"seeded {rows} customers, {rows} products, {2 * rows} orders")

    for n, label in (
        (2, "first pass: every customer is a miss, then a guarded fill"),
        (3, "second pass: every customer is a hit, no SQL"),
    ):
        out.title(f"{n}. session.get over all customers, {label}")
        with out.progress("customers", rows, cache, sql) as step:
            for i in range(1, rows + 1):
                with Session(engine) as s:
                    s.get(Customer, i)
                step()

    out.title("4. Lazy loads: order.customer comes from Redis")
    before, sql0 = cache.stats()["hits"], sql.n
    with Session(engine) as s:
        orders = s.query(Order).limit(20).all()
        for o in orders:
            _ = o.customer.name
    out.line(
        f"{len(orders)} orders loaded with 1 query; their customers: {cache.stats()['hits'] - before} hits, "
        f"{sql.n - sql0 - 1} further SQL statements"
    )

    out.title("5. A commit invalidates, and the signal fires")
    _commit_and_signal(engine, cache, out)

    out.title("6. mode='repopulate': a commit that rewrote a whole row stores its new state")
    _repopulate(engine, cache, sql, out)

    out.title("7. A stale fill is refused (reader paused between its SELECT and its fill)")
    out.line(_stale_fill(engine, cache))

    out.title("8. Speed-up: cached get vs database get, interleaved")
    out.line(_speedup(engine, plain, rows))

    out.title("9. asyncio: the same cache through an AsyncEngine and AsyncSession")
    for line in async_step(engine, cache, Customer, 3):
        out.line(line)

    out.title("10. stats()")
    stats = cache.stats()
    out.line("  ".join(f"{k}={v}" for k, v in stats.items() if v))
    event.remove(engine, "before_cursor_execute", sql)
    return 0


def _seed(engine: Engine, rows: int) -> None:
    rnd = random.Random(1)
    with Session(engine) as s:
        now = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
        s.add_all(
            Customer(
                id=i,
                name=f"customer {i}",
                email=f"c{i}@shop.test",
                created_at=now,
                balance=decimal.Decimal(i),
            )
            for i in range(1, rows + 1)
        )
        s.add_all(
            Product(id=i, name=f"product {i}", price_cents=25 * i, stock=10) for i in range(1, rows + 1)
        )
        s.flush()
        s.add_all(
            Order(id=i, customer_id=rnd.randint(1, rows), product_id=rnd.randint(1, rows), qty=1)
            for i in range(1, 2 * rows + 1)
        )
        s.commit()


def _commit_and_signal(engine: Engine, cache: SQLCache, out: _Out) -> None:
    received: list[str] = []

    def on_invalidated(sender: SQLCache, identities: list[Any], tags: list[str], remote: bool) -> None:
        names = ", ".join(f"{cls.__name__}{pk}" for cls, pk in identities)
        received.append(f"invalidated: identities [{names}] tags {tags} remote={remote}")

    signals.invalidated.connect(on_invalidated, sender=cache)
    with Session(engine) as s:
        c = s.get(Customer, 1)
        assert c is not None
        c.name = "renamed customer"
        s.commit()
    for r in received:
        out.line(r)
    misses0 = cache.stats()["misses"]
    with Session(engine) as s:
        c = s.get(Customer, 1)
        assert c is not None
        out.line(f"next read: {c.name!r} ({cache.stats()['misses'] - misses0} miss, then filled again)")
    signals.invalidated.disconnect(on_invalidated)


def _repopulate(engine: Engine, cache: SQLCache, sql: _SQLCounter, out: _Out) -> None:
    with Session(engine) as s:
        p = s.get(Product, 1)
        assert p is not None
        p.name, p.price_cents, p.stock = f"{p.name} (sale)", p.price_cents - 5, p.stock - 3  # the whole row
        s.commit()
    sql0, hits0 = sql.n, cache.stats()["hits"]
    with Session(engine) as s:
        p = s.get(Product, 1)
        assert p is not None
        out.line(
            f"{p.name}: stock {p.stock}, {cache.stats()['hits'] - hits0} hit, {sql.n - sql0} SQL statements "
            f"(repopulated entries so far: {cache.stats()['repopulated']}); a commit that left a column "
            "alone invalidates instead (the session's value of it may be older than the row)"
        )


def _stale_fill(engine: Engine, cache: SQLCache) -> str:
    paused, resume = threading.Event(), threading.Event()
    reader_thread: list[threading.Thread] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if reader_thread and threading.current_thread() is reader_thread[0] and "demo_customers" in statement:
            paused.set()
            resume.wait(20)

    event.listen(engine, "after_cursor_execute", after)
    got: list[str] = []

    def reader() -> None:
        with Session(engine) as s:
            c = s.get(Customer, 2)
            got.append(c.name if c else "?")

    cache.invalidate(Customer, 2)  # make the reader miss
    refused0 = cache.stats()["fills_refused"]
    t = threading.Thread(target=reader)
    reader_thread.append(t)
    t.start()
    paused.wait(20)
    with Session(engine) as s:  # the writer commits while the reader holds the old row
        c = s.get(Customer, 2)
        assert c is not None
        c.name = "customer 2, v2"
        s.commit()
    resume.set()
    t.join(20)
    event.remove(engine, "after_cursor_execute", after)
    with Session(engine) as s:
        fresh = s.get(Customer, 2)
        assert fresh is not None
        now = fresh.name
    refused = cache.stats()["fills_refused"] - refused0
    return (
        f"reader loaded {got[0]!r}; writer committed 'customer 2, v2' meanwhile; "
        f"fills refused as stale: {refused}; a fresh read returns {now!r}"
    )


def _speedup(engine: Engine, plain: Engine, rows: int) -> str:
    ids = list(range(1, rows + 1))
    for i in ids:
        with Session(engine) as s:
            s.get(Customer, i)
    cached_t: list[int] = []
    db_t: list[int] = []
    rnd = random.Random(2)
    for _ in range(5):
        for eng, bucket in rnd.sample([(engine, cached_t), (plain, db_t)], 2):
            for _ in range(60):
                i = rnd.choice(ids)
                t0 = time.perf_counter_ns()
                with Session(eng) as s:
                    s.get(Customer, i)
                bucket.append(time.perf_counter_ns() - t0)
    c, d = statistics.median(cached_t) / 1000, statistics.median(db_t) / 1000
    text = f"cached get: {c:.0f} µs vs database get: {d:.0f} µs (medians of {len(db_t)} each) → "
    if d >= c:
        return text + f"{d / c:.1f}x faster"
    return text + (
        f"{c / d:.1f}x slower: this database answers in-process faster than a Redis round trip; "
        "a networked database (--database-url postgresql+psycopg://...) is where the cache pays"
    )
