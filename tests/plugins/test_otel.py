"""The OpenTelemetry plugin: spans of real reads, fills, commits and invalidations, on all three databases."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlcache_otel
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlcache_otel import OpenTelemetryPlugin

import sqlcache
from sqlcache import SQLCache
from sqlcache.errors import ConfigurationError
from sqlcache.plugin import Plugin

from ..conftest import shareable_url
from ..helpers import make_user
from ..models import User

REPO = Path(__file__).resolve().parents[2]


class OpenSpans(SpanProcessor):
    """Spans started and not ended yet (an exporter only ever sees ended ones)."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open[span.get_span_context().span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.pop(span.context.span_id, None)


class Traces:
    """A private tracer provider (the global one stays untouched) and what it recorded."""

    def __init__(self) -> None:
        self.provider = TracerProvider()
        self.exporter = InMemorySpanExporter()
        self.opened = OpenSpans()
        self.provider.add_span_processor(self.opened)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self) -> list[ReadableSpan]:
        """Finished sqlcache spans, in the order they ended."""
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith("sqlcache.")]

    def outcomes(self) -> list[tuple[str, object]]:
        return [(s.name, attr(s, "sqlcache.result")) for s in self.spans()]


def attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


def assert_children_of(spans: list[ReadableSpan], outer: trace.Span) -> None:
    ctx = outer.get_span_context()
    for span in spans:
        assert span.parent is not None and span.parent.span_id == ctx.span_id, span.name
        assert span.context is not None and span.context.trace_id == ctx.trace_id


@pytest.fixture
def traces() -> Iterator[Traces]:
    t = Traces()
    yield t
    t.provider.shutdown()


@pytest.fixture
def traced(cache: SQLCache, traces: Traces) -> SQLCache:
    """The ``cache`` fixture traced by the plugin, its spans going to ``traces``."""
    cache.add_plugin(OpenTelemetryPlugin(tracer_provider=traces.provider))
    return cache


def test_is_a_plugin() -> None:
    """The plugin satisfies the Plugin protocol, is named "otel" and exports only its class."""
    plugin = OpenTelemetryPlugin()
    assert isinstance(plugin, Plugin)
    assert plugin.name == "otel"
    assert sqlcache_otel.__all__ == ["OpenTelemetryPlugin"]


def test_imports_public_sqlcache_names_only() -> None:
    """The plugin's source imports no private sqlcache module."""
    tree = ast.parse(Path(sqlcache_otel.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in modules if m.split(".")[0] == "sqlcache"]
    assert ours and all(not part.startswith("_") for m in ours for part in m.split("."))


def test_get_miss_then_hit(engine: Engine, traced: SQLCache, traces: Traces, redis_url: str) -> None:
    """A get that misses gives a read (miss) and a fill (stored) span, the next get a read (hit) span,
    all CLIENT children of the caller's span with the database and sqlcache attributes."""
    traced.register(User)
    uid = make_user(engine)
    traced.clear()
    traces.exporter.clear()
    with traces.tracer.start_as_current_span("outer") as outer:
        for _ in range(2):
            with Session(engine) as s:
                u = s.get(User, uid)
                assert u is not None and u.name == "ann"
        assert trace.get_current_span() is outer  # every operation's span was current, then undone
    assert not trace.get_current_span().get_span_context().is_valid
    assert traces.outcomes() == [
        ("sqlcache.read", "miss"),
        ("sqlcache.fill", "stored"),
        ("sqlcache.read", "hit"),
    ]
    spans = traces.spans()
    assert_children_of(spans, outer)
    server = urlsplit(redis_url)
    for span in spans:
        assert span.kind is SpanKind.CLIENT
        assert span.status.status_code is StatusCode.UNSET
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "sqlcache"
        assert span.instrumentation_scope.version == sqlcache.__version__
        assert attr(span, "db.system") == attr(span, "db.system.name") == "redis"
        assert attr(span, "db.operation.name") == span.name.removeprefix("sqlcache.")
        assert (attr(span, "server.address"), attr(span, "server.port")) == (server.hostname, server.port)
        assert attr(span, "sqlcache.prefix") == traced.config.prefix
        assert attr(span, "sqlcache.kind") == "identity"
        assert attr(span, "sqlcache.model") == "User"
        assert attr(span, "sqlcache.keys") >= 1
        assert attr(span, "sqlcache.key") is None  # record_keys is off by default
    assert traces.opened.open == {}
    assert traced.stats()["plugin_errors"] == 0


def test_record_keys(engine: Engine, cache: SQLCache, traces: Traces) -> None:
    """With record_keys=True the read and fill spans carry the entry key."""
    cache.add_plugin(OpenTelemetryPlugin(tracer_provider=traces.provider, record_keys=True))
    cache.register(User)
    uid = make_user(engine)
    cache.clear()
    traces.exporter.clear()
    with Session(engine) as s:
        s.get(User, uid)
    spans = traces.spans()
    assert [s.name for s in spans] == ["sqlcache.read", "sqlcache.fill"]
    keys = {attr(s, "sqlcache.key") for s in spans}
    assert len(keys) == 1 and keys.pop().startswith(cache.config.prefix + ":")


class CommittedName(SpanProcessor):
    """Reads the user's committed name on another connection as the lock span ends and the release
    span starts: tells whether each ran before or after the database COMMIT."""

    def __init__(self, read: Callable[[], str]) -> None:
        self.read = read
        self.seen: dict[str, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.name == "sqlcache.release":
            self.seen["release"] = self.read()

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == "sqlcache.lock":
            self.seen["lock"] = self.read()


def test_commit_lock_before_and_release_after_database_commit(
    engine: Engine, traced: SQLCache, traces: Traces
) -> None:
    """A commit that invalidates gives a lock span, ended before the database COMMIT, and a release
    span, started after it; the next get misses."""
    traced.register(User)
    uid = make_user(engine)
    probe = create_engine(shareable_url(engine))  # not attached: sees only what is committed
    try:

        def committed_name() -> str:
            with probe.connect() as c:
                return str(c.execute(select(User.name).where(User.id == uid)).scalar_one())

        watcher = CommittedName(committed_name)
        traces.provider.add_span_processor(watcher)
        traces.exporter.clear()
        with traces.tracer.start_as_current_span("outer") as outer:
            with Session(engine) as s:
                u = s.get(User, uid)
                assert u is not None
                u.name = "bob"
                s.commit()
            with Session(engine) as s:
                u = s.get(User, uid)
                assert u is not None and u.name == "bob"
    finally:
        probe.dispose()
    assert watcher.seen == {"lock": "ann", "release": "bob"}
    spans = {s.name: s for s in traces.spans() if s.name in ("sqlcache.lock", "sqlcache.release")}
    lock, release = spans["sqlcache.lock"], spans["sqlcache.release"]
    assert_children_of([lock, release], outer)
    assert lock.end_time is not None and release.start_time is not None
    assert lock.end_time <= release.start_time
    for span in (lock, release):
        assert attr(span, "sqlcache.result") == "ok"
        assert attr(span, "db.operation.name") == span.name.removeprefix("sqlcache.")
        assert attr(span, "sqlcache.keys") >= 1
        assert "table:users" in attr(span, "sqlcache.tags")
    assert traces.outcomes()[-2:] == [("sqlcache.read", "miss"), ("sqlcache.fill", "stored")]
    assert traces.opened.open == {}
    assert traced.stats()["plugin_errors"] == 0


def test_cached_query_and_invalidate_tags(engine: Engine, traced: SQLCache, traces: Traces) -> None:
    """A tagged cached query misses then hits, invalidate_tags makes an invalidate span, then it misses."""
    make_user(engine)
    traces.exporter.clear()
    stmt = select(User).order_by(User.id).options(sqlcache.cached(tags=["t"]))
    with traces.tracer.start_as_current_span("outer") as outer:
        for _ in range(2):
            with Session(engine) as s:
                assert [u.name for u in s.scalars(stmt)] == ["ann"]
        traced.invalidate_tags("t")
        with Session(engine) as s:
            assert [u.name for u in s.scalars(stmt)] == ["ann"]
    assert traces.outcomes() == [
        ("sqlcache.read", "miss"),
        ("sqlcache.fill", "stored"),
        ("sqlcache.read", "hit"),
        ("sqlcache.invalidate", "ok"),
        ("sqlcache.read", "miss"),
        ("sqlcache.fill", "stored"),
    ]
    spans = traces.spans()
    assert_children_of(spans, outer)
    for span in spans:
        assert tuple(attr(span, "sqlcache.tags")) == ("t",)
        if span.name != "sqlcache.invalidate":
            assert attr(span, "sqlcache.kind") == "query"
    invalidate = spans[3]
    assert attr(invalidate, "sqlcache.keys") == 1 and attr(invalidate, "sqlcache.kind") is None
    assert traces.opened.open == {}
    assert traced.stats()["plugin_errors"] == 0


def test_redis_down_read_span_is_error(engine: Engine, traces: Traces) -> None:
    """With Redis unreachable the read span records the exception with status ERROR while the get still
    returns the database's row, and the caller's span gets a cache_error event."""
    uid = make_user(engine)  # before the cache is attached: no invalidation waits in its journal
    down = SQLCache(
        "redis://127.0.0.1:1/0",
        prefix=f"t{uuid.uuid4().hex[:12]}",
        plugins=[OpenTelemetryPlugin(tracer_provider=traces.provider)],
    )
    down.register(User)
    down.attach(engine)
    try:
        with traces.tracer.start_as_current_span("outer") as outer:
            with Session(engine) as s:
                u = s.get(User, uid)
                assert u is not None and u.name == "ann"
        stats = down.stats()
    finally:
        down.detach(engine)
        down.close()
    assert stats["errors"] >= 1 and stats["plugin_errors"] == 0
    [read] = traces.spans()
    assert_children_of([read], outer)
    assert read.name == "sqlcache.read" and attr(read, "sqlcache.result") == "error"
    assert read.status.status_code is StatusCode.ERROR
    assert attr(read, "error.type") == "sqlcache.errors.CacheUnavailable"
    [exception] = [e for e in read.events if e.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "sqlcache.errors.CacheUnavailable"
    [caller] = [s for s in traces.exporter.get_finished_spans() if s.name == "outer"]
    [event] = [e for e in caller.events if e.name == "sqlcache.cache_error"]
    assert event.attributes is not None and event.attributes["sqlcache.operation"] == "read"
    assert traces.opened.open == {}


def test_redis_down_commit(engine: Engine, traces: Traces) -> None:
    """With Redis unreachable each commit's lock span is an ERROR, its release is deferred, and the
    journal's replay that the second release attempts is a child span of that release."""
    down = SQLCache(
        "redis://127.0.0.1:1/0",
        prefix=f"t{uuid.uuid4().hex[:12]}",
        plugins=[OpenTelemetryPlugin(tracer_provider=traces.provider)],
    )
    down.register(User)
    down.attach(engine)
    try:
        with traces.tracer.start_as_current_span("outer") as outer:
            for name in ("ann", "bob"):
                with Session(engine) as s:
                    s.add(User(name=name))
                    s.commit()
        with Session(engine) as s:
            assert sorted(s.scalars(select(User.name))) == ["ann", "bob"]
    finally:
        down.detach(engine)
        down.close()
    trace_id = outer.get_span_context().trace_id
    spans = [s for s in traces.spans() if s.context is not None and s.context.trace_id == trace_id]
    outcomes = [(s.name, attr(s, "sqlcache.result")) for s in spans]
    assert outcomes == [
        ("sqlcache.lock", "error"),
        ("sqlcache.release", "deferred"),
        ("sqlcache.lock", "error"),
        ("sqlcache.replay", "error"),  # ends first: it runs inside the release below
        ("sqlcache.release", "deferred"),
    ]
    lock, _, _, replay, release = spans
    assert_children_of([lock, release], outer)
    assert replay.parent is not None and release.context is not None
    assert replay.parent.span_id == release.context.span_id
    for span in (lock, replay):
        assert span.status.status_code is StatusCode.ERROR
        assert attr(span, "error.type") == "sqlcache.errors.CacheUnavailable"
    assert traces.opened.open == {}


def test_default_provider_is_the_global_one(engine: Engine, cache: SQLCache, traces: Traces) -> None:
    """Without tracer_provider the plugin uses the global provider (a no-op here) and nothing fails."""
    cache.add_plugin(OpenTelemetryPlugin())
    cache.register(User)
    uid = make_user(engine)
    traces.exporter.clear()
    with traces.tracer.start_as_current_span("outer") as outer:
        for _ in range(2):
            with Session(engine) as s:
                assert s.get(User, uid) is not None
        assert trace.get_current_span() is outer
    assert traces.spans() == []
    assert cache.stats()["plugin_errors"] == 0


def test_close_is_idempotent_and_stops_spans(engine: Engine, cache: SQLCache, traces: Traces) -> None:
    """close() may run twice, and a closed plugin whose hook the cache still holds makes no span."""
    plugin = OpenTelemetryPlugin(tracer_provider=traces.provider)
    cache.add_plugin(plugin)
    cache.register(User)
    uid = make_user(engine)
    plugin.close()
    plugin.close()
    traces.exporter.clear()
    with Session(engine) as s:
        assert s.get(User, uid) is not None
    assert traces.spans() == []
    assert cache.stats()["plugin_errors"] == 0


def test_one_cache_at_a_time(redis_url: str, traces: Traces) -> None:
    """A second cache refuses an instance that serves a first one, and accepts it once the first closed."""
    plugin = OpenTelemetryPlugin(tracer_provider=traces.provider)
    first = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    second = SQLCache(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    try:
        first.add_plugin(plugin)
        with pytest.raises(ConfigurationError, match="already serves a cache"):
            second.add_plugin(plugin)
        first.close()
        second.add_plugin(plugin)
        assert second.plugins() == [plugin]
    finally:
        first.close()
        second.close()


def test_missing_extra_names_it() -> None:
    """Without opentelemetry, importing the plugin raises an ImportError that names the extra to install."""
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "try:\n"
        "    import sqlcache_otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    path = [str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "pip install 'sqlcache[otel]'" in done.stdout
