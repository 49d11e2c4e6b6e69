"""The only module that talks to Redis: carries the calls ``_protocol`` builds to a redis-py client,
hands the replies back to ``_protocol`` to judge, and translates redis-py exceptions."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.sentinel

from . import _protocol as proto
from ._protocol import ReadResult, RepopEntry, SentLock
from .errors import CacheUnavailable, ConfigurationError

__all__ = ["RedisStore", "Subscription", "client_for", "hide_password"]

T = TypeVar("T")

# Errors that mean "Redis cannot serve us right now". A ResponseError from a script (OOM, READONLY
# replica, BUSY) is an outage too as far as callers are concerned: the database answers instead.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def client_for(target: redis.Redis | str, timeout: float) -> redis.Redis:
    """A client of sqlcache's own (bounded timeouts, no retries, bytes responses, its own pool) that
    reaches the server of ``target``: a URL, or a client of the caller's, which is never changed.

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
    else:
        raise ConfigurationError(f"expected a redis.Redis client or a URL, got {target!r}")
    return redis.Redis(connection_pool=_own_pool(source, timeout))


def _own_pool(pool: redis.ConnectionPool, timeout: float) -> redis.ConnectionPool:
    """A new pool to ``pool``'s server: its identity and credentials, our timeouts and decoding.

    Never the caller's pool itself: sqlcache sets a connect hook on its pool (restart detection), and
    two caches on one client would otherwise overwrite each other's, and change the caller's client."""
    kept = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in _KEPT_CONNECTION_KWARGS or k.startswith("ssl_")
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
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        raise ConfigurationError(
            f"cannot build a pool of sqlcache's own like {type(pool).__name__}: pass a URL, or a "
            "redis.Redis over a ConnectionPool, a BlockingConnectionPool or a Sentinel pool"
        )
    return redis.ConnectionPool(connection_class=pool.connection_class, **kept)


_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.I)


def hide_password(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(lambda m: m.group("head") + "***@", text)


# What identifies the server and the credentials; everything else (retries, decoding, timeouts) is ours.
_KEPT_CONNECTION_KWARGS = frozenset(
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


class Subscription:
    """A pub/sub subscription whose failures arrive as CacheUnavailable (from the redis-py error)."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        try:
            self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            self._pubsub.subscribe(channel)
        except _REDIS_ERRORS as exc:
            raise CacheUnavailable("listen") from exc

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            message: dict[str, Any] | None = self._pubsub.get_message(timeout=timeout)
        except _REDIS_ERRORS as exc:
            raise CacheUnavailable("listen") from exc
        return message

    def close(self) -> None:
        try:
            self._pubsub.close()
        except _REDIS_ERRORS:
            pass


def _script_source(name: str) -> str:
    lua = resources.files("sqlcache").joinpath("lua")
    return lua.joinpath("_lib.lua").read_text("utf-8") + "\n" + lua.joinpath(f"{name}.lua").read_text("utf-8")


class RedisStore:
    """The :class:`~sqlcache._protocol.Store` over a sync redis-py client: one Lua script per
    operation; turns every Redis failure into CacheUnavailable.

    After ``failure_threshold`` consecutive failures it stops calling Redis for a back-off period
    (doubling up to ``max_backoff``) so that a dead Redis does not add a timeout to every request.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        failure_threshold: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self._scripts = {name: client.register_script(_script_source(name)) for name in proto.SCRIPTS}
        self._generations = self._scripts["generations"]
        self._fill = self._scripts["fill"]
        self._lock = self._scripts["lock"]
        self._release = self._scripts["release"]
        self._unlock = self._scripts["unlock"]
        self._failure_threshold = failure_threshold
        self._base_backoff = backoff
        self._max_backoff = max_backoff
        self._now = clock
        self._mutex = threading.Lock()
        self._failures = 0
        self._next_backoff = backoff
        self._open_until = 0.0
        self.backoffs = 0
        self.skipped = 0
        self._scripts_loaded = False
        self.ok_seq = 0  # successful calls so far: tells one failure burst from the next
        self.run_id: str | None = None
        self.on_restart: Callable[[], None] | None = None
        self._restart_pending = False
        # every new connection asks the server for its run id before anything else is sent on it, so a
        # restarted Redis is noticed even when redis-py reconnects silently
        client.connection_pool.connection_kwargs["redis_connect_func"] = self._on_connect

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (redis-py's pool resets its own connections on a new pid)."""
        self._mutex = threading.Lock()

    # -- circuit breaker ---------------------------------------------------------------------------

    @property
    def backing_off(self) -> bool:
        return self._open_until > self._now()

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        if self._open_until and self._open_until > self._now():
            self.skipped += 1
            raise CacheUnavailable(operation)
        try:
            if not self._scripts_loaded:
                self._load_scripts()
            result = fn()
        except _REDIS_ERRORS as exc:
            self._scripts_loaded = False  # load the scripts again once it answers (it may have restarted)
            self._failed()
            raise CacheUnavailable(operation) from exc
        if self._restart_pending:
            # t0 entry e filled under generation g1; Redis snapshots to disk
            # t1 a commit moves g1 to g2, acknowledged; Redis dies before its next snapshot
            # t2 Redis restarts from the snapshot: e and g1 are back and e looks valid. This answer came
            #    from the restarted server: drop it, and let the owner fence before the next read
            with self._mutex:
                self._restart_pending = False
            self._scripts_loaded = False
            if self.on_restart is not None:
                self.on_restart()
            raise CacheUnavailable(f"{operation} (redis restarted)")
        self.ok_seq += 1
        if self._failures:
            with self._mutex:
                self._failures = 0
                self._next_backoff = self._base_backoff
                self._open_until = 0.0
        return result

    def _on_connect(self, conn: Any) -> None:
        conn.on_connect()
        conn.send_command("INFO", "server")
        info = conn.read_response()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
        run_id = ""
        for line in text.splitlines():
            if line.startswith("run_id:"):
                run_id = line[len("run_id:") :].strip()
        with self._mutex:
            if self.run_id is not None and run_id != self.run_id:
                self._restart_pending = True
            self.run_id = run_id

    def _load_scripts(self) -> None:
        """Load every script in one round trip, so that a pipelined EVALSHA never meets NOSCRIPT."""
        pipe = self.client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        pipe.execute()
        self._scripts_loaded = True

    def _failed(self) -> None:
        with self._mutex:
            self._failures += 1
            if self._failures >= self._failure_threshold:
                self._open_until = self._now() + self._next_backoff
                self._next_backoff = min(self._next_backoff * 2, self._max_backoff)
                self._failures = 0
                self.backoffs += 1

    # -- operations --------------------------------------------------------------------------------

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        """One MGET of the entry, the clock and the dependencies: the whole hit path."""
        keys = proto.read_keys(clock_key, entry_key, dep_keys)
        values = self._call("read", lambda: self._mget(keys))
        return proto.judge_read(values, time.time)

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        """MGET straight on a pooled connection: the command and its reply, without the client's
        per-call machinery (retries, which ours has none of, event hooks, metrics): a good part of a
        small hit's time. Errors leave the connection disconnected, as the client would."""
        conn = self._connection()
        try:
            conn.send_command("MGET", *keys)
            reply: list[bytes | None] = conn.read_response()
        except BaseException:
            self._discard(conn)
            raise
        self.client.connection_pool.release(conn)
        return reply

    def generations(
        self, clock_key: str, dep_keys: Sequence[str], gen_ttl_ms: int, row_writes: str | None = None
    ) -> ReadResult:
        """Create missing generations, repair garbage, expire dead locks; the miss path's slow case."""
        keys, args = proto.generations_call(clock_key, dep_keys, gen_ttl_ms, row_writes)
        r: list[Any] = self._call("read", lambda: self._generations(keys=keys, args=args))
        return proto.judge_generations(r)

    def fill(
        self,
        clock_key: str,
        entry_key: str,
        dep_keys: Sequence[str],
        payload: bytes,
        ttl_ms: int,
        generations: bytes,
        snapshot_clock: int | None,
        gen_ttl_ms: int,
        fresh_until_ms: int | None = None,
        lock_token: str = "",
    ) -> int:
        keys, args = proto.fill_call(
            clock_key,
            entry_key,
            dep_keys,
            payload,
            ttl_ms,
            generations,
            snapshot_clock,
            gen_ttl_ms,
            fresh_until_ms,
            lock_token,
        )
        return int(self._call("fill", lambda: self._fill(keys=keys, args=args)))

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        """Take the entry's stampede lock (SET NX PX): True if this caller is the one to query."""
        key = proto.fill_lock_key(entry_key)
        return bool(self._call("lock", lambda: self.client.set(key, token, nx=True, px=ttl_ms)))

    def unlock_fill(self, clock_key: str, entry_key: str, token: str) -> None:
        """Drop the stampede lock if it is still ours (it may have expired and been taken by another)."""
        keys, args = proto.unlock_call(clock_key, entry_key, token)
        self._call("unlock", lambda: self._unlock(keys=keys, args=args))

    def lock(
        self,
        clock_key: str,
        lock_keys: Sequence[str],
        watch_keys: Sequence[str],
        token: str,
        lock_ttl_ms: int,
        gen_ttl_ms: int,
    ) -> list[str]:
        keys, args = proto.lock_call(clock_key, lock_keys, watch_keys, token, lock_ttl_ms, gen_ttl_ms)
        r: list[bytes] = self._call("lock", lambda: self._lock(keys=keys, args=args))
        return proto.judge_lock(r)

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

        def run() -> SentLock:
            conn = self._connection()
            try:
                conn.send_command("EVALSHA", self._lock.sha, len(keys), *keys, *args)
            except BaseException:
                self._discard(conn)
                raise
            return SentLock(conn)

        return self._call("lock", run)

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """Release behind a pipelined lock; returns whether the lock itself had succeeded."""
        keys, args = proto.release_call(clock_key, dep_keys, token, gen_ttl_ms, (), announce)
        conn = sent.conn

        def run() -> list[Any]:
            try:
                conn.send_command("EVALSHA", self._release.sha, len(keys), *keys, *args)
                replies: list[Any] = []
                for _ in range(2):
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:  # e.g. NOSCRIPT after a Redis restart
                        replies.append(exc)
            except BaseException:
                self._discard(conn)
                raise
            self.client.connection_pool.release(conn)
            return replies

        lock_reply, release_reply = self._call("release", run)
        if isinstance(release_reply, redis.ResponseError):
            # NOSCRIPT: Redis restarted or was flushed since we loaded the scripts; load and release
            self._scripts_loaded = False
            self.release(clock_key, dep_keys, token, gen_ttl_ms, announce=announce)
        return not isinstance(lock_reply, redis.ResponseError)

    def _connection(self) -> Any:
        pool = self.client.connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            return pool.get_connection("EVALSHA")

    def _discard(self, conn: Any) -> None:
        conn.disconnect()
        self.client.connection_pool.release(conn)

    def release(
        self,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        entries: Sequence[RepopEntry] = (),
        announce: tuple[str, bytes] | None = None,
    ) -> int:
        keys, args = proto.release_call(clock_key, dep_keys, token, gen_ttl_ms, entries, announce)
        return int(self._call("release", lambda: self._release(keys=keys, args=args)))

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

    def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel`` on a connection of its own (not through the circuit breaker)."""
        return Subscription(self.client, channel)

    def delete(self, *keys: str) -> None:
        self._call("delete", lambda: self.client.delete(*keys))

    def delete_matching(self, pattern: str, batch: int = 500) -> int:
        def run() -> int:
            removed = 0
            chunk: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=batch):
                chunk.append(key)
                if len(chunk) >= batch:
                    removed += int(self.client.unlink(*chunk))
                    chunk = []
            if chunk:
                removed += int(self.client.unlink(*chunk))
            return removed

        return self._call("clear", run)
