"""The plugins of one cache: set up in order, closed in reverse, and the narrow core their hosts use."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._protocol import StoreSlot
from ._report import Reporter
from .errors import ConfigurationError
from .plugin import OperationHook, Plugin, PluginHost, StoreWrapper

if TYPE_CHECKING:
    from blinker import NamedSignal

__all__ = ["Plugins"]


class Plugins:
    """What ``SQLCache(plugins=...)``, ``add_plugin()`` and ``close()`` do with plugins; also the
    host core (``sqlcache.plugin._HostCore``) every :class:`~sqlcache.plugin.PluginHost` talks to."""

    def __init__(
        self, reporter: Reporter, slot: StoreSlot, server: Callable[[], dict[str, str | int]]
    ) -> None:
        self._rep = reporter
        self._slot = slot
        self.server = server
        self._plugins: dict[str, Plugin] = {}
        self._wrappers: list[tuple[str, StoreWrapper]] = []
        self._receivers: list[tuple[str, NamedSignal, Callable[..., Any]]] = []
        self._sender: object = None

    def add(self, cache: Any, plugin: Plugin) -> None:
        """Set ``plugin`` up on ``cache`` (the facade, sender of its signals)."""
        if not isinstance(plugin, Plugin):
            raise ConfigurationError(f"plugins must have a name, setup(host) and close(), got {plugin!r}")
        name = plugin.name
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a plugin's name must be a non-empty string, got {name!r}")
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
        return list(self._plugins.values())

    def remove(self, name: str) -> Plugin:
        """Undo what the plugin ``name`` added and close it; returns it."""
        plugin = self._plugins.pop(name, None)
        if plugin is None:
            raise ConfigurationError(f"no plugin named {name!r} on this cache")
        self._remove(name)
        try:
            plugin.close()
        except Exception:
            self._rep.plugin_failed(name, "close()")
        return plugin

    def close(self) -> None:
        """Undo what each plugin added and close it, last added first; what a close raises is counted."""
        plugins, self._plugins = list(self._plugins.items()), {}
        for name, plugin in reversed(plugins):
            self._remove(name)
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
        if any(p == plugin for p, _w in self._wrappers):
            self._wrappers = [(p, w) for p, w in self._wrappers if p != plugin]
            self._rewrap()

    # -- the host core -----------------------------------------------------------------------------------

    def connect(self, plugin: str, signal: NamedSignal, receiver: Callable[..., Any]) -> None:
        guarded = self._rep.guard(plugin, receiver)
        signal.connect(guarded, sender=self._sender, weak=False)
        self._receivers.append((plugin, signal, guarded))

    def add_hook(self, plugin: str, hook: OperationHook) -> None:
        # a new list each time: the hot paths read the attribute once, without a lock
        self._rep.hooks = [*self._rep.hooks, (plugin, hook)]

    def wrap_store(self, plugin: str, wrapper: StoreWrapper) -> None:
        self._wrappers.append((plugin, wrapper))
        self._rewrap()

    def _rewrap(self) -> None:
        store = self._slot.base
        for _plugin, wrapper in self._wrappers:
            store = wrapper(store)
        self._slot.current = store
