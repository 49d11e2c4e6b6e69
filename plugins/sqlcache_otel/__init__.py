"""OpenTelemetry tracing for sqlcache: one CLIENT span per cache operation.

Every timed operation of a :class:`~sqlcache.SQLCache` (see :data:`sqlcache.plugin.OPERATIONS`) becomes a
span named ``sqlcache.<operation>`` (``sqlcache.read``, ``sqlcache.fill``, ``sqlcache.lock``, ...), a
child of the span current when the operation starts, with the database client attributes of
OpenTelemetry's semantic conventions (``db.system.name = "redis"``, ``db.operation.name``, the server's
address) and sqlcache's own under ``sqlcache.*`` (``sqlcache.result`` says hit or miss)::

    from sqlcache_otel import OpenTelemetryPlugin

    cache = SQLCache(client, prefix="app", plugins=[OpenTelemetryPlugin()])

Depends on ``opentelemetry-api`` only; spans are recorded by whatever SDK the application configured.

.. versionadded:: 0.2
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sqlcache_otel needs the OpenTelemetry API, which is not installed: pip install 'sqlcache[otel]'",
        name=exc.name,
    ) from exc

import sqlcache
from sqlcache import signals
from sqlcache.errors import ConfigurationError
from sqlcache.plugin import Operation, PluginHost

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = ["OpenTelemetryPlugin"]

#: the instrumentation scope of every span (sqlcache instruments itself: its own name and version)
SCOPE = "sqlcache"


class OpenTelemetryPlugin:
    """A span per cache operation, and an event on the current span for each ``cache_error``.

    Span attributes: ``db.system`` and ``db.system.name`` (``"redis"``), ``db.operation.name`` (the
    operation), ``server.address``, ``server.port`` and ``db.namespace`` (when the cache's client says),
    ``sqlcache.prefix``, ``sqlcache.kind`` (``"identity"`` or ``"query"``), ``sqlcache.model``,
    ``sqlcache.tags``, ``sqlcache.keys`` (how many dependency keys), ``sqlcache.result`` (one of
    ``OPERATIONS[name]``: ``hit``, ``miss``, ``stored``, ``ok``, ``deferred``, ...) and ``sqlcache.key``
    with ``record_keys``. An operation that failed (Redis away, say) records its exception and ends with
    status ERROR, although the read or commit itself went on without the cache.

    A commit's invalidation is two spans: ``sqlcache.lock`` before the database COMMIT and
    ``sqlcache.release`` after it. Each span is current while its operation runs, so spans of an
    instrumented Redis client nest under it.

    Not guaranteed: an operation the cache never ends (an exception sqlcache does not expect, raised
    mid-operation) leaves its span unended. One instance serves one cache at a time; :meth:`close`
    (called by :meth:`SQLCache.close <sqlcache.SQLCache.close>`) frees it for another.

    :param tracer_provider: where spans go; ``None`` uses the global provider
        (``opentelemetry.trace.get_tracer``), a no-op until the application installs an SDK.
    :param record_keys: put the entry key of reads and fills on their spans (``sqlcache.key``). Off by
        default: keys are high-cardinality and hash the query's parameters, which may be sensitive.
    :param name: the plugin's name on its cache (two instances on one cache need two names).

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        record_keys: bool = False,
        name: str = "otel",
    ) -> None:
        self.name = name
        self._provider = tracer_provider
        self._record_keys = record_keys
        self._tracer: Tracer | None = None
        self._common: dict[str, AttributeValue] = {}

    def __repr__(self) -> str:
        return f"<OpenTelemetryPlugin name={self.name!r} record_keys={self._record_keys}>"

    def setup(self, host: PluginHost) -> None:
        """Trace every operation of ``host``'s cache and hear its ``cache_error`` signal.

        :raises ConfigurationError: if this instance already serves a cache (create one per cache).
        """
        if self._tracer is not None:
            raise ConfigurationError(f"{self!r} already serves a cache: create one plugin per cache")
        self._common = {
            "db.system": "redis",  # the name before semantic conventions 1.26, still widely read
            "db.system.name": "redis",
            **_server_attributes(host),
            "sqlcache.prefix": host.prefix,
        }
        self._tracer = trace.get_tracer(SCOPE, sqlcache.__version__, tracer_provider=self._provider)
        host.add_operation_hook(self._hook)
        host.connect(signals.cache_error, self._on_cache_error)

    def close(self) -> None:
        """Stop tracing (the host removes the hook and the receiver itself). Idempotent."""
        self._tracer = None

    def _hook(self, op: Operation) -> AbstractContextManager[object]:
        tracer = self._tracer
        if tracer is None:
            return nullcontext()  # closed while the cache still held the hook
        return _OperationSpan(tracer, op, self._common, self._record_keys)

    def _on_cache_error(self, sender: object, *, exc: BaseException, operation: str, **_: Any) -> None:
        # sent after a failed operation ended (on the caller's span) or inside one (a release's span);
        # a plain event, not record_exception(): the caller's own work did not fail
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "sqlcache.cache_error",
                {
                    "sqlcache.operation": operation,
                    "sqlcache.prefix": self._common.get("sqlcache.prefix", ""),
                    "exception.type": _qualified_name(type(exc)),
                    "exception.message": str(exc),
                },
            )


class _OperationSpan:
    """The context manager one operation's hook returns: its span is current from enter to exit."""

    __slots__ = ("_common", "_op", "_record_keys", "_span", "_token", "_tracer")

    def __init__(
        self, tracer: Tracer, op: Operation, common: dict[str, AttributeValue], record_keys: bool
    ) -> None:
        self._tracer = tracer
        self._op = op
        self._common = common
        self._record_keys = record_keys
        self._span: Span | None = None
        self._token: Token[Context] | None = None

    def __enter__(self) -> Span:
        op = self._op
        attributes = dict(self._common)
        attributes["db.operation.name"] = op.name
        attributes["sqlcache.keys"] = op.keys
        if op.kind is not None:
            attributes["sqlcache.kind"] = op.kind
        if op.model is not None:
            attributes["sqlcache.model"] = op.model
        if op.tags:
            attributes["sqlcache.tags"] = list(op.tags)
        if self._record_keys and op.key is not None:
            attributes["sqlcache.key"] = op.key
        span = self._tracer.start_span(f"sqlcache.{op.name}", kind=SpanKind.CLIENT, attributes=attributes)
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span, token = self._span, self._token
        if span is None or token is None:
            return
        self._span = self._token = None
        op = self._op
        try:
            if span.is_recording():
                if op.result is not None:
                    span.set_attribute("sqlcache.result", op.result)
                error = op.error if op.error is not None else exc
                if error is not None:
                    span.record_exception(error)
                    span.set_attribute("error.type", _qualified_name(type(error)))
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                elif op.result == "error":
                    # e.g. an entry that could not be decoded: the cache_error event on this span says why
                    span.set_attribute("error.type", "_OTHER")
                    span.set_status(Status(StatusCode.ERROR, f"sqlcache {op.name} failed"))
        finally:
            span.end()
            otel_context.detach(token)


def _server_attributes(host: PluginHost) -> dict[str, AttributeValue]:
    """``server.address``, ``server.port`` and ``db.namespace`` of the cache's Redis, where known."""
    server = host.server()
    attributes: dict[str, AttributeValue] = {}
    if "address" in server:
        attributes["server.address"] = str(server["address"])
    if "port" in server:
        attributes["server.port"] = int(server["port"])
    if "db" in server:
        attributes["db.namespace"] = str(server["db"])
    return attributes


def _qualified_name(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
