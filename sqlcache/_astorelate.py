"""The asyncio store's release replies read late (``AsyncRedisStore.release_after`` leaves a release's
reply on its connection): :class:`AsyncLateReplies`, the part of ``AsyncRedisStore`` that keeps what is
owed, reads it (``settle``: at the store's next call, from ``disconnect()`` and ``aclose()``, or by a
timer on the event loop for a writer gone quiet), sends a refused release again, and hands what Redis
may not have applied to the journal. The asyncio twin of ``_storelate``."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aredis

from . import _protocol as proto
from ._aclient import quietly_closed
from ._health import Health
from ._pools import Wire
from ._settle import SETTLE_AFTER, Owed
from .errors import CacheUnavailable

__all__ = ["AsyncLateReplies"]

log = logging.getLogger("sqlcache")

_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)


class AsyncLateReplies(proto.ScriptCalls):
    """What ``AsyncRedisStore`` owes and how it reads it; the store gives it a client, a health, the
    scripts' epoch and ``_script`` (``release`` is the store's, through ``ScriptCalls``)."""

    client: aredis.Redis
    health: Health
    _loaded_epoch: int

    if TYPE_CHECKING:

        async def _script(
            self, name: str, keys: Sequence[Any], args: Sequence[Any], wait: tuple[int, int] | None = None
        ) -> Any: ...

    def _owe_nothing(self) -> None:
        """The state of a store that owes no reply (its ``__init__`` calls this)."""
        # releases whose reply nobody read yet, oldest first, each holding its connection out of the
        # pool (see release_after); read under _settling, by the next call or by the timer _due arms
        self._owed: deque[Owed] = deque()
        self._settling = asyncio.Lock()
        self._due: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the timer's settling tasks (held: not collected)

    def owe(self, owed: Sequence[Owed]) -> None:
        """Release replies left unread on one connection of this node, in the order they were sent, the
        last holding the connection (a sharded cluster's ``release_after``): read by :meth:`settle`."""
        self._owed.extend(owed)
        self._settle_later()

    def _settle_later(self) -> None:
        """Settle what is owed ``SETTLE_AFTER`` seconds from now, should no call of this store do it
        first (a writer gone quiet): the asyncio twin of the sync world's settler thread."""
        if self._due is None:
            self._due = asyncio.get_running_loop().call_later(SETTLE_AFTER, self._on_due)

    def _on_due(self) -> None:
        self._due = None
        if self._owed:
            task = asyncio.get_running_loop().create_task(self._settle_quietly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle_quietly(self) -> None:
        try:
            await self.settle()
        except Exception:  # a bug, or a signal receiver's error: logged, and tried again
            log.exception("sqlcache: reading a release's reply failed")
        finally:
            if self._owed:  # what is left is read by the next call, or by the timer armed here
                self._settle_later()

    async def settle(self) -> None:
        """Read the replies of the releases :meth:`release_after` left unread and give their connections
        back, as the sync store's ``settle()``: an error reply (NOSCRIPT, READONLY, MOVED) is released
        again; a reply that never came (the connection failed) goes to ``health.on_release_lost`` (the
        journal); after one failure, or while the breaker backs off, the rest are handed over unread.
        Never raises for Redis. Held under a lock: closing waits for a reply another task is reading."""
        async with self._settling:
            await self._settle_owed()

    async def _settle_owed(self) -> None:
        owed = self._owed
        gave_up = False
        while owed:
            o = owed.popleft()
            if o.pid != os.getpid():  # a forked child: the parent reads its own connections
                owed.clear()
                return
            held = True  # o's reply is still this call's to let go of (o.conn given back or dropped)
            failure: CacheUnavailable | None = None
            try:
                if gave_up or self.health.backing_off:
                    held = False
                    await self._let_go(o, drop=True)
                    failure = CacheUnavailable("release (not read: Redis failed)")
                elif not Wire.connected(o.conn):  # closed on purpose (as the sync store's)
                    held = False
                    await self._let_go(o, drop=True)
                    failure = CacheUnavailable("release (not read: its connection was closed)")
                else:
                    try:
                        await o.conn.read_response()
                    except redis.ResponseError:  # not applied; the connection is in step
                        held = False
                        await self._let_go(o)
                        self._loaded_epoch = -1
                        failure = await self._release_again(o)
                        gave_up = failure is not None
                    except _REDIS_ERRORS as exc:
                        held = False
                        await self._let_go(o, drop=True)
                        self._loaded_epoch = -1
                        self.health.failed()
                        gave_up = True
                        failure = CacheUnavailable("release")
                        failure.__cause__ = exc
                    else:
                        held = False
                        await self._let_go(o)
            except BaseException as exc:  # cancelled (the loop shutting down), interrupted: journalled
                interrupted = CacheUnavailable("release (interrupted)")
                interrupted.__cause__ = exc
                try:
                    if held:  # dropped first: a signal receiver's error below must not leak it
                        await self._let_go(o, drop=True)
                finally:
                    self._lost(o, interrupted)
                raise
            if failure is not None:
                self._lost(o, failure)

    async def _let_go(self, o: Owed, drop: bool = False) -> None:
        """As the sync store's: ``o.conn`` back to the pool (closed first if ``drop``) if ``o`` holds it;
        else it stays out for the replies still owed on it, closed if ``drop``."""
        if o.holds:
            if drop:
                await quietly_closed(self._discard(o.conn))
            else:
                await self._give_back(o.conn)
        elif drop:
            await quietly_closed(o.conn.disconnect())

    async def _release_again(self, o: Owed) -> CacheUnavailable | None:
        """Send a release again whose first sending Redis refused; the failure, if this one failed too."""
        keys, args = proto.release_call(o.clock_key, o.dep_keys, o.token, o.gen_ttl_ms, (), o.announce)
        try:
            self.health.check("release")
            try:
                await self._script("release", keys, args)
            except _REDIS_ERRORS as exc:
                self._loaded_epoch = -1
                self.health.failed()
                raise CacheUnavailable("release") from exc
            self.health.answered("release")
        except CacheUnavailable as exc:
            return exc
        return None

    def abandon(self) -> None:
        """The store's loop closed without shutting down its async generators (so :meth:`aclose` never
        ran): the replies it left unread can no longer be read; each release is handed to the journal
        (as lost: replayed through the sync store), not left to its lock's expiry unreported."""
        if not self._owed:
            return
        log.warning(
            "sqlcache: an event loop closed with %d release replies unread (closed without "
            "shutdown_asyncgens(): call await cache.release_loop() before closing a loop by hand)",
            len(self._owed),
        )
        while self._owed:
            self._lost(self._owed.popleft(), CacheUnavailable("release (its event loop closed)"))

    def _lost(self, o: Owed, failure: CacheUnavailable) -> None:
        lost = self.health.on_release_lost
        if lost is not None:
            lost(o.dep_keys, o.token, failure)

    async def _give_back(self, conn: Any) -> None:
        released = self.client.connection_pool.release(conn)
        if inspect.isawaitable(released):  # a coroutine from redis-py 5.1 on
            await released

    async def _discard(self, conn: Any) -> None:
        try:
            await conn.disconnect()
        finally:
            await self._give_back(conn)
