"""Command line: ``python -m sqlcache demo | bench | relay | outbox`` (also ``sqlcache ...``).

URLs come from flags or from ``SQLCACHE_REDIS_URL`` / ``SQLCACHE_DATABASE_URL`` (so that passwords need
not appear on a command line, where any user of the machine can read them). The commands live in
``sqlcache.cli``, which ``import sqlcache`` does not load."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

_REDIS = "redis://127.0.0.1:6379/0"
_ENV_HELP = " (default: $SQLCACHE_{0}, else {1})"


def _redis_url() -> str:
    return os.environ.get("SQLCACHE_REDIS_URL") or _REDIS


def _database_url(fallback: str | None) -> str | None:
    return os.environ.get("SQLCACHE_DATABASE_URL") or fallback


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sqlcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="watch misses turn into hits, commits invalidate, stale fills refused")
    demo.add_argument(
        "--database-url",
        default=_database_url(None),
        help="SQLAlchemy URL" + _ENV_HELP.format("DATABASE_URL", "a temporary SQLite file"),
    )
    demo.add_argument("--redis-url", default=_redis_url(), help=_ENV_HELP.format("REDIS_URL", _REDIS))
    demo.add_argument(
        "--rows", type=int, default=200, help="customers and products in the demo shop (at least 10)"
    )
    demo.add_argument("--plain", action="store_true", help="plain text output, no live table")
    bench = sub.add_parser("bench", help="compare uncached reads, sqlcache hits and the floor, side by side")
    pg = "postgresql+psycopg://root@127.0.0.1:5432/test"
    bench.add_argument("--database-url", default=_database_url(pg), help=_ENV_HELP.format("DATABASE_URL", pg))
    bench.add_argument("--redis-url", default=_redis_url(), help=_ENV_HELP.format("REDIS_URL", _REDIS))
    bench.add_argument("--rounds", type=int, default=30, help="rounds; each runs every system once")
    bench.add_argument("--batch", type=int, default=50, help="operations per system per round")
    bench.add_argument("--quick", action="store_true", help="a few rounds, to check that it runs")
    bench.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures as a chart, and write FILE.json"
    )
    relay = sub.add_parser(
        "relay", help="apply and delete outbox rows that crashed or cut-off writers left (durable=True)"
    )
    relay.add_argument(
        "--database-url",
        default=_database_url(None),
        help="SQLAlchemy URL of the database" + _ENV_HELP.format("DATABASE_URL", "required"),
    )
    relay.add_argument("--redis-url", default=_redis_url(), help=_ENV_HELP.format("REDIS_URL", _REDIS))
    relay.add_argument("--prefix", default="sqlcache", help="the writers' cache prefix")
    relay.add_argument("--table", default="sqlcache_outbox", help="the outbox table")
    relay.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    relay.add_argument(
        "--grace", type=float, default=10.0, help="age in seconds at which a row is applied (default 10)"
    )
    relay.add_argument("--once", action="store_true", help="one pass, then exit (for cron jobs and scripts)")
    outbox = sub.add_parser("outbox", help="print the outbox table's DDL for a database, or create it")
    outbox.add_argument(
        "--database-url",
        default=_database_url(None),
        help="SQLAlchemy URL of the database" + _ENV_HELP.format("DATABASE_URL", "required"),
    )
    outbox.add_argument("--table", default="sqlcache_outbox", help="the outbox table")
    outbox.add_argument("--create", action="store_true", help="create the table (if missing) instead")
    args = parser.parse_args(argv)
    if args.command in ("relay", "outbox") and not args.database_url:
        parser.error(f"{args.command}: --database-url or SQLCACHE_DATABASE_URL is required")
    if args.command in ("relay", "outbox"):
        from .relay import run_outbox, run_relay

        return run_relay(args) if args.command == "relay" else run_outbox(args)
    if args.command == "demo":
        from .demo import run_demo

        return int(run_demo(args))
    from .bench import run_bench

    return int(run_bench(args))
