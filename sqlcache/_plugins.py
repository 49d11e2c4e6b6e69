"""The plugins of one cache: set up in order, closed in reverse, and the narrow core their hosts use."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._protocol import StoreSlot
from ._report import Reporter
from .errors import ConfigurationError
from .plugin import OperationHook, Plugin, PluginHost, StoreWrapper

if TYPE_CHECKING:
    from .cache import SQLCache

__all__ = ["Plugins"]


class Plugins:
    """What ``SQLCache(plugins=...)``, ``add_plugin()`` and ``close()`` do with plugins; also the
    host core (``sqlcache.plugin._HostCore``) every :class:`~sqlcache.plugin.PluginHost` talks to."""

    def __init__(self, reporter: Reporter, slot: StoreSlot) -> None:
        self._rep = reporter
        self._slot = slot
        self._plugins: dict[str, tuple[Plugin, PluginHost]] = {}
        self._wrappers: list[tuple[str, StoreWrapper]] = []

    def add(self, cache: SQLCache, plugin: Plugin) -> None:
        if not isinstance(plugin, Plugin):
            raise ConfigurationError(f"plugins must have a name, setup(host) and close(), got {plugin!r}")
        name = plugin.name
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a plugin's name must be a non-empty string, got {name!r}")
        if name in self._plugins:
            raise ConfigurationError(f"a plugin named {name!r} was added to this cache already")
        host = PluginHost(cache, name, core=self)
        self._plugins[name] = (plugin, host)
        try:
            plugin.setup(host)
        except Exception as exc:
            del self._plugins[name]
            host._undo()
            raise ConfigurationError(f"plugin {name!r} failed to set up: {exc!r}") from exc

    def all(self) -> list[Plugin]:
        return [p for p, _h in self._plugins.values()]

    def close(self) -> None:
        """Undo every host and close every plugin, last added first; what a close raises is counted."""
        plugins, self._plugins = list(self._plugins.items()), {}
        for name, (plugin, host) in reversed(plugins):
            host._undo()
            try:
                plugin.close()
            except Exception:
                self._rep.plugin_failed(name, "close()")

    # -- the host core -----------------------------------------------------------------------------------

    def guard(self, plugin: str, receiver: Callable[..., Any]) -> Callable[..., Any]:
        return self._rep.guard(plugin, receiver)

    def add_hook(self, plugin: str, hook: OperationHook) -> None:
        # a new list each time: the hot paths read the attribute once, without a lock
        self._rep.hooks = [*self._rep.hooks, (plugin, hook)]

    def remove_hook(self, hook: OperationHook) -> None:
        self._rep.hooks = [(p, h) for p, h in self._rep.hooks if h is not hook]

    def wrap_store(self, plugin: str, wrapper: StoreWrapper) -> None:
        self._wrappers.append((plugin, wrapper))
        self._rewrap()

    def unwrap_store(self, wrapper: StoreWrapper) -> None:
        self._wrappers = [(p, w) for p, w in self._wrappers if w is not wrapper]
        self._rewrap()

    def _rewrap(self) -> None:
        store = self._slot.base
        for _plugin, wrapper in self._wrappers:
            store = wrapper(store)
        self._slot.current = store
