"""The local tier's tracking connection: Redis server-assisted client-side caching on a socket of its own.

One connection per cache and process: ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX <each
shard's dependency keys>`` and ``SUBSCRIBE __redis__:invalidate`` (RESP2, Redis 6+), so that Redis pushes
the name of every dependency key that changes, whoever changed it, and a ``null`` when the database was
flushed. ``PING`` on it is answered in order with the invalidations, which is what bounds the local
tier's staleness (``_local``).

A socket of our own (TCP, a Unix socket, or TLS with the ``ssl_*`` settings of sqlcache's other
connections; a password or a credential provider asked at each connection) and a small RESP2 reader,
not redis-py: its pub/sub reader does not hand tracking messages over on RESP2 in the versions we
support, and this connection carries three commands and one kind of message. Everything read is
validated: a reply that is not one of those fails the connection (the tier drops everything and
reconnects), never more.
"""

from __future__ import annotations

import inspect
import os
import select
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import ConfigurationError

__all__ = ["Target", "Tracking", "TrackingError", "target_of", "tracking_target"]

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


_IDENTITY = ("username", "password", "credential_provider")
# redis-py's own default, which changed (False before 6): the tracking checks what the store checks
_CHECK_HOSTNAME = inspect.signature(redis.SSLConnection.__init__).parameters["ssl_check_hostname"].default


def _text(value: Any) -> str | None:
    """A username or password as redis-py takes them (str or bytes, UTF-8)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


@dataclass(frozen=True)
class Target:
    """Where a tracking connection (or a check's client) connects and how: one node's address, the
    cache's timeout, and the identity and TLS settings of sqlcache's own clients (never in a repr)."""

    host: str
    port: int
    path: str | None
    timeout: float
    tls: bool = False
    settings: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def at(self, host: str, port: int) -> Target:
        """The same settings for another node."""
        return replace(self, host=host, port=port, path=None)

    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password, a credential provider's asked at each connection."""
        provider = self.settings.get("credential_provider")
        if provider is None:
            return _text(self.settings.get("username")), _text(self.settings.get("password"))
        got = tuple(provider.get_credentials())
        if len(got) == 1:
            return None, _text(got[0])
        if len(got) == 2:
            return _text(got[0]), _text(got[1])
        raise TrackingError("the credential provider gave neither (password,) nor (username, password)")

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context sqlcache's other connections would use (redis-py's ``ssl_*`` settings)."""
        s = self.settings
        reqs = s.get("ssl_cert_reqs", "required")
        if reqs is None:
            reqs = ssl.CERT_NONE
        elif isinstance(reqs, str):
            known = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
            if reqs not in known:
                raise ValueError(f"ssl_cert_reqs={reqs!r} is none of 'none', 'optional', 'required'")
            reqs = known[reqs]
        context = ssl.create_default_context()
        check = s.get("ssl_check_hostname", _CHECK_HOSTNAME)
        context.check_hostname = bool(check) and reqs != ssl.CERT_NONE
        context.verify_mode = reqs
        for flag in s.get("ssl_include_verify_flags") or ():
            context.verify_flags |= flag
        for flag in s.get("ssl_exclude_verify_flags") or ():
            context.verify_flags &= ~flag
        if s.get("ssl_certfile") or s.get("ssl_keyfile"):
            context.load_cert_chain(s.get("ssl_certfile") or "", s.get("ssl_keyfile"), s.get("ssl_password"))
        if s.get("ssl_ca_certs") or s.get("ssl_ca_path") or s.get("ssl_ca_data"):
            context.load_verify_locations(s.get("ssl_ca_certs"), s.get("ssl_ca_path"), s.get("ssl_ca_data"))
        if s.get("ssl_min_version") is not None:
            context.minimum_version = s["ssl_min_version"]
        if s.get("ssl_ciphers"):
            context.set_ciphers(s["ssl_ciphers"])
        return context

    def client(self) -> redis.Redis:
        """A client of this node for checks: the same identity and TLS, no retries, this timeout
        (it connects on first use, not here)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            ssl=self.tls,
            **self.settings,
        )


def target_of(kwargs: dict[str, Any], tls: bool, timeout: float) -> Target:
    """The :class:`Target` of a node reached with redis-py's connection ``kwargs``.

    :raises ConfigurationError: TLS settings that make no context (a certificate file missing, an
        unknown ``ssl_cert_reqs``), or OCSP validation, which the tracking connection does not do."""
    # an ssl_* setting's None means something (ssl_cert_reqs=None: no verification): kept as given
    settings = {
        k: v
        for k, v in kwargs.items()
        if (k in _IDENTITY and v is not None) or (tls and k.startswith("ssl_"))
    }
    if settings.get("ssl_validate_ocsp") or settings.get("ssl_validate_ocsp_stapled"):
        raise ConfigurationError("the local tier's tracking connection does not validate OCSP")
    for k in ("ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "ssl_ocsp_context", "ssl_ocsp_expected_cert"):
        settings.pop(k, None)
    target = Target(
        host=str(kwargs.get("host", "localhost")),
        port=int(kwargs.get("port", 6379)),
        path=kwargs.get("path"),
        timeout=timeout,
        tls=tls,
        settings=settings,
    )
    if tls:
        try:
            target.tls_context()  # made again at each connection (certificates renewed on disk are read)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            files = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
            missing = [
                f"{k}={settings[k]!r}" for k in files if settings.get(k) and not os.path.exists(settings[k])
            ]
            why = (
                f"no such file: {', '.join(missing)}"
                if missing
                else f"{type(exc).__name__}: {str(exc)[:200]}"
            )
            raise ConfigurationError(f"the local tier cannot use these TLS settings ({why})") from None
    return target


def tracking_target(client: redis.Redis, timeout: float) -> Target:
    """Where the tracking socket connects, from sqlcache's own client of one server: host and port or a
    Unix socket path, its identity (password or credential provider) and TLS.

    :raises ConfigurationError: a pool the tracking cannot follow (a Sentinel pool is
        ``_stracking``'s), or OCSP validation."""
    pool = client.connection_pool
    if not isinstance(pool, redis.ConnectionPool) or isinstance(pool, redis.sentinel.SentinelConnectionPool):
        raise ConfigurationError(f"the local tier cannot follow a {type(pool).__name__}")
    tls = bool(pool.connection_kwargs.get("ssl")) or issubclass(pool.connection_class, redis.SSLConnection)
    return target_of(pool.connection_kwargs, tls, timeout)


class Tracking:
    """One tracking connection. Not thread-safe: the local tier calls it under its lock."""

    pong_proves = True  # one server: its answer to a PING follows every message it sent before

    def __init__(self, target: Target, prefixes: Sequence[str]) -> None:
        self.target = target
        self._prefixes = [p.encode() for p in prefixes]
        self._sock: socket.socket | None = None
        self._reader = _Reader()
        self._ready: list[Any] = []  # replies read but not handed out yet
        self._tls = False
        self._poller: Any = None  # a select.poll of the socket, where the platform has one

    def connect(self) -> None:
        """Connect (over TLS if sqlcache's connections use it), authenticate, register the prefixes and
        subscribe (each reply checked).

        :raises TrackingError: anything but the expected replies, or the server unreachable."""
        t = self.target
        try:
            if t.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(t.timeout)
                sock.connect(t.path)
            else:
                sock = socket.create_connection((t.host, t.port), timeout=t.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise TrackingError(f"cannot connect: {exc}") from None
        if t.tls:
            try:
                sock = t.tls_context().wrap_socket(sock, server_hostname=t.host)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise TrackingError(f"TLS: {type(exc).__name__}: {str(exc)[:200]}") from None
        sock.setblocking(False)  # every wait is a poll with a deadline; a TLS record in parts never blocks
        self._sock, self._reader, self._ready = sock, _Reader(), []
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._poller = None
        if hasattr(select, "poll"):  # cheaper than select() at each lookup; not on every platform
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
        try:
            username, password = t.credentials()
            if password is not None:
                secret = [password.encode("utf-8", "surrogateescape")]
                auth = [
                    b"AUTH",
                    *([username.encode("utf-8", "surrogateescape")] if username else []),
                    *secret,
                ]
                self._expect(auth, lambda r: r == b"OK", secret=True)
            own = self._expect([b"CLIENT", b"ID"], lambda r: isinstance(r, int))
            track = [b"CLIENT", b"TRACKING", b"on", b"REDIRECT", str(own).encode(), b"BCAST"]
            for p in self._prefixes:
                track += [b"PREFIX", p]
            self._expect(track, lambda r: r == b"OK")
            self._expect(
                [b"SUBSCRIBE", CHANNEL], lambda r: isinstance(r, list) and r[:2] == [b"subscribe", CHANNEL]
            )
        except TrackingError:
            self.close()
            raise
        except BaseException as exc:  # a credential provider's own failure included
            self.close()
            if isinstance(exc, Exception):
                raise TrackingError(f"cannot authenticate: {type(exc).__name__}") from None
            raise

    def _expect(self, command: list[bytes], ok: Any, secret: bool = False) -> Any:
        self._send(command)
        deadline = time.monotonic() + self.target.timeout
        while True:
            got = self._next()
            if got is not None:
                if isinstance(got, TrackingError) or not ok(got):
                    said = "an error" if secret else str(got)[:100]  # an AUTH error may echo a secret
                    raise TrackingError(f"{command[0].decode()} answered {said}")
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(f"{command[0].decode()}: no answer")
            self._fill(left)  # TLS: what arrives may be a record that holds no reply (a session ticket)

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
            # TLS: bytes already decrypted wait in the SSL object, where poll() does not see them
            if not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                if self._poller is not None:
                    if not self._poller.poll(max(0.0, wait) * 1000.0):
                        return False
                elif not select.select([sock], [], [], max(0.0, wait))[0]:
                    return False
            chunk = sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # TLS: part of a record only
        except (OSError, ValueError) as exc:
            raise TrackingError(f"read failed: {type(exc).__name__}") from None
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
