"""sqlcache through Sentinel (one primary, one replica, three sentinels; tests/topologies.py): a
failover that loses releases the old primary acknowledged serves nothing stale."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache
from sqlcache.errors import ConfigurationError

from ..helpers import check_failover, make_user, user_name
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

    def new_cache() -> SQLCache:
        client = local_sentinel.sentinel().master_for(local_sentinel.service_name)
        return SQLCache(client, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1)

    checked = check_failover(
        engine, new_cache, lambda _, window: local_sentinel.lose_writes_then_failover(window), reader,
        rows=10, versions=2, rereads=4,
    )  # fmt: skip
    assert checked == 60
    print(f"sentinel failover ({reader}): {checked} reads checked")


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_wait_replicas_keeps_an_unacknowledged_release_in_the_journal(
    engine: Engine, local_sentinel: LocalSentinel
) -> None:
    """``wait_replicas=1``: each release is followed by WAIT on its connection. Acknowledged, the commit
    is done as usual; not acknowledged in ``wait_timeout`` (the replica cut off), it is an outage: the
    invalidation stays in the journal, this process reads the database for it, and it is replayed (WAIT
    included) once the replica is back. (``wait_timeout`` of a second: on a loaded machine a replica
    that is up may take more than 100 ms to acknowledge, which CI once saw.)"""
    client = local_sentinel.sentinel().master_for(local_sentinel.service_name)
    cache = SQLCache(
        client, prefix=f"w{uuid.uuid4().hex[:10]}", default_ttl=600, timeout=2.0, wait_replicas=1,
        wait_timeout=1.0, backoff=0.05, max_backoff=0.05,
    )  # fmt: skip
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine, "v0")
        assert user_name(engine, uid) == "v0"
        with Session(engine) as s:
            s.get(User, uid).name = "v1"
            s.commit()
        st = cache.stats()
        assert st["invalidations_deferred"] == 0 and st["errors"] == 0
        assert user_name(engine, uid) == "v1"
        local_sentinel.pause_replication()
        try:
            with Session(engine) as s:
                s.get(User, uid).name = "v2"
                s.commit()  # released on the primary; WAIT: 0 of 1 replicas
            assert cache.stats()["invalidations_deferred"] >= 1
            assert user_name(engine, uid) == "v2"
        finally:
            local_sentinel.resume_replication()
        deadline = time.monotonic() + 10
        while cache.stats()["journal"] and time.monotonic() < deadline:
            assert user_name(engine, uid) == "v2"  # each read tries the replay first
            time.sleep(0.05)
        st = cache.stats()
        assert st["journal"] == 0 and st["invalidations_replayed"] >= 1
        assert user_name(engine, uid) == "v2"
    finally:
        cache.close()


def test_wait_timeout_must_be_below_timeout() -> None:
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        SQLCache("redis://127.0.0.1:1/0", prefix="w", timeout=0.1, wait_replicas=1, wait_timeout=0.2)
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        SQLCache("redis://127.0.0.1:1/0", prefix="w", wait_replicas=-1)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_short_waits_open_the_breaker(engine: Engine, local_sentinel: LocalSentinel) -> None:
    """More replicas asked for than exist: every release's WAIT is short, which fails the call like an
    outage, so the breaker opens (each read no longer pays ``wait_timeout`` for a replay)."""
    client = local_sentinel.sentinel().master_for(local_sentinel.service_name)
    cache = SQLCache(
        client, prefix=f"w{uuid.uuid4().hex[:10]}", timeout=0.5, wait_replicas=2, wait_timeout=0.02
    )
    cache.register(User)
    cache.attach(engine)
    try:
        uid = make_user(engine, "v0")
        for n in range(4):
            with Session(engine) as s:
                s.get(User, uid).name = f"v{n}"  # type: ignore[union-attr]
                s.commit()
            assert user_name(engine, uid) == f"v{n}"
        st = cache.stats()
        assert st["backoffs"] >= 1 and st["invalidations_deferred"] >= 1
    finally:
        cache.close()


def test_wait_timeout_is_not_checked_without_wait_replicas() -> None:
    SQLCache("redis://127.0.0.1:1/0", prefix="w", timeout=0.05).close()
