"""The documentation site (docs/mkdocs.yml) builds strictly, with the pages, diagrams, chart and API
reference it promises; a broken link, a page left out of nav or a stale docstring fails here too."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = DOCS / "pages"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module with ``mkdocs build --strict`` into a temporary folder."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert p.returncode == 0, p.stderr
    return out


def text(page: Path) -> str:
    """A built page's text, tags removed (highlighted code is split into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_no_page_outside_the_site() -> None:
    """Every page lives in docs/pages/: a Markdown file left in docs/ would be missing from the site."""
    stray = sorted(p.name for p in DOCS.glob("*.md"))
    assert not stray, f"move {stray} to docs/pages/ (git mv) and add them to nav in docs/mkdocs.yml"


def test_sequence_diagrams_have_no_semicolon() -> None:
    """Mermaid ends a sequence-diagram statement at ``;``: a message containing one breaks the diagram
    (it is then shown as its source text)."""
    for page in PAGES.glob("*.md"):
        for block in re.findall(r"```mermaid\n(.*?)```", page.read_text(), re.S):
            if block.startswith("sequenceDiagram"):
                assert ";" not in block, f"{page.name}: {block.splitlines()[1]}..."


def test_site_builds_with_its_pages(site: Path) -> None:
    """Home has the README's quick start, every guide is there, the examples are published beside them."""
    home = text(site / "index.html")
    assert "cache.invalidate_tags" in home and "python -m pip install -e" in home
    for page in PAGES.glob("*.md"):
        if page.stem != "index":
            assert (site / page.stem / "index.html").is_file(), page.name
    for example in (DOCS / "examples").glob("*.py"):
        assert (site / "examples" / example.name).read_bytes() == example.read_bytes()


def test_diagrams_use_the_vendored_mermaid(site: Path) -> None:
    """The architecture page's diagrams reach the browser as mermaid blocks, and every page loads the
    mermaid shipped with the site (Material would fetch one from a CDN otherwise)."""
    page = (site / "architecture" / "index.html").read_text()
    assert page.count('<pre class="mermaid">') >= 4  # the parts, a hit, a guarded fill, a commit
    assert "sequenceDiagram" in page
    (script,) = (site / "assets" / "vendor").glob("mermaid-*.min.js")
    for built in (site / "index.html", site / "architecture" / "index.html"):
        assert f"assets/vendor/{script.name}" in built.read_text()


def test_api_reference_covers_the_public_names(site: Path) -> None:
    """The API page documents every name ``sqlcache`` exports, and renders reST roles as code."""
    import sqlcache

    page = (site / "api" / "index.html").read_text()
    for name in sqlcache.__all__:
        if name != "__version__":
            obj = getattr(sqlcache, name)
            where = obj.__name__ if name == "signals" else f"{obj.__module__}.{name}"
            assert f'id="sqlcache.{name}"' in page or f'id="{where}"' in page, name
    assert 'id="sqlcache.signals.cache_hit"' in page and 'id="sqlcache.plugin.Plugin"' in page
    assert ":meth:" not in page and ":class:" not in page and ".. versionadded" not in page


def test_benchmark_page_and_its_figures(site: Path, tmp_path: Path) -> None:
    """The benchmark page shows the committed chart and the command that made it, and the chart can be
    drawn again from the committed JSON."""
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    from sqlcache.cli import bench_plot

    page = text(site / "benchmark" / "index.html")
    assert "python -m sqlcache bench --plot docs/pages/assets/bench.png" in page
    assert (site / "assets" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((PAGES / "assets" / "bench.json").read_text())
    assert doc["run"]["database"] == "postgresql" and (doc["run"]["rounds"], doc["run"]["batch"]) == (30, 50)
    bench_plot.render(doc, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 20_000
