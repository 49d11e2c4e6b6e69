"""The local tier's tracking over a Redis Cluster: one tracking connection per primary serving one of the
cache's slots, and, with every PING, proof that each of them still serves those slots.

On one server a PING answered on the tracking connection proves that every invalidation Redis sent
before it has arrived. On a cluster that holds only for the node that applies the writes: after a
failover or a slot migration the writes go to another node, whose invalidations this connection never
sees, while the old node may go on answering PINGs. So each round here is:

1. ``PING`` on every tracking connection (:meth:`ClusterTracking.ping`, under the tier's lock);
2. then, outside the lock, ``EXISTS`` of one key of each of the cache's slots on a plain connection to
   the node located for it (:meth:`ClusterTracking.verify`): a node that no longer serves the slot
   answers ``MOVED`` (or ``ASK``, ``CLUSTERDOWN``), and the tier drops everything and locates again;
3. the round's answer counts (a ``pong`` handed to the tier) only once every connection answered its
   PING *and* the round's check passed.

A node that served the slot when the check was made, after the PING was sent, served it when the PING
was sent (a slot does not leave a node and come back between a PING and the check that follows it), so
the pong proves what it proves on one server: every change made before the PING's send time has been
applied. A change of primary the cache's own stores notice (``Health.moved``) drops the tier at once as
well. Between the last check that passed and the first that fails, the tier goes on serving what the
last counted PING allows: after a failover the bound is ``max_lag``, not the strict read-after-commit
of one host (docs/pages/local-tier.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.crc import key_slot

from ._cluster import ClusterTarget
from ._tracking import Target, Tracking, TrackingError, target_of

__all__ = ["CheckedTracking", "ClusterTracking", "cluster_tracking"]


def _endpoint(node: Any, asked_host: str) -> tuple[str, int] | None:
    """A node of a ``CLUSTER SLOTS`` entry: its host (empty or null: the host asked, as Redis defines
    it) and port; None for a node whose address the server does not know ("?")."""
    raw, port = node[0], int(node[1])
    host = asked_host if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
    if host == "?" or not 0 < port < 65536:
        return None
    return (host or asked_host, port)


def _slot_owners(
    client: redis.Redis, asked_host: str
) -> tuple[dict[int, tuple[str, int]], set[tuple[str, int]]]:
    """Per slot, the primary serving it, and every node named, from ``CLUSTER SLOTS`` (validated:
    anything else fails)."""
    reply: Any = client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    owners: dict[int, tuple[str, int]] = {}
    named: set[tuple[str, int]] = set()
    if not isinstance(reply, list):
        raise TrackingError("CLUSTER SLOTS answered something else than a list")
    for entry in reply:
        try:
            first, last = int(entry[0]), int(entry[1])
            primary = _endpoint(entry[2], asked_host)
            replicas = [_endpoint(node, asked_host) for node in entry[3:]]
        except (TypeError, ValueError, IndexError, UnicodeDecodeError):
            raise TrackingError("CLUSTER SLOTS answered an entry of another shape") from None
        if not 0 <= first <= last < 16384:
            raise TrackingError("CLUSTER SLOTS answered a range out of bounds")
        named.update(r for r in replicas if r is not None)  # a replica of unknown address: not asked later
        if primary is None:
            continue  # these slots are served by no node this process can reach: as if uncovered
        named.add(primary)
        for slot in range(first, last + 1):
            owners[slot] = primary
    return owners, named


class CheckedTracking:
    """A :class:`~sqlcache._local.TrackingLike` made of tracking connections to the node(s) that apply
    the writes, whose pongs count only for rounds whose check (that those nodes still do) passed.

    Subclasses say how the nodes are found (:meth:`_connect_watches`) and checked (:meth:`_check`)."""

    pong_proves = False  # a round's pongs count once the keeper's check of that round passed

    def __init__(self) -> None:
        self._closed = False
        self._watches: list[Tracking] = []
        self._pongs: list[int] = []  # PINGs answered, per connection
        self._handed = 0  # rounds whose answer went to the tier
        self._verified = 0  # rounds whose check passed (written by the keeper, read under the tier's lock)
        self._rounds = 0

    def _connect_watches(self) -> None:
        """Find the nodes, append a connected :class:`Tracking` to each to ``_watches``."""
        raise NotImplementedError

    def _check(self) -> None:
        """:raises TrackingError: a node no longer applies the writes it is watched for, or no answer."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close the checks' own clients (from any thread)."""

    def connect(self) -> None:
        """Connect a tracking connection to each node, then check they are the right ones.

        :raises TrackingError: the nodes unreachable, or one that does not answer as it should."""
        try:
            self._connect_watches()
            self._pongs = [0] * len(self._watches)
            self._check()  # before anything is served: each node is still the one, after the subscription
        except BaseException:
            self.close()
            raise

    @property
    def partial(self) -> bool:
        return any(w.partial for w in self._watches)

    def ping(self) -> None:
        for w in self._watches:
            w.ping()
        self._rounds += 1

    def verify(self) -> None:
        """The check of the last round (the keeper calls it after :meth:`ping`, outside the tier's lock).

        :raises TrackingError: as :meth:`_check`."""
        rounds = self._rounds
        self._check()
        self._verified = max(self._verified, rounds)

    def poll(self) -> list[tuple[str, list[bytes]]]:
        """Every connection's messages; a ``pong`` once per round that every connection answered and
        whose check passed.

        :raises TrackingError: as :meth:`~sqlcache._tracking.Tracking.poll`."""
        out: list[tuple[str, list[bytes]]] = []
        for i, w in enumerate(self._watches):
            for kind, keys in w.poll():
                if kind == "pong":
                    self._pongs[i] += 1
                else:
                    out.append((kind, keys))
        answered = min(self._pongs, default=0)
        due = min(answered, self._verified) - self._handed
        if due > 0:
            self._handed += due
            out.extend(("pong", []) for _ in range(due))
        return out

    def close(self) -> None:
        """Close every connection (from any thread: a check running in the keeper then fails)."""
        self._closed = True
        watches, self._watches = self._watches, []
        for w in watches:
            w.close()
        self._release()


class ClusterTracking(CheckedTracking):
    """The tracking of a cache on a Redis Cluster.

    :param node: how sqlcache reaches a node (identity, TLS, timeout), at a startup node.
    :param startup: the startup nodes.
    :param keys: one key in each of the cache's slots (a slot per shard).
    :param prefixes: the key prefixes every tracking connection watches (BCAST).
    :param known: the nodes the last slot table named, shared by the connections one after the other
        (asked after the startup nodes: a URL names one node, which may be the one that is down).
    """

    def __init__(
        self,
        node: Target,
        startup: Sequence[tuple[str, int]],
        keys: Sequence[str],
        prefixes: Sequence[str],
        known: set[tuple[str, int]],
    ) -> None:
        super().__init__()
        self._node = node
        self._startup = list(startup)
        self._known = known
        self._keys = list(keys)
        self._prefixes = list(prefixes)
        self._checks: list[tuple[redis.Redis, list[str]]] = []  # per node: a client, the keys it serves

    def _locate(self) -> dict[tuple[str, int], list[str]]:
        """Which primary serves each of the cache's keys now: per node, its keys."""
        failure = "no startup node"
        for host, port in self._startup + sorted(self._known - set(self._startup)):
            client = self._node.at(host, port).client()
            try:
                owners, named = _slot_owners(client, host)
            except (redis.RedisError, OSError, TrackingError) as exc:
                failure = f"{host}:{port}: {type(exc).__name__}"
                continue
            finally:
                client.close()
            nodes: dict[tuple[str, int], list[str]] = {}
            for key in self._keys:
                owner = owners.get(key_slot(key.encode()))
                if owner is None:
                    break
                nodes.setdefault(owner, []).append(key)
            else:
                self._known.clear()  # a table that covers the cache: the nodes to ask next time
                self._known.update(named)
                return nodes
            failure = f"{host}:{port}: a slot of the cache served by no node"  # a node joining, or reset
        raise TrackingError(f"cannot read the cluster's slots ({failure})")

    def _connect_watches(self) -> None:
        for (host, port), keys in self._locate().items():
            t = self._node.at(host, port)
            watch = Tracking(t, self._prefixes)
            self._watches.append(watch)
            self._checks.append((t.client(), keys))
            watch.connect()

    def _check(self) -> None:
        for client, keys in self._checks:
            if self._closed:  # by another thread: no new connection on a client it closed
                raise TrackingError("closed")
            try:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                replies = pipe.execute(raise_on_error=False)
            except Exception as exc:  # redis's errors, a socket closed by close() from another thread
                raise TrackingError(f"the slots' check failed ({type(exc).__name__})") from None
            finally:
                if self._closed:  # closed meanwhile: a connection this check opened goes too
                    client.close()
            for reply in replies:
                if isinstance(reply, Exception) or type(reply) is not int:
                    raise TrackingError("a node no longer serves a slot of the cache") from None

    def _release(self) -> None:
        checks, self._checks = self._checks, []
        for client, _ in checks:
            try:
                client.close()
            except Exception:  # already closed, or in use by the keeper's check (which then fails)
                pass


def cluster_tracking(
    target: ClusterTarget, keys: Sequence[str], prefixes: Sequence[str], timeout: float
) -> Callable[[], ClusterTracking]:
    """How the local tier makes the tracking of a cache on the cluster ``target``.

    :raises ConfigurationError: TLS settings that make no context, or OCSP validation."""
    node = target_of(target.kwargs, bool(target.kwargs.get("ssl")), timeout)
    startup, known = list(target.nodes), set[tuple[str, int]]()
    return lambda: ClusterTracking(node.at(*startup[0]), startup, keys, prefixes, known)
