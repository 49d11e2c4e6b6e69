"""What one cache reports: its series of the shared families, incremented from the operation hooks and
the signal receivers of its plugin."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Histogram

from sqlcache.plugin import OPERATIONS, Operation

from ._families import Family

__all__ = ["INVALIDATING", "Recorder", "Timing"]

#: operations whose ``keys`` are dependency keys given (or journalled for) a fresh generation
INVALIDATING = ("release", "invalidate", "replay", "relay")

Labels = tuple[str, ...]
M = TypeVar("M", Counter, Histogram)


class Series(Generic[M]):
    """One metric's children for one cache, by label values (the prefix excluded)."""

    __slots__ = ("children", "metric")

    metric: M
    children: dict[Labels, M]

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.children = {}

    def drop(self, prefix: str) -> None:
        """Remove every series of ``prefix`` this cache created from the metric."""
        for labels in list(self.children):
            self.metric.remove(prefix, *labels)
        self.children.clear()


class Recorder:
    """The series of one cache: label children looked up once, then incremented from the hooks."""

    def __init__(self, family: Family, prefix: str) -> None:
        self.family = family
        self.prefix = prefix
        self._lock = threading.Lock()
        self._closed = False
        o = family.options
        self._label_models = o.label_models
        self._label_tags = o.label_tags
        self._requests = Series(family.requests)
        self._fills = Series(family.fills)
        self._invalidated_keys = Series(family.invalidated_keys)
        self._invalidation_events = Series(family.invalidation_events)
        self._replays = Series(family.replays)
        self._relay_passes = Series(family.relay_passes)
        self._errors = Series(family.errors)
        self._durations = Series(family.durations)
        self._counters = (
            self._requests,
            self._fills,
            self._invalidated_keys,
            self._invalidation_events,
            self._replays,
            self._relay_passes,
            self._errors,
        )
        # series that exist from the start (at 0), so that rates and ratios are defined before any event
        if not (o.label_models or o.label_tags):
            for kind in ("identity", "query"):
                for result in OPERATIONS["read"]:
                    self._child(self._requests, (kind, result))
                for result in OPERATIONS["fill"]:
                    self._child(self._fills, (kind, result))
        for operation in INVALIDATING:
            for result in OPERATIONS[operation]:
                self._child(self._invalidated_keys, (operation, result))
        for remote in ("false", "true"):
            self._child(self._invalidation_events, (remote,))
        for result in OPERATIONS["replay"]:
            self._child(self._replays, (result,))
        for result in OPERATIONS["relay"]:
            self._child(self._relay_passes, (result,))
        for operation in OPERATIONS:
            self._child(self._durations, (operation,))

    def _child(self, series: Series[M], labels: Labels) -> M | None:
        """The child for this prefix and ``labels``; None once closed."""
        child = series.children.get(labels)
        if child is None:
            with self._lock:  # creation only: lookups above take no lock
                if self._closed:
                    return None
                child = series.children.get(labels)
                if child is None:
                    child = series.children[labels] = series.metric.labels(self.prefix, *labels)
        return child

    def hook(self, op: Operation) -> Timing:
        return Timing(self, op)

    def record(self, op: Operation, seconds: float) -> None:
        """Count an operation that ended (its ``result`` set) and observe its duration."""
        result = op.result
        if result is None or self._closed:
            return
        name = op.name
        timer = self._child(self._durations, (name,))
        if timer is not None:
            timer.observe(seconds)
        counter: Counter | None = None
        if name == "read" or name == "fill":
            labels: Labels = (op.kind or "", result)
            if self._label_models:
                labels = (*labels, op.model or "")
            if self._label_tags:
                labels = (*labels, ",".join(sorted(op.tags)))
            counter = self._child(self._requests if name == "read" else self._fills, labels)
        elif name in INVALIDATING:
            if op.keys:
                keys = self._child(self._invalidated_keys, (name, result))
                if keys is not None:
                    keys.inc(op.keys)
            if name == "replay":
                counter = self._child(self._replays, (result,))
            elif name == "relay":
                counter = self._child(self._relay_passes, (result,))
        if counter is not None:
            counter.inc()

    def on_invalidated(self, sender: object, **kwargs: Any) -> None:
        remote = "true" if kwargs.get("remote") else "false"
        counter = None if self._closed else self._child(self._invalidation_events, (remote,))
        if counter is not None:
            counter.inc()

    def on_error(self, sender: object, **kwargs: Any) -> None:
        operation = str(kwargs.get("operation", ""))
        counter = None if self._closed else self._child(self._errors, (operation,))
        if counter is not None:
            counter.inc()

    def close(self) -> None:
        """Stop recording and remove this prefix's series (the metrics stay registered for others)."""
        with self._lock:
            self._closed = True
        # no child is created once closed: the series are final
        for series in self._counters:
            series.drop(self.prefix)
        self._durations.drop(self.prefix)


class Timing:
    """The context manager an operation hook returns: times the operation, records it as it ends."""

    __slots__ = ("_op", "_recorder", "_started")

    def __init__(self, recorder: Recorder, op: Operation) -> None:
        self._recorder = recorder
        self._op = op
        self._started = 0.0

    def __enter__(self) -> Timing:
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._recorder.record(self._op, time.perf_counter() - self._started)
