"""sqlcache through Sentinel (one primary, one replica, three sentinels; tests/topologies.py): a
failover that loses releases the old primary acknowledged serves nothing stale."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..helpers import make_user, user_name
from ..models import User
from ..topologies import LocalSentinel, local_sentinel

__all__ = ["local_sentinel"]


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("reader", ["writer", "late"])
def test_failover_that_loses_acknowledged_releases_serves_nothing_stale(
    engine: Engine, local_sentinel: LocalSentinel, reader: str
) -> None:
    """As on the cluster (test_cluster.py): the releases of the window reach the old primary only; after
    the sentinels promote the replica, neither the writer nor a process started after the failover (the
    writer gone) reads a version older than the last commit that returned."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    caches: list[SQLCache] = []

    def new_cache() -> SQLCache:
        client = local_sentinel.sentinel().master_for(local_sentinel.service_name)
        c = SQLCache(client, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1)
        c.register(User)
        c.attach(engine)
        caches.append(c)
        return c

    writer = new_cache()
    try:
        uids = [make_user(engine, "v0") for _ in range(10)]
        for uid in uids:
            assert user_name(engine, uid) == "v0"  # filled, then replicated
        last = {uid: "v0" for uid in uids}
        checked = 0

        def window() -> None:
            nonlocal checked
            for n in range(1, 3):
                for uid in uids:
                    with Session(engine) as s:
                        s.get(User, uid).name = f"v{n}"
                        s.commit()
                    last[uid] = f"v{n}"
                    assert user_name(engine, uid) == last[uid]
                    checked += 1
            if reader == "late":
                writer.close()

        local_sentinel.lose_writes_then_failover(window)
        c = writer if reader == "writer" else new_cache()
        for _ in range(4):
            for uid in uids:
                assert user_name(engine, uid) == last[uid]
                checked += 1
        assert c.stats()["hits"] >= 20  # Redis answered: the reads above were not all misses
    finally:
        for c in caches:
            c.close()
    assert checked == 60
    print(f"sentinel failover ({reader}): {checked} reads checked")
