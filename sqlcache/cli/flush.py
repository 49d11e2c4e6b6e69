"""``sqlcache flush``: delete one prefix's keys (SCAN MATCH on the escaped prefix, UNLINK per batch; never
KEYS or FLUSHDB), or ``--fence`` it: every entry becomes a miss at once, without deleting anything."""

from __future__ import annotations

import argparse
import sys
import time

from sqlcache import _keys

from .ops import Target, guarded

__all__ = ["run_flush"]


def _confirm(question: str) -> bool:
    """Ask on stdout, read the answer from stdin; anything but y/yes (or end of input) is no."""
    print(f"{question} [y/N] ", end="", flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def run_flush(args: argparse.Namespace) -> int:
    """Flush or fence a prefix; exit 0 when done, 1 when not confirmed, 2 on a bad argument or an outage."""

    def body(target: Target) -> int:
        prefix = args.prefix
        if args.fence:
            question = (
                f"Fence prefix {prefix!r} on {target.url}? Every entry under it becomes a miss "
                "(nothing is deleted; entries expire by their TTL)."
            )
        else:
            question = (
                f"Delete every key of prefix {prefix!r} on {target.url}? Keys of other prefixes, even "
                f"ones that start with {prefix!r}, are not touched."
            )
        if not args.yes and not _confirm(question):
            print("sqlcache flush: not confirmed; nothing changed")
            return 1
        p = target.key_prefix
        if args.fence:
            # the journal's fence (a replay after lost invalidations): a fresh generation for the
            # dependency every entry has, by release.lua, so no entry filled before it matches again
            everything = list(target.layout.everything)  # one per shard of a sharded cache
            target.store.release(_keys.clock_key(p), everything, "", args.generation_ttl * 1000)
            moved = ", ".join(everything)
            print(f"sqlcache flush: fenced prefix {prefix!r} ({moved} moved): every entry is a miss")
            return 0
        started = last = time.monotonic()

        def progress(deleted: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - started > 1.0 and now - last >= 1.0:
                last = now
                print(f"sqlcache flush: {deleted} keys deleted so far...", file=sys.stderr, flush=True)

        deleted = 0

        def shard_progress(n: int) -> None:
            progress(deleted + n)

        for shard in target.layout.prefixes:  # each shard's keys on the node serving it
            deleted += target.store.delete_matching(_keys.scan_pattern(shard), args.batch, shard_progress)
        if args.layout:  # the claim running processes are checked against: theirs to make again
            for shard in target.layout.prefixes:
                target.store.delete(_keys.layout_key(shard))
            print(f"sqlcache flush: the layout claim of prefix {prefix!r} deleted")
        took = time.monotonic() - started
        print(f"sqlcache flush: deleted {deleted} keys of prefix {prefix!r} in {took:.1f} s")
        return 0

    return guarded("flush", args, body)
