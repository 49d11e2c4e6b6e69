"""The demo and the benchmark run end to end as a user runs them."""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sqlcache.cli.demo import run_demo

from .conftest import free_port, unavailable


def run(
    *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlcache", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning", **(env or {})},
    )


def test_demo_plain(redis_url: str) -> None:
    """The demo runs on SQLite and shows hits, the signal, a refused stale fill and a measured speed."""
    p = run("demo", "--plain", "--rows", "30", "--redis-url", redis_url)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "hits   30  misses    0  SQL statements    0" in out
    assert "invalidated: identities [Customer(1,)]" in out
    assert "fills refused as stale: 1" in out and "a fresh read returns 'customer 2, v2'" in out
    assert "cached get:" in out and "database get:" in out
    assert "await session.get(): 'customer 3', a hit: True" in out
    assert "the sync engine now reads 'customer 3 (async)'" in out


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_demo_without_redis(given: str) -> None:
    """With Redis unreachable at a URL the user gave (--redis-url or SQLCACHE_REDIS_URL), the demo says
    so in one line, without a traceback and without the URL's password, and starts no server of its own
    in its place."""
    url = f"redis://u:s3cret-pw@127.0.0.1:{free_port()}/0"
    if given == "flag":
        p = run("demo", "--plain", "--redis-url", url, timeout=60)
    else:
        p = run("demo", "--plain", timeout=60, env={"SQLCACHE_REDIS_URL": url})
    assert p.returncode == 2
    assert "cannot reach Redis" in p.stderr and "Traceback" not in p.stderr
    assert "--private-redis" in p.stderr and "s3cret-pw" not in p.stderr
    assert "private redis-server" not in p.stdout


def _started_pid(out: str) -> int:
    found = re.search(r"started a private redis-server \(pid (\d+)\) on 127\.0\.0\.1:(\d+)", out)
    assert found, out
    return int(found.group(1))


def _gone(pid: int) -> bool:
    """No process ``pid`` any more (the demo reaped its child, so not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _without_redis_server() -> str:
    """$PATH without the directories that hold redis-server."""
    return os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if not os.path.exists(os.path.join(d, "redis-server"))
    )


def _demo_args(redis_url: str, private: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        redis_url=redis_url, private_redis=private, database_url=None, rows=10, plain=True
    )


def test_demo_private_redis() -> None:
    """--private-redis runs the demo on a redis-server of its own, says so, and stops it by PID."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    p = run("demo", "--plain", "--rows", "10", "--private-redis", timeout=120)
    assert p.returncode == 0, p.stderr
    pid = _started_pid(p.stdout)
    assert f"stopped the private redis-server (pid {pid})" in p.stdout
    assert "hits   10  misses    0  SQL statements    0" in p.stdout
    assert _gone(pid)


def test_demo_falls_back_when_the_default_url_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    """When nothing answers at a URL the user did not give (here a closed port standing in for the
    default), the demo starts a private redis-server, runs on it, and stops it by PID."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    closed = f"redis://127.0.0.1:{free_port()}/0"
    assert run_demo(_demo_args(closed), explicit=False) == 0
    out = capsys.readouterr().out
    assert f"nothing answers at {closed}" in out
    assert "fills refused as stale: 1" in out
    assert _gone(_started_pid(out))


@pytest.mark.parametrize("how", ["fallback", "--private-redis"])
def test_demo_without_redis_server_installed(
    how: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing answering and no redis-server on PATH, the clear one-line error stays."""
    monkeypatch.setenv("PATH", _without_redis_server())
    closed = f"redis://127.0.0.1:{free_port()}/0"
    assert run_demo(_demo_args(closed, private=how != "fallback"), explicit=False) == 2
    err = capsys.readouterr().err
    assert "cannot start a private redis-server: redis-server is not installed" in err
    assert ("cannot reach Redis" in err) == (how == "fallback")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_stops_its_redis(sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) in the middle of the demo stops its private redis-server all the same."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlcache", "demo", "--plain", "--rows", "5000", "--private-redis"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"},
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(
            target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True
        ).start()
        first = lines.get(timeout=60)  # the demo prints it, flushed, once the server answers
        pid = _started_pid(first)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert _gone(pid)


def test_bench_quick(redis_url: str, pg_url: str) -> None:
    """The benchmark's quick mode prints the table, the ratios and the round-trip counts."""
    p = run("bench", "--quick", "--database-url", pg_url, "--redis-url", redis_url)
    assert p.returncode == 0, p.stderr
    for needle in (
        "get sqlcache hit",
        "floor",
        "update sqlcache / update plain",
        "get hit / floor",
        "direct get hit / floor",
        "direct get hit, open session / floor",
        "direct get hit / get hit",
        "get_many 50 / 50 get hits",
        "get local hit / get ORM floor, memory",
        "update transaction of 50 registered rows: 2",
        "read-only transaction: 0",
    ):
        assert needle in p.stdout, needle
    if shutil.which("redis-server") and shutil.which("redis-cli"):  # CI installs both
        # the cluster rows, on a private cluster started for the run and stopped at its end
        ports = re.search(r"private Redis Cluster \(3 primaries, ports \[([\d, ]+)\]\)", p.stdout)
        assert ports is not None, p.stdout
        for needle in ("cluster get hit", "cluster q20 hit / q20 hit", "cluster update / update plain"):
            assert needle in p.stdout, needle
        assert "on the cluster, update of 1 / 50 rows, read-only: [2, 2, 0]" in p.stdout
        for port in ports.group(1).split(", "):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", int(port))) != 0, f"node {port} still runs"


def test_bench_plot(redis_url: str, tmp_path: Path) -> None:
    """A minimal bench on SQLite with --plot writes a PNG chart and the JSON of its figures (no URL in it),
    and the chart can be drawn again from the JSON alone."""
    from sqlcache.cli import bench_plot

    png = tmp_path / "bench.png"
    db = f"sqlite:///{tmp_path / 'bench.db'}"
    p = run(
        "bench",
        "--rounds",
        "1",
        "--batch",
        "2",
        "--database-url",
        db,
        "--redis-url",
        redis_url,
        "--plot",
        str(png),
    )
    assert p.returncode == 0, p.stderr
    assert f"chart: {png}" in p.stdout
    _check_png(png)
    text = (tmp_path / "bench.json").read_text()
    assert redis_url not in text and "bench.db" not in text
    doc = json.loads(text)
    assert doc["format"] == bench_plot.FORMAT
    assert doc["run"] == {"database": "sqlite", "driver": "pysqlite", "rounds": 1, "batch": 2, "rows": 1000}
    hit = doc["systems"]["get sqlcache hit"]
    assert hit["n"] == 2 and len(hit["samples_ns"]) == 2 and hit["p95_us"] >= hit["median_us"] > 0
    ratio = next(r for r in doc["ratios"] if r["label"] == "get hit / floor")
    assert ratio["target"] == 1.5 and ratio["met"] is (ratio["value"] <= 1.5)
    again = tmp_path / "again.png"
    assert bench_plot.main([str(tmp_path / "bench.json"), str(again)]) == 0
    _check_png(again)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 600 and len(data) > 20_000
    assert data[-8:-4] == b"IEND"


def test_bench_plot_without_matplotlib(tmp_path: Path) -> None:
    """Without matplotlib, --plot fails at once with the extra to install, before the bench runs."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    p = subprocess.run(
        [sys.executable, "-m", "sqlcache", "bench", "--plot", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 2 and "sqlcache[plot]" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.png").exists() and "rounds" not in p.stdout


def test_relay_and_outbox_take_urls_from_the_environment(redis_url: str, tmp_path: object) -> None:
    """With SQLCACHE_DATABASE_URL and SQLCACHE_REDIS_URL set, `sqlcache outbox --create` and `sqlcache
    relay --once` need no URL on the command line (where other users of the machine could read it)."""
    import pathlib

    db = pathlib.Path(str(tmp_path)) / "outbox.db"
    env = {**os.environ, "SQLCACHE_DATABASE_URL": f"sqlite:///{db}", "SQLCACHE_REDIS_URL": redis_url}
    for args in (["outbox", "--create"], ["relay", "--once", "--prefix", "envtest"]):
        p = subprocess.run(
            [sys.executable, "-m", "sqlcache", *args], capture_output=True, text=True, timeout=60, env=env
        )
        assert p.returncode == 0, p.stderr
    assert "applied 0 outbox rows" in p.stdout
    bare = {k: v for k, v in os.environ.items() if k != "SQLCACHE_DATABASE_URL"}
    p = subprocess.run(
        [sys.executable, "-m", "sqlcache", "relay", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=bare,
    )
    assert p.returncode == 2 and "SQLCACHE_DATABASE_URL" in p.stderr


def test_bad_database_url_hides_its_password() -> None:
    """An unusable database URL is reported without its password and without a traceback."""
    p = run("outbox", "--database-url", "nosuchdialect://user:s3cret-pw@db.example/x", timeout=60)
    assert p.returncode == 2
    assert "s3cret-pw" not in p.stderr and "Traceback" not in p.stderr and "***" in p.stderr
