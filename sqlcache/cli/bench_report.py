"""The benchmark's report: medians and p95 per system, and the ratios against their targets."""

from __future__ import annotations

import statistics

__all__ = ["RATIOS", "pct", "report", "round_spread"]

#: (label, system, base, target: the ratio system/base must not exceed, or None)
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("get hit / floor", "get sqlcache hit", "floor", 1.5),
    ("lazy hit / floor", "lazy sqlcache hit", "floor", 1.5),
    ("direct get hit / floor", "direct get hit", "floor", 1.2),
    ("direct get hit, open session / floor", "direct get hit, open session", "floor", None),
    ("floor, lean GET / floor", "floor, lean GET", "floor", None),
    ("direct get hit / floor, lean GET", "direct get hit", "floor, lean GET", None),
    (
        "direct get hit, open session / floor, lean GET",
        "direct get hit, open session",
        "floor, lean GET",
        None,
    ),
    ("get hit / floor, lean GET", "get sqlcache hit", "floor, lean GET", None),
    ("direct get hit / get hit", "direct get hit", "get sqlcache hit", None),
    ("get_many 50 / 50 get hits", "get_many 50 hit", "50 get hits", 0.3),
    ("get hit / get plain", "get sqlcache hit", "get plain", None),
    ("lazy hit / lazy plain", "lazy sqlcache hit", "lazy plain", None),
    ("update sqlcache / update plain", "update sqlcache", "update plain", 1.15),
    ("q20 hit / q20 floor", "q20 sqlcache hit", "q20 floor", 1.5),
    ("q200 hit / q200 floor", "q200 sqlcache hit", "q200 floor", 1.5),
    ("q20 hit / q20 plain", "q20 sqlcache hit", "q20 plain", None),
    ("q200 hit / q200 plain", "q200 sqlcache hit", "q200 plain", 0.5),
    ("get hit / get ORM floor", "get sqlcache hit", "get ORM floor", 1.1),
    ("lazy hit / lazy ORM floor", "lazy sqlcache hit", "lazy ORM floor", 1.1),
    ("q20 hit / q20 ORM floor", "q20 sqlcache hit", "q20 ORM floor", 1.1),
    ("q200 hit / q200 ORM floor", "q200 sqlcache hit", "q200 ORM floor", 1.1),
    ("q20 no-reuse hit / q20 floor", "q20 hit, no reuse", "q20 floor", None),
    ("q200 no-reuse hit / q200 floor", "q200 hit, no reuse", "q200 floor", None),
    ("q200 no-reuse hit / q200 plain", "q200 hit, no reuse", "q200 plain", None),
    ("get local hit / floor", "get local hit", "floor", 0.6),
    ("get local hit / get plain", "get local hit", "get plain", 0.15),
    ("get local hit / get hit", "get local hit", "get sqlcache hit", None),
    ("get ORM floor, memory / floor", "get ORM floor, memory", "floor", None),
    ("get local hit / get ORM floor, memory", "get local hit", "get ORM floor, memory", None),
    ("direct local get hit / floor", "direct local get hit", "floor", 0.6),
    ("direct local get hit / get plain", "direct local get hit", "get plain", 0.15),
    ("async get local hit / async get hit", "async get local hit", "async get hit", None),
    ("async get local hit / async get plain", "async get local hit", "async get plain", None),
    ("lazy local hit / floor", "lazy local hit", "floor", None),
    ("q20 local hit / q20 floor", "q20 local hit", "q20 floor", None),
    ("q200 local hit / q200 floor", "q200 local hit", "q200 floor", 0.8),
    ("q200 ORM floor, memory / q200 floor", "q200 ORM floor, memory", "q200 floor", None),
    ("q200 local hit / q200 ORM floor, memory", "q200 local hit", "q200 ORM floor, memory", None),
    ("async get hit / async get plain", "async get hit", "async get plain", 0.5),
    ("async get hit / get hit", "async get hit", "get sqlcache hit", None),
    ("async get plain / get plain", "async get plain", "get plain", None),
    ("async update sqlcache / async update plain", "async update sqlcache", "async update plain", None),
    ("async update sqlcache / update sqlcache", "async update sqlcache", "update sqlcache", None),
    ("cluster get hit / get hit", "cluster get hit", "get sqlcache hit", None),
    ("cluster q20 hit / q20 hit", "cluster q20 hit", "q20 sqlcache hit", None),
    ("cluster update / update", "cluster update", "update sqlcache", None),
    ("cluster update / update plain", "cluster update", "update plain", None),
    ("sharded get hit / cluster get hit", "sharded get hit", "cluster get hit", None),
    ("sharded q20 hit / cluster q20 hit", "sharded q20 hit", "cluster q20 hit", None),
    ("sharded update / cluster update", "sharded update", "cluster update", None),
)


def report(samples: dict[str, list[int]], rounds: int = 1) -> None:
    """Medians and p95 per system, then the ratios against their targets, each with the spread of its
    per-round ratios (``samples`` hold ``rounds`` equal batches per system, in round order: both
    systems of a round ran within seconds of each other, so a round's ratio is a paired measure)."""
    print(f"{'system':<24} {'n':>6} {'median µs':>10} {'p95 µs':>10}")
    med = {}
    for name, xs in samples.items():
        med[name] = statistics.median(xs) / 1000
        print(f"{name:<24} {len(xs):>6} {med[name]:>10.1f} {pct(xs, 0.95):>10.1f}")
    print()
    if rounds > 1:
        print(f"{'ratio of medians':<40} {'':>7}  (middle half of the {rounds} rounds' ratios)")
    for label, system, base, target in RATIOS:
        if system not in med or base not in med:
            continue  # rows this run has not got (no asyncio driver, no cluster)
        ratio = med[system] / med[base]
        spread = round_spread(samples[system], samples[base], rounds)
        between = "" if spread is None else f"  ({spread[0]:.2f}-{spread[1]:.2f})"
        verdict = "" if target is None else f"  target <= {target}: {'PASS' if ratio <= target else 'MISS'}"
        print(f"{label:<40} {ratio:6.2f}x{between}{verdict}")


def round_spread(system: list[int], base: list[int], rounds: int) -> tuple[float, float] | None:
    """The first and third quartiles of the per-round ratios of ``system`` to ``base`` (medians of each
    round's batch); None for fewer than four rounds, or batches that do not split into ``rounds``."""
    if rounds < 4 or len(system) % rounds or len(base) % rounds or not system or not base:
        return None
    n, m = len(system) // rounds, len(base) // rounds
    ratios = [
        statistics.median(system[r * n : (r + 1) * n]) / statistics.median(base[r * m : (r + 1) * m])
        for r in range(rounds)
    ]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000
