"""The local tier's tracking behind Redis Sentinel: one tracking connection to the primary the sentinels
name, and, with every PING, proof that it is still the primary.

On one server a PING answered on the tracking connection proves that every invalidation Redis sent
before it has arrived. Behind Sentinel that holds only while the node watched is the one that applies
the writes: after a failover the writers go to the new primary, whose invalidations this connection
never sees, while the old node may go on answering PINGs (it is not restarted, and a demoted node keeps
its clients). So each round (``_ctracking.CheckedTracking``) is:

1. ``PING`` on the tracking connection (under the tier's lock);
2. then, outside the lock, ``SENTINEL GET-MASTER-ADDR-BY-NAME`` on every sentinel, and ``ROLE`` on the
   node watched. The round passes only if a majority of the sentinels answered, every one that answered
   named the node watched, and the node says it is a master;
3. the round's pong counts toward the tier's freshness only once it passed.

A failover is decided by a majority of the sentinels, and the sentinel that leads it names the new
primary from the moment it promotes it: a round that reaches that sentinel fails, and the tier drops
everything and finds the primary again. What this cannot see is a failover whose leader this process
cannot reach while the sentinels it reaches have not learned of it yet (they learn within Sentinel's
hello period, about 2 s); that window adds to ``max_lag`` (docs/pages/local-tier.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import redis
import redis.sentinel

from ._ctracking import CheckedTracking
from ._tracking import Target, Tracking, TrackingError, target_of, tracking_target
from .errors import ConfigurationError

__all__ = ["SentinelTracking", "server_tracking"]


def _address(reply: Any) -> tuple[str, int] | None:
    """A sentinel's answer to GET-MASTER-ADDR-BY-NAME (validated), or None for a service it does not
    know."""
    if reply is None:
        return None
    try:
        host, port = reply
        host = host.decode() if isinstance(host, bytes) else host
        port = int(port)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise TrackingError("a sentinel answered something else than an address") from None
    if not isinstance(host, str) or not host or not 0 < port < 65536:
        raise TrackingError("a sentinel answered something else than an address")
    return host, port


class SentinelTracking(CheckedTracking):
    """The tracking of a cache behind Redis Sentinel.

    :param node: how sqlcache reaches a data node (identity, TLS, timeout), at any address.
    :param sentinels: how it reaches each sentinel.
    :param service: the service name the sentinels monitor.
    :param prefixes: the key prefixes the tracking connection watches (BCAST).
    """

    def __init__(
        self,
        node: Target,
        sentinels: Sequence[Target],
        service: str,
        prefixes: Sequence[str],
        deadline: float,
    ) -> None:
        super().__init__()
        self._node = node
        self._service = service
        self._prefixes = list(prefixes)
        self._deadline = deadline
        self._sentinels = [s.client() for s in sentinels]  # connect on first use
        # asked in parallel, so that one silent sentinel costs a round the deadline, not the timeout; a
        # sentinel still busy with an earlier round's question is not asked again, and its late answer,
        # given before this round's PING perhaps, does not count
        self._asking: list[Future[Any] | None] = [None] * len(self._sentinels)
        self._pool = ThreadPoolExecutor(len(self._sentinels), thread_name_prefix="sqlcache-sentinel-check")
        self._at: tuple[str, int] | None = None
        self._primary: redis.Redis | None = None

    def _ask(self, client: redis.Redis) -> Any:
        try:
            return client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self._service)  # type: ignore[no-untyped-call]
        finally:
            if self._closed:  # closed meanwhile: a connection this question opened goes too
                client.close()

    def _named(self) -> tuple[str, int]:
        """The primary every sentinel that answers within the deadline names, if a majority of them
        answer.

        :raises TrackingError: fewer answers, or sentinels naming different nodes (a failover under way)."""
        if self._closed:
            raise TrackingError("closed")
        fresh: list[tuple[int, Future[Any]]] = []  # this round's questions, asked after its PING
        try:
            for i, client in enumerate(self._sentinels):
                f = self._asking[i]
                if f is not None and f.done():
                    f = self._asking[i] = None  # an earlier round's, answered late: proves nothing now
                if f is None:
                    f = self._asking[i] = self._pool.submit(self._ask, client)
                    fresh.append((i, f))
        except RuntimeError:  # the pool was shut down by close() from another thread
            raise TrackingError("closed") from None
        wait([f for _, f in fresh], timeout=self._deadline)
        named: set[tuple[str, int] | None] = set()
        answers = 0
        for i, f in fresh:
            if not f.done():
                continue  # still asking: no answer this round (and not asked again until it answers)
            self._asking[i] = None
            if f.cancelled() or f.exception() is not None:
                continue  # redis's errors, a socket closed by close() from another thread
            named.add(_address(f.result()))
            answers += 1
        if answers * 2 <= len(self._sentinels):
            raise TrackingError(f"{answers} of {len(self._sentinels)} sentinels answered in time")
        if len(named) != 1 or None in named:
            raise TrackingError("the sentinels do not name one primary for the service")
        return next(a for a in named if a is not None)

    def _connect_watches(self) -> None:
        self._at = self._named()
        node = self._node.at(*self._at)
        self._primary = node.client()
        watch = Tracking(node, self._prefixes)
        self._watches.append(watch)
        watch.connect()

    def _check(self) -> None:
        if self._named() != self._at:
            raise TrackingError("the sentinels name another primary")
        primary = self._primary
        if primary is None or self._closed:
            raise TrackingError("closed")
        try:
            role: Any = primary.execute_command("ROLE")  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise TrackingError(f"the primary's check failed ({type(exc).__name__})") from None
        finally:
            if self._closed:  # closed meanwhile: a connection this check opened goes too
                primary.close()
        if not isinstance(role, list) or not role or role[0] not in (b"master", "master"):
            raise TrackingError("the node watched is no longer a primary")

    def _release(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        clients = [*self._sentinels, *([self._primary] if self._primary is not None else [])]
        for client in clients:
            try:
                client.close()
            except Exception:  # already closed, or in use by the keeper's check (which then fails)
                pass


def _tls(pool: Any) -> bool:
    return bool(pool.connection_kwargs.get("ssl")) or issubclass(pool.connection_class, redis.SSLConnection)


def sentinel_tracking(
    pool: redis.sentinel.SentinelConnectionPool, prefixes: Sequence[str], timeout: float, max_lag: float
) -> Callable[[], SentinelTracking]:
    """How the local tier makes the tracking of a cache on ``pool`` (sqlcache's own Sentinel pool).

    :raises ConfigurationError: a pool of replicas, TLS settings that make no context, or OCSP
        validation."""
    if not pool.is_master:
        raise ConfigurationError("the local tier watches a Sentinel service's primary, not its replicas")
    node = target_of(pool.connection_kwargs, _tls(pool), timeout)
    sentinels = [
        target_of(s.connection_pool.connection_kwargs, _tls(s.connection_pool), timeout)
        for s in pool.sentinel_manager.sentinels
    ]
    if not sentinels:
        raise ConfigurationError("the Sentinel pool names no sentinel")
    service = str(pool.service_name)
    # a round whose sentinels answer later than this could hardly count in time anyway
    deadline = min(timeout, max(0.01, max_lag / 2))
    return lambda: SentinelTracking(node, sentinels, service, prefixes, deadline)


def server_tracking(
    client: redis.Redis, prefixes: Sequence[str], timeout: float, max_lag: float
) -> Callable[[], Tracking | SentinelTracking]:
    """How the local tier makes the tracking of a cache on ``client`` (sqlcache's own client of one
    server, or of a Sentinel service's primary).

    :raises ConfigurationError: as :func:`sentinel_tracking` and
        :func:`~sqlcache._tracking.tracking_target`."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return sentinel_tracking(pool, prefixes, timeout, max_lag)
    target = tracking_target(client, timeout)
    return lambda: Tracking(target, prefixes)
