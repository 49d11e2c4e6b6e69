"""The plugin API: what a plugin is, and what the cache lets it reach.

A plugin is an object with a ``name`` and two methods. :meth:`Plugin.setup` receives a
:class:`PluginHost` bound to one :class:`~sqlcache.SQLCache`; through it the plugin hears that cache's
signals, reads its ``stats()``, wraps timed operations (for spans and histograms) and wraps the I/O
store (for a tier in front of Redis). :meth:`Plugin.close` undoes exactly what ``setup`` did; the host
disconnects whatever the plugin connected through it on its own.

A plugin never breaks a read or a commit: an exception raised by its receivers or by its operation
hooks is logged and counted in ``stats()["plugin_errors"]``, and the cache carries on.

.. versionadded:: 0.2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._protocol import ReadResult, RepopEntry, SentLock, Store

if TYPE_CHECKING:
    from blinker import NamedSignal

    from .cache import SQLCache

__all__ = [
    "OPERATIONS",
    "Operation",
    "OperationHook",
    "Plugin",
    "PluginHost",
    "ReadResult",
    "RepopEntry",
    "SentLock",
    "Store",
    "StoreWrapper",
]

#: Names of the timed operations and what their ``result`` may be once they end.
OPERATIONS: Mapping[str, tuple[str, ...]] = {
    # one read through the cache (the Redis round trip and, on a hit, rebuilding the result)
    "read": ("hit", "miss", "stale", "bypass", "error"),
    # storing what the database returned after a miss
    "fill": ("stored", "refused", "skipped", "error"),
    # before the database COMMIT: the transaction's dependencies locked (sent, for invalidate-only)
    "lock": ("ok", "error"),
    # after the database COMMIT: fresh generations, locks dropped, repopulated entries written;
    # "expiring": the COMMIT raised with its outcome unknown, the locks are left to expire (lock_ttl)
    "release": ("ok", "deferred", "expiring", "error"),
    # invalidate(), invalidate_tags(), invalidate_model() outside a transaction
    "invalidate": ("ok", "deferred", "error"),
    # the journal of invalidations Redis did not take, applied once it answers again
    "replay": ("ok", "error"),
    # a relay applying outbox rows that their writers did not (durable=True)
    "relay": ("ok", "error"),
}


@dataclass(eq=False, slots=True)
class Operation:
    """One timed operation, handed to every operation hook as it starts.

    ``result`` and ``error`` are set by the cache just before the hooks' context managers exit, so a
    hook reads them in its ``__exit__`` (or after its ``yield``). Values are plain strings and ints:
    cheap to put on a span or a metric label.
    """

    name: str  #: a key of :data:`OPERATIONS`
    kind: str | None = None  #: ``"identity"`` or ``"query"`` for reads and fills
    key: str | None = None  #: the entry key of a read or fill
    model: str | None = None  #: the mapped class's name of an identity read or fill
    tags: tuple[str, ...] = ()  #: user tags of a cached query
    keys: int = 0  #: how many dependency keys the operation carries
    result: str | None = None  #: one of ``OPERATIONS[name]``, set when the operation ends
    error: BaseException | None = None  #: what failed, when ``result == "error"``
    attributes: dict[str, Any] = field(default_factory=dict)  #: free for hooks to share state


#: ``hook(operation)`` returns a context manager entered as the operation starts and exited as it ends.
OperationHook = Callable[[Operation], AbstractContextManager[object]]

#: ``wrapper(store)`` returns the store the cache uses from then on (which usually delegates to it).
StoreWrapper = Callable[[Store], Store]


@runtime_checkable
class Plugin(Protocol):
    """What ``SQLCache(plugins=[...])`` and :meth:`~sqlcache.SQLCache.add_plugin` accept."""

    name: str

    def setup(self, host: PluginHost) -> None:
        """Connect receivers, create metrics, add hooks, wrap the store."""

    def close(self) -> None:
        """Undo exactly what :meth:`setup` did (the host already disconnected its receivers)."""


class PluginHost:
    """What one cache hands one plugin: its signals, its counters, its operations and its store.

    Everything a plugin adds through the host is removed when the plugin is closed (by
    :meth:`~sqlcache.SQLCache.close`) or when its :meth:`Plugin.setup` raised.
    """

    def __init__(self, cache: SQLCache, plugin_name: str, *, core: _HostCore) -> None:
        self._cache = cache
        self._core = core
        self.plugin_name = plugin_name

    @property
    def cache(self) -> SQLCache:
        """The cache this plugin serves (its public API only)."""
        return self._cache

    @property
    def prefix(self) -> str:
        """The cache's key prefix: tells two caches of one process apart (a metric label, say)."""
        return self._cache.config.prefix

    def connect(self, signal: NamedSignal, receiver: Callable[..., Any]) -> None:
        """Call ``receiver(cache, **kwargs)`` for ``signal`` sent by this cache only (not other caches').

        An exception the receiver raises is logged and counted (``plugin_errors``), never propagated.
        """
        self._core.connect(self.plugin_name, signal, receiver)

    def stats(self) -> dict[str, int]:
        """The cache's counters now (``SQLCache.stats()``)."""
        return self._cache.stats()

    def server(self) -> dict[str, str | int]:
        """Where the cache's Redis is, for span and metric attributes: ``address`` (host name or socket
        path), ``port`` and ``db`` when known (never credentials)."""
        return self._core.server()

    def add_operation_hook(self, hook: OperationHook) -> None:
        """Wrap every timed operation of this cache (see :data:`OPERATIONS`) in ``hook(operation)``.

        Costs nothing while no plugin has added a hook. A hook that raises (on entry or on exit) is
        skipped for that operation and counted in ``plugin_errors``.
        """
        self._core.add_hook(self.plugin_name, hook)

    def wrap_store(self, wrapper: StoreWrapper) -> None:
        """Replace the cache's store by ``wrapper(store)``: every Redis operation goes through it.

        The wrapped store must keep the :class:`Store` contract (an in-process tier, for instance,
        answers ``read`` itself only when it can vouch for the entry). Wrappers apply in the order the
        plugins were added; closing the plugin unwraps.
        """
        self._core.wrap_store(self.plugin_name, wrapper)


class _HostCore(Protocol):
    """What the cache gives the host (narrow; the host never reaches further). The core remembers
    what each plugin added, to remove it when that plugin goes."""

    def connect(self, plugin: str, signal: NamedSignal, receiver: Callable[..., Any]) -> None: ...

    def add_hook(self, plugin: str, hook: OperationHook) -> None: ...

    def wrap_store(self, plugin: str, wrapper: StoreWrapper) -> None: ...

    def server(self) -> dict[str, str | int]: ...
