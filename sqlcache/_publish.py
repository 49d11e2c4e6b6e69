"""Published counters (``publish_stats=``): a daemon thread writes this process's ``stats()`` under the
cache's prefix every few seconds, with a TTL of a few intervals, so that ``sqlcache stats`` can show
every live process and a dead one disappears on its own.

The value is JSON (any tool can read it), and whoever reads it treats it as hostile: :func:`parse_stats`
caps its size and checks every field's type and range, and returns None for anything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from . import _keys
from ._report import Reporter
from .errors import CacheUnavailable

__all__ = ["MAX_BYTES", "Published", "Publisher", "encode_stats", "parse_stats"]

log = logging.getLogger("sqlcache")

FORMAT = 1
#: the largest published value a reader accepts (a real one is about 1 KiB)
MAX_BYTES = 64 * 1024
_MAX_COUNTERS = 256
_COUNTER = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_MAX_COUNT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Published:
    """One process's published counters, as validated by :func:`parse_stats`."""

    host: str
    pid: int
    time: float  # when it was published (Unix seconds, the publisher's clock)
    interval: float  # seconds between two publications
    prefix: str  # the cache's prefix, as the user gave it
    stats: dict[str, int]


def encode_stats(
    host: str, pid: int, now: float, interval: float, prefix: str, stats: dict[str, int]
) -> bytes:
    """The value one publication writes."""
    body = {
        "format": FORMAT,
        "host": host,
        "pid": pid,
        "time": round(now, 3),
        "interval": interval,
        "prefix": prefix,
        "stats": stats,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _text(value: object, limit: int) -> str | None:
    """A short printable string (nothing that could drive a terminal), or None."""
    if type(value) is not str or not value or len(value) > limit or not value.isprintable():
        return None
    return value


def _seconds(value: object) -> float | None:
    if type(value) not in (int, float):
        return None
    if type(value) is int and not 0 <= value <= 2**40:  # float() of a 400-digit int raises
        return None
    f = float(value)  # type: ignore[arg-type]
    return f if math.isfinite(f) and 0 <= f <= 2**40 else None


def parse_stats(raw: object) -> Published | None:
    """The publication in ``raw`` (bytes read from Redis), or None if it is not one sqlcache wrote:
    too large, not JSON, a field missing or of another type or range, a counter name or value that no
    sqlcache counter has."""
    if not isinstance(raw, bytes) or len(raw) > MAX_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, digits past int's limit, deep nesting
        return None
    if type(data) is not dict or data.get("format") != FORMAT:
        return None
    host, prefix = _text(data.get("host"), 255), _text(data.get("prefix"), 1024)
    pid, at, interval = data.get("pid"), _seconds(data.get("time")), _seconds(data.get("interval"))
    stats = data.get("stats")
    if host is None or prefix is None or at is None or interval is None or not interval:
        return None
    if type(pid) is not int or not 0 < pid < 2**32:
        return None
    if type(stats) is not dict or len(stats) > _MAX_COUNTERS:
        return None
    for name, value in stats.items():
        if not _COUNTER.match(name) or type(value) is not int or not 0 <= value <= _MAX_COUNT:
            return None
    return Published(host, pid, at, interval, prefix, dict(stats))


class Publishing(Protocol):
    """What the publisher needs of a store (``_store.RedisStore``, ``_cluster.ClusterStore``)."""

    @property
    def backing_off(self) -> bool: ...

    def put(self, key: str, value: bytes, ttl_ms: int) -> None: ...

    def delete(self, *keys: str) -> None: ...


class Publisher:
    """Publishes one cache's counters every ``interval`` seconds from a daemon thread; does nothing
    when ``interval`` is None.

    :param key_prefix: what starts the cache's keys (a hash tag on a cluster).
    :param prefix: the prefix as the user gave it (shown by ``sqlcache stats``).
    :param stats: gives the cache's ``stats`` method, or None once the cache is gone: a weak reference,
        so that the thread never keeps a cache alive.
    """

    def __init__(
        self,
        store: Publishing,
        reporter: Reporter,
        key_prefix: str,
        prefix: str,
        interval: float | None,
        stats: Callable[[], Callable[[], dict[str, int]] | None],
    ) -> None:
        self._store = store
        self._rep = reporter
        self._key_prefix = key_prefix
        self._prefix = prefix
        self._interval = interval
        self._stats = stats
        # a dead process's key goes after three missed publications (and never before a second)
        self._ttl_ms = max(1000, round((interval or 0) * 3000))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.key = ""
        self._host = ""
        self._start()

    def _start(self) -> None:
        if self._interval is None:
            return
        host = socket.gethostname()[:100] or "?"
        self._host = host
        self.key = _keys.stats_key(
            self._key_prefix, f"{quote(host, safe='')}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        me = weakref.ref(self)
        self._thread = threading.Thread(
            target=_run,
            args=(me, self._stopping, self._interval),
            name=f"sqlcache-publish-{self._prefix}",
            daemon=True,
        )
        self._thread.start()

    def publish_once(self) -> bool:
        """Write the counters now; False if the cache is gone or Redis did not take them (reported)."""
        stats = self._stats()
        if stats is None or self._interval is None:
            return False
        if self._store.backing_off:
            return False  # the breaker is open: no call (and no skipped call counted) for a publication
        value = encode_stats(self._host, os.getpid(), time.time(), self._interval, self._prefix, stats())
        try:
            self._store.put(self.key, value, self._ttl_ms)
        except CacheUnavailable as exc:
            self._rep.report(exc, "publish")
            return False
        return True

    def turn(self) -> bool:
        """One turn of the thread; False once the cache is gone."""
        try:
            if self._stats() is None:
                return False
            self.publish_once()
        except Exception:
            # a defect of ours: logged and counted, and the next turn tries again (the app never sees it)
            self._rep.incr("errors")
            log.exception("sqlcache: publishing stats failed")
        return True

    def after_fork(self) -> None:
        """In a forked child: the thread did not survive the fork; start one of its own, under a key of
        its own (the parent's key stays the parent's)."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping = threading.Event()
        self._start()

    def stop(self) -> None:
        """End the thread and delete this process's key (if Redis is away, it expires by its TTL)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if thread is not threading.current_thread():
            thread.join(5.0)
        if not self._store.backing_off:
            try:
                self._store.delete(self.key)
            except CacheUnavailable:
                pass  # gone within three intervals anyway


def _run(ref: weakref.ref[Publisher], stopping: threading.Event, interval: float) -> None:
    """The thread: holds the publisher only during a turn, so a cache dropped without ``close()`` is
    collected, and the thread ends at its next turn."""
    while not stopping.is_set():
        publisher = ref()
        if publisher is None:
            return
        if not publisher.turn():
            return
        del publisher
        stopping.wait(interval)
