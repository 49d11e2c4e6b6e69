"""``sqlcache stats``, ``inspect`` and ``flush`` on a real local Redis Cluster: every key of a prefix is in
its slot, and the commands talk to the primary serving it."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from sqlcache import SQLCache
from sqlcache.cli import main

from ..topologies import LocalCluster, local_cluster  # noqa: F401  (the fixture)


def test_commands_on_a_cluster(local_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A cache on the cluster publishes to its slot's primary; stats shows it, inspect reads a key
    there, flush deletes the prefix's keys there."""
    url = local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)
    prefix = f"cc{uuid.uuid4().hex[:8]}"
    cache = SQLCache(url, prefix=prefix, publish_stats=0.1)
    try:
        cache.invalidate_tags("a")
        args = ["--prefix", prefix, "--redis-url", url]
        deadline = time.monotonic() + 20
        out = ""
        while "invalidations" not in out and time.monotonic() < deadline:
            assert main(["stats", "--once", *args]) == 0
            out = capsys.readouterr().out
            time.sleep(0.02)  # polling for the publisher thread's first write, with a deadline
        assert f"pid {os.getpid()}" in out and "invalidations" in out
        tag = "{" + prefix + "}"
        assert main(["inspect", "--key", f"{tag}:q:none", "--dep", f"{tag}:d:u:a", *args]) == 1
        out = capsys.readouterr().out
        assert "absent" in out and "unlocked" in out
    finally:
        cache.close()
    assert main(["flush", "--yes", *args]) == 0
    out = capsys.readouterr().out
    deleted = int(out.split("deleted ", 1)[1].split()[0])
    assert deleted >= 3  # the clock, the lineage key, the tag's generation
    assert main(["flush", "--yes", *args]) == 0
    assert "deleted 0 keys" in capsys.readouterr().out
