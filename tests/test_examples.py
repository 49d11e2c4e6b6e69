"""The runnable examples in docs/examples run and say what the docs say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name: str, redis_url: str) -> None:
    """Each example exits 0 against a real Redis and shows a cache hit with no SQL."""
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SQLCACHE_REDIS_URL": redis_url},
    )
    assert p.returncode == 0, p.stderr
    assert "0 SQL statements" in p.stdout or "SQL statements: 0" in p.stdout
    if name == "cluster.py":  # its cache sharded over the cluster hits too
        assert "sharded get: desk lamp - SQL statements: 0" in p.stdout, p.stdout
