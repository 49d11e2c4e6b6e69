"""The plugins of one cache: set up in order, closed in reverse, and the narrow core their hosts use.

Store wrappers form a chain over the base store. Each wrapper is called exactly once, when its plugin
adds it, with a :class:`_Link` as its inner store; removing a plugin re-points the link above it, so
no other wrapper is ever called again. A :class:`_Guard` on top turns anything a wrapper raises, other
than ``CacheUnavailable``, into ``CacheUnavailable`` (counted in ``plugin_errors``): the cache then
degrades as for an outage, and a plugin never breaks a read or a commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ._protocol import Store, StoreSlot
from ._report import Reporter
from .errors import CacheUnavailable, ConfigurationError
from .plugin import OperationHook, Plugin, PluginHost, StoreWrapper

if TYPE_CHECKING:
    from blinker import NamedSignal

__all__ = ["Plugins"]


class _Link:
    """A wrapper's inner store: whatever lies below it now (re-pointed when a plugin below goes)."""

    __slots__ = ("target",)

    def __init__(self, target: Store) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class _Guard:
    """The top of a wrapped chain: a wrapper's unexpected exception becomes an outage for the caller."""

    __slots__ = ("_report", "inner")

    def __init__(self, inner: Store, report: Callable[[str, BaseException], None]) -> None:
        self.inner = inner
        self._report = report

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr
        report = self._report

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except CacheUnavailable:
                raise
            except Exception as exc:
                report(name, exc)
                raise CacheUnavailable(f"{name} (a plugin's store wrapper raised)") from exc

        return guarded


class _Layer:
    """One plugin's wrapper in the chain: its inner link and the store it returned."""

    __slots__ = ("link", "plugin", "store")

    def __init__(self, plugin: str, link: _Link, store: Store) -> None:
        self.plugin = plugin
        self.link = link
        self.store = store


class Plugins:
    """What ``SQLCache(plugins=...)``, ``add_plugin()``, ``remove_plugin()`` and ``close()`` do with
    plugins; also the host core (``sqlcache.plugin._HostCore``) every
    :class:`~sqlcache.plugin.PluginHost` talks to."""

    def __init__(
        self, reporter: Reporter, slot: StoreSlot, server: Callable[[], dict[str, str | int]]
    ) -> None:
        self._rep = reporter
        self._slot = slot
        self.server = server
        self._mutex = threading.RLock()  # setup() calls back into this object from the same thread
        self._plugins: dict[str, Plugin] = {}
        self._layers: list[_Layer] = []
        self._receivers: list[tuple[str, NamedSignal, Callable[..., Any]]] = []
        self._sender: object = None

    def add(self, cache: Any, plugin: Plugin) -> None:
        """Set ``plugin`` up on ``cache`` (the facade, sender of its signals)."""
        if not isinstance(plugin, Plugin):
            raise ConfigurationError(f"plugins must have a name, setup(host) and close(), got {plugin!r}")
        name = plugin.name
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a plugin's name must be a non-empty string, got {name!r}")
        with self._mutex:
            if name in self._plugins:
                raise ConfigurationError(f"a plugin named {name!r} was added to this cache already")
            self._sender = cache
            self._plugins[name] = plugin
            try:
                plugin.setup(PluginHost(cache, name, core=self))
            except Exception as exc:
                del self._plugins[name]
                self._remove(name)
                raise ConfigurationError(f"plugin {name!r} failed to set up: {exc!r}") from exc

    def all(self) -> list[Plugin]:
        with self._mutex:
            return list(self._plugins.values())

    def remove(self, name: str) -> Plugin:
        """Undo what the plugin ``name`` added and close it; returns it."""
        with self._mutex:
            plugin = self._plugins.pop(name, None)
            if plugin is None:
                raise ConfigurationError(f"no plugin named {name!r} on this cache")
            self._remove(name)
        self._close(name, plugin)
        return plugin

    def close(self) -> None:
        """Undo what each plugin added and close it, last added first; what a close raises is counted."""
        with self._mutex:
            plugins, self._plugins = list(self._plugins.items()), {}
            for name, _plugin in reversed(plugins):
                self._remove(name)
        for name, plugin in reversed(plugins):
            self._close(name, plugin)

    def _close(self, name: str, plugin: Plugin) -> None:
        try:
            plugin.close()
        except Exception:
            self._rep.plugin_failed(name, "close()")

    def _remove(self, plugin: str) -> None:
        for name, signal, receiver in self._receivers:
            if name == plugin:
                signal.disconnect(receiver, sender=self._sender)
        self._receivers = [r for r in self._receivers if r[0] != plugin]
        self._rep.hooks = [(p, h) for p, h in self._rep.hooks if p != plugin]
        for i in reversed(range(len(self._layers))):
            if self._layers[i].plugin != plugin:
                continue
            gone = self._layers.pop(i)
            if i < len(self._layers):
                self._layers[i].link.target = gone.link.target  # the layer above now sits on ours' inner
        self._publish()

    # -- the host core -----------------------------------------------------------------------------------

    def connect(self, plugin: str, signal: NamedSignal, receiver: Callable[..., Any]) -> None:
        guarded = self._rep.guard(plugin, receiver)
        with self._mutex:
            # weakly: _receivers keeps it (a strong one, on a module-level signal, kept the cache alive)
            signal.connect(guarded, sender=self._sender, weak=True)
            self._receivers.append((plugin, signal, guarded))

    def add_hook(self, plugin: str, hook: OperationHook) -> None:
        with self._mutex:
            # a new list each time: the hot paths read the attribute once, without a lock
            self._rep.hooks = [*self._rep.hooks, (plugin, hook)]

    def wrap_store(self, plugin: str, wrapper: StoreWrapper) -> None:
        with self._mutex:
            below = self._layers[-1].store if self._layers else self._slot.base
            link = _Link(below)
            store = wrapper(cast(Store, link))  # called once, now, never again
            self._layers.append(_Layer(plugin, link, store))
            self._publish()

    def rebase(self) -> None:
        """``slot.base`` changed (the asyncio world was added): the lowest wrapper now wraps the new base."""
        with self._mutex:
            if self._layers:
                self._layers[0].link.target = self._slot.base
            self._publish()

    def _publish(self) -> None:
        if not self._layers:
            self._slot.current = self._slot.base
            return
        self._slot.current = cast(Store, _Guard(self._layers[-1].store, self._wrapper_failed))

    def _wrapper_failed(self, operation: str, exc: BaseException) -> None:
        # called from the guard's except block: plugin_failed logs the exception being handled
        owners = ", ".join(sorted({layer.plugin for layer in self._layers}))
        self._rep.plugin_failed(owners, f"a store wrapper ({operation}: {exc!r})")
