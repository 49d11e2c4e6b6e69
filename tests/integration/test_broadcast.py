"""broadcast=True and listen(): invalidations reach other processes' signal receivers."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sqlalchemy.engine import Engine

from sqlcache import SQLCache, signals

from ..conftest import RedisServer
from ..helpers import make_user
from ..models import User


class Heard:
    """Collects ``invalidated`` signals of one cache."""

    def __init__(self, cache: SQLCache) -> None:
        self.calls: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.event = threading.Event()
        signals.invalidated.connect(self.on_invalidated, sender=cache)
        signals.cache_error.connect(self.on_error, sender=cache)

    def on_invalidated(self, sender: SQLCache, **kw: Any) -> None:
        self.calls.append(kw)
        self.event.set()

    def on_error(self, sender: SQLCache, exc: BaseException, operation: str) -> None:
        self.errors.append(operation)

    def wait(self, timeout: float = 10) -> dict[str, Any]:
        assert self.event.wait(timeout), "no invalidation heard"
        self.event.clear()
        return self.calls[-1]

    def close(self) -> None:
        signals.invalidated.disconnect(self.on_invalidated)
        signals.cache_error.disconnect(self.on_error)


def pair(url: str) -> tuple[SQLCache, SQLCache]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    a = SQLCache(url, prefix=prefix, broadcast=True)
    b = SQLCache(url, prefix=prefix, broadcast=True)
    for c in (a, b):
        c.register(User)
    return a, b


def test_remote_signal(engine: Engine, redis_url: str) -> None:
    """A commit through cache A is re-emitted by cache B's listener with remote=True."""
    a, b = pair(redis_url)
    a.attach(engine)
    heard = Heard(b)
    listener = b.listen()
    try:
        assert listener.subscribed.wait(10)
        uid = make_user(engine)
        got = heard.wait()
        assert got["remote"] is True and got["identities"] == [(User, (uid,))]
        assert "table:users" in got["tags"]
        a.invalidate_tags("org:1")
        assert heard.wait()["tags"] == ["org:1"]
    finally:
        listener.stop()
        heard.close()
        a.detach(engine)
        a.clear()


def test_own_broadcasts_not_reemitted(engine: Engine, redis_url: str) -> None:
    """A cache's listener ignores its own broadcasts (the local signal already fired): once another
    cache's broadcast, published after it, has been heard, its own was read and dropped."""
    a, b = pair(redis_url)
    a.attach(engine)
    heard = Heard(a)
    listener = a.listen()
    try:
        assert listener.subscribed.wait(10)
        make_user(engine)
        b.invalidate(User, 10**9)  # published after a's own: the channel delivers in order
        deadline = time.monotonic() + 10
        while not any(c["remote"] for c in heard.calls):
            assert time.monotonic() < deadline, "b's broadcast was not heard"
            time.sleep(0.01)  # polling
        assert [c["remote"] for c in heard.calls] == [False, True]
        assert heard.calls[1]["identities"] == [(User, (10**9,))]
    finally:
        listener.stop()
        heard.close()
        a.detach(engine)
        a.clear()


def test_listener_reconnects_and_says_so(engine: Engine, private_redis: RedisServer) -> None:
    """After its Redis restarts the listener reports cache_error('listen') and hears again."""
    a, b = pair(private_redis.url)
    a.attach(engine)
    heard = Heard(b)
    listener = b.listen()
    try:
        assert listener.subscribed.wait(10)
        private_redis.stop()
        deadline = time.monotonic() + 10
        while "listen" not in heard.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "listen" in heard.errors
        private_redis.start()
        deadline = time.monotonic() + 15
        while not listener.subscribed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.subscribed.is_set()
        deadline = time.monotonic() + 10
        while True:  # a broadcast made once the listener is subscribed again is heard
            a.invalidate(User, 1)
            if heard.event.wait(0.2):
                break
            assert time.monotonic() < deadline, "nothing heard after the restart"
        assert heard.calls[-1]["identities"] == [(User, (1,))]
    finally:
        listener.stop()
        heard.close()
        a.detach(engine)


def test_signed_broadcasts_drop_forgeries(engine: Engine, redis_url: str, redis_client: Any) -> None:
    """With secret=, broadcasts are signed: a message PUBLISHed by someone without the secret (unsigned,
    or signed for another channel) is dropped and counted; genuine ones are heard, in order."""
    from sqlcache import _keys
    from sqlcache._codec import encode_body

    prefix = f"t{uuid.uuid4().hex[:10]}"
    secret = "correct horse battery staple"
    a, b = (SQLCache(redis_url, prefix=prefix, broadcast=True, secret=secret) for _ in range(2))
    for c in (a, b):
        c.register(User)
    heard = Heard(b)
    listener = b.listen()
    try:
        assert listener.subscribed.wait(10)
        channel = _keys.channel(prefix)
        forged = encode_body(["someone", [], ["org:forged"]])
        redis_client.publish(channel, forged)  # unsigned
        redis_client.publish(channel, b"\x00" * 16 + forged)  # a wrong MAC
        a.invalidate_tags("org:genuine")  # published after the forgeries: heard after them
        assert heard.wait()["tags"] == ["org:genuine"]
        assert [c["tags"] for c in heard.calls] == [["org:genuine"]]
        assert b.stats()["broadcasts_dropped"] == 2
    finally:
        listener.stop()
        heard.close()
        for c in (a, b):
            c.clear()
            c.close()
