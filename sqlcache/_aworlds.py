"""Which world a call goes to: one asyncio store per event loop (:class:`AsyncStores`), made on first
use and closed with its loop, and :class:`Worlds`, the store the parts use once an AsyncEngine is
attached (asyncio inside SQLAlchemy's greenlet, sync elsewhere)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Protocol

from . import _aio
from ._protocol import PendingRead, SentLock, Store, send_read

__all__ = ["AsyncStores", "LoopStore", "Worlds"]


class LoopStore(Store, Protocol):
    """What :class:`AsyncStores` keeps per event loop: a store it can close when the loop shuts down."""

    closer: AsyncGenerator[None, None] | None

    async def aclose(self) -> None: ...

    async def settle(self) -> None: ...

    def abandon(self) -> None: ...


class AsyncStores:
    """One store per event loop (an :class:`AsyncRedisStore`, or a cluster's router), made on first
    use by ``make_store``.

    A store's connections are closed when its loop shuts down its async generators, which
    ``asyncio.run()`` and ``asyncio.Runner`` do before closing the loop: each store parks an async
    generator in its loop whose ``finally`` closes them. A loop closed without that step is dropped (and
    its connections left to the garbage collector) when the next loop's store is made; the release
    replies it left unread are handed to the journal then (``abandon``).
    """

    def __init__(self, make_store: Callable[[], LoopStore]) -> None:
        self._make_store = make_store
        self._mutex = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, LoopStore] = {}
        self._last: tuple[asyncio.AbstractEventLoop, LoopStore] | None = None

    def current(self) -> LoopStore:
        """The running loop's store (called in SQLAlchemy's greenlet of that loop)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        made = False
        gone: list[LoopStore] = []
        with self._mutex:
            store = self._by_loop.get(loop)
            if store is None:
                gone = [self._by_loop.pop(other) for other in list(self._by_loop) if other.is_closed()]
                store = self._make_store()
                self._by_loop[loop] = store
                made = True
            self._last = (loop, store)
        for dropped in gone:  # their unread release replies, to the journal (outside the mutex: it reports)
            dropped.abandon()
        if made:
            closer = self._closer(loop, store)
            store.closer = closer  # the loop only tracks async generators weakly
            _aio.await_(closer.__anext__())  # parked: the loop's shutdown_asyncgens() resumes it
        return store

    async def _closer(self, loop: asyncio.AbstractEventLoop, store: LoopStore) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._forget(loop, store)
            await store.aclose()

    def _forget(self, loop: asyncio.AbstractEventLoop, store: LoopStore) -> None:
        with self._mutex:
            if self._by_loop.get(loop) is store:
                del self._by_loop[loop]
            last = self._last
            if last is not None and last[1] is store:
                self._last = None

    async def aclose_current(self) -> None:
        """Close the connections of the running loop's store (the next use opens new ones)."""
        loop = asyncio.get_running_loop()
        with self._mutex:
            store = self._by_loop.get(loop)
        if store is None:
            return
        if store.closer is not None:
            await store.closer.aclose()  # its finally forgets and closes the store
        else:
            self._forget(loop, store)
            await store.aclose()

    async def settle_current(self) -> None:
        """Read the release replies the running loop's store has left unread (before the journal's last
        replay: a release found lost is journalled in time for it)."""
        with self._mutex:
            store = self._by_loop.get(asyncio.get_running_loop())
        if store is not None:
            await store.settle()

    def open_loops(self) -> int:
        """How many event loops hold a store (and so possibly connections)."""
        with self._mutex:
            return sum(1 for loop in self._by_loop if not loop.is_closed())

    def after_fork(self) -> None:
        """In a forked child: no loop of the parent runs here; forget their stores."""
        self._mutex = threading.Lock()
        self._by_loop = {}
        self._last = None


class Worlds:
    """The store of the world the caller is in: asyncio inside SQLAlchemy's greenlet, sync elsewhere.
    Every operation goes to that store; a pipelined lock's release goes to the store that sent it (a
    connection belongs to one world)."""

    def __init__(self, sync: Store, stores: AsyncStores) -> None:
        self.sync = sync
        self.stores = stores

    def _here(self) -> Store:
        return self.stores.current() if _aio.in_async_greenlet() else self.sync

    def __getattr__(self, name: str) -> Any:
        return getattr(self._here(), name)

    def send_read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> PendingRead:
        return send_read(self._here(), clock_key, entry_key, dep_keys)

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        here = self._here()
        sent = here.send_lock(clock_key, lock_keys, token, lock_ttl_ms, gen_ttl_ms)
        # a cluster's router names the node store that wrote it; that store reads the reply
        return sent if sent.store is not None else SentLock(sent.conn, here)

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        store: Store = sent.store if sent.store is not None else self._here()
        return store.release_after(sent, clock_key, dep_keys, token, gen_ttl_ms, announce)
