"""A private redis-server that speaks TLS only, with a password: on its own, or as a one-node Redis
Cluster serving every slot. Its certificate authority and certificate are made for the run with the
``openssl`` command; the process is stopped by PID and its directory removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from .conftest import free_port, unavailable
from .topologies import LocalCluster

PASSWORD = "tls-secret-pw"


def _openssl(directory: str, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        unavailable("openssl", FileNotFoundError("openssl"))
    assert exe is not None
    subprocess.run([exe, *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_certificates(directory: str) -> None:
    """ca.crt, and server.crt/server.key for 127.0.0.1 and localhost signed by it, with the extensions
    a strict verifier asks for (Python 3.13 sets VERIFY_X509_STRICT): a CA's basic constraints and key
    usage, a server certificate's key usage, extended key usage and key identifiers."""
    key = ["-newkey", "rsa:2048", "-nodes"]
    with open(os.path.join(directory, "ca.cnf"), "w", encoding="ascii") as f:
        f.write(
            "[req]\ndistinguished_name = dn\nx509_extensions = ca\nprompt = no\n"
            "[dn]\nCN = sqlcache test CA\n"
            "[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
            "subjectKeyIdentifier = hash\n"
        )
    _openssl(directory, "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-config", "ca.cnf")  # fmt: skip
    _openssl(directory, "req", *key, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    with open(os.path.join(directory, "ext.cnf"), "w", encoding="ascii") as f:
        f.write(
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n"
        )
    _openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip


class TLSRedis:
    """One TLS-only redis-server (``requirepass``); ``cluster=True``: a cluster node serving all slots."""

    def __init__(self, directory: str, cluster: bool = False) -> None:
        self.port = LocalCluster._cluster_port(set()) if cluster else free_port()
        self.cluster = cluster
        self.certs = directory
        self.dir = tempfile.mkdtemp(prefix="sqlcache-tls-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> str:
        return os.path.join(self.certs, "ca.crt")

    def url(self, password: bool = True) -> str:
        scheme = "rediss+cluster" if self.cluster else "rediss"
        auth = f":{PASSWORD}@" if password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def admin(self, **kwargs: Any) -> redis.Redis:
        """A TLS client of the node (strings, 2 s timeouts); the caller closes it."""
        options: dict[str, Any] = {
            "port": self.port, "ssl": True, "ssl_ca_certs": self.ca, "password": PASSWORD,
            "socket_timeout": 2, "socket_connect_timeout": 2, "decode_responses": True, **kwargs,
        }  # fmt: skip
        return redis.Redis(**options)

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("redis-server", FileNotFoundError("redis-server"))
        assert exe is not None
        argv = [
            exe, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", os.path.join(self.certs, "server.crt"),
            "--tls-key-file", os.path.join(self.certs, "server.key"),
            "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", self.dir,
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--tls-cluster", "yes"]
            argv += ["--cluster-config-file", "nodes.conf"]
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        problem = "not started"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                unavailable("redis-server with TLS", RuntimeError(self._log_tail()))
            try:
                with self.admin(socket_timeout=0.5) as r:
                    r.ping()
                    if not self.cluster:
                        return
                    if int(r.cluster("info").get("cluster_slots_assigned", 0)) == 0:
                        r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                    if r.cluster("info").get("cluster_state") == "ok":
                        return
                    problem = "cluster state not ok"
            except redis.RedisError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)  # polling with a deadline
        raise RuntimeError(f"TLS redis-server on {self.port} did not start: {problem}\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-10:])
        except OSError:
            return "(no log)"

    def tracking_ids(self, admin: redis.Redis | None = None) -> list[int]:
        """The ids of the connections with tracking on and a subscription (the local tier's)."""
        r = admin or self.admin()
        try:
            clients = r.client_list()
            return [int(c["id"]) for c in clients if "t" in c.get("flags", "") and c.get("sub") == "1"]
        finally:
            if admin is None:
                r.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def certificates() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sqlcache-certs-")
    try:
        make_certificates(directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=["server", "cluster"])
def tls_redis(request: pytest.FixtureRequest, certificates: str) -> Iterator[TLSRedis]:
    """A TLS-only Redis, on its own and as a one-node cluster."""
    server = TLSRedis(certificates, cluster=request.param == "cluster")
    try:
        server.start()
        yield server
    finally:
        server.stop()
