"""Command line: ``python -m sqlcache demo`` and ``python -m sqlcache bench`` (also ``sqlcache ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sqlcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="watch misses turn into hits, commits invalidate, stale fills refused")
    demo.add_argument(
        "--database-url", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)"
    )
    demo.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    demo.add_argument("--rows", type=int, default=200, help="users in the demo shop")
    demo.add_argument("--plain", action="store_true", help="plain text output, no live table")
    bench = sub.add_parser("bench", help="compare uncached reads, sqlcache hits and the floor, side by side")
    bench.add_argument("--database-url", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    bench.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    bench.add_argument("--rounds", type=int, default=30, help="rounds; each runs every system once")
    bench.add_argument("--batch", type=int, default=50, help="operations per system per round")
    bench.add_argument("--quick", action="store_true", help="a few rounds, to check that it runs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return int(run_demo(args))
    from ._bench import run_bench

    return int(run_bench(args))


if __name__ == "__main__":
    sys.exit(main())
