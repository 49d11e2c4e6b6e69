"""The only module that talks to Redis: carries the calls ``_protocol`` builds to a redis-py client,
hands the replies back to ``_protocol`` to judge, and translates redis-py exceptions."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.sentinel

from . import _protocol as proto
from . import _settle
from ._health import Health
from ._keys import Layout
from ._pools import (
    KEPT_CONNECTION_KWARGS,
    LeanPool,
    OpenSockets,
    Subscription,
    Wire,
    client_for,
    connect_hook,
    hide_password,
)
from ._protocol import ReadResult, SentLock
from ._scripts import LINEAGE_SOURCE, script_source
from ._settle import Owed
from ._storelate import LateReplies
from .errors import CacheUnavailable

__all__ = [
    "KEPT_CONNECTION_KWARGS",
    "LeanPool",
    "RedisStore",
    "SentRead",
    "client_for",
    "hide_password",
]

T = TypeVar("T")

log = logging.getLogger("sqlcache")

# Errors that mean "Redis cannot serve us right now". A ResponseError from a script (OOM, READONLY
# replica, BUSY) is an outage too as far as callers are concerned: the database answers instead.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


class RedisStore(LateReplies):
    """The :class:`~sqlcache._protocol.Store` over a sync redis-py client: one Lua script per
    operation; turns every Redis failure into CacheUnavailable, and skips Redis while ``health`` backs
    off (shared with the cache's other stores)."""

    def __init__(
        self,
        client: redis.Redis,
        health: Health,
        node: str = "",
        shards: Callable[[], Sequence[int]] | None = None,
    ) -> None:
        self.client = client
        self.health = health
        self._node = node  # the cluster node it talks to ("" for a server of its own)
        # the shards whose lineage a new connection checks (those the node serves; None: the first)
        self._shards = shards
        self._scripts = {name: client.register_script(script_source(name)) for name in proto.SCRIPTS}
        self._loaded_epoch = -1  # health.epoch when the scripts were last loaded; -1: not loaded
        self._owe_nothing()
        # every new connection asks the server for its run id before anything else is sent on it, so a
        # restarted Redis is noticed even when redis-py reconnects silently
        # (and its socket noted, for closer())
        self._sockets = OpenSockets()
        client.connection_pool.connection_kwargs["redis_connect_func"] = connect_hook(
            self._on_connect, self._sockets
        )

    # -- circuit breaker ---------------------------------------------------------------------------

    @property
    def backing_off(self) -> bool:
        return self.health.backing_off

    def _call(self, operation: str, fn: Callable[[], T], answered: bool = True) -> T:
        """``fn()`` once the breaker, the owed replies and the scripts are seen to; a Redis failure is
        CacheUnavailable (counted). ``answered=False``: ``fn`` only wrote a request, and the answer
        counts once its reply is read (:meth:`_reply_of`)."""
        health = self.health
        health.check(operation)
        if self._owed:
            self.settle()
        try:
            if self._loaded_epoch != health.epoch:
                self._load_scripts()
            result = fn()
        except _REDIS_ERRORS as exc:
            raise self._failed(operation) from exc
        if answered:
            health.answered(operation)
        return result

    def _failed(self, operation: str) -> CacheUnavailable:
        """A Redis failure of ``operation``, counted for the breaker; the error to raise."""
        self._loaded_epoch = -1  # load the scripts again once it answers (it may have restarted)
        self.health.failed()
        return CacheUnavailable(operation)

    def _eval(
        self, operation: str, script: str, keys: list[Any], args: list[Any], shield: bool = False
    ) -> Any:
        run = self._scripts[script]
        wait = self.health.wait if script == "release" else None
        if wait is None:
            return self._call(operation, lambda: run(keys=keys, args=args))

        def waited() -> Any:  # WAIT counts the writes of its own connection: one pipeline
            pipe = self.client.pipeline(transaction=False)
            run(keys=keys, args=args, client=pipe)
            pipe.wait(*wait)
            written, acked = pipe.execute()
            short = self.health.short_ack(acked)
            if short is not None:
                raise redis.RedisError(short)  # a failure for the breaker, like any outage
            return written

        return self._call(operation, waited)

    def closer(self) -> Callable[[], None]:
        """What closes the sockets of every connection this store opened, holding nothing but them: a
        cache dropped without close() calls it when it is collected (``_parts``)."""
        return self._sockets.close

    def _on_connect(self, conn: Any) -> None:
        conn.on_connect()
        calls = self.health.lineage_calls((0,) if self._shards is None else self._shards())
        if not calls:
            conn.send_command("INFO", "server")
            self.health.connected(conn.read_response(), self._node)
            return
        # first on this connection: the run id, and a fence if the data is not this server's (each
        # shard it serves: one round trip for all)
        for call in calls:
            conn.send_command("EVAL", LINEAGE_SOURCE, 4, *call)
        for _ in calls:
            self.health.lineage_checked(conn.read_response(), self._node)

    def _load_scripts(self) -> None:
        """Load every script in one round trip, so that a pipelined EVALSHA never meets NOSCRIPT."""
        epoch = self.health.epoch
        pipe = self.client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        pipe.execute()
        self._loaded_epoch = epoch

    # -- operations --------------------------------------------------------------------------------

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        """One MGET of the entry, the clock and the dependencies: the whole hit path."""
        keys = proto.read_keys(clock_key, entry_key, dep_keys)
        values = self._call("read", lambda: self._mget(keys))
        return proto.judge_read(values, time.time)

    def send_read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> SentRead:
        """:meth:`read` in two steps: its MGET written now, its reply read by :meth:`SentRead.result`.
        What the caller does in between runs while Redis answers (``cache.get``'s checks of the
        session). The breaker, the owed replies and the scripts are seen to first, as by every call;
        the answer counts (a restarted server's is refused) once the reply is read.

        :raises CacheUnavailable: Redis cannot be written to now (nothing is left on the wire).
        """
        keys = proto.read_keys(clock_key, entry_key, dep_keys)

        def send() -> Any:
            conn = self._connection()
            try:
                Wire.send(conn, "MGET", *keys)
            except BaseException:
                self._discard(conn)
                raise
            return conn

        return SentRead(self, self._call("read", send, answered=False))

    def _reply_of(self, conn: Any) -> list[bytes | None]:
        """The reply of a read sent on ``conn``; the connection goes back to the pool (dropped if the
        reply could not be read), and the answer counts for the breaker."""
        try:
            reply: list[bytes | None] = Wire.read(conn)
        except BaseException as exc:
            self._discard(conn)
            if isinstance(exc, _REDIS_ERRORS):
                raise self._failed("read") from exc
            raise
        self.client.connection_pool.release(conn)
        self.health.answered("read")
        return reply

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        """Several reads, one MGET (``cache.get_many``)."""
        keys, layout = proto.read_many_keys(clock_key, entries)
        values = self._call("read", lambda: self._mget(keys))
        return proto.judge_read_many(values, layout, len(keys), time.time)

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        """MGET straight on a pooled connection: the command and its reply, without the client's
        per-call machinery (retries, which ours has none of, event hooks, metrics): a good part of a
        small hit's time. Errors leave the connection disconnected, as the client would."""
        conn = self._connection()
        try:
            Wire.send(conn, "MGET", *keys)
            reply: list[bytes | None] = Wire.read(conn)
        except BaseException:
            self._discard(conn)
            raise
        self.client.connection_pool.release(conn)
        return reply

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        """Take the entry's stampede lock (SET NX PX): True if this caller is the one to query."""
        key = proto.fill_lock_key(entry_key)
        return bool(self._call("lock", lambda: self.client.set(key, token, nx=True, px=ttl_ms)))

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        """Write lock.lua to a connection of our own without waiting for its reply.

        For commits that only invalidate: the lock is on its way to Redis before the database COMMIT
        (the bytes are sent; a crash from here on still leaves it to expire into a fresh generation),
        and its reply is read together with the release's after the COMMIT, on the same connection, so
        Redis runs the two in order. One round trip of latency instead of two. Repopulating commits
        wait for the reply instead: their "newest lock" rule needs Redis to order locks as the database
        ordered the commits.
        """
        keys, args = proto.lock_call(clock_key, lock_keys, (), token, lock_ttl_ms, gen_ttl_ms)

        sent: list[SentLock] = []

        def run() -> SentLock:
            conn = self._connection()
            try:
                Wire.send(conn, "EVALSHA", self._scripts["lock"].sha, len(keys), *keys, *args)
            except BaseException:
                self._discard(conn)
                raise
            sent.append(SentLock(conn))
            return sent[0]

        try:
            return self._call("lock", run)
        except CacheUnavailable:
            if sent:  # sent, but its answer dropped (a restart noticed): nobody will read the reply
                self._discard(sent[0].conn)
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
        """Release behind a pipelined lock; returns whether the lock itself had succeeded.

        The lock's reply is read before this returns: Redis has applied the lock, so no reader anywhere
        takes the old entry once ``commit()`` has returned. The release's own reply is usually left
        for later (:meth:`settle`, run before this store's next call): waiting for it would add a round
        trip to every commit, and until the release runs, the lock keeps readers on the database. If
        that reply says Redis did not apply the release, it is released again or handed to
        ``health.on_release_lost`` (the journal). Read at once instead: when nobody listens for a lost
        release, when the lock failed, and with ``wait_replicas`` (its WAIT acknowledges the release
        before the commit returns)."""
        keys, args = proto.release_call(clock_key, dep_keys, token, gen_ttl_ms, (), announce)
        conn = sent.conn
        wait = self.health.wait
        # a release of no key (a COMMIT of unknown outcome: only the lock's reply is wanted) is read now
        later = wait is None and self.health.on_release_lost is not None and bool(dep_keys)

        ran = False

        def run() -> list[Any]:
            nonlocal ran
            ran = True
            try:
                # closed under the commit (a pool's disconnect()): the lock's reply is gone with it
                if not Wire.connected(conn):
                    raise redis.ConnectionError("the lock's connection was closed before its release")
                Wire.send(conn, "EVALSHA", self._scripts["release"].sha, len(keys), *keys, *args)
                if wait is not None:
                    Wire.send(conn, "WAIT", *wait)
                replies: list[Any] = []
                for i in range(2 if wait is None else 3):
                    try:
                        replies.append(Wire.read(conn))
                    except redis.ResponseError as exc:  # e.g. NOSCRIPT after a Redis restart
                        replies.append(exc)
                    if i == 0 and later and not isinstance(replies[0], redis.ResponseError):
                        pid = os.getpid()
                        since = time.monotonic()
                        owed = Owed(conn, pid, since, clock_key, dep_keys, token, gen_ttl_ms, announce)
                        self._owed.append(owed)  # the release's reply: read by settle()
                        return [replies[0], None]
            except BaseException:
                self._discard(conn)
                raise
            self.client.connection_pool.release(conn)
            if wait is not None and not isinstance(replies[1], redis.ResponseError):
                short = self.health.short_ack(replies[2])
                if short is not None:
                    raise redis.RedisError(short)
            return replies

        try:
            lock_reply, release_reply, *_ = self._call("release", run)
        except CacheUnavailable:
            if not ran:  # refused before run() (backing off, scripts not loaded): the lock's connection
                self._discard(conn)  # still waits for its reply, and must not stay checked out
            raise
        if later:  # outside run(): its failure must not drop the reply
            self._watch()
        if isinstance(release_reply, redis.ResponseError):
            # NOSCRIPT: Redis restarted or was flushed since we loaded the scripts; load and release
            self._loaded_epoch = -1
            self.release(clock_key, dep_keys, token, gen_ttl_ms, announce=announce)
        return not isinstance(lock_reply, redis.ResponseError)

    # -- several commands on one connection, the reply read later (a sharded cluster's exchange) -----

    def sha(self, script: str) -> str:
        """The SHA1 EVALSHA runs ``script`` by."""
        return str(self._scripts[script].sha)

    def send(self, commands: Sequence[Sequence[Any]]) -> Any:
        """Write ``commands`` on a pooled connection of this node without reading their replies (the
        scripts loaded first if the server may have lost them); the connection, for :meth:`receive`.
        Raises redis-py's errors: the caller turns them into one outage for all its nodes."""
        if self._owed:
            self.settle()  # the replies a sharded commit left: connections back in the pool
        if self._loaded_epoch != self.health.epoch:
            self._load_scripts()
        conn = self._connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def receive(self, conn: Any, count: int, keep: bool = False) -> list[Any]:
        """The next ``count`` replies on ``conn`` (an error reply as its ResponseError, so that one
        refused command leaves the connection in step); the connection goes back to the pool, unless
        ``keep`` (more replies are owed on it: see :meth:`owe`). Dropped if a read fails."""
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._discard(conn)
            raise
        if not keep:
            self.client.connection_pool.release(conn)
        if any(isinstance(r, redis.ResponseError) for r in replies):
            self._loaded_epoch = -1  # NOSCRIPT after a restart, say: load them again next time
        return replies

    def drop(self, conn: Any) -> None:
        """Give up a connection whose replies will not be read."""
        self._discard(conn)

    def _connection(self) -> Any:
        pool = self.client.connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name (a Sentinel pool)
            return pool.get_connection("EVALSHA")

    def server(self) -> dict[str, str | int]:
        """Where this store's Redis is: ``address`` (host or socket path), ``port``, ``db`` where known.
        Never credentials."""
        kwargs = self.client.connection_pool.connection_kwargs
        out: dict[str, str | int] = {}
        address = kwargs.get("host", kwargs.get("path"))
        if isinstance(address, str) and address:
            out["address"] = address
        for name in ("port", "db"):
            value = kwargs.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
        return out

    def key_prefix(self, prefix: str) -> str:
        """What starts this store's keys for the user's ``prefix`` (``_keys.namespace`` escapes it)."""
        return prefix

    def key_layout(self, prefix: str) -> Layout:
        """Which prefix starts the keys of each table and tag: one server, one shard."""
        return Layout([self.key_prefix(prefix)])

    def disconnect(self) -> None:
        """Close every connection this store opened (the client is sqlcache's own), once the replies
        of the releases left unread are read."""
        with self._settle_lock():
            self._settle()
            _settle.SETTLER.unwatch(self)
            self._watched = -1
            self.client.connection_pool.disconnect()

    def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel`` on a connection of its own (not through the circuit breaker)."""
        return Subscription(self.client, channel)

    def delete(self, *keys: str) -> None:
        self._call("delete", lambda: self.client.delete(*keys))

    def put(self, key: str, value: bytes, ttl_ms: int) -> None:
        """SET with an expiry, for a value outside the protocol (the published stats)."""
        self._call("publish", lambda: self.client.set(key, value, px=ttl_ms))

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def delete_matching(
        self, pattern: str, batch: int = 500, on_batch: Callable[[int], None] | None = None
    ) -> int:
        """SCAN MATCH ``pattern`` and UNLINK what it finds, ``batch`` keys at a time; ``on_batch`` is
        told the running total after each batch (``sqlcache flush`` shows progress).

        A cache's layout key (``{ns}:layout``, the only key of a cache that ends so with one ``:``: the
        namespace has none) is kept: it is not cached data but the claim every process's layout is
        checked against, and a process already connected would never see a new claim."""

        def run() -> int:
            removed = 0
            chunk: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=batch):
                if key.endswith(b":layout") and key.count(b":") == 1:
                    continue
                chunk.append(key)
                if len(chunk) >= batch:
                    removed += int(self.client.unlink(*chunk))
                    chunk = []
                    if on_batch is not None:
                        on_batch(removed)
            if chunk:
                removed += int(self.client.unlink(*chunk))
            return removed

        return self._call("clear", run)


class SentRead:
    """A read whose MGET :meth:`RedisStore.send_read` wrote; its connection is held until the reply is
    taken, by :meth:`result` or :meth:`drop`, exactly once."""

    __slots__ = ("_conn", "_store")

    def __init__(self, store: RedisStore, conn: Any) -> None:
        self._store = store
        self._conn = conn

    def result(self) -> ReadResult:
        """The reply, judged as :meth:`RedisStore.read` judges it.

        :raises CacheUnavailable: Redis did not answer, or a restarted server did (then the cache fences
            before its next read).
        """
        return proto.judge_read(self._store._reply_of(self._conn), time.time)

    def drop(self) -> None:
        """The reply read and not used (the reader took another way): the connection goes back clean.
        Never raises for Redis (a failure counts for the breaker, as any)."""
        try:
            self._store._reply_of(self._conn)
        except CacheUnavailable:
            pass
