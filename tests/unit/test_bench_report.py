"""The benchmark report's per-round ratio spread."""

from __future__ import annotations

import pytest

from sqlcache.cli.bench_report import report, round_spread


def test_round_spread_is_the_middle_half_of_paired_round_ratios() -> None:
    """Each round's ratio is its two batches' medians divided; the spread is their quartiles."""
    base = [100, 100, 100] * 8  # 8 rounds of 3 samples, every median 100
    ratios = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    system = [int(100 * r) for r in ratios for _ in range(3)]
    q1, q3 = round_spread(system, base, 8)  # type: ignore[misc]
    assert (round(q1, 3), round(q3, 3)) == (1.125, 1.575)  # statistics.quantiles, exclusive method


def test_round_spread_needs_whole_rounds() -> None:
    assert round_spread([1, 2, 3], [1, 2, 3], 1) is None
    assert round_spread([1] * 10, [1] * 12, 4) is None  # 10 samples are not 4 equal batches


def test_report_prints_each_ratio_with_its_spread(capsys: pytest.CaptureFixture[str]) -> None:
    samples = {"update plain": [1000] * 8, "update sqlcache": [1100] * 4 + [1300] * 4}
    report(samples, rounds=4)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("update sqlcache / "))
    assert "1.20x" in line and "(1.10-1.30)" in line and "target <= 1.15: MISS" in line


def test_every_charted_series_has_a_legend_and_a_colour() -> None:
    """A system added to a chart panel without its series in the legend table failed only in a full
    ``bench --plot`` run (a KeyError while drawing)."""
    from sqlcache.cli import bench_plot

    for _group, _what, bars in bench_plot._PANELS:
        for series, _system in bars:
            assert series in bench_plot._SERIES, series
