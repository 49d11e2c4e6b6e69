"""A private Redis Cluster for the benchmark's cluster rows: three primaries (no replicas) started with
``redis-server --cluster-enabled yes`` on free ports in a temporary directory, joined with
``redis-cli --cluster create``, and stopped by PID (and the directory removed) on :meth:`stop`.
Nothing is written to disk beyond the nodes' cluster config files in that directory."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

__all__ = ["LocalCluster", "available"]


def available() -> bool:
    """Whether ``redis-server`` and ``redis-cli`` are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    """A free port whose cluster bus port (10000 above it, so below 65536) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 10000 <= 65535 and _bindable(port + 10000):
            return port


class LocalCluster:
    """Three cluster primaries on 127.0.0.1; :attr:`url` is a ``redis+cluster://`` URL of the first."""

    def __init__(self, nodes: int = 3, timeout: float = 20.0) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sqlcache-cluster-"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        try:
            for _ in range(nodes):
                self._start_node()
            self._create(timeout)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _start_node(self) -> None:
        port = _free_port()
        node_dir = self._dir / str(port)
        node_dir.mkdir()
        args = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir", str(node_dir),
        ]  # fmt: skip
        self._procs.append(
            subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=node_dir)
        )
        self.ports.append(port)

    def _create(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._wait(deadline, lambda c: bool(c.ping()), f"node {port} to answer", port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        for port in self.ports:
            self._wait(deadline, _cluster_ok, f"node {port} to see the cluster ok", port)

    @staticmethod
    def _wait(deadline: float, ok: Callable[[redis.Redis], bool], what: str, port: int) -> None:
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as c:
                    if ok(c):
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)  # polling a process we started, with a deadline

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 5 s) and remove the directory."""
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        shutil.rmtree(self._dir, ignore_errors=True)


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text
