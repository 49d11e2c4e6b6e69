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
from collections.abc import Sequence

try:
    from prometheus_client import REGISTRY, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sqlcache_prometheus needs prometheus_client, which is not installed: "
        "pip install 'sqlcache[prometheus]'",
        name=exc.name,
    ) from exc

from sqlcache import signals
from sqlcache.errors import ConfigurationError
from sqlcache.plugin import PluginHost

from ._families import Options, join, leave
from ._recorder import Recorder

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

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


class PrometheusPlugin:
    """Exports one cache's activity to a Prometheus registry.

    What it does not promise: ``<ns>_errors_total`` counts ``cache_error`` signals, and the cache signals
    an outage once per burst, so it is lower than ``<ns>_stats_errors_total`` (every failed call) during
    one. Removing series on :meth:`close` is not supported by prometheus_client's multiprocess mode.

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
        self._recorder: Recorder | None = None

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
        options = Options(self.namespace, self.label_models, self.label_tags, self.buckets)
        family = join(self.registry, options, prefix, host.stats)
        try:
            self._recorder = recorder = Recorder(family, prefix)
            host.add_operation_hook(recorder.hook)
            host.connect(signals.invalidated, recorder.on_invalidated)
            host.connect(signals.cache_error, recorder.on_error)
        except BaseException:
            if self._recorder is None:
                leave(self.registry, family, prefix)
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
            leave(self.registry, recorder.family, recorder.prefix)
