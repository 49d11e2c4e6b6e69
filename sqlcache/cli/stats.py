"""``sqlcache stats``: the counters that running processes publish (``SQLCache(publish_stats=...)``),
one table per process, refreshed until Ctrl-C (``--once``: printed once)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlcache import _keys
from sqlcache._publish import Published, parse_stats

from .ops import Target, guarded

__all__ = ["Snapshot", "collect", "run_stats"]

# At most this many published keys are read in one refresh (a prefix flooded with keys, by mistake or
# on purpose, costs a bounded number of reads; SCAN itself walks the whole database, as it always
# does); the rest are counted as not shown.
MAX_PROCESSES = 1000
_BATCH = 200
_ALWAYS = ("hits", "misses", "errors")  # shown even when zero


@dataclass
class Snapshot:
    """One refresh: the valid publications by key, what was rejected, what was left unread."""

    processes: dict[bytes, Published]
    rejected: int = 0
    unread: int = 0


def collect(target: Target) -> Snapshot:
    """SCAN the prefix's published keys (never KEYS), MGET them in batches, keep what validates."""
    out = Snapshot({})
    batch: list[bytes] = []
    seen = 0
    for key in target.client.scan_iter(match=_keys.stats_pattern(target.key_prefix), count=_BATCH):
        seen += 1
        if seen > MAX_PROCESSES:
            out.unread += 1
            continue
        batch.append(key)
        if len(batch) >= _BATCH:
            _read(target, batch, out)
            batch = []
    if batch:
        _read(target, batch, out)
    return out


def _read(target: Target, keys: list[bytes], out: Snapshot) -> None:
    for key, raw in zip(keys, target.client.mget(keys), strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET (or not a string: MGET answers nil for those)
        published = parse_stats(raw)
        if published is None:
            out.rejected += 1
        else:
            out.processes[key] = published


def _rows(p: Published, show_all: bool, rates: dict[str, float] | None) -> Iterator[tuple[str, str, str]]:
    """(counter, value, rate) rows of one process: the non-zero counters (every one with ``show_all``)
    and the hit ratio."""
    for name, value in p.stats.items():
        if value or show_all or name in _ALWAYS:
            rate = rates.get(name) if rates is not None else None
            yield name, str(value), "" if rate is None else f"{rate:.1f}/s"
        if name == "misses":
            reads = p.stats.get("hits", 0) + value
            if reads:
                yield "hit ratio", f"{100 * p.stats.get('hits', 0) / reads:.1f}%", ""


def _title(p: Published, now: float) -> str:
    age = max(0.0, now - p.time)
    return f"{p.host} pid {p.pid} (prefix {p.prefix!r}, published {age:.1f} s ago, every {p.interval:g} s)"


def _rates(before: Snapshot | None, after: Snapshot) -> dict[bytes, dict[str, float]]:
    """Per process, each counter's growth per second between two publications of it."""
    out: dict[bytes, dict[str, float]] = {}
    if before is None:
        return out
    for key, p in after.processes.items():
        old = before.processes.get(key)
        if old is None or p.time <= old.time:
            continue
        dt = p.time - old.time
        out[key] = {n: (v - old.stats.get(n, 0)) / dt for n, v in p.stats.items() if v >= old.stats.get(n, 0)}
    return out


def _footer(snap: Snapshot, target: Target, prefix: str) -> list[str]:
    lines = []
    if not snap.processes:
        lines.append(
            f"no process publishes stats under prefix {prefix!r} on {target.url} "
            "(SQLCache(..., publish_stats=5) publishes every 5 s)"
        )
    if snap.rejected:
        lines.append(f"ignored {snap.rejected} value(s) under the prefix that are not sqlcache publications")
    if snap.unread:
        lines.append(f"{snap.unread} more published key(s) not read (at most {MAX_PROCESSES} per refresh)")
    return lines


def plain(snap: Snapshot, target: Target, args: argparse.Namespace, before: Snapshot | None) -> str:
    """The snapshot as plain text."""
    now = time.time()
    rates = _rates(before, snap)
    out = [f"sqlcache stats: prefix {args.prefix!r} on {target.url}: {len(snap.processes)} process(es)"]
    for key, p in sorted(snap.processes.items(), key=lambda kv: (kv[1].host, kv[1].pid, kv[0])):
        out.append(_title(p, now))
        for name, value, rate in _rows(p, args.all, rates.get(key) if before is not None else None):
            out.append(f"  {name:<24}{value:>16}  {rate}".rstrip())
    out.extend(_footer(snap, target, args.prefix))
    return "\n".join(out)


def _rich(snap: Snapshot, target: Target, args: argparse.Namespace, before: Snapshot | None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    rates = _rates(before, snap)
    parts: list[Any] = [Text(f"prefix {args.prefix!r} on {target.url}: {len(snap.processes)} process(es)")]
    for key, p in sorted(snap.processes.items(), key=lambda kv: (kv[1].host, kv[1].pid, kv[0])):
        table = Table(title=Text(_title(p, now)), title_justify="left")
        table.add_column("counter")
        table.add_column("value", justify="right")
        if before is not None:  # a rate needs two refreshes
            table.add_column("rate", justify="right")
        for name, value, rate in _rows(p, args.all, rates.get(key) if before is not None else None):
            table.add_row(name, value, rate) if before is not None else table.add_row(name, value)
        parts.append(table)
    parts.extend(Text(line) for line in _footer(snap, target, args.prefix))
    return Group(*parts)


def _use_rich(args: argparse.Namespace) -> bool:
    if args.plain or not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def run_stats(args: argparse.Namespace) -> int:
    """Print the published counters once (``--once``) or every ``--interval`` seconds until Ctrl-C."""

    def body(target: Target) -> int:
        before: Snapshot | None = None
        if _use_rich(args):
            from rich.console import Console
            from rich.live import Live

            snap = collect(target)
            if args.once:
                Console().print(_rich(snap, target, args, None))
                return 0
            with Live(_rich(snap, target, args, None), auto_refresh=False) as live:
                while True:
                    time.sleep(args.interval)  # the refresh period, not a synchronisation
                    before, snap = snap, collect(target)
                    live.update(_rich(snap, target, args, before), refresh=True)
        while True:
            snap = collect(target)
            print(plain(snap, target, args, before), flush=True)
            if args.once:
                return 0
            before = snap
            time.sleep(args.interval)
            print()

    try:
        return guarded("stats", args, body)
    except KeyboardInterrupt:
        return 0
