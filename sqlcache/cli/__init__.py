"""Command line: ``python -m sqlcache demo | bench | relay | outbox`` (also ``sqlcache ...``).

URLs come from flags or from ``SQLCACHE_REDIS_URL`` / ``SQLCACHE_DATABASE_URL`` (so that passwords need
not appear on a command line, where any user of the machine can read them). The commands live in
``sqlcache.cli``, which ``import sqlcache`` does not load."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

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
    demo.add_argument(
        "--redis-url",
        help=_ENV_HELP.format("REDIS_URL", _REDIS)[:-1] + "; if neither is set and nothing answers there, "
        "a private redis-server)",
    )
    demo.add_argument(
        "--private-redis",
        action="store_true",
        help="run against a redis-server of the demo's own on a free port, stopped when the demo ends",
    )
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

        if args.private_redis and args.redis_url:
            parser.error("demo: --redis-url and --private-redis exclude each other")
        explicit = bool(args.redis_url or os.environ.get("SQLCACHE_REDIS_URL"))
        args.redis_url = args.redis_url or _redis_url()
        return int(run_demo(args, explicit))
    from .bench import run_bench

    return int(run_bench(args))
