"""SQLAlchemy's asyncio bridge, as sqlcache uses it: whether code runs in SQLAlchemy's asyncio greenlet,
awaiting from there, and running sync code that uses an asyncio driver from plain code (a thread with
an event loop of its own). Public SQLAlchemy API only (``sqlalchemy.util.concurrency``, ``Engine``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.util import concurrency as _concurrency

__all__ = ["await_", "blocking", "engine_like", "engine_of", "in_async_greenlet", "run_in_own_loop", "spawn"]

T = TypeVar("T")

# SQLAlchemy runs the sync core of AsyncSession/AsyncConnection inside greenlets it spawns
# (greenlet_spawn) and marks them; an awaitable passed to its await_ from there is awaited by the event
# loop's task that spawned the greenlet, which then switches back with the result. 2.0 calls it
# await_only, 2.1 await_.
_await: Callable[[Any], Any] = getattr(_concurrency, "await_", None) or _concurrency.await_only
_in_greenlet: Callable[[], bool] = _concurrency.in_greenlet


def in_async_greenlet() -> bool:
    """Whether this code runs inside SQLAlchemy's asyncio greenlet (an AsyncSession's sync core)."""
    return _in_greenlet()


def await_(awaitable: Any) -> Any:
    """Await ``awaitable`` from the sync code SQLAlchemy runs for asyncio (see ``in_async_greenlet``)."""
    return _await(awaitable)


def engine_of(engine: Any) -> Any:
    """The sync :class:`~sqlalchemy.engine.Engine` of ``engine`` (itself, or an AsyncEngine's
    ``sync_engine``); None for anything else."""
    if isinstance(engine, Engine):
        return engine
    try:
        from sqlalchemy.ext.asyncio import AsyncEngine
    except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio extension
        return None
    return engine.sync_engine if isinstance(engine, AsyncEngine) else None


def engine_like(engine: Any) -> Any:
    """A new Engine on ``engine``'s database (its dialect, URL and connection settings) over a pool of
    its own: for a thread with an event loop of its own, which cannot use connections of another loop."""
    return Engine(engine.pool.recreate(), engine.dialect, engine.url)


def spawn(fn: Callable[[], Any]) -> Any:
    """An awaitable running sync ``fn`` in SQLAlchemy's greenlet (``greenlet_spawn``)."""
    return _concurrency.greenlet_spawn(fn)


def run_in_own_loop(fn: Callable[[], Any], after: Callable[[], Any] | None = None) -> Any:
    """Run ``fn`` (sync code that may use an asyncio driver or store) in SQLAlchemy's greenlet on a new
    event loop of the calling thread (which must not be running one); then await ``after()``, if given,
    on the same loop, and close it."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_concurrency.greenlet_spawn(fn))
    finally:
        try:
            if after is not None:
                loop.run_until_complete(after())
        finally:
            loop.close()


def blocking(engine: Engine, fn: Callable[[Engine], T]) -> T:
    """``fn(engine)`` from plain sync code. An asyncio engine cannot be used from here (there may be no
    loop, or one already running in this thread): ``fn`` then gets an engine of its own on a pool of its
    own, in SQLAlchemy's greenlet on a new event loop, in a short-lived thread; its result or exception
    is handed back."""
    if not engine.dialect.is_async:
        return fn(engine)
    private = engine_like(engine)
    out: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            out.append((True, run_in_own_loop(lambda: fn(private), after=lambda: spawn(private.dispose))))
        except BaseException as exc:  # handed to the caller below
            out.append((False, exc))

    thread = threading.Thread(target=work, name="sqlcache-blocking", daemon=True)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    result: T = value
    return result
