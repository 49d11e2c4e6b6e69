"""Prefork servers (Gunicorn, uWSGI, Celery): a child forked after attach() and after traffic starts
clean and correct, with a real os.fork() and a multiprocessing "fork" start."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from sqlcache import SQLCache

from ..helpers import durable_cache, make_user, rename_user, user_name
from ..models import User

# a thread-holding parent forks on purpose here; Python 3.12+ warns about exactly that
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def _in_child(work: Callable[[], bool]) -> None:
    """Run ``work`` in the forked child and leave with its verdict, never through pytest."""
    code = 2
    try:
        code = 0 if work() else 1
    finally:
        os._exit(code)


def _wait(pid: int, seconds: float) -> int:
    """The child's exit code, or -1 if it had to be killed after ``seconds`` (stuck)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)  # polling a child process's exit, with a deadline
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


def _fork_while_held(lock: Any, work: Callable[[], bool]) -> int:
    """Fork while another thread holds ``lock``; the child runs ``work`` (its verdict is the exit code),
    the parent lets the lock go and returns the child's exit code (-1: stuck, killed after 20 s)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:
        _in_child(work)
    release.set()
    holder.join()
    return _wait(pid, 20)


def test_child_forked_while_a_lock_was_held_is_not_stuck(engine: Engine, cache: SQLCache) -> None:
    """A lock another thread held at the fork (here the counters', taken by every read) is fresh in the
    child: it reads from the cache and commits, and the parent sees its commit."""
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"

    def work() -> bool:
        engine.dispose(close=False)  # SQLAlchemy's advice for a forked child
        hits = cache.stats()["hits"]
        ok = user_name(engine, uid) == "ann" and cache.stats()["hits"] == hits + 1
        rename_user(engine, uid, "child")
        return ok and user_name(engine, uid) == "child"

    assert _fork_while_held(cache._parts.rep.stats._lock, work) == 0
    assert user_name(engine, uid) == "child"


def test_child_forked_while_release_replies_were_read_is_not_stuck(
    engine: Engine, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock the store reads release replies under, held by another thread at the fork (the settler
    thread's turn), with a reply owed: the child's first call, which settles first, does not wait on
    it; the child reads and commits."""
    from sqlcache import _settle

    from ..helpers import NoSettler

    monkeypatch.setattr(_settle, "SETTLER", NoSettler())  # the reply waits for a call, not the settler
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    rename_user(engine, uid, "bob")  # its release's reply is owed
    store: Any = cache._parts.store
    assert store._owed

    def work() -> bool:
        engine.dispose(close=False)
        ok = user_name(engine, uid) == "bob"
        rename_user(engine, uid, "child")
        return ok and user_name(engine, uid) == "child"

    assert _fork_while_held(store._settling, work) == 0
    assert user_name(engine, uid) == "child"


def test_child_forked_with_a_release_reply_unread_leaves_it_to_the_parent(
    engine: Engine, cache: SQLCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's release reply waits on its connection for the store's next call. A child forked
    meanwhile never reads it (the socket is the parent's): it reads and commits on connections of its
    own, and the parent's next call reads the reply, in step."""
    from sqlcache import _settle

    from ..helpers import NoSettler

    monkeypatch.setattr(_settle, "SETTLER", NoSettler())  # the reply waits for a call, not the settler
    cache.register(User)
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    rename_user(engine, uid, "parent")
    assert len(cache._parts.store._owed) == 1  # the reply the child must leave alone

    def work() -> bool:
        engine.dispose(close=False)
        ok = user_name(engine, uid) == "parent" and user_name(engine, uid) == "parent"
        rename_user(engine, uid, "child")
        return ok and user_name(engine, uid) == "child"

    pid = os.fork()
    if pid == 0:
        _in_child(work)
    assert _wait(pid, 20) == 0
    assert user_name(engine, uid) == "child"
    assert not cache._parts.store._owed
    hits = cache.stats()["hits"]
    assert user_name(engine, uid) == "child" and cache.stats()["hits"] == hits + 1


def test_child_forked_while_the_listener_slots_lock_was_held_can_attach(
    redis_url: str, tmp_path: Any
) -> None:
    """The lock guarding listener slots (sqlcache._slots), held by another thread at the fork, is fresh
    in the child: a cache attaches there to an engine of its own and serves a hit."""
    from sqlalchemy import create_engine

    from sqlcache import _slots

    def work() -> bool:
        child_engine = create_engine(f"sqlite:///{tmp_path}/child.db")
        User.metadata.create_all(child_engine)
        child = SQLCache(redis_url, prefix=f"k{uuid.uuid4().hex[:10]}")
        child.register(User)
        child.attach(child_engine)  # installs listeners: takes the slots' lock
        uid = make_user(child_engine)
        ok = user_name(child_engine, uid) == "ann" and user_name(child_engine, uid) == "ann"
        ok = ok and child.stats()["hits"] == 1
        child.clear()
        child.close()
        return ok

    assert _fork_while_held(_slots._lock, work) == 0


@pytest.fixture
def durable(engine: Engine, redis_url: str) -> Iterator[SQLCache]:
    with durable_cache(engine, redis_url, f"f{uuid.uuid4().hex[:10]}", relay_interval=0.05) as cache:
        yield cache


def _relay_child(engine: Engine, cache: SQLCache, uid: int, out: Any) -> None:
    engine.dispose(close=False)
    relays = set(cache._parts.outbox.relays.values()) if cache._parts.outbox is not None else set()
    alive = [r.is_alive() for r in relays]
    rename_user(engine, uid, "from child")
    passes = [r.passes for r in relays]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [r.passes for r in relays] == passes:
        time.sleep(0.02)  # the child's relay thread runs a pass (its interval is 50 ms)
    out.put((alive, [r.passes > p for r, p in zip(relays, passes, strict=True)], user_name(engine, uid)))


def test_multiprocessing_fork_child_runs_its_relay(engine: Engine, durable: SQLCache) -> None:
    """A multiprocessing "fork" child after traffic has its relay running (its thread died with the
    fork), commits durably, and reads its own commit."""
    uid = make_user(engine)
    assert user_name(engine, uid) == "ann"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_relay_child, args=(engine, durable, uid, out))
    child.start()
    alive, ran, seen = out.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert alive == [True] and ran == [True] and seen == "from child"
    assert user_name(engine, uid) == "from child"
