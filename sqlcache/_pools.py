"""How sqlcache connects to one Redis server: its own client and pool built from the user's URL or
client (their server and credentials, our timeouts), the lean pools its hot paths check connections
out of (sync and asyncio), commands written straight on the socket (``Wire``), a pub/sub subscription
whose failures are outages, and passwords kept out of messages. The stores use them."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import socket
import weakref
from collections.abc import Callable
from typing import Any

import hiredis
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
import redis.sentinel

from .errors import CacheUnavailable, ConfigurationError

__all__ = [
    "KEPT_CONNECTION_KWARGS",
    "AsyncLeanPool",
    "LeanPool",
    "OpenSockets",
    "Subscription",
    "Wire",
    "client_for",
    "connect_hook",
    "hide_password",
]


def client_for(target: redis.Redis | redis.asyncio.Redis | str, timeout: float) -> redis.Redis:
    """A client of sqlcache's own (bounded timeouts, no retries, bytes responses, its own pool) that
    reaches the server of ``target``: a URL, or a client of the caller's (sync or asyncio), which is
    never changed. The asyncio world's clients are made from this one (``_astore``).

    Options a URL or the caller's client carries that the protocol cannot live with (long timeouts,
    retries, ``decode_responses``) are overridden; the server, credentials and TLS settings are kept.

    :raises ConfigurationError: a URL redis-py cannot read (the password is not echoed), or a client
        whose pool sqlcache cannot rebuild.
    """
    if isinstance(target, str):
        try:
            source = redis.ConnectionPool.from_url(target)
        except ValueError as exc:
            message = hide_password(str(exc))
            raise ConfigurationError(f"invalid Redis URL {hide_password(target)!r}: {message}") from None
    elif isinstance(target, redis.Redis):
        source = target.connection_pool
    elif isinstance(target, redis.asyncio.Redis):
        source = _sync_pool_like(target.connection_pool)
    else:
        raise ConfigurationError(
            f"expected a redis.Redis or redis.asyncio.Redis client or a URL, got {target!r}"
        )
    return redis.Redis(connection_pool=_own_pool(source, timeout))


class LeanPool(redis.ConnectionPool):
    """sqlcache's own pool to one server (or one cluster node): redis-py's ``ConnectionPool`` with a
    leaner checkout and release. redis-py 8 records metrics and dispatches events at each (about 9 µs of
    a small hit); what a checkout must do is kept: a connection with data or an EOF waiting (closed by
    the server, say) is connected again before use, a release of a connection not checked out is
    ignored, and a forked child never uses its parent's connections (``_checkpid``)."""

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        self._checkpid()
        with self._lock:
            try:
                conn = self._available_connections.pop()
            except IndexError:
                conn = self.make_connection()
            self._in_use_connections.add(conn)
        try:
            conn.connect()
            try:
                if conn.can_read():
                    raise redis.ConnectionError("the connection has data")
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()
                conn.connect()
                if conn.can_read():
                    raise redis.ConnectionError("the connection is not ready") from None
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, connection: Any) -> None:
        self._checkpid()
        with self._lock:
            try:
                self._in_use_connections.remove(connection)
            except KeyError:
                return  # not checked out here, or released already: as redis-py, nothing happens
            if connection.pid != self.pid:  # checked out before a fork: the parent's socket
                return
            should_reconnect = getattr(connection, "should_reconnect", None)
            if should_reconnect is not None and should_reconnect():  # redis-py 8's maintenance events
                connection.disconnect()
            self._available_connections.append(connection)


class AsyncLeanPool(redis.asyncio.ConnectionPool):
    """The asyncio twin of :class:`LeanPool`, for sqlcache's own asyncio pools: redis-py 8 records
    metrics and dispatches events at each checkout and release, under a lock (measured: 28 µs a
    checkout and release, against 11 µs here). What a checkout must do is kept: a connection with data
    or an end waiting (closed by the server, say) is connected again before use, with redis-py's own
    check. No lock: nothing is awaited between taking a connection and marking it in use, and a pool
    belongs to one event loop. The release is redis-py's own where it is not a coroutine (before
    redis-py 5.1), whose client calls it without awaiting."""

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        try:
            conn = self._available_connections.pop()
        except IndexError:
            if len(self._in_use_connections) >= self.max_connections:
                raise redis.ConnectionError("Too many connections") from None
            conn = self.make_connection()  # type: ignore[no-untyped-call, unused-ignore]
        self._in_use_connections.add(conn)
        # redis-py 8's name for the check; before, can_read_destructive (deprecated since)
        check = conn.can_read if hasattr(conn, "can_read") else conn.can_read_destructive
        try:
            await conn.connect()  # type: ignore[no-untyped-call, unused-ignore]
            try:
                if await check():
                    raise redis.ConnectionError("the connection has data")
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                await conn.disconnect()
                await conn.connect()  # type: ignore[no-untyped-call, unused-ignore]
                if await check():
                    raise redis.ConnectionError("the connection is not ready") from None
        except BaseException:
            self._in_use_connections.discard(conn)
            self._available_connections.append(conn)
            raise
        return conn

    if inspect.iscoroutinefunction(redis.asyncio.ConnectionPool.release):

        async def release(self, connection: Any) -> None:
            try:
                self._in_use_connections.remove(connection)
            except KeyError:
                return  # not checked out here, or released already: as redis-py, nothing happens
            should_reconnect = getattr(connection, "should_reconnect", None)
            try:
                if should_reconnect is not None and should_reconnect():  # redis-py 8's maintenance events
                    await connection.disconnect()
            finally:
                self._available_connections.append(connection)


class OpenSockets:
    """The sockets of the connections one store opened, and nothing else (not the pool, whose settings
    may hold the caller's objects, nor the store): what a cache dropped without close() closes when it
    is collected, before the collector would finalise each socket itself (a ResourceWarning each,
    wherever it runs). Closed ones are dropped as new ones come. No lock (a forked child must not meet
    one held): a set's add, discard and pop are atomic."""

    __slots__ = ("_socks",)

    def __init__(self) -> None:
        self._socks: set[tuple[socket.socket, int]] = set()  # each with the process that opened it

    def add(self, conn: Any) -> None:
        """Note the socket of ``conn``, a redis-py connection just connected."""
        sock: socket.socket = conn._sock
        for old in list(self._socks):
            if old[0].fileno() == -1:
                self._socks.discard(old)
        self._socks.add((sock, os.getpid()))

    def close(self) -> None:
        """Shut each socket down and close it, as redis-py's ``disconnect()`` does; one inherited from a
        parent process is only closed here (the parent's connection stays open)."""
        pid = os.getpid()
        while True:
            try:
                sock, opener = self._socks.pop()
            except KeyError:
                return
            try:
                if opener == pid:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


def connect_hook(on_connect: Callable[[Any], None], sockets: OpenSockets) -> Callable[[Any], None]:
    """A pool's connect hook: each new connection's socket noted in ``sockets``, then ``on_connect``
    (a store's bound method) run on it. Its object is held weakly, since a pool's settings must not
    keep the cache alive; once it is gone, a connection connects as redis-py does."""
    ref = weakref.WeakMethod(on_connect)

    def hook(conn: Any) -> None:
        sockets.add(conn)
        live = ref()
        if live is None:
            conn.on_connect()
        else:
            live(conn)

    return hook


class Subscription:
    """A pub/sub subscription whose failures arrive as CacheUnavailable (from the redis-py error)."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        try:
            self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
            self._pubsub.subscribe(channel)
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailable("listen") from exc

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            message: dict[str, Any] | None = self._pubsub.get_message(timeout=timeout)
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailable("listen") from exc
        return message

    def close(self) -> None:
        try:
            self._pubsub.close()
        except (redis.RedisError, OSError):
            pass


# hiredis packs a command in C (redis-py's own packer costs about 4 µs of a small hit); before hiredis
# 2.2 it could not, and redis-py packs
_PACK: Any = getattr(hiredis, "pack_command", None)


# redis-py's own methods as they were when sqlcache was imported: a class that overrides them, or a
# patch of redis-py's classes made later (a test that counts commands), is not bypassed
_SEND = redis.connection.AbstractConnection.send_command
_SEND_PACKED = redis.connection.AbstractConnection.send_packed_command
_READ = redis.connection.AbstractConnection.read_response
_ASEND = redis.asyncio.connection.AbstractConnection.send_command
_ASEND_PACKED = redis.asyncio.connection.AbstractConnection.send_packed_command


class Wire:
    """A command written and its reply read straight on a checked-out connection, without the
    connection's per-call machinery (health checks it is not configured for, debug logging, a packer
    that inspects every argument): about 10 µs of a small hit.

    Only where the connection's class has redis-py's own ``send_command``, ``send_packed_command`` and
    ``read_response`` (checked at each call, so that a class changed later is honoured too): a
    Sentinel-managed connection turns READONLY into a failover, and a caller's connection class may
    count or trace commands; those go through the connection's methods. A failed write or read raises
    what those methods raise (``redis.ConnectionError`` / ``redis.TimeoutError``, naming the server);
    the rest of what they do on an error is the caller's, as every caller here does: a connection that
    failed is disconnected and released (``RedisStore._discard``). An error reply is raised as its
    ``ResponseError`` and leaves the connection in step, as ``read_response`` does.

    redis-py's private names used: a connection's ``_sock`` and ``_parser`` (redis-py 5 to 8; if an
    upgrade moves them, the connection's own methods are used, and tests/integration/test_wire.py
    fails)."""

    @staticmethod
    def send(conn: Any, *args: Any) -> None:
        """Write one command (``conn`` was checked out of a pool: it is connected)."""
        cls = type(conn)
        sock = getattr(conn, "_sock", None)
        if (
            _PACK is None
            or sock is None
            or cls.send_command is not _SEND
            or cls.send_packed_command is not _SEND_PACKED
        ):
            conn.send_command(*args)
            return
        try:
            packed = _PACK(args)
        except TypeError:  # an argument hiredis does not pack (a memoryview): redis-py's way
            conn.send_command(*args)
            return
        try:
            sock.sendall(packed)
        except TimeoutError as exc:
            raise redis.TimeoutError(f"Timeout writing to {_server(conn)}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while writing to {_server(conn)}: {exc}") from exc

    @staticmethod
    def read(conn: Any) -> Any:
        """The next reply on ``conn``; an error reply raised as its ``ResponseError``."""
        parser = getattr(conn, "_parser", None)
        if parser is None or type(conn).read_response is not _READ:
            return conn.read_response()
        try:
            reply = parser.read_response()
        except TimeoutError as exc:  # the parsers raise redis-py's own errors; a bare socket's too
            raise redis.TimeoutError(f"Timeout reading from {_server(conn)}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from {_server(conn)}: {exc}") from exc
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    @staticmethod
    def connected(conn: Any) -> bool:
        """Whether ``conn`` still has the socket it was checked out with: a pool's ``disconnect()``
        closes connections in use too, and redis-py's methods would then reconnect on their own (a
        release meant for its lock's connection must not go out on another)."""
        if hasattr(conn, "_sock"):
            return conn._sock is not None
        if hasattr(conn, "_writer"):
            return conn._writer is not None
        return True

    @staticmethod
    async def asend(conn: Any, *args: Any) -> None:
        """:meth:`send` on an asyncio connection: packed by hiredis and handed to the connection's
        stream writer. redis-py's ``send_packed_command`` bounds every write by ``asyncio.wait_for``,
        a task of its own and two turns of the event loop (measured: 70 µs of a 100 µs write). A small
        command leaves the transport's buffer below its low-water mark, and nothing waits; past it,
        the wait for the buffer to drain (to that mark) is bounded by the connection's timeout. A
        connection lost or closing raises ``redis.ConnectionError`` and is disconnected, as redis-py's
        method does. A connection class of the caller's, or one without a stream writer, is written
        by its own method.

        redis-py's private name used: an asyncio connection's ``_writer`` (redis-py 5 to 8)."""
        cls = type(conn)
        writer = getattr(conn, "_writer", None)
        if (
            _PACK is None
            or writer is None
            or cls.send_command is not _ASEND
            or cls.send_packed_command is not _ASEND_PACKED
        ):
            await conn.send_command(*args)
            return
        try:
            packed = _PACK(args)
        except TypeError:  # an argument hiredis does not pack: redis-py's way
            await conn.send_command(*args)
            return
        transport = writer.transport
        try:
            try:
                if transport.is_closing():  # a write now would be dropped without a word
                    raise ConnectionResetError("the connection is closing")
                writer.write(packed)
                low = transport.get_write_buffer_limits()[0]
                if conn.socket_timeout and transport.get_write_buffer_size() > low:
                    try:
                        await asyncio.wait_for(writer.drain(), conn.socket_timeout)
                    except asyncio.TimeoutError as exc:
                        if getattr(exc, "errno", None) is not None:  # the OS's ETIMEDOUT: a dead connection
                            raise
                        raise redis.TimeoutError(f"Timeout writing to {_server(conn)}") from exc
                else:
                    await writer.drain()  # returns at once; raises if the connection was lost
            except OSError as exc:
                raise redis.ConnectionError(f"Error while writing to {_server(conn)}: {exc}") from exc
        except BaseException:
            try:
                await conn.disconnect(nowait=True)
            except Exception:  # closing a broken connection: its own failure is not the caller's
                pass
            raise


def _server(conn: Any) -> str:
    """The server a connection talks to, for an error's message (never its credentials)."""
    kwargs = (conn.host, conn.port) if hasattr(conn, "host") else (getattr(conn, "path", "?"),)
    return ":".join(str(k) for k in kwargs)


def _own_pool(pool: redis.ConnectionPool, timeout: float) -> redis.ConnectionPool:
    """A new pool to ``pool``'s server: its identity and credentials, our timeouts and decoding.

    Never the caller's pool itself: sqlcache sets a connect hook on its pool (restart detection), and
    two caches on one client would otherwise overwrite each other's, and change the caller's client."""
    kept = {
        k: v for k, v in pool.connection_kwargs.items() if k in KEPT_CONNECTION_KWARGS or k.startswith("ssl_")
    }
    kept.update(socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        kept.pop("connection_pool", None)
        return redis.sentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            pool.sentinel_manager,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            connection_class=pool.connection_class,
            **kept,
        )
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool, LeanPool):
        raise ConfigurationError(
            f"cannot build a pool of sqlcache's own like {type(pool).__name__}: pass a URL, or a "
            "redis.Redis over a ConnectionPool, a BlockingConnectionPool or a Sentinel pool"
        )
    return LeanPool(connection_class=pool.connection_class, **kept)


# the sync twin of each asyncio connection class redis-py builds from a URL
_SYNC_TWINS: dict[type[Any], type[Any]] = {
    redis.asyncio.connection.Connection: redis.Connection,
    redis.asyncio.connection.SSLConnection: redis.SSLConnection,
    redis.asyncio.connection.UnixDomainSocketConnection: redis.UnixDomainSocketConnection,
}


def _sync_pool_like(pool: redis.asyncio.ConnectionPool) -> redis.ConnectionPool:
    """A sync pool to the server of a caller's asyncio pool (its kwargs; nothing is connected)."""
    twin = _SYNC_TWINS.get(pool.connection_class)
    if twin is None:
        raise ConfigurationError(
            f"cannot build a sync connection like {pool.connection_class.__name__}: pass a URL, or a "
            "redis.asyncio.Redis over a plain, TLS or Unix-socket connection pool"
        )
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "redis_connect_func"}
    return redis.ConnectionPool(connection_class=twin, **kwargs)


# up to the last '@' of the netloc (urlparse's reading: a password may hold an unescaped '@')
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^/?#\s]*@", re.I)
# redis-py also reads ?password= (the only place for it in its unix:// syntax)
_PASSWORD_IN_QUERY = re.compile(r"(?P<head>[?&]password=)[^&#\s]*", re.I)


def hide_password(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    text = _PASSWORD_IN_URL.sub(lambda m: m.group("head") + "***@", text)
    return _PASSWORD_IN_QUERY.sub(lambda m: m.group("head") + "***", text)


# What identifies the server and the credentials; everything else (retries, decoding, timeouts) is ours.
KEPT_CONNECTION_KWARGS = frozenset(
    {
        "host",
        "port",
        "db",
        "username",
        "password",
        "path",
        "client_name",
        "credential_provider",
        "socket_keepalive",
        "socket_keepalive_options",
        "protocol",
    }
)
