"""The local tier behind Redis Sentinel (one primary, one replica, three sentinels; tests/topologies.py):
its tracking connection on the primary the sentinels name, and each round's proof that a majority of
them still name it and it is still a primary. Writers are other caches on other engines."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.sentinel import Sentinel
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqlcache import SQLCache

from ..conftest import shareable_url
from ..helpers import each_commit_read_back, make_user, rename_user, user_name
from ..models import User
from ..topologies import LocalSentinel, admin, local_sentinel
from .test_local_tier import serving, wait_for

__all__ = ["local_sentinel"]


@pytest.fixture
def other(engine: Engine) -> Iterator[Engine]:
    e = create_engine(shareable_url(engine))
    yield e
    e.dispose()


def _cache(setup: LocalSentinel, engine: Engine, prefix: str, **kwargs: Any) -> SQLCache:
    client = setup.sentinel().master_for(setup.service_name)
    c = SQLCache(
        client, prefix=prefix, default_ttl=600, timeout=0.5, backoff=0.05, max_backoff=0.1, **kwargs
    )  # fmt: skip
    c.register(User)
    c.attach(engine)
    return c


def _close(*pairs: tuple[SQLCache, Engine]) -> None:
    for c, e in pairs:
        c.detach(e)
        c.close()


def _watched(setup: LocalSentinel) -> set[int]:
    """The data nodes holding a tracking connection (subscribed, with tracking on)."""
    out = set()
    for port in setup.data_ports:
        with admin(port) as node:
            if any("t" in c.get("flags", "") and c.get("sub") == "1" for c in node.client_list()):
                out.add(port)
    return out


def _fresh(cache: SQLCache) -> bool:
    """Whether the tier may serve now (a counted PING within max_lag)."""
    tier: Any = cache._parts.local
    return bool(time.monotonic() - tier._alive <= tier.max_lag)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_every_read_after_another_process_commit_returned_sees_it_behind_sentinel(
    engine: Engine, other: Engine, local_sentinel: LocalSentinel
) -> None:
    """Strict read-after-commit behind Sentinel: 30 rounds of another process renaming a user and, as
    soon as its commit returned, reads that always see the new name, served from memory in between;
    the tracking connection is on the primary the sentinels name, and on no other node."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    local = _cache(local_sentinel, engine, prefix, local_bytes=1 << 20)
    writer = _cache(local_sentinel, other, prefix)
    try:
        wait_for(lambda: serving(local), "the tracking connection")
        assert _watched(local_sentinel) == {local_sentinel.primary_port()}
        uid = make_user(engine, "v0")
        for _ in range(2):
            assert user_name(engine, uid) == "v0"
        each_commit_read_back(engine, other, uid, 30)
        assert local.stats()["local_hits"] > 0
    finally:
        local.clear()
        _close((writer, other), (local, engine))


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_failover_moves_the_tracking_to_the_new_primary(
    engine: Engine, other: Engine, local_sentinel: LocalSentinel
) -> None:
    """``SENTINEL FAILOVER``: for about 8 s after the sentinels promote the replica, the old primary is
    still a master, keeps its clients and would go on answering the tracking connection's PINGs. The
    tier's check sees at once that the sentinels name another node, and drops everything while the old
    primary is still a master (Sentinel's own demotion, which closes its clients, comes later). Once
    settled, reads after another process's commit on the new primary see it, and come from memory again
    through a tracking connection there."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    local = _cache(local_sentinel, engine, prefix, local_bytes=1 << 20)
    try:
        wait_for(lambda: serving(local), "the tracking connection")
        uid = make_user(engine, "v0")
        for _ in range(3):
            assert user_name(engine, uid) == "v0"
        old = local_sentinel.primary_port()
        assert _watched(local_sentinel) == {old}
        drops = local.stats()["local_drops"]
        promoted = local_sentinel.failover(settle=False)
        wait_for(lambda: local.stats()["local_drops"] > drops, "the tier to see the failover", timeout=5)
        with admin(old) as node:  # the drop came from the check, not from a demotion closing clients
            assert node.execute_command("ROLE")[0] == "master"
        local_sentinel.wait_settled()
        writer = _cache(local_sentinel, other, prefix)  # a process whose connections are to the new primary
        try:
            rename_user(other, uid, "v1")
            hits = local.stats()["local_hits"]

            def served_from_memory() -> bool:  # every read right, until the tier serves again
                assert user_name(engine, uid) == "v1"
                return local.stats()["local_hits"] > hits

            wait_for(served_from_memory, "a tracking connection to the new primary", timeout=15)
            assert _watched(local_sentinel) == {promoted}
        finally:
            _close((writer, other))
    finally:
        local.clear()
        _close((local, engine))


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_nothing_is_served_locally_while_most_sentinels_are_unreachable(
    engine: Engine, local_sentinel: LocalSentinel
) -> None:
    """Two of the three sentinels killed: no round can show that a majority still names the primary, so
    once ``local_max_lag`` has passed nothing is served from memory (Redis answers, correctly); with
    the sentinels back, the tier serves again."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    local = _cache(local_sentinel, engine, prefix, local_bytes=1 << 20, local_max_lag=0.2)
    killed = local_sentinel.sentinel_ports[1:]
    try:
        wait_for(lambda: serving(local), "the tracking connection")
        uid = make_user(engine, "v0")
        for _ in range(3):
            assert user_name(engine, uid) == "v0"
        assert _fresh(local)
        for port in killed:
            local_sentinel.kill(port)
        wait_for(lambda: not _fresh(local), "the tier to stop serving", timeout=10)
        hits = local.stats()["local_hits"]
        for _ in range(3):
            assert user_name(engine, uid) == "v0"
        assert local.stats()["local_hits"] == hits
        local_sentinel.restart(*killed)
        killed = []
        hits = local.stats()["local_hits"]

        def served_from_memory() -> bool:
            assert user_name(engine, uid) == "v0"
            return local.stats()["local_hits"] > hits

        wait_for(served_from_memory, "the tier to serve again", timeout=15)
    finally:
        if killed:
            local_sentinel.restart(*killed)
        local.clear()
        _close((local, engine))


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_silent_sentinel_does_not_keep_the_tier_off(engine: Engine, local_sentinel: LocalSentinel) -> None:
    """A third "sentinel" that accepts connections and never answers (a host dropping traffic), the two
    others up: the sentinels are asked in parallel and a round waits for the silent one only until its
    deadline (``local_max_lag / 2``), so the majority's answers count and the tier serves from memory."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        addresses = [*local_sentinel.sentinel_addresses[:2], silent.getsockname()]
        client = Sentinel(addresses, socket_timeout=0.5).master_for(local_sentinel.service_name)
        local = SQLCache(
            client, prefix=f"s{uuid.uuid4().hex[:10]}", default_ttl=600, timeout=0.5, local_bytes=1 << 20,
            local_max_lag=0.2,
        )  # fmt: skip
        local.register(User)
        local.attach(engine)
        try:
            wait_for(lambda: serving(local), "the tracking connection", timeout=10)
            uid = make_user(engine, "v0")
            hits = local.stats()["local_hits"]

            def served_from_memory() -> bool:
                assert user_name(engine, uid) == "v0"
                return local.stats()["local_hits"] > hits

            wait_for(served_from_memory, "a read from memory", timeout=10)
        finally:
            local.clear()
            _close((local, engine))
    finally:
        silent.close()
