"""Listeners that can be switched off from any thread, at any moment.

SQLAlchemy dispatches an event by iterating a deque of listeners, and ``event.listen()`` /
``event.remove()`` change that deque in place: doing either while some thread (or a garbage-collector
callback on the same thread) is inside a dispatch of that event raises ``RuntimeError: deque mutated
during iteration`` in the dispatching code, which is the user's session or connection.
``cache.close()`` and ``detach()`` must not do that to other threads' work.

So each sqlcache listener is installed as a trampoline to a slot, and detaching only empties the slot;
the listener stays and does nothing. An empty slot is taken again by the next listener for the same
target, event and options, so the number installed on a target is the largest number of caches ever
attached to it at once (one, in most processes), and SQLAlchemy's deques change only when that number
grows: at the first attach, in practice at start-up.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event

__all__ = ["Slot", "hook"]

_Key = tuple[str, tuple[tuple[str, Any], ...]]

# reentrant: a garbage-collector callback may close a cache (release its slots) on this very thread
# while it is inside hook() or release(), since both allocate
_lock = threading.RLock()
# target (the Session class, a mapper, an engine) -> (event, options) -> its empty slots
_free: weakref.WeakKeyDictionary[Any, dict[_Key, list[Slot]]] = weakref.WeakKeyDictionary()


def _after_fork() -> None:
    """In a forked child: a fresh lock (another thread of the parent may have held it at the fork, and
    never releases it here)."""
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork)


class Slot:
    """One installed listener; ``fn`` is what it calls (None: nothing)."""

    __slots__ = ("__weakref__", "_key", "_target", "fn")

    def __init__(self, target: Any, key: _Key) -> None:
        self.fn: Callable[..., Any] | None = None
        self._target = weakref.ref(target)
        self._key = key

    def release(self, fn: Callable[..., Any]) -> None:
        """Stop calling ``fn`` (at once, for every dispatch that has not reached this listener yet) and
        offer the slot to the next listener for the same target and event. Nothing if the slot no
        longer calls ``fn`` (released already, maybe taken by another cache since)."""
        with _lock:
            if self.fn is None or self.fn != fn:
                return
            self.fn = None
            target = self._target()
            if target is not None:
                _free.setdefault(target, {}).setdefault(self._key, []).append(self)


def _trampoline(slot: Slot) -> Callable[..., Any]:
    def listener(*args: Any, **kw: Any) -> Any:
        fn = slot.fn
        if fn is None:
            return None
        return fn(*args, **kw)

    listener.sqlcache_listener = True  # type: ignore[attr-defined]  # told apart from the app's (_sa)
    return listener


def hook(target: Any, name: str, fn: Callable[..., Any], **options: Any) -> Slot:
    """Have ``fn`` called on ``target``'s event ``name`` (``event.listen`` options as keywords), in an
    empty slot if the target has one for this event, else in a new listener."""
    key: _Key = (name, tuple(sorted(options.items())))
    with _lock:
        free = _free.get(target, {}).get(key)
        if free:
            slot = free.pop()
            slot.fn = fn
            return slot
        slot = Slot(target, key)
        slot.fn = fn
    event.listen(target, name, _trampoline(slot), **options)
    return slot
