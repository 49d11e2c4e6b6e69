"""``sqlcache relay`` and ``sqlcache outbox``: durable invalidation from the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.schema import CreateIndex, CreateTable

from sqlcache import SQLCache, outbox_table, signals
from sqlcache.errors import CacheUnavailable, ConfigurationError

__all__ = ["run_outbox", "run_relay"]

log = logging.getLogger("sqlcache")


def _engine(url: str, command: str) -> Engine | None:
    """The engine of ``url``; None (and a message with the password hidden) if the URL is not one."""
    try:
        return create_engine(url)
    except (ArgumentError, ValueError) as exc:
        try:
            shown = make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            shown = "(unreadable)"
        print(f"sqlcache {command}: invalid database URL {shown}: {type(exc).__name__}", file=sys.stderr)
        return None


def run_relay(args: argparse.Namespace) -> int:
    """Run a relay in the foreground until SIGINT/SIGTERM (or one pass with ``--once``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sqlcache relay: %(message)s")
    engine = _engine(args.database_url, "relay")
    if engine is None:
        return 2
    try:
        cache = SQLCache(
            args.redis_url,
            prefix=args.prefix,
            durable=True,
            outbox_table=args.table,
            relay_interval=args.interval,
            relay_grace=args.grace,
        )
        if args.once:
            relay = cache.relay(engine, start=False)
            try:
                applied = relay.run_once()
            except CacheUnavailable as exc:
                print(f"sqlcache relay: Redis unavailable: {exc}", file=sys.stderr)
                return 1
            print(f"sqlcache relay: applied {applied} outbox rows")
            return 0

        def on_error(_sender: Any, exc: Exception, operation: str) -> None:
            log.warning("%s failed: %s (retrying with back-off)", operation, exc)

        signals.cache_error.connect(on_error, sender=cache)
        relay = cache.relay(engine)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        log.info("relaying %s for prefix %r every %.1fs", args.table, args.prefix, args.interval)
        while not done.wait(1.0):
            if not relay.is_alive():
                return 1
        relay.stop()
        cache.close()
        return 0
    except ConfigurationError as exc:
        print(f"sqlcache relay: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def run_outbox(args: argparse.Namespace) -> int:
    """Print the outbox DDL for the database's dialect, or create the table with ``--create``."""
    from sqlalchemy import MetaData

    engine = _engine(args.database_url, "outbox")
    if engine is None:
        return 2
    try:
        table = outbox_table(MetaData(), args.table)
        if args.create:
            table.create(engine, checkfirst=True)
            print(f"sqlcache outbox: table {args.table} is present")
            return 0
        print(str(CreateTable(table).compile(dialect=engine.dialect)).strip() + ";")
        for index in table.indexes:
            print(str(CreateIndex(index).compile(dialect=engine.dialect)).strip() + ";")
        return 0
    finally:
        engine.dispose()
