"""publish_stats=: each process's counters under the prefix, through outages, forks and close()."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis

from sqlcache import SQLCache, signals
from sqlcache._publish import parse_stats
from sqlcache.errors import ConfigurationError

from ..proxy import Proxy

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def poll(check: Callable[[], Any], seconds: float = 10.0) -> Any:
    """``check()`` once it is truthy; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)  # polling Redis for the publisher thread's write, with a deadline
    pytest.fail(f"not true after {seconds} s: {check}")


def published(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    keys = list(client.scan_iter(match=f"{prefix}:stats:*"))
    return {k: parse_stats(v) for k, v in zip(keys, client.mget(keys), strict=True) if v is not None}


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Any:
    p = f"pub{uuid.uuid4().hex[:10]}"
    yield p
    for key in redis_client.scan_iter(match=f"{p}:*"):
        redis_client.unlink(key)


def test_publishes_counters_with_a_ttl_and_deletes_them_on_close(
    redis_client: redis.Redis, prefix: str
) -> None:
    """The process's stats() appear under the prefix with a TTL of three intervals, follow the counters,
    and go when the cache is closed (the thread ends)."""
    cache = SQLCache(redis_client, prefix=prefix, publish_stats=0.2)
    try:
        cache.invalidate_tags("t")
        found = poll(
            lambda: [p for p in published(redis_client, prefix).values() if p and p.stats["invalidations"]]
        )
        p = found[0]
        assert (p.pid, p.prefix, p.interval) == (os.getpid(), prefix, 0.2)
        assert set(cache.stats()) == set(p.stats)
        (key,) = published(redis_client, prefix)
        assert 0 < redis_client.pttl(key) <= 1000  # three intervals, at least a second
    finally:
        cache.close()
    assert published(redis_client, prefix) == {}
    assert not [t for t in threading.enumerate() if t.name == f"sqlcache-publish-{prefix}"]


def test_not_published_by_default(redis_client: redis.Redis, prefix: str) -> None:
    """Without publish_stats no thread runs and nothing is written."""
    cache = SQLCache(redis_client, prefix=prefix)
    cache.invalidate_tags("t")
    assert not [t for t in threading.enumerate() if t.name == f"sqlcache-publish-{prefix}"]
    assert published(redis_client, prefix) == {}
    cache.close()


@pytest.mark.parametrize("bad", [0, 0.05, -1, True, "5", float("nan"), float("inf"), 3601])
def test_publish_stats_is_validated(bad: Any) -> None:
    """A bad interval fails fast with the value in the message."""
    with pytest.raises(ConfigurationError, match="publish_stats"):
        SQLCache("redis://127.0.0.1:6379/0", prefix="x", publish_stats=bad)


def test_survives_an_outage_and_resumes(redis_client: redis.Redis, prefix: str) -> None:
    """With Redis cut off the thread reports (cache_error "publish", errors) and carries on; once Redis
    is back its counters are published again."""
    port = int(redis_client.connection_pool.connection_kwargs.get("port", 6379))
    proxy = Proxy(port)
    cache = SQLCache(proxy.url, prefix=prefix, publish_stats=0.1, backoff=0.1, max_backoff=0.2)
    failed = threading.Event()

    def on_error(_sender: Any, exc: BaseException, operation: str) -> None:
        if operation == "publish":
            failed.set()

    signals.cache_error.connect(on_error, sender=cache)
    try:
        poll(lambda: published(redis_client, prefix))
        proxy.cut()
        assert failed.wait(10)
        assert cache.stats()["errors"] >= 1
        healed = time.time()
        proxy.heal()
        poll(lambda: [p for p in published(redis_client, prefix).values() if p and p.time >= healed])
    finally:
        signals.cache_error.disconnect(on_error, sender=cache)
        cache.close()
        proxy.close()


def test_a_dropped_cache_stops_publishing(redis_client: redis.Redis, prefix: str) -> None:
    """The thread holds no strong reference to the cache: a cache dropped without close() is collected,
    and its thread ends."""
    # what earlier tests left to the collector goes first: its sockets' warnings are not this test's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    cache = SQLCache(redis_client, prefix=prefix, publish_stats=0.1)
    poll(lambda: published(redis_client, prefix))
    del cache
    gc.collect()  # its connections are closed then (no ResourceWarning: an error under this suite's filters)
    # collected between two turns of the thread (a turn holds the cache for its duration)
    poll(
        lambda: (
            gc.collect() >= 0
            and not [t for t in threading.enumerate() if t.name == f"sqlcache-publish-{prefix}"]
        )
    )


def test_forked_child_publishes_under_its_own_key(redis_client: redis.Redis, prefix: str) -> None:
    """A child forked from a publishing process starts its own thread and key (its pid); the parent's
    key stays."""
    cache = SQLCache(redis_client, prefix=prefix, publish_stats=0.1)
    try:
        poll(lambda: published(redis_client, prefix))
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child = os.getpid()
                client = redis.Redis(port=redis_client.connection_pool.connection_kwargs.get("port", 6379))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and code:
                    pids = {p.pid for p in published(client, prefix).values() if p is not None}
                    code = 0 if child in pids else 1
                    time.sleep(0.02)  # polling for the child's own publisher, with a deadline
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)  # polling the child's exit, with a deadline
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("child stuck")
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.getpid() in {p.pid for p in published(redis_client, prefix).values() if p is not None}
    finally:
        cache.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[" * 100_000,
        b"{" + b" " * (64 * 1024) + b"}",
        json.dumps(
            {"format": 2, "host": "h", "pid": 1, "time": 1, "interval": 1, "prefix": "p", "stats": {}}
        ).encode(),
        json.dumps(
            {"format": 1, "host": "\x1b[2J", "pid": 1, "time": 1, "interval": 1, "prefix": "p", "stats": {}}
        ).encode(),
        json.dumps(
            {"format": 1, "host": "h", "pid": True, "time": 1, "interval": 1, "prefix": "p", "stats": {}}
        ).encode(),
        json.dumps(
            {"format": 1, "host": "h", "pid": 1, "time": 1, "interval": 0, "prefix": "p", "stats": {}}
        ).encode(),
        json.dumps(
            {
                "format": 1,
                "host": "h",
                "pid": 1,
                "time": 1,
                "interval": 1,
                "prefix": "p",
                "stats": {"hits": -1},
            }
        ).encode(),
        json.dumps(
            {
                "format": 1,
                "host": "h",
                "pid": 1,
                "time": 1,
                "interval": 1,
                "prefix": "p",
                "stats": {"Hits!": 1},
            }
        ).encode(),
        json.dumps(
            {"format": 1, "host": "h", "pid": 1, "time": 1, "interval": 1, "prefix": "p", "stats": []}
        ).encode(),
        b'{"format":1,"host":"h","pid":1,"time":1,"interval":1,"prefix":"p","stats":{"hits":'
        + b"9" * 5000
        + b"}}",
    ],
)
def test_parse_stats_refuses_what_sqlcache_did_not_write(raw: bytes) -> None:
    """Hostile values (garbage, bombs, terminal escapes, wrong types or ranges) are None, never an error."""
    assert parse_stats(raw) is None
