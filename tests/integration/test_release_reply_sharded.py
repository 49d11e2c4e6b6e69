"""A sharded commit (``shards=4`` on a local cluster of three primaries) returns once every node has
applied its locks; the releases' replies are read on each node's next call, several in order where a
node serves several of the commit's shards (one connection, the last reply giving it back). What they
may still say is handled then, as on one server (test_release_reply.py): sent again, or journalled."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache, _settle, signals
from sqlcache._settle import Owed

from ..conftest import shareable_url
from ..helpers import NoSettler
from ..models import Employee, Manager, Order, User
from ..topologies import LocalCluster, local_cluster
from .test_release_reply import once_locked

__all__ = ["local_cluster"]

SHARDS = 4  # users, orders, employees and managers each in a shard of their own (test_cluster_sharded)

pytestmark = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)


def seed_rows(engine: Engine) -> tuple[int, int, int]:
    """A user, an order of theirs and a manager at version 0 (each table in a shard of its own); their
    ids."""
    with Session(engine) as s:
        user, manager = User(name="v0"), Manager(name="m", reports=0)
        s.add_all([user, manager])
        s.flush()
        order = Order(user_id=user.id, total=Decimal("0"))
        s.add(order)
        s.commit()
        return user.id, order.id, manager.id


class Pair:
    """A writer's cache on ``engine`` and a reader's (another process's) on a second engine, sharded on
    one prefix; a user, an order and a manager written, each table in a shard of its own."""

    def __init__(self, engine: Engine, cluster: LocalCluster, **writer_options: Any) -> None:
        url = cluster.startup_url.replace("redis://", "redis+cluster://", 1)
        prefix = f"rs{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.other = create_engine(shareable_url(engine))
        self.writer = SQLCache(url, prefix=prefix, shards=SHARDS, timeout=2, **writer_options)
        self.reader = SQLCache(url, prefix=prefix, shards=SHARDS, timeout=2)
        for cache, e in ((self.writer, engine), (self.reader, self.other)):
            for model in (User, Order, Employee):
                cache.register(model)
            cache.attach(e)
        self.errors: list[str] = []
        signals.cache_error.connect(self._on_error, sender=self.writer, weak=False)
        self.ids = seed_rows(engine)

    def _on_error(self, sender: SQLCache, exc: BaseException, operation: str) -> None:
        self.errors.append(operation)

    def close(self) -> None:
        signals.cache_error.disconnect(self._on_error, sender=self.writer)
        for cache, e in ((self.writer, self.engine), (self.reader, self.other)):
            cache.detach(e)
            cache.clear()
            cache.close()
        self.other.dispose()

    def write(self, n: int) -> None:
        """One commit of all three rows, to version ``n``."""
        uid, oid, mid = self.ids
        with Session(self.engine) as s:
            user, order, manager = s.get(User, uid), s.get(Order, oid), s.get(Manager, mid)
            assert user is not None and order is not None and manager is not None
            user.name, order.total, manager.reports = f"v{n}", Decimal(n), n
            s.commit()

    def versions(self, engine: Engine) -> tuple[str, Decimal, int]:
        uid, oid, mid = self.ids
        with Session(engine) as s:
            user, order, manager = s.get(User, uid), s.get(Order, oid), s.get(Manager, mid)
            assert user is not None and order is not None and manager is not None
            return user.name, order.total, manager.reports

    def served_from_redis(self, cache: SQLCache, engine: Engine, n: int) -> bool:
        """Whether reads of the three rows, after some that may fill, are three hits of version ``n``."""
        assert self.versions(engine) == (f"v{n}", Decimal(n), n)
        hits = cache.stats()["hits"]
        return self.versions(engine) == (f"v{n}", Decimal(n), n) and cache.stats()["hits"] == hits + 3

    def until_served(self, n: int, what: str) -> None:
        """Read until the reader's reads of the three rows are hits of version ``n`` again (the writer's
        calls replay its journal meanwhile), failing with ``what`` after 10 s."""
        deadline = time.monotonic() + 10
        while not self.served_from_redis(self.reader, self.other, n):
            assert time.monotonic() < deadline, what
            time.sleep(0.02)  # polled with a deadline: the replay runs on the writer's calls
            self.versions(self.engine)

    def owed(self) -> dict[int, list[Owed]]:
        """The writer's unread release replies, per node's port."""
        stores: Any = self.writer._parts.store._stores
        return {int(s.server()["port"]): list(s._owed) for s in stores.values() if s._owed}


@pytest.fixture
def pair(engine: Engine, local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    monkeypatch.setattr(_settle, "SETTLER", NoSettler())  # a node's next call reads its replies
    p = Pair(engine, local_cluster)
    try:
        yield p
    finally:
        p.close()


def shared(owed: dict[int, list[Owed]]) -> tuple[int, list[Owed]]:
    """A node owed several replies on one connection, and those replies."""
    for port, replies in owed.items():
        if len(replies) >= 2:
            return port, replies
    raise AssertionError(f"no node serves two of the commit's shards: {owed}")


def test_a_sharded_commit_leaves_its_releases_for_each_nodes_next_call(pair: Pair) -> None:
    """Four shards on three nodes: the commit returns with one reply owed per shard, a node serving two
    of them owes both on the lock's connection (the last holding it). Another process reads the new
    rows at once; the writer's next call reads every reply, and both are served from Redis."""
    assert pair.served_from_redis(pair.reader, pair.other, 0)
    pair.write(1)
    owed = pair.owed()
    assert sum(len(r) for r in owed.values()) == SHARDS
    _, replies = shared(owed)
    assert len({id(o.conn) for o in replies}) == 1
    assert [o.holds for o in replies] == [False] * (len(replies) - 1) + [True]
    assert pair.versions(pair.other) == ("v1", Decimal(1), 1)  # before the writer's next call
    assert pair.served_from_redis(pair.writer, pair.engine, 1)
    assert pair.owed() == {}
    assert pair.served_from_redis(pair.reader, pair.other, 1)
    assert pair.errors == [] and pair.writer.stats()["journal"] == 0


def test_sharded_commits_give_their_connections_back(pair: Pair, local_cluster: LocalCluster) -> None:
    """Commits one after the other, nothing read between them: each node's next call reads what the
    last left, so the writer keeps a few connections per node, not one per commit."""
    for n in range(1, 31):
        pair.write(n)
    assert pair.served_from_redis(pair.writer, pair.engine, 30)
    for port in local_cluster.live_ports():
        node = local_cluster.node(port)
        try:
            if node.info("replication")["role"] == "master":
                # both caches' pools and the checks' clients; far below one per commit
                assert int(node.info("clients")["connected_clients"]) <= 12
        finally:
            node.close()


def test_releases_refused_after_a_sharded_commit_returned_are_sent_again(
    pair: Pair, local_cluster: LocalCluster
) -> None:
    """Every primary loses its scripts between the locks and the releases: each reply, read on its
    node's next call, is NOSCRIPT, and each release goes again then, in order on a node that owes
    several. Meanwhile readers go to the database; nothing is journalled."""
    assert pair.served_from_redis(pair.reader, pair.other, 0)
    pair.write(1)
    port, replies = shared(pair.owed())
    assert pair.served_from_redis(pair.writer, pair.engine, 1)
    primaries = [local_cluster.node(p) for p in local_cluster.live_ports()]
    primaries = [n for n in primaries if n.info("replication")["role"] == "master"]
    node = local_cluster.node(port)
    try:

        def flush() -> None:
            for n in primaries:
                n.script_flush()

        # the lock of a shard of the node that owes several has applied: flush every primary's scripts
        with once_locked(pair.engine, node, replies[0].dep_keys[0], flush):
            pair.write(2)
        assert len(shared(pair.owed())[1]) >= 2  # returned with the refusals unread
        assert pair.versions(pair.other) == ("v2", Decimal(2), 2)
        assert pair.served_from_redis(pair.writer, pair.engine, 2)  # sent again on that call
        assert pair.owed() == {}
        assert pair.served_from_redis(pair.reader, pair.other, 2)
        assert pair.errors == [] and pair.writer.stats()["journal"] == 0
    finally:
        for n in [*primaries, node]:
            n.close()


def test_a_lock_refused_on_a_node_is_not_left_for_later(pair: Pair, local_cluster: LocalCluster) -> None:
    """Every primary loses its scripts before the commit's locks go out: each lock is refused, and so is
    the release behind it. Those replies are read before ``commit()`` returns (nothing applied: there is
    nothing to leave for later), the invalidation is journalled and replayed at once, and another
    process reads the new rows, never the old entries."""
    assert pair.served_from_redis(pair.reader, pair.other, 0)
    assert pair.served_from_redis(pair.writer, pair.engine, 0)
    primaries = [local_cluster.node(p) for p in local_cluster.live_ports()]
    try:
        for n in primaries:
            if n.info("replication")["role"] == "master":
                n.script_flush()
        pair.write(1)
        assert pair.owed() == {}
        assert "release" in pair.errors
        assert pair.versions(pair.other) == ("v1", Decimal(1), 1)
        pair.until_served(1, "the rows were never served from Redis again")
    finally:
        for n in primaries:
            n.close()


def test_releases_lost_on_one_connection_are_all_journalled_and_it_goes_back_once(
    pair: Pair, local_cluster: LocalCluster
) -> None:
    """The node that owes several replies on one connection stops running writes after the locks
    (CLIENT PAUSE WRITE), and the connection is killed with the releases still queued: the next call
    finds the first reply missing, hands the rest over unread, and gives the connection back to the
    pool once. Every release is journalled, the locks keep readers on the database meanwhile, and the
    replay releases every shard's lock (the journal keeps a lock's parts together: one token, several
    shards' keys)."""
    assert pair.served_from_redis(pair.reader, pair.other, 0)
    pair.write(1)
    port, replies = shared(pair.owed())
    assert pair.served_from_redis(pair.writer, pair.engine, 1)
    node = local_cluster.node(port)
    try:
        with once_locked(
            pair.engine, node, replies[0].dep_keys[0], lambda: node.client_pause(10_000, all=False)
        ):
            pair.write(2)  # the releases wait on that node, unread
        held = shared(pair.owed())[1]
        conn = held[-1].conn
        writer_port = conn._sock.getsockname()[1]
        killed = [c for c in node.client_list() if c["addr"].endswith(f":{writer_port}")]
        assert killed
        node.client_kill_filter(_id=killed[0]["id"])
        node.client_unpause()
        pool = held[-1].conn  # the same connection object for every reply owed on it
        assert all(o.conn is pool for o in held)
        assert pair.versions(pair.other) == ("v2", Decimal(2), 2)  # the locks hold: the database
        assert pair.versions(pair.engine) == ("v2", Decimal(2), 2)  # the writer's next call: lost
        assert "release" in pair.errors  # journalled (and perhaps replayed already: Redis answers)
        stores: Any = pair.writer._parts.store._stores
        store = next(s for s in stores.values() if int(s.server()["port"]) == port)
        available = store.client.connection_pool._available_connections
        assert sum(1 for c in available if c is conn) <= 1  # given back once, not once per reply
        pair.until_served(2, "the journal's replay never released every shard's lock")
    finally:
        try:
            node.client_unpause()
        except redis.RedisError:
            pass
        node.close()
