"""The local tier's tracking connection: Redis server-assisted client-side caching on a socket of its own.

One connection per cache and process: ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX <each
shard's dependency keys>`` and ``SUBSCRIBE __redis__:invalidate`` (RESP2, Redis 6+), so that Redis pushes
the name of every dependency key that changes, whoever changed it, and a ``null`` when the database was
flushed. ``PING`` on it is answered in order with the invalidations, which is what bounds the local
tier's staleness (``_local``).

A plain socket and a small RESP2 reader of our own, not redis-py: its pub/sub reader does not hand
tracking messages over on RESP2 in the versions we support, and this connection carries three commands
and one kind of message. Everything read is validated: a reply that is not one of those fails the
connection (the tier drops everything and reconnects), never more.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis

from .errors import ConfigurationError

__all__ = ["Tracking", "TrackingError", "tracking_target"]

CHANNEL = b"__redis__:invalidate"
_MAX_BUFFER = 8 * 1024 * 1024  # a message naming more keys than this is not one we asked for


class TrackingError(Exception):
    """The tracking connection failed or said something it should not: it is closed."""


class _Null:
    pass


NULL = _Null()


class _Reader:
    """An incremental RESP2 reader: each byte is looked at once, however a reply is split across reads
    (a message naming 150,000 keys arrives in many chunks). Bulk and simple strings are bytes, a null
    bulk or array NULL, an error a TrackingError instance; arrays nest two deep at most."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[tuple[int, list[Any]]] = []  # arrays being filled: (items still due, items)

    @property
    def partial(self) -> bool:
        """Whether part of a reply has arrived and the rest has not."""
        return bool(self._stack) or self._pos < len(self._buf)

    def feed(self, chunk: bytes) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]  # drop what was read, now and then (not at every reply)
            self._pos = 0
        self._buf += chunk
        if len(self._buf) - self._pos > _MAX_BUFFER:
            raise TrackingError("a message larger than any invalidation")

    def replies(self) -> list[Any]:
        """Every reply complete so far."""
        out: list[Any] = []
        while True:
            value = self._element()
            if value is _INCOMPLETE:
                return out
            while True:  # complete arrays upwards
                if not self._stack:
                    out.append(value)
                    break
                due, items = self._stack[-1]
                items.append(value)
                if due > 1:
                    self._stack[-1] = (due - 1, items)
                    break
                self._stack.pop()
                value = items

    def _element(self) -> Any:
        """The next element, an array's header pushed on the stack (then the loop goes on), or
        _INCOMPLETE (nothing consumed)."""
        while True:
            buf, pos = self._buf, self._pos
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > 64:
                    raise TrackingError("a reply header without its end")
                return _INCOMPLETE
            kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
            if kind == b"+":
                self._pos = end + 2
                return line
            if kind == b"-":
                self._pos = end + 2
                return TrackingError(line.decode("utf-8", "replace")[:200])
            if len(line) > 12 or not (line.isdigit() or (line[:1] == b"-" and line[1:].isdigit())):
                raise TrackingError(f"unreadable reply header {bytes(buf[pos:end])[:40]!r}")
            n = int(line)
            if kind == b":":
                self._pos = end + 2
                return n
            if kind == b"$":
                if n < 0:
                    self._pos = end + 2
                    return NULL
                if len(buf) < end + 4 + n:
                    return _INCOMPLETE
                self._pos = end + 4 + n
                return bytes(buf[end + 2 : end + 2 + n])
            if kind == b"*":
                self._pos = end + 2
                if n < 0:
                    return NULL
                if n == 0:
                    return []
                if len(self._stack) >= 2:
                    raise TrackingError("a reply nested deeper than any invalidation")
                self._stack.append((n, []))
                continue
            raise TrackingError(f"unexpected reply type {kind!r}")


class _Incomplete:
    pass


_INCOMPLETE = _Incomplete()


def tracking_target(client: redis.Redis) -> dict[str, Any]:
    """Where the tracking socket connects, from sqlcache's own client of the server: host and port or
    a Unix socket path, and credentials.

    :raises ConfigurationError: a connection the tracking socket cannot make (TLS, a credential
        provider, a Sentinel-managed pool) - not yet supported by the local tier."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if type(pool) is not redis.ConnectionPool and type(pool) is not redis.BlockingConnectionPool:
        raise ConfigurationError("the local tier needs a plain Redis server (not Sentinel), for now")
    if kwargs.get("ssl") or issubclass(pool.connection_class, redis.SSLConnection):
        raise ConfigurationError("the local tier does not reach Redis over TLS yet")
    if kwargs.get("credential_provider") is not None:
        raise ConfigurationError("the local tier does not take a credential provider yet")
    return {
        "host": kwargs.get("host", "localhost"),
        "port": int(kwargs.get("port", 6379)),
        "path": kwargs.get("path"),
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
        "timeout": float(kwargs.get("socket_timeout") or 1.0),
    }


class Tracking:
    """One tracking connection. Not thread-safe: the local tier calls it under its lock."""

    def __init__(self, target: dict[str, Any], prefixes: Sequence[str]) -> None:
        self._target = target
        self._prefixes = [p.encode() for p in prefixes]
        self._sock: socket.socket | None = None
        self._reader = _Reader()
        self._ready: list[Any] = []  # replies read but not handed out yet

    def connect(self) -> None:
        """Connect, authenticate, register the prefixes and subscribe (each reply checked).

        :raises TrackingError: anything but the expected replies, or the server unreachable."""
        t = self._target
        try:
            if t["path"]:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(t["timeout"])
                sock.connect(t["path"])
            else:
                sock = socket.create_connection((t["host"], t["port"]), timeout=t["timeout"])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise TrackingError(f"cannot connect: {exc}") from None
        self._sock, self._reader, self._ready = sock, _Reader(), []
        try:
            if t["password"] is not None:
                auth = [b"AUTH", *([t["username"].encode()] if t["username"] else []), t["password"].encode()]
                self._expect(auth, lambda r: r == b"OK")
            own = self._expect([b"CLIENT", b"ID"], lambda r: isinstance(r, int))
            track = [b"CLIENT", b"TRACKING", b"on", b"REDIRECT", str(own).encode(), b"BCAST"]
            for p in self._prefixes:
                track += [b"PREFIX", p]
            self._expect(track, lambda r: r == b"OK")
            self._expect(
                [b"SUBSCRIBE", CHANNEL], lambda r: isinstance(r, list) and r[:2] == [b"subscribe", CHANNEL]
            )
            sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    def _expect(self, command: list[bytes], ok: Any) -> Any:
        self._send(command)
        deadline = time.monotonic() + self._target["timeout"]
        while True:
            got = self._next()
            if got is not None:
                if isinstance(got, TrackingError) or not ok(got):
                    raise TrackingError(f"{command[0].decode()} answered {str(got)[:100]}")
                return got
            if time.monotonic() > deadline or not self._fill(deadline - time.monotonic()):
                raise TrackingError(f"{command[0].decode()}: no answer")

    def _send(self, command: list[bytes]) -> None:
        out = b"*%d\r\n" % len(command) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in command)
        assert self._sock is not None
        try:
            self._sock.sendall(out)
        except OSError as exc:
            raise TrackingError(f"send failed: {exc}") from None

    def _fill(self, wait: float) -> bool:
        """Read what has arrived, waiting up to ``wait`` seconds (0: not at all); False if nothing came.

        :raises TrackingError: the connection closed or broke."""
        sock = self._sock
        if sock is None:
            raise TrackingError("closed")
        try:
            ready, _, _ = select.select([sock], [], [], max(0.0, wait))
            if not ready:
                return False
            sock.setblocking(False)
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise TrackingError(f"read failed: {exc}") from None
        if not chunk:
            raise TrackingError("closed by the server")
        self._reader.feed(chunk)
        self._ready.extend(self._reader.replies())
        return True

    def _next(self) -> Any:
        """The next complete reply read, or None."""
        return self._ready.pop(0) if self._ready else None

    @property
    def partial(self) -> bool:
        """Whether part of a message has arrived and the rest has not (it may name a key just read)."""
        return self._reader.partial

    def ping(self) -> None:
        self._send([b"PING"])

    def verify(self) -> None:
        """Nothing to prove on one server: the connection is to the server that applies every write
        (a restart breaks it). See ``_ctracking`` for a cluster's."""

    def poll(self) -> list[tuple[str, list[bytes]]]:
        """Every message that has arrived, without waiting: ("keys", names) for an invalidation, ("all",
        []) for a flushed database, ("pong", []) for a PING's answer. A string published on the channel
        (only PUBLISH sends one: Redis's own are arrays or null) is ignored.

        :raises TrackingError: a broken connection or a message that is none of these."""
        while self._fill(0):
            pass
        ready, self._ready = self._ready, []
        out: list[tuple[str, list[bytes]]] = []
        for m in ready:
            if not isinstance(m, list) or not m:
                raise TrackingError(f"unexpected message {str(m)[:100]}")
            if m[0] == b"pong":
                out.append(("pong", []))
            elif len(m) == 3 and m[0] == b"message" and m[1] == CHANNEL:
                keys = m[2]
                if keys is NULL:
                    out.append(("all", []))
                elif isinstance(keys, list) and all(isinstance(k, bytes) for k in keys):
                    out.append(("keys", keys))
                elif not isinstance(keys, bytes):
                    raise TrackingError("an invalidation naming something else than keys")
            else:
                raise TrackingError(f"unexpected message {str(m)[:100]}")
        return out

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
