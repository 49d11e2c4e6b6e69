"""``python -m sqlcache bench --plot FILE.png``: the benchmark's figures as one chart, and as JSON beside it.

The JSON (``FILE.json``) holds every sample the run measured, the medians and p95 the chart draws and
the ratios against their targets, and no URL (a password must not land in a file that gets shared).
The chart is drawn from the JSON alone, so ``python -m sqlcache.cli.bench_plot FILE.json [OUT.png]``
draws it again. matplotlib (the ``plot`` extra) is drawn through its Agg canvas, without pyplot: no
window, no global backend switched in the caller's process.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "figures", "json_path", "matplotlib_missing", "render", "write"]

FORMAT = 1  # of the JSON; bumped when a field changes meaning

# one panel per operation group: (group, what it times, ((series, system), ...))
_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "get",
        "Session.get of one row",
        (
            ("plain", "get plain"),
            ("sqlcache", "get sqlcache hit"),
            ("direct", "direct get hit"),
            ("direct, open session", "direct get hit, open session"),
            ("cluster", "cluster get hit"),
            ("floor", "floor"),
            ("floor, lean GET", "floor, lean GET"),
            ("ORM floor", "get ORM floor"),
        ),
    ),
    (
        "get 50",
        "50 rows by primary key, one Session",
        (("sqlcache", "50 get hits"), ("direct", "get_many 50 hit")),
    ),
    (
        "lazy",
        "many-to-one lazy load",
        (("plain", "lazy plain"), ("sqlcache", "lazy sqlcache hit"), ("floor", "floor")),
    ),
    (
        "q20",
        "cached() query, 20 rows",
        (
            ("plain", "q20 plain"),
            ("sqlcache", "q20 sqlcache hit"),
            ("cluster", "cluster q20 hit"),
            ("no reuse", "q20 hit, no reuse"),
            ("floor", "q20 floor"),
            ("ORM floor", "q20 ORM floor"),
        ),
    ),
    (
        "q200",
        "cached() query, 200 rows",
        (
            ("plain", "q200 plain"),
            ("sqlcache", "q200 sqlcache hit"),
            ("no reuse", "q200 hit, no reuse"),
            ("floor", "q200 floor"),
            ("ORM floor", "q200 ORM floor"),
        ),
    ),
    (
        "update",
        "update of one row + commit",
        (("plain", "update plain"), ("sqlcache", "update sqlcache"), ("cluster", "cluster update")),
    ),
    (
        "async get",
        "AsyncSession.get of one row",
        (("plain", "async get plain"), ("sqlcache", "async get hit")),
    ),
    (
        "async update",
        "AsyncSession: update of one row + commit",
        (("plain", "async update plain"), ("sqlcache", "async update sqlcache")),
    ),
)

_SERIES: dict[str, tuple[str, str]] = {  # series: (legend, colour)
    "plain": ("database, no cache", "#7f8c9a"),
    "sqlcache": ("sqlcache (a hit; for update, the cached commit)", "#e8730c"),
    "direct": ("sqlcache, direct: cache.get / cache.get_many", "#c0392b"),
    "direct, open session": ("sqlcache, direct, in a Session already open", "#e74c3c"),
    "cluster": ("sqlcache on a Redis Cluster (three primaries)", "#8e44ad"),
    "no reuse": ("sqlcache hit, decoded every time (decoded_cache_bytes=0)", "#f5b971"),
    "floor": ("floor: one GET + msgpack decode + the objects", "#2e8b57"),
    "floor, lean GET": ("the floor, its GET sent as sqlcache's store sends its MGET", "#52be80"),
    "ORM floor": ("ORM floor: the floor handed out through a Session", "#1b4d3e"),
}


def json_path(png: Path) -> Path:
    """Where the figures of a chart go: beside it, same name, ``.json``."""
    return png.with_suffix(".json")


def matplotlib_missing() -> str | None:
    """Why a chart cannot be drawn here (matplotlib not installed), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'sqlcache[plot]'"
    return None


def figures(
    samples: Mapping[str, Sequence[int]],
    ratios: Sequence[tuple[str, str, str, float | None]],
    run: Mapping[str, object],
) -> dict[str, Any]:
    """The JSON document of one run: ``run`` (database, rounds, ...), each system's samples (ns), median
    and p95 (µs), and each ratio of ``ratios`` (label, system, base, target) both systems of which ran."""
    systems: dict[str, dict[str, Any]] = {}
    for name, xs in samples.items():
        if not xs:
            continue
        ordered = sorted(xs)
        systems[name] = {
            "n": len(ordered),
            "median_us": round(statistics.median(ordered) / 1000, 3),
            "p95_us": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] / 1000, 3),
            "samples_ns": list(xs),
        }
    out = []
    for label, system, base, target in ratios:
        if system in systems and base in systems:
            value = systems[system]["median_us"] / systems[base]["median_us"]
            out.append(
                {
                    "label": label,
                    "system": system,
                    "base": base,
                    "value": round(value, 4),
                    "target": target,
                    "met": None if target is None else value <= target,
                }
            )
    return {"format": FORMAT, "run": dict(run), "systems": systems, "ratios": out}


def write(png: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` (from :func:`figures`) as ``png``'s JSON, then the chart as ``png``; the JSON's path."""
    target = json_path(png)
    target.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    render(doc, png)
    return target


def _checked(doc: Any) -> dict[str, Any]:
    """``doc`` if it has the shape :func:`figures` gives (a file read back may not), else ValueError."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a sqlcache bench figures file of format {FORMAT}")
    systems, ratios, run = doc.get("systems"), doc.get("ratios"), doc.get("run")
    if not isinstance(systems, dict) or not isinstance(ratios, list) or not isinstance(run, dict):
        raise ValueError("figures file: 'systems', 'ratios' and 'run' are missing or of the wrong type")
    for name, s in systems.items():
        ok = isinstance(s, dict) and all(
            isinstance(s.get(k), (int, float)) and math.isfinite(s[k]) and s[k] >= 0
            for k in ("median_us", "p95_us")
        )
        if not ok:
            raise ValueError(f"figures file: system {name!r} has no finite median_us / p95_us")
    for r in ratios:
        if not (isinstance(r, dict) and isinstance(r.get("label"), str) and isinstance(r.get("system"), str)):
            raise ValueError(f"figures file: bad ratio {r!r}")
        if not isinstance(r.get("value"), (int, float)) or not isinstance(
            r.get("target"), (int, float, type(None))
        ):
            raise ValueError(f"figures file: bad ratio {r!r}")
    return doc


def _panels(systems: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The panels this run has rows for (no asyncio driver: no async panel), bars it has not dropped."""
    out = []
    for group, caption, bars in _PANELS:
        have = [(series, system) for series, system in bars if system in systems]
        if have:
            out.append((group, caption, have))
    return out


def _ratio_line(r: Mapping[str, Any]) -> str:
    line = f"{r['label']}: {r['value']:.2f}x"
    if r["target"] is not None:
        line += f"  (target <= {r['target']}: {'PASS' if r['value'] <= r['target'] else 'MISS'})"
    return line


def _title(run: Mapping[str, Any], ratios: Sequence[Mapping[str, Any]]) -> str:
    targeted = [r for r in ratios if r["target"] is not None]
    met = sum(1 for r in targeted if r["value"] <= r["target"])
    where = f"{run.get('database', '?')}, {run.get('rounds', '?')} rounds x {run.get('batch', '?')} ops"
    return (
        f"sqlcache bench ({where}, {run.get('rows', '?')} rows): median µs per operation"
        f" (labels: median, p95); targets met: {met} of {len(targeted)}"
    )


def render(doc: Mapping[str, Any], png: Path) -> None:
    """Draw the chart of ``doc`` into ``png``: a panel per operation group, a bar per system, each bar
    labelled with its median and p95 in µs, the group's ratios (and their targets) under its panel."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    data = _checked(dict(doc))
    systems: dict[str, Any] = data["systems"]
    panels = _panels(systems)
    if not panels:
        raise ValueError("no system of the chart's panels was measured")
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(15, 5.2 * rows + 1.2), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (group, caption, bars) in zip(axes, panels, strict=False):
        names = [series for series, _ in bars]
        medians = [systems[system]["median_us"] for _, system in bars]
        p95 = [systems[system]["p95_us"] for _, system in bars]
        drawn = ax.bar(range(len(bars)), medians, color=[_SERIES[s][1] for s in names])
        # p95 as text, not a whisker: on a busy machine the tail is many medians long and would set the scale
        labels = [f"{m:,.0f}\np95 {p:,.0f}" for m, p in zip(medians, p95, strict=True)]
        ax.bar_label(drawn, labels=labels, padding=2, fontsize=8, linespacing=1.1)
        ax.set_ylim(0, max(medians) * 1.25 or 1.0)
        ax.set_xticks(range(len(bars)), names, fontsize=8)
        ax.set_ylabel("µs per operation")
        ax.set_title(f"{group}: {caption}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        lines = [_ratio_line(r) for r in data["ratios"] if r["system"] in {s for _, s in bars}]
        ax.set_xlabel("\n".join(lines), fontsize=8, loc="left", family="monospace")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    shown = [s for s in _SERIES if any(s == series for _, _, bars in panels for series, _ in bars)]
    fig.legend(
        handles=[Patch(color=_SERIES[s][1], label=_SERIES[s][0]) for s in shown],
        loc="outside lower center",
        ncols=3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(_title(data["run"], data["ratios"]), fontsize=11)
    fig.savefig(png, format="png")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sqlcache.cli.bench_plot FILE.json [OUT.png]``: draw a saved run again."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m sqlcache.cli.bench_plot FILE.json [OUT.png]", file=sys.stderr)
        return 2
    missing = matplotlib_missing()
    if missing:
        print(f"sqlcache bench: {missing}", file=sys.stderr)
        return 2
    source = Path(args[0])
    png = Path(args[1]) if len(args) == 2 else source.with_suffix(".png")
    try:
        render(json.loads(source.read_text(encoding="utf-8")), png)
    except (OSError, ValueError) as exc:
        print(f"sqlcache bench: cannot draw {source}: {exc}", file=sys.stderr)
        return 2
    print(f"sqlcache bench: chart written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
