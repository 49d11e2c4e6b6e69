"""The store's straight-on-the-socket commands (``_pools.Wire``): the same bytes and replies as
redis-py's own methods, error replies raised with the connection left in step, failures that leave the
pool whole, and redis-py's methods kept for connection classes that change them (Sentinel)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.sentinel

from sqlcache import SQLCache
from sqlcache._pools import Wire, client_for
from sqlcache._store import RedisStore
from sqlcache.errors import CacheUnavailable

from ..conftest import RedisServer


def _pooled(url: str) -> tuple[redis.Redis, Wire]:
    return client_for(url, 2.0), Wire()


class _Counting(redis.Connection):
    sent: list[object] = []
    read: int = 0

    def send_command(self, *args: object, **kwargs: object) -> None:
        _Counting.sent.append(args[0])
        super().send_command(*args, **kwargs)

    def read_response(self, *args: object, **kwargs: object) -> object:
        _Counting.read += 1
        return super().read_response(*args, **kwargs)


def test_a_connection_class_of_its_own_is_used_as_it_is(redis_url: str) -> None:
    """A caller's connection class that changes how commands are sent or read (one that counts, or
    Sentinel's, which turns READONLY into a failover) is never bypassed; redis-py's own classes are."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_Counting)
    wire = Wire()
    conn = pool.get_connection()
    try:
        _Counting.sent, _Counting.read = [], 0
        wire.send(conn, "PING")
        assert wire.read(conn) == b"PONG"
        assert (_Counting.sent, _Counting.read) == (["PING"], 1)
    finally:
        pool.release(conn)
        pool.disconnect()
    # what the raw path reads of a connection (redis-py private names: an upgrade that moves them fails
    # here, and Wire would fall back to the connection's own methods)
    probe = redis.ConnectionPool.from_url(redis_url)
    live = probe.get_connection()
    try:
        assert live._sock is not None and hasattr(live._parser, "read_response")
    finally:
        probe.release(live)
        probe.disconnect()
    for cls in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection):
        assert cls.send_command is redis.connection.AbstractConnection.send_command
        assert cls.read_response is redis.connection.AbstractConnection.read_response
    assert (
        redis.sentinel.SentinelManagedConnection.read_response
        is not redis.connection.AbstractConnection.read_response
    )


def test_replies_match_redis_py(redis_url: str, redis_client: redis.Redis) -> None:
    prefix = f"wire-{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}:é:{i}" for i in range(5)] + [f"{prefix}:missing"]
    values = [b"\x00\xff\r\n", b"", "ß".encode(), b"x" * 70_000, b"$3\r\nfoo"]
    for k, v in zip(keys, values, strict=False):
        redis_client.set(k, v)
    client, wire = _pooled(redis_url)
    try:
        conn = client.connection_pool.get_connection()
        try:
            wire.send(conn, "MGET", *keys)
            assert wire.read(conn) == [*values, None]
            wire.send(conn, "SET", f"{prefix}:n", 12, "PX", 60_000)  # ints packed as redis-py packs them
            assert wire.read(conn) == b"OK"
            assert redis_client.get(f"{prefix}:n") == b"12"
            # an argument hiredis does not pack is packed by redis-py
            wire.send(conn, "SET", f"{prefix}:m", memoryview(b"mv"))
            assert wire.read(conn) == b"OK"
            assert redis_client.get(f"{prefix}:m") == b"mv"
        finally:
            client.connection_pool.release(conn)
    finally:
        redis_client.delete(*keys, f"{prefix}:n", f"{prefix}:m")
        client.close()


def test_error_reply_raised_and_connection_in_step(redis_url: str, redis_client: redis.Redis) -> None:
    key = f"wire-{uuid.uuid4().hex[:8]}"
    redis_client.set(key, b"v", px=60_000)
    client, wire = _pooled(redis_url)
    try:
        conn = client.connection_pool.get_connection()
        try:
            wire.send(conn, "EVALSHA", "0" * 40, 0)
            wire.send(conn, "GET", key)
            with pytest.raises(redis.exceptions.NoScriptError):
                wire.read(conn)
            assert wire.read(conn) == b"v"  # the reply after the error is the next command's
        finally:
            client.connection_pool.release(conn)
    finally:
        redis_client.delete(key)
        client.close()


def test_a_connection_lost_mid_read_is_an_outage_and_leaves_the_pool_whole(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that never comes (the server's end closed after the command was written): the read is
    an outage (the database answers), the connection is dropped, not returned in a state where its next
    user would read this reply; the next read works on a fresh connection."""
    cache = SQLCache(private_redis.url, prefix=f"wire-{uuid.uuid4().hex[:8]}")
    try:
        store = cache._parts.store
        assert isinstance(store, RedisStore)
        pool = store.client.connection_pool
        key = f"{cache.config.prefix}:k"
        store.client.set(key, b"v")
        used: list[Any] = []
        original = Wire.send

        def send_then_cut(c: Any, *args: object) -> None:
            original(c, *args)
            used.append(c)
            c._sock.shutdown(socket.SHUT_RD)  # our end: EOF on the read

        monkeypatch.setattr(Wire, "send", staticmethod(send_then_cut))
        with pytest.raises(CacheUnavailable):
            store.read(f"{cache.config.prefix}:clock", key, [])
        assert not pool._in_use_connections
        assert len(used) == 1 and used[0]._sock is None  # disconnected, not kept
        monkeypatch.undo()
        store.health.retry_now()
        store.read(f"{cache.config.prefix}:clock", key, [])  # answered: no CacheUnavailable
        assert not pool._in_use_connections
    finally:
        cache.close()


def test_async_commands_packed_by_hiredis_answer_as_redis_pys(redis_url: str) -> None:
    """``Wire.asend``: the bytes hiredis packs, written by the connection's own method; a connection
    class whose ``send_command`` was changed (one that counts) is used as it is."""
    key = f"wire-{uuid.uuid4().hex[:8]}"
    sent: list[object] = []

    class Counting(redis.asyncio.Connection):
        async def send_command(self, *args: object, **kwargs: object) -> None:
            sent.append(args[0])
            await super().send_command(*args, **kwargs)

    async def body() -> None:
        for cls, counted in ((redis.asyncio.Connection, []), (Counting, ["SET", "MGET"])):
            pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=cls)
            conn = await pool.get_connection()
            try:
                sent.clear()
                await Wire.asend(conn, "SET", key, "é", "PX", 60_000)
                assert await conn.read_response() == b"OK"
                await Wire.asend(conn, "MGET", key, f"{key}:missing")
                assert await conn.read_response() == ["é".encode(), None]
                assert sent == counted
            finally:
                await pool.release(conn)
                await pool.disconnect()

    asyncio.run(body())
    redis.Redis.from_url(redis_url).delete(key)


def test_a_failed_write_is_redis_pys_connection_error_naming_the_server(private_redis: RedisServer) -> None:
    """What the caller catches, and what a ``cache_error`` receiver finds as the cause: redis-py's own
    error, with the server in its message, as redis-py's methods raise it."""
    client, wire = _pooled(private_redis.url)
    conn = client.connection_pool.get_connection()
    try:
        conn._sock.shutdown(socket.SHUT_WR)  # the write side closed under the connection
        with pytest.raises(redis.ConnectionError, match=f"127.0.0.1:{private_redis.port}"):
            wire.send(conn, "PING")
    finally:
        conn.disconnect()
        client.connection_pool.release(conn)
        client.close()


def test_an_async_command_larger_than_the_socket_takes_is_written_whole(redis_url: str) -> None:
    """``Wire.asend`` hands a command to the stream writer without redis-py's per-write task; one the
    transport cannot send at once (8 MiB) waits for the socket, and arrives whole."""
    key = f"wire-{uuid.uuid4().hex[:8]}"
    value = bytes(range(256)) * (32 << 10)

    async def body() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_url, socket_timeout=10)
        conn = await pool.get_connection()
        try:
            await Wire.asend(conn, "SET", key, value, "PX", 60_000)
            assert await conn.read_response() == b"OK"
            await Wire.asend(conn, "STRLEN", key)
            assert await conn.read_response() == len(value)
        finally:
            await pool.release(conn)
            await pool.disconnect()

    asyncio.run(body())
    redis.Redis.from_url(redis_url).delete(key)


def test_an_async_write_on_a_lost_connection_is_redis_pys_connection_error(
    private_redis: RedisServer,
) -> None:
    """The server closed the connection (CLIENT KILL of a private server): an asyncio transport drops
    writes to a lost connection without raising, so ``Wire.asend`` must find out itself. Writing
    again (replies unread) soon raises redis-py's ConnectionError naming the server, and leaves the
    connection disconnected."""

    async def body() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(private_redis.url, socket_timeout=2)
        conn = await pool.get_connection()
        killer = redis.Redis(port=private_redis.port)
        try:
            await Wire.asend(conn, "CLIENT", "ID")
            cid = await conn.read_response()
            killer.client_kill_filter(_id=cid)
            deadline = time.monotonic() + 10
            with pytest.raises(redis.ConnectionError, match=f"127.0.0.1:{private_redis.port}"):
                while time.monotonic() < deadline:  # the first writes may still reach the socket
                    await Wire.asend(conn, "PING")
                    await asyncio.sleep(0.01)  # the loop's turn: it learns of the loss
            assert time.monotonic() < deadline, "writes to a lost connection never failed"
            assert not conn.is_connected
        finally:
            killer.close()
            await conn.disconnect()
            await pool.release(conn)
            await pool.disconnect()

    asyncio.run(body())


def test_a_release_never_goes_out_on_a_connection_made_after_its_lock(private_redis: RedisServer) -> None:
    """The pool was disconnected between a commit's lock and its release (a cluster's topology change
    closes a node's connections in use too): redis-py would reconnect and send the release on a new
    connection, reading its reply as the lock's. The release fails instead, as an outage (journalled
    by the caller)."""
    from sqlcache._health import Health

    store = RedisStore(client_for(private_redis.url, 2.0), Health())
    try:
        key = f"wire-{uuid.uuid4().hex[:8]}"
        sent = store.send_lock("clock", [key], "tok", 10_000, 60_000)
        store.client.connection_pool.disconnect()
        other = redis.Redis(port=private_redis.port)
        deadline = time.monotonic() + 10
        while (locked := other.get(key)) is None:  # the lock's bytes were on their way: Redis ran it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(CacheUnavailable):
            store.release_after(sent, "clock", [key], "tok", 60_000)
        assert other.get(key) == locked  # the release never ran: the lock stands (journalled by the caller)
        other.close()
    finally:
        store.client.close()


def test_the_lean_asyncio_pool_never_hands_out_a_connection_out_of_step(private_redis: RedisServer) -> None:
    """``AsyncLeanPool`` skips redis-py's metrics, not its checkout check: a connection given back
    with a reply unread, or closed by the server, is connected again before its next use, and
    answers its own command."""
    from sqlcache._pools import AsyncLeanPool

    async def body() -> None:
        pool = AsyncLeanPool.from_url(private_redis.url, socket_timeout=2)
        killer = redis.Redis(port=private_redis.port)
        try:
            conn = await pool.get_connection()
            await Wire.asend(conn, "ECHO", "stale")  # its reply left unread (a bug this check catches)
            deadline = time.monotonic() + 10
            while not conn._reader._buffer:  # the reply reached the connection's reader
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await pool.release(conn)
            conn = await pool.get_connection()
            await Wire.asend(conn, "ECHO", "fresh")
            assert await conn.read_response() == b"fresh"
            await Wire.asend(conn, "CLIENT", "ID")
            killer.client_kill_filter(_id=await conn.read_response())
            await pool.release(conn)
            while not conn._reader.at_eof():  # the loop saw the server close it
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            conn = await pool.get_connection()
            await Wire.asend(conn, "PING")
            assert await conn.read_response() in (b"PONG", True)
            await pool.release(conn)
        finally:
            killer.close()
            await pool.disconnect()

    asyncio.run(body())
