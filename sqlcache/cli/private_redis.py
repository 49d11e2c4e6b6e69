"""A throwaway redis-server for the demo: a free port on 127.0.0.1, no persistence, its own temp dir,
stopped by its PID however the demo ends."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import redis

__all__ = ["PrivateRedisError", "Server", "hide_password", "private_redis", "problem_with"]

# no snapshot, no append-only file, loopback only, in the foreground (a child we can stop by its PID)
_OPTIONS = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no")
_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.I)


class PrivateRedisError(Exception):
    """The private server could not be started; the message says why, in one line."""


class Server:
    """A running private redis-server: where it listens and its process id."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def hide_password(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***`` (it may be shown on a terminal)."""
    return _PASSWORD.sub(lambda m: m.group("head") + "***@", text)


def problem_with(url: str, timeout: float = 2.0) -> tuple[str, bool] | None:
    """None if a Redis answers PING at ``url``; else why not, and whether nothing answered at all
    (refused, unresolvable, timed out) as opposed to a server or the URL itself being wrong (a
    password refused, an unknown scheme), which no server of our own would fix."""
    try:
        # closed here, not left to the garbage collector: a Ctrl-C arriving in a __del__ is lost
        with redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout) as client:
            client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        silent = isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)) and not isinstance(
            exc,
            redis.AuthenticationError,  # a ConnectionError subclass, but someone answered
        )
        return hide_password(str(exc).rstrip(".") or type(exc).__name__), silent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _start(exe: str, workdir: str, deadline: float) -> Server:
    """Start redis-server on a free port and poll until it answers; try another port if the one picked
    was taken in between (the server exits at once then)."""
    logfile = os.path.join(workdir, "redis.log")
    for _ in range(3):
        port = _free_port()
        with open(logfile, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--dir", workdir, *_OPTIONS],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        server = Server(proc, port)
        try:
            while time.monotonic() < deadline and proc.poll() is None and not _answers(port):
                time.sleep(0.05)  # polling for readiness, bounded by the deadline
            if proc.poll() is None and _answers(port):
                return server
        except BaseException:  # Ctrl-C while waiting: the server must not outlive us
            _stop(server)
            raise
        _stop(server)
        if time.monotonic() >= deadline:
            break
    with open(logfile, "rb") as f:
        tail = f.read().decode(errors="replace").strip().splitlines()[-1:]
    raise PrivateRedisError("redis-server did not start" + (f": {tail[0]}" if tail else ""))


def _stop(server: Server) -> None:
    """Stop the server by its PID: SIGTERM, then SIGKILL if it has not gone within 5 s; reap it."""
    if server.proc.poll() is not None:
        return
    server.proc.terminate()
    try:
        server.proc.wait(5)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


class _Terminated(SystemExit):
    """SIGTERM turned into an exception, so that the server is stopped on the way out."""


@contextmanager
def _term_as_exit() -> Iterator[None]:
    """While inside, SIGTERM unwinds the main thread (finally blocks run) instead of ending the process
    on the spot; elsewhere (another thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        # the exception was raised inside a finalizer (a __del__ the garbage collector ran right then),
        # which Python reports and swallows: the block ran on, but the process was still told to end
        raise _Terminated(128 + received[0])


@contextmanager
def private_redis(timeout: float = 10.0) -> Iterator[Server]:
    """A redis-server of our own for the duration of the ``with`` block, stopped by PID when it ends,
    whether normally, on an exception, on Ctrl-C or on SIGTERM. (A SIGKILL of this process leaves it
    running: nothing can run then.)

    :raises PrivateRedisError: redis-server is not on PATH, or did not answer within ``timeout``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise PrivateRedisError("redis-server is not installed (not found on PATH)")
    workdir = tempfile.mkdtemp(prefix="sqlcache-demo-redis-")
    try:
        with _term_as_exit():
            server = _start(exe, workdir, time.monotonic() + timeout)
            try:
                yield server
            finally:
                _stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
