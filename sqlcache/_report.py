"""Degradation, counters, signals and plugin hooks: the one place failures are absorbed and reported.

Every part of the core receives the :class:`Reporter` of its cache; none reaches the facade. A Redis
or codec failure is counted and signalled here and the caller falls through to the database; a
receiver or plugin that raises is logged and counted here, never allowed to undo a read or a commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from . import signals
from ._stats import Stats
from .errors import CacheUnavailable, CodecError
from .plugin import Operation, OperationHook

if TYPE_CHECKING:
    from blinker import NamedSignal

__all__ = ["Reporter", "Running"]

log = logging.getLogger("sqlcache")


class Running:
    """An operation whose hooks have been entered; :meth:`end` exits them (once)."""

    __slots__ = ("_ended", "_exits", "_reporter", "op")

    def __init__(self, reporter: Reporter, op: Operation) -> None:
        self._reporter = reporter
        self.op = op
        self._exits: list[tuple[str, AbstractContextManager[object]]] = []
        self._ended = False  # our own flag: hooks may write op.result as they like

    def end(self, result: str, error: BaseException | None = None) -> None:
        if self._ended:
            return  # ended already (a hit that turned out unservable, then a miss)
        self._ended = True
        op = self.op
        op.result = result
        op.error = error
        exits, self._exits = self._exits, []
        for plugin, cm in reversed(exits):
            try:
                cm.__exit__(None, None, None)
            except Exception:
                self._reporter.plugin_failed(plugin, f"operation hook ({op.name}, exit)")


class Reporter:
    """Counters, signals and operation hooks of one cache.

    :param sender: the cache, sender of every signal.
    :param ok_seq: how many Redis calls have succeeded so far (tells one failure burst from the next).
    """

    def __init__(self, sender: object, ok_seq: Callable[[], int]) -> None:
        self.sender = sender
        self.stats = Stats()
        self._ok_seq = ok_seq
        self._reported_seq = -1  # ok_seq when the last outage was signalled
        #: when True, an exception raised by a signal receiver propagates (the test suite sets it)
        self.strict_signals = False
        #: (plugin name, hook); empty (falsy) while no plugin timed anything: the hot paths test it
        self.hooks: list[tuple[str, OperationHook]] = []
        #: count an event (the counters' own method: one call less on the hot paths)
        self.incr: Callable[..., None] = self.stats.incr

    # -- failures -------------------------------------------------------------------------------------

    @contextmanager
    def degrade(self, operation: str) -> Iterator[None]:
        """The one place Redis and codec failures are absorbed: count, signal, let the caller go on."""
        try:
            yield
        except (CacheUnavailable, CodecError) as exc:
            self.report(exc, operation)

    def report(self, exc: Exception, operation: str) -> None:
        """Count a failure; signal it, but an outage only once per burst (until Redis answers again)."""
        self.stats.incr("errors")
        log.debug("sqlcache %s failed: %s", operation, exc)
        if isinstance(exc, CacheUnavailable):
            seq = self._ok_seq()
            if seq == self._reported_seq:
                return  # same burst: Redis has not answered since the last cache_error
            self._reported_seq = seq
        self.send(signals.cache_error, exc=exc, operation=operation)

    def send(self, signal: NamedSignal, **kwargs: Any) -> None:
        """Call each receiver; one that raises is logged and counted, never undoes the caller's work."""
        for receiver in signal.receivers_for(self.sender):
            try:
                receiver(self.sender, **kwargs)
            except Exception:
                if self.strict_signals:
                    raise
                self.stats.incr("signal_errors")
                log.exception("sqlcache: receiver of %s raised", signal.name)

    # -- plugins --------------------------------------------------------------------------------------

    def plugin_failed(self, plugin: str, where: str) -> None:
        self.stats.incr("plugin_errors")
        log.exception("sqlcache: plugin %r raised in %s", plugin, where)

    def guard(self, plugin: str, receiver: Callable[..., Any]) -> Callable[..., Any]:
        """``receiver`` wrapped so that what it raises is logged and counted, even under strict signals."""

        def guarded(sender: Any, **kwargs: Any) -> None:
            try:
                receiver(sender, **kwargs)
            except Exception:
                self.plugin_failed(plugin, "a signal receiver")

        return guarded

    def begin(
        self,
        name: str,
        kind: str | None = None,
        key: str | None = None,
        model: str | None = None,
        tags: tuple[str, ...] = (),
        keys: int = 0,
    ) -> Running:
        """Enter every hook for a new operation. Callers check ``if reporter.hooks:`` first."""
        running = Running(self, Operation(name, kind, key, model, tags, keys))
        for plugin, hook in list(self.hooks):
            try:
                cm = hook(running.op)
                cm.__enter__()
            except Exception:
                self.plugin_failed(plugin, f"operation hook ({name}, entry)")
                continue
            running._exits.append((plugin, cm))
        return running

    def instant(
        self,
        name: str,
        result: str,
        kind: str | None = None,
        key: str | None = None,
        model: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        """An operation that ended as it began (a read that bypassed the cache, a fill not attempted)."""
        if self.hooks:
            self.begin(name, kind, key, model, tags).end(result)
