"""sqlcache's redis.asyncio clients: how one is built, the asyncio twin of a sync client of sqlcache's
own (the same server, credentials and TLS settings, or the same sentinels and service; bounded timeouts,
no retries), and how connections are closed without raising."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.connection as aconnection
import redis.asyncio.sentinel as asentinel
import redis.sentinel

from ._pools import AsyncLeanPool
from ._store import KEPT_CONNECTION_KWARGS
from .errors import ConfigurationError

__all__ = ["async_client_like", "quietly_closed"]

# the asyncio twin of each sync connection class redis-py builds from a URL or a client
_TWINS: dict[type[Any], type[Any]] = {
    redis.Connection: aconnection.Connection,
    redis.SSLConnection: aconnection.SSLConnection,
    redis.UnixDomainSocketConnection: aconnection.UnixDomainSocketConnection,
}


def _async_kwargs(kwargs: dict[str, Any], twin: type[Any], timeout: float) -> dict[str, Any]:
    """The connection settings sqlcache keeps (identity, credentials, TLS) that ``twin`` accepts, with
    bounded timeouts and no retries."""
    accepted = set(inspect.signature(twin.__init__).parameters) | set(
        inspect.signature(aconnection.AbstractConnection.__init__).parameters
    )
    kept = {
        k: v
        for k, v in kwargs.items()
        if (k in KEPT_CONNECTION_KWARGS or k.startswith("ssl_")) and k in accepted
    }
    kept.update(socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)
    return kept


def async_client_like(sync_client: redis.Redis, timeout: float) -> aredis.Redis:
    """A redis.asyncio client of sqlcache's own to the server ``sync_client`` (sqlcache's own) reaches:
    the same server, credentials and TLS settings; bounded timeouts, no retries, bytes responses. A
    Sentinel-managed client gets the asyncio twin: the same sentinels and service, the primary asked
    of them by each new connection.

    :raises ConfigurationError: a connection class with no asyncio twin (a custom class).
    """
    pool = sync_client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return _async_sentinel_client(pool, timeout)
    twin = _TWINS.get(pool.connection_class)
    if twin is None:
        raise ConfigurationError(
            f"an AsyncEngine needs a redis.asyncio connection like {pool.connection_class.__name__}, "
            "which sqlcache cannot build: pass a redis:// or rediss:// URL, or a plain redis.Redis"
        )
    kept = _async_kwargs(pool.connection_kwargs, twin, timeout)
    return aredis.Redis(connection_pool=AsyncLeanPool(connection_class=twin, **kept))


def _async_sentinel_client(pool: redis.sentinel.SentinelConnectionPool, timeout: float) -> aredis.Redis:
    manager = pool.sentinel_manager
    sentinels = [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in manager.sentinels
    ]
    twin = asentinel.SentinelManagedConnection
    kept = _async_kwargs(pool.connection_kwargs, twin, timeout)
    if pool.connection_kwargs.get("ssl") or issubclass(pool.connection_class, redis.SSLConnection):
        kept["ssl"] = True
    watchers = _async_kwargs(dict(manager.sentinel_kwargs), aconnection.Connection, timeout)
    if manager.sentinel_kwargs.get("ssl"):
        watchers["ssl"] = True
    asent = asentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
        sentinels, min_other_sentinels=manager.min_other_sentinels, sentinel_kwargs=watchers
    )
    client: aredis.Redis = asent.master_for(pool.service_name, **kept)
    return client


async def quietly_closed(closing: Awaitable[Any]) -> None:
    """Await a close of connections, whose failure is not the caller's: redis-py closes each socket's
    transport first, then waits for the close to finish for at most the connect timeout, and raises
    when a busy event loop or server made it wait longer (or the peer was gone); the sockets are
    closed either way, and every connection of a pool was asked to close."""
    try:
        await closing
    except (redis.RedisError, OSError):
        pass
