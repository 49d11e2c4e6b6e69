"""The metric families of one registry and namespace, shared by every plugin reporting there.

prometheus-client allows a metric name once per registry: the first plugin of a (registry, namespace)
creates and registers the families, the others add their series to them (told apart by ``prefix``), and
the last one to leave unregisters them.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sqlcache.errors import ConfigurationError

__all__ = ["Family", "Options", "Stats", "StatsCollector", "join", "leave"]

#: ``stats()`` entries that are levels, not running totals
_STATS_GAUGES = frozenset({"journal"})
_STAT_NAME = re.compile(r"[a-zA-Z0-9_]+\Z")

Stats = Callable[[], dict[str, int]]


class Options:
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


class Family:
    """The metrics of one registry and namespace, shared by every plugin reporting there."""

    def __init__(self, o: Options) -> None:
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
        self.stats = StatsCollector(ns)
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


class StatsCollector(Collector):
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
_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Family]] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def join(registry: CollectorRegistry, o: Options, prefix: str, stats: Stats) -> Family:
    """The families of ``registry`` and ``o.namespace``, created and registered if new, with ``prefix``
    reserved in them; raises ConfigurationError on a clash."""
    with _families_lock:
        by_ns = _families.setdefault(registry, {})
        family = by_ns.get(o.namespace)
        if family is None:
            family = Family(o)
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


def leave(registry: CollectorRegistry, family: Family, prefix: str) -> None:
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
