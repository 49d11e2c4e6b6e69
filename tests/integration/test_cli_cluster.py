"""``sqlcache stats``, ``inspect`` and ``flush`` on a real local Redis Cluster: every key of a prefix is in
its slot, and the commands talk to the primary serving it."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from sqlcache import SQLCache, _keys
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


def test_commands_on_a_sharded_cache(local_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The commands read a sharded cache's layout from its first shard: inspect reads a tag's key on the
    node serving its shard, --fence moves every shard's dependency of every entry, flush deletes every
    shard's keys (on each node) but the layout's claims."""
    url = local_cluster.startup_url.replace("redis://", "redis+cluster://", 1)
    prefix = f"cs{uuid.uuid4().hex[:8]}"
    cache = SQLCache(url, prefix=prefix, shards=4)
    try:
        tags = [f"t{i}" for i in range(40)]
        cache.invalidate_tags(*tags)  # tags in every shard; each shard's clock, lineage and layout made
        layout = cache._parts.keys.layout
        assert len({layout.at(t) for t in tags}) == 4
        args = ["--prefix", prefix, "--redis-url", url]
        at = layout.at("t1")
        dep = _keys.tag_dep_key(at, "t1")
        assert main(["inspect", "--key", _keys.query_key(at, "none"), "--dep", dep, *args]) == 1
        out = capsys.readouterr().out
        assert "absent" in out and "unlocked" in out
        before = [local_cluster.client().get(k) for k in layout.everything]
        assert main(["flush", "--fence", "--yes", *args]) == 0
        assert "every entry is a miss" in capsys.readouterr().out
        after = [local_cluster.client().get(k) for k in layout.everything]
        assert all(a is not None and a != b for a, b in zip(after, before, strict=True))
    finally:
        cache.close()
    assert main(["flush", "--yes", *args]) == 0
    out = capsys.readouterr().out
    deleted = int(out.split("deleted ", 1)[1].split()[0])
    assert deleted >= 40 + 4 * 3  # the tags' generations; each shard's clock, lineage and fence key
    left = set()
    for port in local_cluster.live_ports():
        for key in local_cluster.node(port).scan_iter(match="*", count=1000):
            name = key if isinstance(key, str) else key.decode()
            if any(name.startswith(ns + ":") for ns in layout.namespaces):
                left.add(name)
    assert left == {ns + ":layout" for ns in layout.namespaces}
