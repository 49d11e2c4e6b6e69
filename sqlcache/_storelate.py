"""The sync store's release replies read late (``RedisStore.release_after`` leaves a release's reply on
its connection): :class:`LateReplies`, the part of ``RedisStore`` that keeps what is owed, reads it
(``settle``: at the store's next call, from ``close()``, or by ``_settle``'s settler thread) and hands
what Redis did not apply to the journal. ``_settle`` says what each unread reply holds (``Owed``)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis

from . import _protocol as proto
from . import _settle
from ._health import Health
from ._pools import Wire
from ._settle import Owed
from .errors import CacheUnavailable

__all__ = ["LateReplies"]

_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


class LateReplies(proto.ScriptCalls):
    """What ``RedisStore`` owes and how it reads it; the store gives it a client, a health and the
    scripts' epoch (``release`` is the store's, through ``ScriptCalls``)."""

    client: redis.Redis
    health: Health
    _loaded_epoch: int

    def _owe_nothing(self) -> None:
        """The state of a store that owes no reply (its ``__init__`` calls this)."""
        # releases whose reply nobody read yet, oldest first (see release_after); each holds its
        # connection out of the pool until settle() reads it
        self._owed: deque[Owed] = deque()
        self._watched = -1  # the process whose settler watches this store (-1: none)
        # held while owed replies are read: a settle() or disconnect() waits for one running elsewhere
        # (the settler's), rather than returning while a reply is still being read; reentrant, for the
        # release a refused reply sends again (release -> _call -> settle)
        self._settling = threading.RLock()
        self._settling_pid = os.getpid()  # the process whose lock that is (see _settle_lock)

    def _watch(self) -> None:
        """Have the settler thread read what this store owes if no call of it does (once per process)."""
        if self._watched != os.getpid():
            self._watched = os.getpid()
            _settle.SETTLER.watch(self)

    def owe(self, owed: Sequence[Owed]) -> None:
        """Release replies left unread on one connection of this node, in the order they were sent,
        the last holding the connection (a sharded cluster's ``release_after``): read by :meth:`settle`."""
        self._owed.extend(owed)  # at once: another thread's never land between them
        self._watch()

    def settle(self) -> None:
        """Read the replies of the releases :meth:`release_after` left unread (normally in the socket
        buffer long since), and give their connections back. A release Redis answered with an error
        (NOSCRIPT: it restarted or was flushed meanwhile; READONLY, MOVED...) is sent again; one it may
        not have applied (the connection failed) goes to ``health.on_release_lost``, as an awaited
        release's failure goes to the journal. After one such failure, or while the breaker backs off,
        the rest are handed over unread (a release journalled that Redis did apply only costs misses):
        one call never waits out a timeout per owed reply. Never raises for Redis."""
        with self._settle_lock():
            self._settle()

    def unread_since(self) -> float | None:
        """When the oldest release reply still unread was written (``time.monotonic()``); None: none."""
        try:
            return self._owed[0].since
        except IndexError:  # nothing owed (or another thread just read the last one)
            return None

    def try_settle(self) -> None:
        """:meth:`settle`, unless another thread is settling this store already (the settler's turn)."""
        lock = self._settle_lock()
        if lock.acquire(blocking=False):
            try:
                self._settle()
            finally:
                lock.release()

    def _settle_lock(self) -> threading.RLock:
        """The lock replies are read under; in a forked child a new one (the parent's settler thread may
        have held it at the fork, and no thread of the child would ever release it), and nothing owed:
        the parent reads its own connections."""
        if self._settling_pid != os.getpid():
            self._settling = threading.RLock()
            self._settling_pid = os.getpid()
            self._owed.clear()
        return self._settling

    def _settle(self) -> None:
        owed = self._owed
        gave_up = False
        while owed:
            try:
                o = owed.popleft()
            except IndexError:  # another thread took the last one
                return
            if o.pid != os.getpid():  # a forked child: the parent reads its own connections
                owed.clear()
                return
            held = True  # o's reply is still this call's to let go of (o.conn given back or dropped)
            failure: CacheUnavailable | None = None
            try:
                if gave_up or self.health.backing_off:
                    held = False
                    self._let_go(o, drop=True)
                    failure = CacheUnavailable("release (not read: Redis failed)")
                elif not Wire.connected(o.conn):
                    # closed on purpose: an earlier reply on it was interrupted, or handed over while
                    # the breaker backed off. Not a failure of Redis: no breaker count, and the replies
                    # owed on other connections are still read
                    held = False
                    self._let_go(o, drop=True)
                    failure = CacheUnavailable("release (not read: its connection was closed)")
                else:
                    try:
                        Wire.read(o.conn)
                    except redis.ResponseError:  # not applied; the connection is in step
                        held = False
                        self._let_go(o)
                        self._loaded_epoch = -1
                        try:
                            self.release(o.clock_key, o.dep_keys, o.token, o.gen_ttl_ms, announce=o.announce)
                        except CacheUnavailable as exc:
                            gave_up = True
                            failure = exc
                    except _REDIS_ERRORS as exc:
                        held = False
                        self._let_go(o, drop=True)
                        self._loaded_epoch = -1
                        self.health.failed()
                        gave_up = True
                        failure = CacheUnavailable("release")
                        failure.__cause__ = exc
                    else:
                        held = False
                        self._let_go(o)
            except BaseException as exc:  # interrupted (KeyboardInterrupt): journalled, passed on
                if held:
                    self._let_go(o, drop=True)
                interrupted = CacheUnavailable("release (interrupted)")
                interrupted.__cause__ = exc
                self._lost(o, interrupted)
                raise
            if failure is not None:
                self._lost(o, failure)

    def _let_go(self, o: Owed, drop: bool = False) -> None:
        """Done with ``o``'s reply: its connection back to the pool (closed first if ``drop``: out of
        step) if ``o`` holds it; else the connection stays out for the replies still owed on it, closed
        if ``drop`` (their reads then fail, and the last one gives it back)."""
        if o.holds:
            if drop:
                self._discard(o.conn)
            else:
                self.client.connection_pool.release(o.conn)
        elif drop:
            o.conn.disconnect()

    def _lost(self, o: Owed, failure: CacheUnavailable) -> None:
        lost = self.health.on_release_lost
        if lost is not None:
            lost(o.dep_keys, o.token, failure)

    def _discard(self, conn: Any) -> None:
        conn.disconnect()
        self.client.connection_pool.release(conn)
