"""Cross-process invalidation signals: a thread that re-emits other processes' broadcasts."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import redis

from . import signals
from ._codec import FORMAT_VERSION, decode
from .errors import CodecError

if TYPE_CHECKING:
    from .cache import SQLCache

__all__ = ["Listener"]

log = logging.getLogger("sqlcache")


class Listener(threading.Thread):
    """Subscribed to a cache's channel; sends ``signals.invalidated(remote=True)`` for each message.

    Messages from the cache itself are skipped (the local commit already sent the signal). After a lost
    connection it reports ``cache_error`` (operation ``"listen"``: messages may have been missed) and
    subscribes again, waiting a little longer each time, up to the cache's ``max_backoff``.
    """

    def __init__(self, cache: SQLCache) -> None:
        super().__init__(name=f"sqlcache-listen-{cache.config.prefix}", daemon=True)
        self.cache = cache
        self._stopping = threading.Event()
        self.subscribed = threading.Event()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and its subscription."""
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        pause = self.cache.config.backoff
        while not self._stopping.is_set():
            pubsub: Any = None
            try:
                client: Any = self.cache.store.client
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.cache._channel)
                self.subscribed.set()
                pause = self.cache.config.backoff
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                self.cache._stats.incr("errors")
                self.cache._send(signals.cache_error, exc=exc, operation="listen")
                self._stopping.wait(pause)
                pause = min(pause * 2, self.cache.config.max_backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass

    def _deliver(self, data: bytes) -> None:
        try:
            node, body, tags = decode(bytes([FORMAT_VERSION]) + data)
        except (CodecError, ValueError, TypeError):
            log.warning("sqlcache: ignored an undecodable broadcast on %s", self.cache._channel)
            return
        if node == self.cache._node or type(body) is not list or type(tags) is not list:
            return
        identities = []
        for item in body:
            if type(item) is list and len(item) == 2 and type(item[0]) is str and type(item[1]) is list:
                found = self.cache.remote_identity(item[0], item[1])
                if found is not None:
                    identities.append(found)
        self.cache._send(
            signals.invalidated, identities=identities, tags=[t for t in tags if type(t) is str], remote=True
        )
