"""Cross-process invalidation signals: the message a release publishes, and a thread that re-emits
other processes' messages as ``signals.invalidated(remote=True)``."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect as sa_inspect

from . import _keys, signals
from ._codec import FORMAT_VERSION, decode, encode_body
from ._hierarchy import class_id
from .errors import CacheUnavailable, CodecError

if TYPE_CHECKING:
    from ._report import Reporter
    from ._seal import Sealer

__all__ = ["Announcer", "Listener"]

log = logging.getLogger("sqlcache")

Identity = tuple[type[Any], tuple[Any, ...]]


class Announcer:
    """Builds the pub/sub message a release publishes (inside the same script) when ``broadcast`` is
    on, and reads other processes' messages back."""

    def __init__(self, prefix: str, enabled: bool, sealer: Sealer) -> None:
        self.enabled = enabled
        self.channel = _keys.channel(prefix)
        self.node = uuid.uuid4().hex  # tells this cache's own broadcasts from other processes'
        # with a secret, every message carries a MAC over the channel and the body: anyone allowed to
        # PUBLISH could otherwise forge invalidated(remote=True)
        self._sealer = sealer

    def announce(self, identities: list[Identity], tags: list[str]) -> tuple[str, bytes] | None:
        if not self.enabled:
            return None
        try:
            body = [[class_id(sa_inspect(cls)), list(pk)] for cls, pk in identities]
            message = encode_body([self.node, body, tags])
        except CodecError:
            message = encode_body([self.node, [], [*tags, "*"]])
        return self.channel, self._sealer.seal(self.channel, message)

    def parse(self, data: bytes) -> tuple[list[tuple[str, list[Any]]], list[str]] | None:
        """(class ids and pks, tags) of another process's message; None for ours, for garbage and (with
        a secret) for a message not signed with it.

        :raises CodecError: the message is unsigned, badly signed or undecodable (the caller counts it).
        """
        try:
            node, body, tags = decode(bytes([FORMAT_VERSION]) + self._sealer.unseal(self.channel, data))
        except (ValueError, TypeError) as exc:
            raise CodecError(f"undecodable broadcast: {exc!r}") from exc
        if node == self.node or type(body) is not list or type(tags) is not list:
            return None
        found = [
            (item[0], item[1])
            for item in body
            if type(item) is list and len(item) == 2 and type(item[0]) is str and type(item[1]) is list
        ]
        return found, [t for t in tags if type(t) is str]


class Listener(threading.Thread):
    """Subscribed to a cache's channel; sends ``signals.invalidated(remote=True)`` for each message.

    Messages from the cache itself are skipped (the local commit already sent the signal). After a lost
    connection it reports ``cache_error`` (operation ``"listen"``: messages may have been missed) and
    subscribes again, waiting a little longer each time, up to the cache's ``max_backoff``.
    """

    def __init__(
        self,
        subscribe: Callable[[], Any],
        announcer: Announcer,
        reporter: Reporter,
        class_for: Callable[[str], type[Any] | None],
        backoff: float,
        max_backoff: float,
    ) -> None:
        super().__init__(name=f"sqlcache-listen-{announcer.channel}", daemon=True)
        self._subscribe = subscribe
        self._announcer = announcer
        self._channel = announcer.channel
        self._rep = reporter
        self._class_for = class_for
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._stopping = threading.Event()
        self.subscribed = threading.Event()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and its subscription."""
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        pause = self._backoff
        while not self._stopping.is_set():
            pubsub: Any = None
            try:
                pubsub = self._subscribe()
                self.subscribed.set()
                pause = self._backoff
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except CacheUnavailable as exc:
                self.subscribed.clear()
                self._rep.incr("errors")
                self._rep.send(signals.cache_error, exc=exc, operation="listen")
                self._stopping.wait(pause)
                pause = min(pause * 2, self._max_backoff)
            except Exception as exc:
                # a defect or a message nobody foresaw: reported, and the listener subscribes again
                # rather than die (messages may have been missed meanwhile, as after a lost connection)
                self.subscribed.clear()
                log.exception("sqlcache listener: unexpected failure")
                self._rep.incr("errors")
                self._rep.send(signals.cache_error, exc=exc, operation="listen")
                self._stopping.wait(pause)
                pause = min(pause * 2, self._max_backoff)
            finally:
                if pubsub is not None:
                    pubsub.close()

    def _deliver(self, data: bytes) -> None:
        try:
            parsed = self._announcer.parse(data)
        except CodecError:
            self._rep.incr("broadcasts_dropped")
            log.warning("sqlcache: dropped an unsigned, forged or undecodable broadcast on %s", self._channel)
            return
        if parsed is None:
            return
        body, tags = parsed
        identities = []
        for cid, pk in body:
            cls = self._class_for(cid)
            if cls is not None:
                identities.append((cls, tuple(pk)))
        self._rep.send(signals.invalidated, identities=identities, tags=tags, remote=True)
