"""The topology fixtures themselves: a real cluster and a real Sentinel setup fail over as promised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from .. import topologies
from ..topologies import LocalCluster, LocalSentinel

# the module-scoped fixtures, made visible to this module's tests
local_cluster = topologies.local_cluster
local_sentinel = topologies.local_sentinel


@contextmanager
def cluster_client(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    client = cluster.client(decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def sentinel_primary(setup: LocalSentinel) -> Iterator[tuple[redis.sentinel.Sentinel, redis.Redis]]:
    with setup.sentinel() as sentinel:
        primary = sentinel.master_for(setup.service_name, decode_responses=True)
        try:
            yield sentinel, primary
        finally:
            primary.close()


# --- cluster -----------------------------------------------------------------------------------------


def test_cluster_serves_keys_on_all_three_primaries(local_cluster: LocalCluster) -> None:
    keys = {f"topo:spread:{i}": str(i) for i in range(100)}
    with cluster_client(local_cluster) as client:
        for key, value in keys.items():
            client.set(key, value)
    by_primary: dict[int, list[str]] = {}
    for key in keys:
        by_primary.setdefault(local_cluster.primary_for(key), []).append(key)
    assert len(by_primary) == 3
    for port, owned in by_primary.items():
        with local_cluster.node(port) as node:
            assert node.info("replication")["role"] == "master"
            assert [node.get(k) for k in owned] == [keys[k] for k in owned]  # served here, no MOVED


def test_cluster_failover_moves_the_slot(local_cluster: LocalCluster) -> None:
    key = "topo:failover"
    with cluster_client(local_cluster) as client:
        client.set(key, "kept")
    old = local_cluster.primary_for(key)
    replica = local_cluster.replica_of(old)

    new = local_cluster.failover(old)

    assert new == replica
    assert local_cluster.primary_for(key) == new
    assert local_cluster.replica_of(new) == old
    with cluster_client(local_cluster) as client:
        assert client.get(key) == "kept"


def test_cluster_paused_replication_catches_up_on_resume(local_cluster: LocalCluster) -> None:
    key = "topo:paused"
    old = local_cluster.primary_for(key)
    with cluster_client(local_cluster) as client:
        replica = local_cluster.pause_replication(old)
        try:
            client.set(key, "late")
        finally:
            local_cluster.resume_replication(old)
    with local_cluster.node(replica) as node:  # nothing lost while the primary lives
        node.execute_command("READONLY")
        assert node.get(key) == "late"


def test_cluster_lose_writes_then_failover(local_cluster: LocalCluster) -> None:
    before, during = "{topo:lost}:before", "{topo:lost}:during"
    old = local_cluster.primary_for(before)
    replica = local_cluster.replica_of(old)
    with cluster_client(local_cluster) as client:
        client.set(before, "kept")

        def write() -> None:
            assert client.set(during, "acknowledged") is True
            with local_cluster.node(old) as node:
                assert node.get(during) == "acknowledged"

        new = local_cluster.lose_writes_then_failover(old, write)

    assert new == replica
    assert local_cluster.primary_for(during) == new
    assert local_cluster.replica_of(new) == old  # the old primary rejoined as a replica
    with cluster_client(local_cluster) as client:
        assert client.get(before) == "kept"
        assert client.get(during) is None
    with local_cluster.node(old) as node:  # resynchronised from the promoted node
        node.execute_command("READONLY")
        assert node.get(before) == "kept"
        assert node.get(during) is None


# --- sentinel ----------------------------------------------------------------------------------------


def test_sentinel_failover_changes_the_discovered_primary(local_sentinel: LocalSentinel) -> None:
    with sentinel_primary(local_sentinel) as (sentinel, primary):
        primary.set("topo:failover", "kept")
        old = sentinel.discover_master(local_sentinel.service_name)
        assert old[1] == local_sentinel.primary_port()

        new = local_sentinel.failover()

        assert old[1] != new
        assert sentinel.discover_master(local_sentinel.service_name) == ("127.0.0.1", new)
    with sentinel_primary(local_sentinel) as (_, primary):
        assert primary.get("topo:failover") == "kept"


def test_sentinel_lose_writes_then_failover(local_sentinel: LocalSentinel) -> None:
    old = local_sentinel.primary_port()
    with sentinel_primary(local_sentinel) as (_, primary):
        primary.set("topo:before", "kept")

        def write() -> None:
            assert primary.set("topo:during", "acknowledged") is True
            with local_sentinel.node(old) as node:
                assert node.get("topo:during") == "acknowledged"

        new = local_sentinel.lose_writes_then_failover(write)

    assert new != old
    with sentinel_primary(local_sentinel) as (sentinel, primary):
        assert sentinel.discover_master(local_sentinel.service_name) == ("127.0.0.1", new)
        assert primary.get("topo:before") == "kept"
        assert primary.get("topo:during") is None
    with local_sentinel.node(old) as node:  # the restarted old primary now replicates the promoted one
        assert node.info("replication")["role"] == "slave"
        assert node.get("topo:before") == "kept"
        assert node.get("topo:during") is None
