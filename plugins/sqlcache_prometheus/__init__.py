"""Prometheus metrics for sqlcache: reads, fills, invalidations, errors, operation durations and the
cache's ``stats()`` counters, each labelled with the cache's key ``prefix``.

.. code-block:: python

    from sqlcache_prometheus import PrometheusPlugin

    cache = SQLCache(client, prefix="app", plugins=[PrometheusPlugin()])

Metrics (``namespace`` defaults to ``sqlcache``; every one has a ``prefix`` label):

====================================  =======================================================================
``<ns>_requests_total``               reads through the cache by ``kind`` and ``result`` (hit, miss, stale,
                                      bypass, error); ``model`` / ``tags`` labels when asked for
``<ns>_fills_total``                  fills by ``kind`` and ``result`` (stored, refused, skipped, error);
                                      ``model`` / ``tags`` labels when asked for
``<ns>_invalidated_keys_total``       dependency keys carried by ``operation`` (release, invalidate, replay,
                                      relay) and its ``result``
``<ns>_invalidation_events_total``    ``invalidated`` signals by ``remote`` ("true" / "false")
``<ns>_replays_total``                journal replays by ``result``
``<ns>_relay_passes_total``           relay batches applied by ``result``
``<ns>_errors_total``                 ``cache_error`` signals by ``operation``
``<ns>_operation_duration_seconds``   histogram of every timed operation by ``operation``
``<ns>_stats_<counter>_total``        ``SQLCache.stats()`` counters, read at scrape time
``<ns>_stats_journal``                ``stats()["journal"]``: invalidations waiting for Redis (a gauge)
====================================  =======================================================================

Several caches may report into one registry, each through its own plugin: the plugins of one registry
and namespace share the metric families and tell their series apart by ``prefix``.

.. versionadded:: 0.2
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sqlcache_prometheus needs prometheus_client, which is not installed: "
        "pip install 'sqlcache[prometheus]'",
        name=exc.name,
    ) from exc

from sqlcache import signals
from sqlcache.errors import ConfigurationError
from sqlcache.plugin import OPERATIONS, Operation, PluginHost

__all__ = ["PrometheusPlugin"]

#: seconds: a Redis round trip on a local network (~0.1 ms) up to a timed-out call (timeout=0.25 s)
#: and a slow commit's release
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

#: operations whose ``keys`` are dependency keys given (or journalled for) a fresh generation
_INVALIDATING = ("release", "invalidate", "replay", "relay")
#: ``stats()`` entries that are levels, not running totals
_STATS_GAUGES = frozenset({"journal"})
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_STAT_NAME = re.compile(r"[a-zA-Z0-9_]+\Z")

Labels = tuple[str, ...]
Stats = Callable[[], dict[str, int]]
M = TypeVar("M", Counter, Histogram)


class PrometheusPlugin:
    """Exports one cache's activity to a Prometheus registry.

    :param registry: where the metrics are registered; the global ``prometheus_client.REGISTRY`` when
        None.
    :param namespace: the first part of every metric's name.
    :param label_models: add a ``model`` label (the mapped class's name; for a query, its first entity's;
        "" when there is none) to requests and fills. One series per model and result: mind the cardinality.
    :param label_tags: add a ``tags`` label (the cached query's tags, sorted and comma-joined) to
        requests and fills. One series per distinct tag set: only for a small, fixed set of tags.
    :param buckets: upper bounds in seconds of the duration histogram's buckets.
    :param name: the plugin's name in its cache (unique per cache).
    :raises ConfigurationError: on a bad namespace, bucket list or registry; at ``add_plugin()``, when
        this plugin serves another cache already, when a plugin of another cache with the same prefix
        reports into the same registry and namespace, or when such plugins disagree on ``label_models``,
        ``label_tags`` or ``buckets`` (they share the metric families).

    What it does not promise: ``<ns>_errors_total`` counts ``cache_error`` signals, and the cache signals
    an outage once per burst, so it is lower than ``<ns>_stats_errors_total`` (every failed call) during
    one. Removing series on :meth:`close` is not supported by prometheus_client's multiprocess mode.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "sqlcache",
        label_models: bool = False,
        label_tags: bool = False,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        name: str = "prometheus",
    ) -> None:
        if registry is None:
            registry = REGISTRY
        if not isinstance(registry, CollectorRegistry):
            raise ConfigurationError(
                f"registry must be a prometheus_client CollectorRegistry, got {registry!r}"
            )
        if not isinstance(namespace, str) or not _NAME.match(namespace):
            raise ConfigurationError(f"namespace must be a valid metric name prefix, got {namespace!r}")
        bounds = tuple(buckets)
        if (
            not bounds
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds)
            or any(b >= c for b, c in itertools.pairwise(bounds))
        ):
            raise ConfigurationError(f"buckets must be increasing numbers, got {buckets!r}")
        self.registry = registry
        self.namespace = namespace
        self.label_models = bool(label_models)
        self.label_tags = bool(label_tags)
        self.buckets = tuple(float(b) for b in bounds)
        self.name = name
        self._recorder: _Recorder | None = None

    def __repr__(self) -> str:
        return f"<PrometheusPlugin name={self.name!r} namespace={self.namespace!r}>"

    def setup(self, host: PluginHost) -> None:
        """Create (or join) the metric families, time every operation, hear ``invalidated`` and
        ``cache_error``, and expose ``stats()`` at scrape time."""
        if self._recorder is not None:
            raise ConfigurationError(
                f"{self!r} serves {self._recorder.prefix!r} already: use one PrometheusPlugin per cache"
            )
        prefix = host.prefix
        options = _Options(self.namespace, self.label_models, self.label_tags, self.buckets)
        family = _join(self.registry, options, prefix, host.stats)
        try:
            self._recorder = recorder = _Recorder(family, prefix)
            host.add_operation_hook(recorder.hook)
            host.connect(signals.invalidated, recorder.on_invalidated)
            host.connect(signals.cache_error, recorder.on_error)
        except BaseException:
            if self._recorder is None:
                _leave(self.registry, family, prefix)
            self.close()
            raise

    def close(self) -> None:
        """Remove this cache's series and, once no other plugin uses them, unregister the metrics.

        Idempotent. Closed by its cache, the plugin has no hook nor receiver left; closed on its own
        (its cache still open), they stay installed but record nothing.
        """
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
            _leave(self.registry, recorder.family, recorder.prefix)


# -- the metric families of one registry and namespace ------------------------------------------------


class _Options:
    """What the plugins sharing one registry and namespace must agree on."""

    __slots__ = ("buckets", "label_models", "label_tags", "namespace")

    def __init__(
        self, namespace: str, label_models: bool, label_tags: bool, buckets: tuple[float, ...]
    ) -> None:
        self.namespace = namespace
        self.label_models = label_models
        self.label_tags = label_tags
        self.buckets = buckets

    def key(self) -> tuple[bool, bool, tuple[float, ...]]:
        return (self.label_models, self.label_tags, self.buckets)


class _Family:
    """The metrics of one registry and namespace, shared by every plugin reporting there."""

    def __init__(self, o: _Options) -> None:
        ns = o.namespace
        self.options = o
        extra = (*(["model"] if o.label_models else []), *(["tags"] if o.label_tags else []))
        self.requests = Counter(
            f"{ns}_requests",
            "Reads through the cache by kind (identity, query) and result (hit, miss, stale, bypass, error).",
            ["prefix", "kind", "result", *extra],
            registry=None,
        )
        self.fills = Counter(
            f"{ns}_fills",
            "Entries offered to Redis after a miss, by kind and result (stored, refused, skipped, error).",
            ["prefix", "kind", "result", *extra],
            registry=None,
        )
        self.invalidated_keys = Counter(
            f"{ns}_invalidated_keys",
            "Dependency keys given a fresh generation (result ok) or journalled (deferred, error), by "
            "operation (release, invalidate, replay, relay).",
            ["prefix", "operation", "result"],
            registry=None,
        )
        self.invalidation_events = Counter(
            f"{ns}_invalidation_events",
            "invalidated signals: commits and invalidate*() calls (remote=false), other processes' "
            "broadcasts (remote=true).",
            ["prefix", "remote"],
            registry=None,
        )
        self.replays = Counter(
            f"{ns}_replays",
            "Replays of the journal of invalidations Redis did not take, by result.",
            ["prefix", "result"],
            registry=None,
        )
        self.relay_passes = Counter(
            f"{ns}_relay_passes",
            "Outbox batches a relay applied, by result.",
            ["prefix", "result"],
            registry=None,
        )
        self.errors = Counter(
            f"{ns}_errors",
            "cache_error signals by operation (a Redis outage is signalled once per burst).",
            ["prefix", "operation"],
            registry=None,
        )
        self.durations = Histogram(
            f"{ns}_operation_duration_seconds",
            "Duration of the cache's timed operations (read, fill, lock, release, invalidate, replay, "
            "relay).",
            ["prefix", "operation"],
            registry=None,
            buckets=o.buckets,
        )
        self.stats = _StatsCollector(ns)
        self.collectors: tuple[Collector, ...] = (
            self.requests,
            self.fills,
            self.invalidated_keys,
            self.invalidation_events,
            self.replays,
            self.relay_passes,
            self.errors,
            self.durations,
            self.stats,
        )
        self.prefixes: set[str] = set()


class _StatsCollector(Collector):
    """``stats()`` of every cache reporting here, read at scrape time: one family per counter, one
    series per cache (``prefix``)."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._lock = threading.Lock()
        self._sources: dict[str, Stats] = {}

    def add(self, prefix: str, stats: Stats) -> None:
        with self._lock:
            self._sources[prefix] = stats

    def remove(self, prefix: str) -> None:
        with self._lock:
            self._sources.pop(prefix, None)

    def describe(self) -> Iterable[Metric]:
        # the names are those of stats(): what a scrape yields now is what the registry must reserve
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sources = sorted(self._sources.items())
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for prefix, stats in sources:
            for counter, value in stats().items():
                if not _STAT_NAME.match(counter):
                    continue
                family = families.get(counter)
                if family is None:
                    name = f"{self._namespace}_stats_{counter}"
                    if counter in _STATS_GAUGES:
                        family = GaugeMetricFamily(
                            name, f"SQLCache.stats()[{counter!r}] now.", labels=["prefix"]
                        )
                    else:
                        family = CounterMetricFamily(
                            name,
                            f"SQLCache.stats()[{counter!r}] since the cache was created.",
                            labels=["prefix"],
                        )
                    families[counter] = family
                family.add_metric([prefix], float(value))
        return list(families.values())


# The registry is what the plugins of several caches share: a metric name exists once per registry, so
# the first plugin of a (registry, namespace) creates the families and the others add their series.
# Weak keys: a registry dropped by its owner takes its entry with it.
_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Family]] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _join(registry: CollectorRegistry, o: _Options, prefix: str, stats: Stats) -> _Family:
    """The families of ``registry`` and ``o.namespace``, created and registered if new, with ``prefix``
    reserved in them; raises ConfigurationError on a clash."""
    with _families_lock:
        by_ns = _families.setdefault(registry, {})
        family = by_ns.get(o.namespace)
        if family is None:
            family = _Family(o)
            family.stats.add(prefix, stats)
            done: list[Collector] = []
            try:
                for collector in family.collectors:
                    registry.register(collector)
                    done.append(collector)
            except ValueError as exc:  # a metric of the same name registered by someone else
                for collector in done:
                    registry.unregister(collector)
                if not by_ns:
                    del _families[registry]
                raise ConfigurationError(
                    f"cannot register the {o.namespace!r} metrics in {registry!r}: {exc}"
                ) from exc
            by_ns[o.namespace] = family
        else:
            if family.options.key() != o.key():
                f = family.options
                raise ConfigurationError(
                    f"the {o.namespace!r} metrics of this registry have label_models={f.label_models}, "
                    f"label_tags={f.label_tags}, buckets={f.buckets}; a plugin reporting there must use "
                    f"the same, got label_models={o.label_models}, label_tags={o.label_tags}, "
                    f"buckets={o.buckets}"
                )
            if prefix in family.prefixes:
                raise ConfigurationError(
                    f"a cache with prefix {prefix!r} reports to the {o.namespace!r} metrics of this registry "
                    "already: its series could not be told apart (use another prefix, registry or namespace)"
                )
            family.stats.add(prefix, stats)
        family.prefixes.add(prefix)
        return family


def _leave(registry: CollectorRegistry, family: _Family, prefix: str) -> None:
    """Release ``prefix``; the last plugin to leave unregisters the families."""
    with _families_lock:
        family.stats.remove(prefix)
        family.prefixes.discard(prefix)
        if family.prefixes:
            return
        for collector in family.collectors:
            registry.unregister(collector)
        by_ns = _families.get(registry)
        if by_ns is not None and by_ns.get(family.options.namespace) is family:
            del by_ns[family.options.namespace]
            if not by_ns:
                del _families[registry]


# -- what one cache reports ------------------------------------------------------------------------------


class _Series(Generic[M]):
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


class _Recorder:
    """The series of one cache: label children looked up once, then incremented from the hooks."""

    def __init__(self, family: _Family, prefix: str) -> None:
        self.family = family
        self.prefix = prefix
        self._lock = threading.Lock()
        self._closed = False
        o = family.options
        self._label_models = o.label_models
        self._label_tags = o.label_tags
        self._requests = _Series(family.requests)
        self._fills = _Series(family.fills)
        self._invalidated_keys = _Series(family.invalidated_keys)
        self._invalidation_events = _Series(family.invalidation_events)
        self._replays = _Series(family.replays)
        self._relay_passes = _Series(family.relay_passes)
        self._errors = _Series(family.errors)
        self._durations = _Series(family.durations)
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
        for operation in _INVALIDATING:
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

    def _child(self, series: _Series[M], labels: Labels) -> M | None:
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

    def hook(self, op: Operation) -> _Timing:
        return _Timing(self, op)

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
        elif name in _INVALIDATING:
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


class _Timing:
    """The context manager an operation hook returns: times the operation, records it as it ends."""

    __slots__ = ("_op", "_recorder", "_started")

    def __init__(self, recorder: _Recorder, op: Operation) -> None:
        self._recorder = recorder
        self._op = op
        self._started = 0.0

    def __enter__(self) -> _Timing:
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._recorder.record(self._op, time.perf_counter() - self._started)
