"""The store of the asyncio world: the protocol ``_protocol`` builds, carried over redis.asyncio.

The core is sync code, and under AsyncSession SQLAlchemy runs it inside a greenlet of its own: each
call here hands a coroutine to SQLAlchemy's ``await_`` (``_aio.await_``), which the event loop's task
that spawned the greenlet awaits before switching back with the result. So the event loop is never
blocked, no thread is involved, and every Redis step a promise depends on (the lock before COMMIT, the
release after it) is finished before the awaited ORM call returns, exactly as in the sync world.

redis.asyncio connections belong to the event loop that opened them: :class:`AsyncStores` keeps one
client (one pool) per loop. :class:`Worlds` is the store the core sees: per call, the asyncio store of
the running loop inside SQLAlchemy's greenlet, the sync store anywhere else (the journal's timer and
the listener threads; plain sync code). A durable relay of an asyncio engine runs in SQLAlchemy's
greenlet on a loop of its own, and so uses that loop's asyncio store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel

from . import _aio
from . import _protocol as proto
from ._aclient import quietly_closed
from ._astorelate import AsyncLateReplies
from ._health import Health
from ._pools import Wire
from ._protocol import ReadResult, SentLock
from ._scripts import LINEAGE_SOURCE, script_source
from ._settle import Owed
from .errors import CacheUnavailable

__all__ = ["AsyncRedisStore"]

T = TypeVar("T")

log = logging.getLogger("sqlcache")

_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)


class AsyncRedisStore(AsyncLateReplies):
    """The :class:`~sqlcache._protocol.Store` over a redis.asyncio client, for code running in
    SQLAlchemy's asyncio greenlet of one event loop. Shares ``health`` (breaker, restarts) with the
    cache's other stores."""

    def __init__(
        self,
        client: aredis.Redis,
        health: Health,
        node: str = "",
        shards: Callable[[], Sequence[int]] | None = None,
    ) -> None:
        self.client = client
        self.health = health
        self._node = node  # the cluster node it talks to ("" for a server of its own)
        # the shards whose lineage a new connection checks (those the node serves; None: the first)
        self._shards = shards
        self._timeout = float(client.connection_pool.connection_kwargs.get("socket_timeout") or 0)
        self._sources = {name: script_source(name) for name in proto.SCRIPTS}
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._sources.items()}
        self._loaded_epoch = -1
        self.closer: AsyncGenerator[None, None] | None = None  # see AsyncStores
        self._owe_nothing()
        client.connection_pool.connection_kwargs["redis_connect_func"] = self._on_connect

    @property
    def backing_off(self) -> bool:
        return self.health.backing_off

    def _call(self, operation: str, make: Callable[[], Awaitable[T]], shield: bool = False) -> T:
        """Run ``make()``'s coroutine on the event loop (the scripts loaded first if needed), through the
        breaker. The coroutine is made only once the breaker let the call through. ``shield``: a
        cancellation of the awaiting task does not stop the call (a release, once begun, finishes)."""
        health = self.health
        health.check(operation)
        if not _aio.in_async_greenlet():
            # e.g. a release reached from a garbage-collected AsyncConnection: nothing can be awaited
            # here; the caller treats it as an outage (the journal keeps the invalidation)
            raise CacheUnavailable(f"{operation} (outside the event loop)")
        started = time.monotonic()
        try:
            work: Awaitable[T] = self._run(make)
            if shield:
                work = asyncio.shield(work)
            result: T = _aio.await_(work)
        except _REDIS_ERRORS as exc:
            self._loaded_epoch = -1
            if self._stalled(exc, started):
                health.stalled()
            else:
                health.failed()
            raise CacheUnavailable(operation) from exc
        health.answered(operation)
        return result

    def _stalled(self, exc: BaseException, started: float) -> bool:
        """Whether a timeout came from a late event loop rather than from Redis: the loop ran nothing
        for a while (a CPU-bound handler, a blocking call), and the timeout fired when it woke, long after
        it was due, beside a reply that had arrived meanwhile. Such a call fails (the database answers it)
        without counting towards the breaker, which would otherwise skip a healthy Redis for up to
        ``max_backoff`` whenever the application is busiest."""
        timeout = self._timeout
        if not timeout or not isinstance(exc, (redis.TimeoutError, asyncio.TimeoutError)):
            return False
        return time.monotonic() - started > 2 * timeout

    async def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        if self._owed:
            await self.settle()
        if self._loaded_epoch != self.health.epoch:
            epoch = self.health.epoch
            async with self.client.pipeline(transaction=False) as pipe:
                for src in self._sources.values():
                    pipe.script_load(src)
                await pipe.execute()
            self._loaded_epoch = epoch
        return await make()

    def _eval(
        self, operation: str, script: str, keys: list[Any], args: list[Any], shield: bool = False
    ) -> Any:
        wait = self.health.wait if script == "release" else None
        if wait is None:
            return self._call(operation, lambda: self._script(script, keys, args), shield=shield)

        async def waited() -> Any:
            written, acked = await self._script(script, keys, args, wait)
            short = self.health.short_ack(acked)
            if short is not None:
                raise redis.RedisError(short)  # a failure for the breaker, like any outage
            return written

        return self._call(operation, waited, shield=shield)

    async def _on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        calls = self.health.lineage_calls((0,) if self._shards is None else self._shards())
        if not calls:
            await conn.send_command("INFO", "server")
            self.health.connected(await conn.read_response(), self._node)
            return
        # first on this connection: the run id, and a fence if the data is not this server's (each
        # shard it serves: one round trip for all)
        for call in calls:
            await conn.send_command("EVAL", LINEAGE_SOURCE, 4, *call)
        for _ in calls:
            self.health.lineage_checked(await conn.read_response(), self._node)

    # -- several commands on one connection, the reply read later (a sharded cluster's exchange) -----

    def sha(self, script: str) -> str:
        """The SHA1 EVALSHA runs ``script`` by."""
        return self._shas[script]

    async def send(self, commands: Sequence[Sequence[Any]]) -> Any:
        """As the sync store's: ``commands`` written on a pooled connection, replies left unread (the
        scripts loaded first if the server may have lost them); the connection, for :meth:`receive`."""
        if self._owed:
            await self.settle()  # the replies a sharded commit left: connections back in the pool
        if self._loaded_epoch != self.health.epoch:
            epoch = self.health.epoch
            async with self.client.pipeline(transaction=False) as pipe:
                for src in self._sources.values():
                    pipe.script_load(src)
                await pipe.execute()
            self._loaded_epoch = epoch
        conn = await self._connection()
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
        except BaseException:
            await self._discard(conn)
            raise
        return conn

    async def receive(self, conn: Any, count: int, keep: bool = False) -> list[Any]:
        """The next ``count`` replies on ``conn`` (an error reply as its ResponseError); the connection
        goes back to the pool unless ``keep`` (more replies are owed on it: :meth:`owe`)."""
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            await self._discard(conn)
            raise
        if not keep:
            await self._give_back(conn)
        if any(isinstance(r, redis.ResponseError) for r in replies):
            self._loaded_epoch = -1
        return replies

    async def drop(self, conn: Any) -> None:
        """Give up a connection whose replies will not be read."""
        await self._discard(conn)

    async def _connection(self) -> Any:
        return await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]

    async def _command(self, *args: Any, wait: tuple[int, int] | None = None) -> Any:
        """One command on a pooled connection, without the client's per-call machinery (as the sync
        store's MGET): errors leave the connection disconnected, as the client would. With ``wait``,
        WAIT follows on the same connection (it counts that connection's writes), and the reply is
        (the command's, WAIT's)."""
        conn = await self._connection()
        try:
            await Wire.asend(conn, *args)
            if wait is not None:
                await Wire.asend(conn, "WAIT", *wait)
            reply = await conn.read_response()
            if wait is not None:
                reply = (reply, await conn.read_response())
        except BaseException:
            await self._discard(conn)
            raise
        await self._give_back(conn)
        return reply

    async def _script(
        self, name: str, keys: Sequence[Any], args: Sequence[Any], wait: tuple[int, int] | None = None
    ) -> Any:
        try:
            return await self._command("EVALSHA", self._shas[name], len(keys), *keys, *args, wait=wait)
        except redis.exceptions.NoScriptError:
            # flushed or restarted since the scripts were loaded: EVAL sends and loads it at once
            return await self._command("EVAL", self._sources[name], len(keys), *keys, *args, wait=wait)

    # -- operations --------------------------------------------------------------------------------

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        keys = proto.read_keys(clock_key, entry_key, dep_keys)
        values: list[bytes | None] = self._call("read", lambda: self._command("MGET", *keys))
        return proto.judge_read(values, time.time)

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        keys, layout = proto.read_many_keys(clock_key, entries)
        values: list[bytes | None] = self._call("read", lambda: self._command("MGET", *keys))
        return proto.judge_read_many(values, layout, len(keys), time.time)

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        key = proto.fill_lock_key(entry_key)
        reply = self._call("lock", lambda: self._command("SET", key, token, "NX", "PX", ttl_ms))
        return reply is not None

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        """As the sync store's: the lock's bytes are written (and drained) before the COMMIT, its reply
        read with the release's after it, on the same connection."""
        keys, args = proto.lock_call(clock_key, lock_keys, (), token, lock_ttl_ms, gen_ttl_ms)

        sent: list[SentLock] = []

        async def run() -> SentLock:
            conn = await self._connection()
            try:
                await Wire.asend(conn, "EVALSHA", self._shas["lock"], len(keys), *keys, *args)
            except BaseException:
                await self._discard(conn)
                raise
            sent.append(SentLock(conn))
            return sent[0]

        try:
            return self._call("lock", run)
        except CacheUnavailable:
            if sent:  # sent, but its answer dropped (a restart noticed): nobody will read the reply
                _aio.await_(self._discard(sent[0].conn))
            raise

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """As the sync store's: the lock's reply is read before this returns, the release's is left for
        :meth:`settle` (run at the start of this store's next call, from :meth:`aclose`, or by a timer on
        the loop ``SETTLE_AFTER`` seconds later for a writer gone quiet), except where it must be read at
        once (no journal, a refused lock, a release of no key, ``wait_replicas``)."""
        keys, args = proto.release_call(clock_key, dep_keys, token, gen_ttl_ms, (), announce)
        conn = sent.conn
        wait = self.health.wait
        later = wait is None and self.health.on_release_lost is not None and bool(dep_keys)
        ran = False

        async def run() -> list[Any]:
            nonlocal ran
            ran = True
            try:
                # closed under the commit (a pool's disconnect()): the lock's reply is gone with it
                if not Wire.connected(conn):
                    raise redis.ConnectionError("the lock's connection was closed before its release")
                await Wire.asend(conn, "EVALSHA", self._shas["release"], len(keys), *keys, *args)
                if wait is not None:
                    await Wire.asend(conn, "WAIT", *wait)
                replies: list[Any] = []
                for i in range(2 if wait is None else 3):
                    try:
                        replies.append(await conn.read_response())
                    except redis.ResponseError as exc:  # e.g. NOSCRIPT after a Redis restart
                        replies.append(exc)
                    if i == 0 and later and not isinstance(replies[0], redis.ResponseError):
                        owed = Owed(
                            conn,
                            os.getpid(),
                            time.monotonic(),
                            clock_key,
                            dep_keys,
                            token,
                            gen_ttl_ms,
                            announce,
                        )
                        self._owed.append(owed)  # the release's reply: read by settle()
                        self._settle_later()
                        return [replies[0], None]
            except BaseException:
                await self._discard(conn)
                raise
            await self._give_back(conn)
            if wait is not None and not isinstance(replies[1], redis.ResponseError):
                short = self.health.short_ack(replies[2])
                if short is not None:
                    raise redis.RedisError(short)
            return replies

        try:
            lock_reply, release_reply, *_ = self._call("release", run, shield=True)
        except CacheUnavailable:
            if not ran and _aio.in_async_greenlet():  # refused before run(): the lock's connection
                _aio.await_(self._discard(conn))  # still waits for its reply; not left checked out
            raise
        if isinstance(release_reply, redis.ResponseError):
            self._loaded_epoch = -1
            self.release(clock_key, dep_keys, token, gen_ttl_ms, announce=announce)
        return not isinstance(lock_reply, redis.ResponseError)

    def delete(self, *keys: str) -> None:
        self._call("delete", lambda: self._command("DEL", *keys))

    def delete_matching(self, pattern: str, batch: int = 500) -> int:
        async def run() -> int:
            removed = 0
            chunk: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=batch):
                if key.endswith(b":layout") and key.count(b":") == 1:
                    continue  # the layout's claim (RedisStore.delete_matching)
                chunk.append(key)
                if len(chunk) >= batch:
                    removed += int(await self.client.unlink(*chunk))
                    chunk = []
            if chunk:
                removed += int(await self.client.unlink(*chunk))
            return removed

        return self._call("clear", run)

    def pause(self, seconds: float) -> None:
        """Wait without blocking the event loop (the stampede wait)."""
        _aio.await_(asyncio.sleep(seconds))

    async def disconnect(self) -> None:
        """Close every pooled connection (the next call opens, and checks, a new one), once the replies
        owed on them are read."""
        async with self._settling:  # and none is being read meanwhile
            await self._settle_owed()
            await quietly_closed(self.client.connection_pool.disconnect())

    async def aclose(self) -> None:
        """Close the store's connections, once the replies owed on them are read."""
        async with self._settling:  # and none is being read meanwhile
            await self._settle_owed()
            if self._due is not None:
                self._due.cancel()
                self._due = None
            await quietly_closed(self.client.aclose())
            pool = self.client.connection_pool
            await quietly_closed(pool.disconnect())
        if isinstance(pool, asentinel.SentinelConnectionPool):  # and the connections to the sentinels
            for watcher in pool.sentinel_manager.sentinels:
                await quietly_closed(watcher.aclose())
