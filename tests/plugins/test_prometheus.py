"""The Prometheus plugin: what a scrape of its registry shows after real reads, fills and commits."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlcache_prometheus import PrometheusPlugin

from sqlcache import ConfigurationError, SQLCache, cached, signals
from sqlcache.plugin import OPERATIONS

from ..conftest import SQLCounter, free_port
from ..models import Product, User
from ..proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]


class Scrape:
    """Reads one cache's samples (its ``prefix`` label) from a registry, as a scrape would see them."""

    def __init__(self, registry: CollectorRegistry, prefix: str, namespace: str = "sqlcache") -> None:
        self.registry = registry
        self.prefix = prefix
        self.ns = namespace

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"{self.ns}_{name}", {"prefix": self.prefix, **labels})

    def requests(self, kind: str, result: str) -> float | None:
        return self("requests_total", kind=kind, result=result)

    def fills(self, kind: str, result: str) -> float | None:
        return self("fills_total", kind=kind, result=result)

    def durations(self, operation: str) -> float | None:
        return self("operation_duration_seconds_count", operation=operation)

    def stat(self, counter: str) -> float | None:
        return self(f"stats_{counter}" if counter == "journal" else f"stats_{counter}_total")


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def add_user(engine: Engine, name: str = "ann") -> int:
    """Insert one user; its id is read from the flush, not through the cache."""
    with Session(engine, expire_on_commit=False) as s:
        u = User(name=name)
        s.add(u)
        s.commit()
        return u.id


def user_name(engine: Engine, uid: int) -> str:
    with Session(engine) as s:
        u = s.get(User, uid)
        assert u is not None
        return u.name


def query_name(engine: Engine, uid: int, tags: tuple[str, ...] = ()) -> str:
    with Session(engine) as s:
        return s.scalars(select(User).where(User.id == uid).options(cached(tags=tags))).one().name


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def scrape(cache: SQLCache, registry: CollectorRegistry) -> Scrape:
    """The default plugin added to ``cache``, reporting into a registry of this test's own."""
    cache.add_plugin(PrometheusPlugin(registry=registry))
    return Scrape(registry, cache.config.prefix)


def test_identity_reads_fills_and_commits(
    engine: Engine, cache: SQLCache, scrape: Scrape, sql_count: SQLCounter
) -> None:
    """Identity misses, hits and fills, and each commit's invalidation, are counted exactly."""
    m = scrape
    cache.register(User)
    uid = add_user(engine)
    assert m.requests("identity", "miss") == 0
    assert m("invalidation_events_total", remote="false") == 1
    assert m.durations("lock") == 1 and m.durations("release") == 1
    released = m("invalidated_keys_total", operation="release", result="ok")
    assert released is not None and released == cache.stats()["invalidations"] > 0

    assert user_name(engine, uid) == "ann"
    sql_count.reset()
    assert user_name(engine, uid) == "ann"
    assert len(sql_count) == 0
    assert (m.requests("identity", "miss"), m.requests("identity", "hit")) == (1, 1)
    assert m.fills("identity", "stored") == 1

    with Session(engine) as s:
        u = s.get(User, uid)  # a hit
        assert u is not None
        u.name = "bob"
        s.commit()
    assert m("invalidation_events_total", remote="false") == 2
    assert m("invalidated_keys_total", operation="release", result="ok") == cache.stats()["invalidations"]
    assert user_name(engine, uid) == "bob"  # invalidated: a miss, then stored again

    assert (m.requests("identity", "miss"), m.requests("identity", "hit")) == (2, 2)
    assert m.fills("identity", "stored") == 2
    for result in ("stale", "bypass", "error"):
        assert m.requests("identity", result) == 0
    for result in ("refused", "skipped", "error"):
        assert m.fills("identity", result) == 0
    assert sum(m.requests("query", r) or 0 for r in OPERATIONS["read"]) == 0
    durations = {op: m.durations(op) for op in OPERATIONS}
    assert durations == {
        "read": 4,
        "fill": 2,
        "lock": 2,
        "release": 2,
        "invalidate": 0,
        "replay": 0,
        "relay": 0,
    }
    assert m("operation_duration_seconds_bucket", operation="read", le="+Inf") == 4
    assert (m("operation_duration_seconds_sum", operation="read") or 0) > 0
    st = cache.stats()
    assert (st["hits"], st["misses"], st["fills"], st["plugin_errors"]) == (2, 2, 2, 0)


def test_cached_query_and_bypass(
    engine: Engine, cache: SQLCache, scrape: Scrape, sql_count: SQLCounter
) -> None:
    """A cached query's miss, fill and hit are counted; a read after a write in its transaction bypasses."""
    m = scrape
    uid = add_user(engine)
    assert query_name(engine, uid) == "ann"
    sql_count.reset()
    assert query_name(engine, uid) == "ann"
    assert len(sql_count) == 0
    assert (m.requests("query", "miss"), m.requests("query", "hit")) == (1, 1)
    assert m.fills("query", "stored") == 1

    with Session(engine) as s:
        s.execute(update(User).where(User.id == uid).values(name="cy"))
        stmt = select(User).where(User.id == uid).options(cached())
        assert s.scalars(stmt).one().name == "cy"  # its own write: the database answers
        s.rollback()
    assert m.requests("query", "bypass") == 1
    assert (m.requests("query", "miss"), m.requests("query", "hit")) == (1, 1)
    assert sum(m.requests("identity", r) or 0 for r in OPERATIONS["read"]) == 0
    assert m.durations("read") == 3 and m.durations("fill") == 1
    st = cache.stats()
    assert (st["hits"], st["misses"], st["bypassed"], st["plugin_errors"]) == (1, 1, 1, 0)


def test_invalidations_outside_transactions(engine: Engine, cache: SQLCache, scrape: Scrape) -> None:
    """invalidate(), invalidate_tags() and invalidate_model() count their keys and their signals."""
    m = scrape
    cache.register(User)
    cache.invalidate_tags("a", "b")
    assert m("invalidated_keys_total", operation="invalidate", result="ok") == 2
    cache.invalidate(User, 1)  # the row's key and its table's row-writes key
    assert m("invalidated_keys_total", operation="invalidate", result="ok") == 4
    cache.invalidate_model(User)
    assert m("invalidated_keys_total", operation="invalidate", result="ok") == cache.stats()["invalidations"]
    assert m("invalidation_events_total", remote="false") == 3
    assert m("invalidation_events_total", remote="true") == 0
    assert m.durations("invalidate") == 3
    assert m("invalidated_keys_total", operation="release", result="ok") == 0
    assert cache.stats()["plugin_errors"] == 0


def test_stats_are_read_at_scrape_time(engine: Engine, cache: SQLCache, scrape: Scrape) -> None:
    """Every stats() counter is exposed under its own name, as the cache reports it when scraped."""
    m = scrape
    cache.register(User)
    uid = add_user(engine)
    for _ in range(3):
        user_name(engine, uid)
    st = cache.stats()
    assert st["hits"] == 2
    for counter, value in st.items():
        assert m.stat(counter) == value, counter
    user_name(engine, uid)
    assert m.stat("hits") == 3  # no hook involved: stats() is read again
    types = {f.name: f.type for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert (types["sqlcache_stats_hits"], types["sqlcache_stats_journal"]) == ("counter", "gauge")


def test_decode_error_is_an_error_read(
    engine: Engine, cache: SQLCache, scrape: Scrape, redis_client: redis.Redis
) -> None:
    """An entry Redis returns cut short is counted as a read error and a decode cache_error."""
    m = scrape
    cache.register(User)
    uid = add_user(engine)
    keys: list[str] = []

    def on_miss(sender: SQLCache, key: str, kind: str) -> None:
        keys.append(key)

    signals.cache_miss.connect(on_miss, sender=cache)
    try:
        assert user_name(engine, uid) == "ann"  # miss, stored
    finally:
        signals.cache_miss.disconnect(on_miss, sender=cache)
    (key,) = keys
    value = redis_client.get(key)
    assert isinstance(value, bytes)
    redis_client.set(key, value[:-3])
    assert user_name(engine, uid) == "ann"
    assert m.requests("identity", "error") == 1
    assert m("errors_total", operation="decode") == 1
    assert m.requests("identity", "hit") == 0
    assert cache.stats()["errors"] == 1 and cache.stats()["plugin_errors"] == 0


def test_outage_counts_errors_deferred_keys_and_the_replay(
    engine: Engine, redis_url: str, registry: CollectorRegistry
) -> None:
    """While Redis is cut off reads fail and a commit's keys are journalled; the first read after it heals
    replays them."""
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    proxy = Proxy(int(port))
    # no back-off and no background replay while the test runs: every step is the test's own call
    cache = SQLCache(proxy.url, prefix=new_prefix(), timeout=0.5, failure_threshold=1000, backoff=30)
    cache.strict_signals = True
    cache.add_plugin(PrometheusPlugin(registry=registry))
    m = Scrape(registry, cache.config.prefix)
    cache.register(User)
    cache.attach(engine)
    try:
        uid = add_user(engine)
        assert user_name(engine, uid) == "ann"
        proxy.cut()
        with Session(engine) as s:
            u = s.get(User, uid)  # Redis unreachable: the database answers
            assert u is not None
            u.name = "during"
            s.commit()
        st = cache.stats()
        assert m.requests("identity", "error") == 1
        assert m("errors_total", operation="read") == 1  # one cache_error per outage...
        assert st["errors"] > 1  # ...however many calls failed
        deferred = m("invalidated_keys_total", operation="release", result="deferred")
        assert deferred == st["invalidations_deferred"] == st["journal"] == m.stat("journal")
        assert st["journal"] > 0
        proxy.heal()
        assert user_name(engine, uid) == "during"
        assert m("replays_total", result="ok") == 1 and m("replays_total", result="error") == 0
        assert m("invalidated_keys_total", operation="replay", result="ok") == deferred
        assert m.stat("journal") == 0
        assert m.requests("identity", "miss") == 2
        assert cache.stats()["plugin_errors"] == 0
    finally:
        cache.detach(engine)
        cache.clear()
        cache.close()
        proxy.close()


def test_relay_pass_is_counted(engine: Engine, redis_url: str, registry: CollectorRegistry) -> None:
    """A relay applying an outbox row a cut-off writer left counts one pass and the row's keys."""
    prefix = new_prefix()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    writer = SQLCache(dead, prefix=prefix, durable=True, relay_interval=3600, timeout=0.2, backoff=30)
    relayer = SQLCache(redis_url, prefix=prefix, relay_grace=0, plugins=[PrometheusPlugin(registry=registry)])
    m = Scrape(registry, prefix)
    writer.create_outbox(engine)
    writer.register(User)
    writer.attach(engine)
    try:
        add_user(engine)  # its commit cannot reach Redis: the outbox row stays for a relay
        relay = relayer.relay(engine, start=False)
        assert relay.run_once() == 1
        assert m("relay_passes_total", result="ok") == 1
        keys = m("invalidated_keys_total", operation="relay", result="ok")
        assert keys == relayer.stats()["invalidations"] > 0
        assert relay.run_once() == 0
        assert m("relay_passes_total", result="ok") == 1  # an empty pass applies nothing: no batch
    finally:
        writer.close()
        relayer.clear()
        relayer.close()


def test_model_and_tag_labels(engine: Engine, cache: SQLCache, registry: CollectorRegistry) -> None:
    """label_models and label_tags add the model's name and the sorted tags to requests and fills."""
    cache.add_plugin(PrometheusPlugin(registry=registry, label_models=True, label_tags=True))
    m = Scrape(registry, cache.config.prefix)
    cache.register(User)
    cache.register(Product)
    uid = add_user(engine)
    with Session(engine, expire_on_commit=False) as s:
        p = Product(name="pen", price=1, stock=1)
        s.add(p)
        s.commit()
        pid = p.id
    for _ in range(2):
        user_name(engine, uid)
        assert query_name(engine, uid, tags=("b", "a")) == "ann"
    with Session(engine) as s:
        assert s.get(Product, pid) is not None

    def requests(kind: str, result: str, model: str, tags: str) -> float | None:
        return m("requests_total", kind=kind, result=result, model=model, tags=tags)

    assert (requests("identity", "miss", "User", ""), requests("identity", "hit", "User", "")) == (1, 1)
    assert requests("identity", "miss", "Product", "") == 1
    # a query's model is its first entity's class
    assert (requests("query", "miss", "User", "a,b"), requests("query", "hit", "User", "a,b")) == (1, 1)
    assert m("fills_total", kind="identity", result="stored", model="Product", tags="") == 1
    assert m("fills_total", kind="query", result="stored", model="User", tags="a,b") == 1
    assert requests("identity", "stale", "User", "") is None  # no series before its first event
    assert m.requests("identity", "miss") is None  # no series without the model and tags labels
    assert cache.stats()["plugin_errors"] == 0


def test_two_caches_share_one_registry(
    engine: Engine, cache: SQLCache, redis_url: str, registry: CollectorRegistry
) -> None:
    """Two caches with a plugin each report into one registry, told apart by prefix, in a valid scrape."""
    other = SQLCache(redis_url, prefix=new_prefix(), default_ttl=600)
    other.strict_signals = True
    first, second = PrometheusPlugin(registry=registry), PrometheusPlugin(registry=registry)
    cache.add_plugin(first)
    other.add_plugin(second)
    a, b = Scrape(registry, cache.config.prefix), Scrape(registry, other.config.prefix)
    cache.register(User)
    other.register(Product)
    other.attach(engine)
    try:
        uid = add_user(engine)
        with Session(engine, expire_on_commit=False) as s:
            p = Product(name="pen", price=1, stock=1)
            s.add(p)
            s.commit()
            pid = p.id
        for _ in range(2):
            user_name(engine, uid)
        for _ in range(3):
            with Session(engine) as s:
                assert s.get(Product, pid) is not None
        assert (a.requests("identity", "miss"), a.requests("identity", "hit")) == (1, 1)
        assert (b.requests("identity", "miss"), b.requests("identity", "hit")) == (1, 2)
        assert (a.stat("hits"), b.stat("hits")) == (1, 2)

        families = list(text_string_to_metric_families(generate_latest(registry).decode()))
        names = [f.name for f in families]
        assert len(names) == len(set(names))  # one family per name, both prefixes inside
        hits = next(f for f in families if f.name == "sqlcache_stats_hits")
        assert sorted(s.labels["prefix"] for s in hits.samples) == sorted([a.prefix, b.prefix])

        first.close()
        assert a.stat("hits") is None and a.requests("identity", "hit") is None
        assert b.stat("hits") == 2 and b.requests("identity", "hit") == 2
        with Session(engine) as s:
            assert s.get(Product, pid) is not None
        assert b.requests("identity", "hit") == 3
        second.close()
        assert list(registry.collect()) == []
        assert cache.stats()["plugin_errors"] == 0 and other.stats()["plugin_errors"] == 0
    finally:
        other.detach(engine)
        other.clear()
        other.close()


def test_close_removes_the_metrics(engine: Engine, cache: SQLCache, registry: CollectorRegistry) -> None:
    """close() unregisters every metric; the cache goes on without them, and a new plugin starts from zero."""
    plugin = PrometheusPlugin(registry=registry)
    cache.add_plugin(plugin)
    cache.register(User)
    uid = add_user(engine)
    user_name(engine, uid)
    assert Scrape(registry, cache.config.prefix).requests("identity", "miss") == 1
    plugin.close()
    assert list(registry.collect()) == []
    assert user_name(engine, uid) == "ann"  # its hook is still installed, inert
    assert list(registry.collect()) == []
    plugin.close()  # idempotent
    cache.add_plugin(PrometheusPlugin(registry=registry, name="prometheus-2"))
    user_name(engine, uid)
    m = Scrape(registry, cache.config.prefix)
    assert (m.requests("identity", "hit"), m.requests("identity", "miss")) == (1, 0)
    assert cache.stats()["plugin_errors"] == 0


def test_cache_close_closes_the_plugin(redis_url: str, registry: CollectorRegistry) -> None:
    """SQLCache.close() closes its plugins, whose metrics leave the registry."""
    cache = SQLCache(redis_url, prefix=new_prefix(), plugins=[PrometheusPlugin(registry=registry)])
    assert Scrape(registry, cache.config.prefix).stat("hits") == 0
    cache.close()
    assert list(registry.collect()) == []


def test_default_registry_is_the_global_one(redis_url: str) -> None:
    """Without a registry the plugin reports into prometheus_client.REGISTRY, and leaves it as it was."""
    before = {f.name for f in REGISTRY.collect()}
    cache = SQLCache(redis_url, prefix=new_prefix(), plugins=[PrometheusPlugin()])
    try:
        assert Scrape(REGISTRY, cache.config.prefix).stat("hits") == 0
    finally:
        cache.close()
    assert {f.name for f in REGISTRY.collect()} == before


def test_clashing_plugins_are_refused(redis_url: str, registry: CollectorRegistry) -> None:
    """A plugin whose series would collide with another's, or reused on a second cache, fails add_plugin."""
    first = SQLCache(redis_url, prefix=new_prefix())
    same = SQLCache(redis_url, prefix=first.config.prefix)
    other = SQLCache(redis_url, prefix=new_prefix())
    try:
        plugin = PrometheusPlugin(registry=registry)
        first.add_plugin(plugin)
        with pytest.raises(ConfigurationError, match="prefix"):
            same.add_plugin(PrometheusPlugin(registry=registry))
        with pytest.raises(ConfigurationError, match="label_models"):
            other.add_plugin(PrometheusPlugin(registry=registry, label_models=True))
        with pytest.raises(ConfigurationError, match="buckets"):
            other.add_plugin(PrometheusPlugin(registry=registry, buckets=(0.1, 1.0)))
        with pytest.raises(ConfigurationError, match="one PrometheusPlugin per cache"):
            other.add_plugin(plugin)
        other.add_plugin(PrometheusPlugin(registry=registry, namespace="other"))  # other names: no clash
        assert Scrape(registry, first.config.prefix).stat("hits") == 0
        assert Scrape(registry, other.config.prefix, "other").stat("hits") == 0
        assert Scrape(registry, other.config.prefix).stat("hits") is None
        assert same.plugins() == [] and len(other.plugins()) == 1
    finally:
        for c in (first, same, other):
            c.close()
    assert list(registry.collect()) == []


def test_name_taken_by_another_collector_is_refused(redis_url: str, registry: CollectorRegistry) -> None:
    """A registry holding a foreign metric of the same name refuses the plugin and keeps nothing of it."""
    from prometheus_client import Counter

    Counter("sqlcache_errors", "not ours", registry=registry)
    cache = SQLCache(redis_url, prefix=new_prefix())
    try:
        with pytest.raises(ConfigurationError, match="sqlcache_errors"):
            cache.add_plugin(PrometheusPlugin(registry=registry))
    finally:
        cache.close()
    assert [f.name for f in registry.collect()] == ["sqlcache_errors"]


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"namespace": "9lives"}, "'9lives'"),
        ({"namespace": "a-b"}, "'a-b'"),
        ({"buckets": ()}, "()"),
        ({"buckets": (0.1, 0.1)}, "(0.1, 0.1)"),
        ({"buckets": ("fast",)}, "('fast',)"),
        ({"registry": "global"}, "'global'"),
    ],
    ids=["namespace-digit", "namespace-dash", "no-buckets", "flat-buckets", "text-bucket", "registry"],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], shown: str) -> None:
    """A bad namespace, bucket list or registry raises ConfigurationError naming the value."""
    with pytest.raises(ConfigurationError, match=re.escape(shown)):
        PrometheusPlugin(**kwargs)  # type: ignore[arg-type]  # deliberately wrong types


def test_missing_extra_names_it() -> None:
    """Without prometheus_client the import fails with the pip command of the extra."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "plugins")!r}]
        sys.modules["prometheus_client"] = None
        try:
            import sqlcache_prometheus
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'sqlcache[prometheus]'" in done.stdout, done.stdout + done.stderr
