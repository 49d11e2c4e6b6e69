"""The benchmark's Redis Cluster rows: an identity hit, a 20-row ``cached()`` query hit and a committing
update through a cache on a Redis Cluster, measured in the same interleaved run as the single server's;
and the same through a cache sharded over that cluster (``shards=8``: the table's keys in one shard,
the calls split by shard as any sharded cache's).

The cluster is ``--cluster-url`` (or ``SQLCACHE_CLUSTER_URL``), or else a private one of three
primaries started for the run when ``redis-server`` and ``redis-cli`` are installed (and stopped at its
end). The rows share the database, the model and the operations with the single server's rows; only
the cache differs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisClusterException
from sqlalchemy.engine import Engine

from sqlcache import SQLCache
from sqlcache.errors import SQLCacheError

from .localcluster import LocalCluster, available

__all__ = ["ClusterRows", "cluster_rows"]

#: (row name, single server's row it sits next to, ratio target)
ROWS = (
    ("cluster get hit", "get sqlcache hit"),
    ("cluster q20 hit", "q20 sqlcache hit"),
    ("cluster update", "update sqlcache"),
)


class ClusterRows:
    """A cache on the cluster, attached to an engine of its own, and the private cluster (if any)."""

    def __init__(
        self, url: str, engine: Engine, model: type[Any], private: LocalCluster | None, shards: int = 1
    ) -> None:
        self.url = url
        self.engine = engine
        self._private = private
        prefix = "sqlcache-bench-cluster" if shards == 1 else f"sqlcache-bench-sharded{shards}"
        self.cache = SQLCache(url, prefix=prefix, default_ttl=3600, shards=shards)
        try:
            self.cache.attach(engine)
            self.cache.register(model)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.cache.clear()
        except SQLCacheError:
            pass
        self.cache.close()
        self.engine.dispose()
        if self._private is not None:
            self._private.stop()


def cluster_rows(url: str | None, make_engine: Callable[[], Engine], model: type[Any]) -> ClusterRows | None:
    """The cluster rows' cache and engine, or None (said why) when there is no cluster to run them on."""
    url = url or os.environ.get("SQLCACHE_CLUSTER_URL")
    private = None
    if not url:
        if not available():
            print("sqlcache bench: no cluster rows (no --cluster-url; redis-server/redis-cli not installed)")
            return None
        try:
            private = LocalCluster()
        except (OSError, TimeoutError, redis.RedisError, subprocess.SubprocessError) as exc:
            print(f"sqlcache bench: no cluster rows (a private cluster did not start: {exc})")
            return None
        url = private.url
        print(f"sqlcache bench: cluster rows on a private Redis Cluster (3 primaries, ports {private.ports})")
    try:
        return ClusterRows(url, make_engine(), model, private)
    except (SQLCacheError, redis.RedisError, RedisClusterException, OSError) as exc:
        print(f"sqlcache bench: no cluster rows ({type(exc).__name__}: {exc})")
        if private is not None:
            private.stop()
        return None
