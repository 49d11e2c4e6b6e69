"""Command line: ``python -m sqlcache demo | bench | relay | outbox | stats | inspect | flush`` (also
``sqlcache ...``).

URLs come from flags or from ``SQLCACHE_REDIS_URL`` / ``SQLCACHE_DATABASE_URL`` (so that passwords need
not appear on a command line, where any user of the machine can read them). The commands live in
``sqlcache.cli``, which ``import sqlcache`` does not load."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REDIS = "redis://127.0.0.1:6379/0"
_ENV_HELP = " (default: $SQLCACHE_{0}, else {1})"


def _redis_url() -> str:
    return os.environ.get("SQLCACHE_REDIS_URL") or _REDIS


def _database_url(fallback: str | None) -> str | None:
    return os.environ.get("SQLCACHE_DATABASE_URL") or fallback


def _operator_commands(sub: Any) -> None:
    """``stats``, ``inspect`` and ``flush``: a prefix's keys on a running Redis (docs/pages/cli.md)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=_redis_url(),
        help="redis://, rediss://, unix:// or redis+cluster:// URL" + _ENV_HELP.format("REDIS_URL", _REDIS),
    )
    common.add_argument("--prefix", default="sqlcache", help="the cache's prefix (default: sqlcache)")
    common.add_argument(
        "--timeout", type=float, default=5.0, help="seconds a Redis command may take (default 5)"
    )
    stats = sub.add_parser(
        "stats", parents=[common], help="live counters of the processes that publish them (publish_stats=)"
    )
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    stats.add_argument("--once", action="store_true", help="print once and exit")
    stats.add_argument("--all", action="store_true", help="every counter, zeros included")
    stats.add_argument("--plain", action="store_true", help="plain text, even on a terminal with rich")
    inspect = sub.add_parser(
        "inspect", parents=[common], help="one entry: payload, seal, dependencies, locks, TTLs, served or not"
    )
    which = inspect.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="module:Class of a mapped class (with --pk): its identity entry")
    which.add_argument("--key", help="a raw entry key (its dependencies with --dep)")
    inspect.add_argument(
        "--pk", action="append", default=[], help="a primary key value (repeat for each column)"
    )
    inspect.add_argument("--dep", action="append", default=[], help="a dependency key of --key (repeatable)")
    inspect.add_argument(
        "--secret",
        default=os.environ.get("SQLCACHE_SECRET"),
        help="the cache's secret, to check the seal (default: $SQLCACHE_SECRET; never printed)",
    )
    inspect.add_argument(
        "--max-entry-bytes", type=int, default=8 * 1024 * 1024, help="the cache's max_entry_bytes"
    )
    flush = sub.add_parser(
        "flush", parents=[common], help="delete one prefix's keys (SCAN + UNLINK), or --fence it"
    )
    flush.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    flush.add_argument("--fence", action="store_true", help="make every entry a miss without deleting keys")
    flush.add_argument("--batch", type=int, default=500, help="keys per SCAN and UNLINK (default 500)")
    flush.add_argument(
        "--layout",
        action="store_true",
        help="also delete the prefix's layout claim (its number of shards): only with every process "
        "using the prefix stopped",
    )
    flush.add_argument(
        "--generation-ttl",
        type=int,
        default=7 * 24 * 3600,
        help="with --fence: the cache's generation_ttl in seconds (default 7 days)",
    )


def _check_operator_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.timeout <= 600:
        parser.error(f"--timeout must be seconds in (0, 600], got {args.timeout}")
    if args.command == "stats" and not 0.1 <= args.interval <= 3600:
        parser.error(f"--interval must be seconds in [0.1, 3600], got {args.interval}")
    if args.command == "inspect" and args.model is not None and not args.pk:
        parser.error("inspect: --model needs --pk")
    if args.command == "inspect" and args.key is not None and args.pk:
        parser.error("inspect: --pk goes with --model, not --key")
    if args.command == "flush" and not 1 <= args.batch <= 100_000:
        parser.error(f"--batch must be in [1, 100000], got {args.batch}")
    if args.command == "flush" and not 1 <= args.generation_ttl <= 10 * 365 * 86400:
        parser.error(f"--generation-ttl must be seconds in [1, ten years], got {args.generation_ttl}")


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
    bench.add_argument(
        "--cluster-url",
        default=None,
        help="redis+cluster:// URL for the cluster rows (or SQLCACHE_CLUSTER_URL); without one, a private "
        "cluster of three primaries is started when redis-server and redis-cli are installed",
    )
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
    _operator_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("stats", "inspect", "flush"):
        _check_operator_args(parser, args)
        if args.command == "stats":
            from .stats import run_stats

            return run_stats(args)
        if args.command == "inspect":
            from .inspect_entry import run_inspect

            return run_inspect(args)
        from .flush import run_flush

        return run_flush(args)
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
