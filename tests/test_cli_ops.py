"""``sqlcache stats``, ``inspect`` and ``flush`` against a real Redis (and PostgreSQL for a model), run
in process through ``sqlcache.cli.main`` and once each as a subprocess."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache
from sqlcache.cli import main

from .conftest import SQLCounter, free_port
from .helpers import make_user
from .models import User

ROOT = Path(__file__).resolve().parent.parent
PG = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)


def cli(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sqlcache ARGS`` run in this process."""
    if stdin is not None:
        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = main(list(args))
    finally:
        if stdin is not None:
            sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def inspect_user(
    capsys: pytest.CaptureFixture[str], uid: int, prefix: str, redis_url: str
) -> tuple[int, str, str]:
    """``sqlcache inspect`` of one tests.models.User by primary key."""
    args = ("inspect", "--model", "tests.models:User", "--pk", str(uid))
    return cli(capsys, *args, "--prefix", prefix, "--redis-url", redis_url)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m sqlcache ARGS`` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "sqlcache", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh prefix; its keys and those of ``prefix:b`` are deleted afterwards."""
    p = f"cli{uuid.uuid4().hex[:10]}"
    yield p
    for pattern in (f"{p}:*", f"{p}%3Ab:*"):
        for key in redis_client.scan_iter(match=pattern):
            redis_client.unlink(key)


@pytest.fixture
def pg_cache(redis_url: str, engine: Engine, prefix: str) -> Iterator[SQLCache]:
    """A cache on ``prefix`` with User registered, attached to ``engine``."""
    c = SQLCache(redis_url, prefix=prefix, default_ttl=600)
    c.strict_signals = True
    c.register(User)
    c.attach(engine)
    yield c
    c.detach(engine)
    c.close()


def _filled(engine: Engine) -> int:
    """A user whose entry is in the cache (a get that filled it)."""
    uid = make_user(engine, "inspected")
    with Session(engine) as s:
        assert s.get(User, uid) is not None
    return uid


# -- every command ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["stats", "inspect", "flush"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows every command's options and exits 0."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--redis-url" in out and "--prefix" in out and "SQLCACHE_REDIS_URL" in out


@pytest.mark.parametrize("command", [["stats", "--once"], ["inspect", "--key", "x:e:1"], ["flush", "--yes"]])
def test_unreachable_redis_hides_the_password(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable Redis is one line on stderr (exit 2), its URL's password replaced by ***."""
    url = f"redis://user:s3cret-pw@127.0.0.1:{free_port()}/0"
    code, out, err = cli(capsys, *command, "--prefix", "x", "--redis-url", url, "--timeout", "0.5")
    assert code == 2
    assert "s3cret-pw" not in out + err and "***" in err and "Traceback" not in err


def test_urls_come_from_the_environment(redis_url: str, prefix: str) -> None:
    """With SQLCACHE_REDIS_URL set no URL is needed on the command line (a subprocess, as a user runs it)."""
    env = {**os.environ, "SQLCACHE_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "sqlcache", "stats", "--once", "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert f"no process publishes stats under prefix {prefix!r}" in p.stdout


# -- stats --------------------------------------------------------------------------------------------


def test_stats_of_a_publishing_cache(
    redis_url: str, redis_client: redis.Redis, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache publishing in this process shows up with its counters; garbage and hostile values under
    the prefix are counted as ignored and never reach the output."""
    cache = SQLCache(redis_url, prefix=prefix, publish_stats=0.1)
    try:
        cache.invalidate_tags("a", "b")
        redis_client.set(f"{prefix}:stats:garbage", b"\x00\xff not json")
        hostile = b'{"format":1,"host":"\x1b[2Jevil","pid":1,"time":1,"interval":1,"prefix":"p","stats":{}}'
        redis_client.set(f"{prefix}:stats:hostile", hostile)
        redis_client.set(f"{prefix}:stats:bomb", b"[" * 200_000)
        redis_client.hset(f"{prefix}:stats:hash", "a", "b")  # not a string: MGET answers nil
        deadline = time.monotonic() + 10
        out = ""
        while "invalidations" not in out and time.monotonic() < deadline:
            code, out, err = cli(capsys, "stats", "--once", "--prefix", prefix, "--redis-url", redis_url)
            assert code == 0, err
            time.sleep(0.02)  # polling for the publisher thread's first write, with a deadline
        assert f"pid {os.getpid()}" in out and "1 process(es)" in out
        assert [line.split() for line in out.splitlines() if line.strip().startswith("invalidations")] == [
            ["invalidations", "2"]
        ]
        assert "hits" in out and "misses" in out and "errors" in out
        assert "ignored 3 value(s)" in out
        assert "\x1b" not in out and "evil" not in out
    finally:
        cache.close()
    code, out, _ = cli(capsys, "stats", "--once", "--all", "--prefix", prefix, "--redis-url", redis_url)
    assert "0 process(es)" in out  # close() deleted its key


def test_stats_subprocess(redis_url: str, prefix: str) -> None:
    """`sqlcache stats --once` in a process of its own sees this process's publication."""
    cache = SQLCache(redis_url, prefix=prefix, publish_stats=0.1)
    try:
        deadline = time.monotonic() + 20
        p = run("stats", "--once", "--prefix", prefix, "--redis-url", redis_url)
        while f"pid {os.getpid()}" not in p.stdout and time.monotonic() < deadline:
            p = run("stats", "--once", "--prefix", prefix, "--redis-url", redis_url)
        assert p.returncode == 0, p.stderr
        assert f"pid {os.getpid()}" in p.stdout and "hit ratio" not in p.stdout
    finally:
        cache.close()


def test_stats_refreshes_until_interrupted(redis_url: str, prefix: str) -> None:
    """Without --once the command prints a snapshot every --interval seconds and exits 0 on Ctrl-C."""
    cache = SQLCache(redis_url, prefix=prefix, publish_stats=0.1)
    argv = [
        sys.executable,
        "-m",
        "sqlcache",
        "stats",
        "--interval",
        "0.1",
        "--prefix",
        prefix,
        "--redis-url",
        redis_url,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    try:
        # SIGINT at its default in the child: a suite started in the background of a shell without job
        # control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        ) as proc:
            try:
                assert proc.stdout is not None
                headers = 0
                while headers < 3:  # three refreshes: the command is looping
                    line = proc.stdout.readline()
                    assert line, "the command ended"
                    headers += line.startswith("sqlcache stats:")
                proc.send_signal(signal.SIGINT)
                assert proc.wait(20) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        cache.close()


# -- inspect ------------------------------------------------------------------------------------------


@PG
def test_inspect_a_hit(
    engine: Engine, pg_cache: SQLCache, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A filled entry: its columns decoded, every dependency matching, served now (exit 0); the key is
    the one a read uses (a get after it sends no SQL)."""
    uid = _filled(engine)
    code, out, err = inspect_user(capsys, uid, prefix, redis_url)
    assert code == 0, out + err
    assert "payload tests.models.User" in out and "name = 'inspected'" in out
    assert out.count("matches the entry") == 3  # the row's, the table's bulk key, the global key
    assert "seal: not checked" in out and "served now: yes" in out


@PG
def test_inspect_a_sealed_entry(
    engine: Engine, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the cache's secret the seal is valid; with another it does not match and is not served;
    the secret is never printed."""
    secret = "a-secret-of-sixteen-or-more"
    cache = SQLCache(redis_url, prefix=prefix, secret=secret)
    cache.register(User)
    cache.attach(engine)
    try:
        uid = _filled(engine)
        base = [
            "inspect",
            "--model",
            "tests.models:User",
            "--pk",
            str(uid),
            "--prefix",
            prefix,
            "--redis-url",
            redis_url,
        ]
        code, out, _ = cli(capsys, *base, "--secret", secret)
        assert code == 0 and "seal: valid" in out and secret not in out
        code, out, _ = cli(capsys, *base, "--secret", "another-secret-of-16-chars")
        assert code == 1 and "seal: DOES NOT MATCH" in out and "served now: no (seal does not match)" in out
    finally:
        cache.detach(engine)
        cache.close()


@PG
def test_inspect_locked_and_invalidated(
    engine: Engine, pg_cache: SQLCache, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dependency locked by a writer (lock.lua, as before a COMMIT) and then one moved by an
    invalidation: both shown, and the entry is not served (exit 1)."""
    uid = _filled(engine)
    args = [
        "inspect",
        "--model",
        "tests.models:User",
        "--pk",
        str(uid),
        "--prefix",
        prefix,
        "--redis-url",
        redis_url,
    ]
    row_dep = f"{prefix}:d:i:users:{uid}"
    store = pg_cache.store
    store.lock(f"{prefix}:clock", [row_dep], [], "writer-token", 30_000, 600_000)
    code, out, _ = cli(capsys, *args)
    assert code == 1 and "LOCKED by 1 writer(s)" in out and f"dependency {row_dep}: LOCKED" in out
    store.release(f"{prefix}:clock", [row_dep], "writer-token", 600_000)
    code, out, _ = cli(capsys, *args)
    assert code == 1 and f"dependency {row_dep} moved since the fill" in out and "entry has" in out


def test_inspect_a_missing_key(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A raw key that is not there: absent, not served (exit 1); a key of another prefix is refused."""
    code, out, _ = cli(
        capsys,
        "inspect",
        "--key",
        f"{prefix}:q:nothing",
        "--dep",
        f"{prefix}:d:*",
        "--prefix",
        prefix,
        "--redis-url",
        redis_url,
    )
    assert code == 1 and "absent" in out and "served now: no (no entry" in out
    code, _, err = cli(capsys, "inspect", "--key", "other:q:x", "--prefix", prefix, "--redis-url", redis_url)
    assert code == 2 and "is not under prefix" in err


@PG
def test_inspect_subprocess(engine: Engine, pg_cache: SQLCache, redis_url: str, prefix: str) -> None:
    """`sqlcache inspect --model` in a process of its own imports the model from the working directory."""
    uid = _filled(engine)
    p = run(
        "inspect",
        "--model",
        "tests.models:User",
        "--pk",
        str(uid),
        "--prefix",
        prefix,
        "--redis-url",
        redis_url,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "served now: yes" in p.stdout


# -- flush --------------------------------------------------------------------------------------------


def _keys(client: redis.Redis, prefix: str) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{prefix}:*"))


def test_flush_asks_and_spares_other_prefixes(
    redis_url: str, redis_client: redis.Redis, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --yes flush asks (no: nothing deleted, exit 1); yes deletes every key of the prefix but
    its layout's claim, and none of prefix ``a:b``'s, which starts with ``a``."""
    inner = SQLCache(redis_url, prefix=f"{prefix}:b")
    outer = SQLCache(redis_url, prefix=prefix)
    try:
        for c in (outer, inner):
            c.invalidate_tags(*[f"t{i}" for i in range(1200)])  # more than two SCAN batches
        before_inner = _keys(redis_client, f"{prefix}%3Ab")
        assert _keys(redis_client, prefix) > 1000 and before_inner > 1000
        code, out, _ = cli(capsys, "flush", "--prefix", prefix, "--redis-url", redis_url, stdin="n\n")
        assert code == 1 and "[y/N]" in out and "nothing changed" in out
        code, out, _ = cli(capsys, "flush", "--prefix", prefix, "--redis-url", redis_url, stdin="")
        assert code == 1  # end of input is no
        assert _keys(redis_client, prefix) > 1000
        code, out, _ = cli(capsys, "flush", "--prefix", prefix, "--redis-url", redis_url, stdin="y\n")
        assert code == 0 and "deleted" in out
        assert redis_client.keys(f"{prefix}:*") == [f"{prefix}:layout".encode()]  # the layout's claim stays
        assert _keys(redis_client, f"{prefix}%3Ab") == before_inner
    finally:
        inner.close()
        outer.close()


def test_flush_subprocess(redis_url: str, redis_client: redis.Redis, prefix: str) -> None:
    """`sqlcache flush --yes` in a process of its own; and with stdin saying yes."""
    for stdin, extra in (("", ["--yes"]), ("yes\n", [])):
        redis_client.set(f"{prefix}:q:x", b"1")
        p = run("flush", *extra, "--prefix", prefix, "--redis-url", redis_url, stdin=stdin)
        assert p.returncode == 0, p.stderr
        assert "deleted 1 keys" in p.stdout and redis_client.exists(f"{prefix}:q:x") == 0


@PG
def test_fence_makes_the_next_read_a_miss(
    engine: Engine,
    pg_cache: SQLCache,
    redis_url: str,
    prefix: str,
    sql_count: SQLCounter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--fence deletes nothing, and the next read of a filled entry goes to the database."""
    uid = _filled(engine)
    with Session(engine) as s:
        sql_count.reset()
        s.get(User, uid)
        assert len(sql_count) == 0  # a hit
    keys = _keys(redis.Redis.from_url(redis_url), prefix)
    code, out, _ = cli(capsys, "flush", "--fence", "--yes", "--prefix", prefix, "--redis-url", redis_url)
    assert code == 0 and "fenced" in out
    assert _keys(redis.Redis.from_url(redis_url), prefix) == keys
    with Session(engine) as s:
        sql_count.reset()
        assert s.get(User, uid) is not None
        assert sql_count.selects() == 1  # a miss
    code, out, _ = inspect_user(capsys, uid, prefix, redis_url)
    assert code == 0  # the miss filled it again, under the fenced generation
