"""pytest plugin for SQLAlchemy's own test suite: sqlcache on every engine, every mapped class registered.

Loaded with ``-p sqlcache_attach`` by ``.ci/transparency/run.py``; configured through the environment:

- ``SQLCACHE_T_MODE``: ``attach`` (a fresh ``SQLCache`` on every ``Engine`` built, every configured
  mapped class registered) or ``cached`` (the same, plus ``cached()`` added to every ORM SELECT);
  anything else: the plugin only records outcomes (the baseline).
- ``SQLCACHE_T_NOHIT=1``: every Redis read reports a miss (fills and commits run as usual), so a test
  that fails only because hits saved statements passes again.
- ``SQLCACHE_T_OUT``: where the per-test outcomes go (JSON).
- ``SQLCACHE_REDIS_URL``: the Redis to use (default ``redis://127.0.0.1:6379/0``).

Each engine gets its own prefix (SQLAlchemy's tests use many in-memory SQLite databases with the same
table names: one prefix per database, as docs/pages/consistency.md requires); every key of the run is
deleted at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
import weakref
from collections import Counter
from typing import Any

import pytest

MODE = os.environ.get("SQLCACHE_T_MODE", "")
NOHIT = os.environ.get("SQLCACHE_T_NOHIT") == "1"
OUT = os.environ.get("SQLCACHE_T_OUT", "")
REDIS_URL = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN = f"sqlat:{uuid.uuid4().hex[:10]}"

_lock = threading.RLock()  # _forget runs from a garbage-collector callback, maybe on a thread holding it
_caches: dict[int, Any] = {}  # id(cache) -> cache, while its engine lives
_registered: dict[int, set[int]] = {}  # id(cache) -> ids of the mappers registered in it
_seq = 0
_counts: Counter[str] = Counter()  # cache_hit / cache_error / ... of the running test
_errors: list[str] = []  # cache_error details of the running test
_results: dict[str, dict[str, Any]] = {}
_totals: Counter[str] = Counter()  # over the whole run


class _NoHits:
    """A store plugin: every read is reported as a miss (the reader then asks for generations, reads
    the database and fills as usual)."""

    name = "transparency-nohit"

    def setup(self, host: Any) -> None:
        host.wrap_store(_NoHitStore)

    def close(self) -> None:
        pass


class _NoHitStore:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, clock_key: str, entry_key: str, dep_keys: Any) -> Any:
        r = self._inner.read(clock_key, entry_key, dep_keys)
        if r.hit:
            return dataclasses.replace(r, hit=False, payload=None, generations=None, stale=False)
        return r


def _current_mappers() -> list[Any]:
    from sqlalchemy.orm import mapperlib

    out: list[Any] = []
    for reg in list(mapperlib._all_registries()):
        out.extend(reg.mappers)
    return out


def _register(cache: Any, mappers: list[Any]) -> None:
    from sqlcache import ConfigurationError

    done = _registered.get(id(cache))
    if done is None:
        return  # its engine was collected meanwhile
    for m in mappers:
        if m is None or id(m) in done or not m.configured:
            continue
        done.add(id(m))
        try:
            cache.register(m.class_)
            _counts["registered"] += 1
        except ConfigurationError:
            _counts["unregistrable"] += 1  # a column type sqlcache cannot round-trip: left unregistered


def _on_configured() -> None:
    mappers = _current_mappers()
    with _lock:
        caches = list(_caches.values())
    for cache in caches:
        _register(cache, mappers)


def _forget(cid: int, cache: Any) -> None:
    with _lock:
        _caches.pop(cid, None)
        _registered.pop(cid, None)
    _add_stats(cache)
    _totals["engines_collected"] += 1
    cache.close()


def _add_stats(cache: Any) -> None:
    for k, v in cache.stats().items():
        if v:
            _totals[f"stats.{k}"] += v


def _attach(engine: Any) -> None:
    global _seq
    from sqlcache import SQLCache

    with _lock:
        _seq += 1
        prefix = f"{RUN}:{_seq}"
    cache = SQLCache(REDIS_URL, prefix=prefix, default_ttl=600, plugins=[_NoHits()] if NOHIT else [])
    cache.attach(engine)
    with _lock:
        _caches[id(cache)] = cache
        _registered[id(cache)] = set()
    weakref.finalize(engine, _forget, id(cache), cache)
    _counts["engines"] += 1
    _register(cache, [m for m in _current_mappers() if m.configured])


def _add_cached(orm_state: Any) -> None:
    from sqlcache import CacheOption, cached

    if not orm_state.is_select:
        return
    if any(isinstance(o, CacheOption) for o in orm_state.user_defined_options):
        return
    orm_state.statement = orm_state.statement.options(cached())


def _install() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Mapper, Session

    from sqlcache import signals

    original = Engine.__init__

    def __init__(self: Engine, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        _attach(self)

    Engine.__init__ = __init__  # type: ignore[method-assign]
    event.listen(Mapper, "after_configured", _on_configured)
    if MODE == "cached":
        # first, so that sqlcache's own do_orm_execute listener sees the option
        event.listen(Session, "do_orm_execute", _add_cached, insert=True)

    def hit(sender: Any, **kw: Any) -> None:
        _counts["hits"] += 1

    def miss(sender: Any, **kw: Any) -> None:
        _counts["misses"] += 1

    def error(sender: Any, **kw: Any) -> None:
        _counts["errors"] += 1
        _errors.append(f"{kw.get('operation')}: {kw.get('exc')!r}"[:300])

    signals.cache_hit.connect(hit, weak=False)
    signals.cache_miss.connect(miss, weak=False)
    signals.cache_error.connect(error, weak=False)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if MODE in ("attach", "cached"):
        _install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _counts.clear()
    _errors.clear()
    yield
    _totals.update(_counts)
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    rec["hits"] = _counts["hits"]
    if _errors:
        rec["cache_errors"] = list(dict.fromkeys(_errors))[:5]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    rec = _results.setdefault(report.nodeid, {"outcome": "passed"})
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
        if rec["outcome"] in ("passed", "skipped", "xfailed"):
            rec["outcome"] = outcome
            crash = getattr(report.longrepr, "reprcrash", None)
            rec["message"] = (crash.message if crash is not None else str(report.longrepr))[-2000:]
    elif report.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call" and hasattr(report, "wasxfail") and report.passed:
        rec["outcome"] = "xpassed"


def pytest_sessionfinish(session: pytest.Session) -> None:
    _totals["caches_alive_at_end"] = len(_caches)
    for cache in list(_caches.values()):
        _add_stats(cache)
    if OUT:
        with open(OUT, "w") as f:
            json.dump({"tests": _results, "totals": dict(_totals)}, f, indent=0, sort_keys=True)
    if MODE in ("attach", "cached"):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for batch in _batches(client.scan_iter(match=f"{RUN}:*", count=1000)):
            client.delete(*batch)


def _batches(it: Any, n: int = 500) -> Any:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
