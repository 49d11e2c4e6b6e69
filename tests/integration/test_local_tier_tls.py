"""The local tier over TLS, with a password or a credential provider: its tracking connection uses the
``ssl_*`` settings and the identity of sqlcache's other connections, on one server and on a Redis
Cluster (a private TLS-only redis-server; tests/tls.py). Writers are other caches on other engines."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from redis.credentials import CredentialProvider
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqlcache import SQLCache

from ..conftest import shareable_url
from ..helpers import each_commit_read_back, make_user, rename_user, user_name
from ..models import User
from ..tls import PASSWORD, TLSRedis, certificates, make_certificates, tls_redis
from .test_local_tier import serving, wait_for

__all__ = ["certificates", "tls_redis"]


class Rotating(CredentialProvider):
    """A credential provider whose password can change, counting how often it is asked."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.asked = 0
        self._lock = threading.Lock()

    def get_credentials(self) -> tuple[str, str]:
        with self._lock:
            self.asked += 1
            return "default", self.password


@pytest.fixture
def other(engine: Engine) -> Iterator[Engine]:
    e = create_engine(shareable_url(engine))
    yield e
    e.dispose()


def _client(server: TLSRedis, provider: CredentialProvider) -> redis.Redis | redis.cluster.RedisCluster:
    options = {"ssl": True, "ssl_ca_certs": server.ca, "credential_provider": provider}
    if server.cluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=server.port, **options)  # type: ignore[arg-type]
    return redis.Redis(host="127.0.0.1", port=server.port, **options)  # type: ignore[arg-type]


def _cache(target: object, engine: Engine, prefix: str, **kwargs: object) -> SQLCache:
    c = SQLCache(target, prefix=prefix, default_ttl=600, timeout=1.0, **kwargs)  # type: ignore[arg-type]
    c.register(User)
    c.attach(engine)
    return c


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_every_read_after_another_process_commit_returned_sees_it_over_tls(
    engine: Engine, other: Engine, tls_redis: TLSRedis
) -> None:
    """Strict read-after-commit over TLS, on one server and on a cluster: 30 rounds of another process
    renaming a user and, as soon as its commit returned, reads that always see the new name, served
    from memory in between; the tracking connection is a TLS connection with the URL's password (the
    server accepts nothing else)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    local = _cache(tls_redis.url(), engine, prefix, local_bytes=1 << 20)
    writer = _cache(tls_redis.url(), other, prefix)
    try:
        wait_for(lambda: serving(local), "the tracking connection over TLS")
        assert tls_redis.tracking_ids()
        uid = make_user(engine, "v0")
        for _ in range(2):
            assert user_name(engine, uid) == "v0"
        each_commit_read_back(engine, other, uid, 30)
        assert local.stats()["local_hits"] > 0
    finally:
        for c, e in ((writer, other), (local, engine)):
            c.detach(e)
        local.clear()
        writer.close()
        local.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_credential_provider_is_asked_at_each_tracking_connection(
    engine: Engine, other: Engine, tls_redis: TLSRedis
) -> None:
    """The password changes (CONFIG SET requirepass, the provider's answer with it) and the tracking
    connection is killed: the new one authenticates with what the provider says now, and the tier
    serves again, never a name older than a commit that returned."""
    provider, writers = Rotating(PASSWORD), Rotating(PASSWORD)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    local = _cache(_client(tls_redis, provider), engine, prefix, local_bytes=1 << 20)
    writer = _cache(_client(tls_redis, writers), other, prefix)
    try:
        wait_for(lambda: serving(local), "the tracking connection")
        uid = make_user(engine, "v0")
        for _ in range(3):
            assert user_name(engine, uid) == "v0"
        asked, drops = provider.asked, local.stats()["local_drops"]
        with tls_redis.admin() as admin:
            admin.config_set("requirepass", "rotated-pw")
        provider.password = writers.password = "rotated-pw"
        with tls_redis.admin(password="rotated-pw") as admin:
            for cid in tls_redis.tracking_ids(admin):
                admin.client_kill_filter(_id=cid)
        rename_user(other, uid, "v1")
        assert user_name(engine, uid) == "v1"
        wait_for(lambda: local.stats()["local_drops"] > drops and serving(local), "a new tracking connection")
        assert provider.asked > asked
        hits = local.stats()["local_hits"]
        for _ in range(3):
            assert user_name(engine, uid) == "v1"
        assert local.stats()["local_hits"] > hits
    finally:
        with tls_redis.admin(password=provider.password) as admin:
            admin.config_set("requirepass", PASSWORD)
        for c, e in ((writer, other), (local, engine)):
            c.detach(e)
        local.clear()
        writer.close()
        local.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_certificate_from_another_authority_is_refused(
    engine: Engine, tls_redis: TLSRedis, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The tracking connection verifies the server as the other connections do: with a CA that did not
    sign the server's certificate it is refused (and the reads, which Redis does not answer either, come
    from the database, right)."""
    make_certificates(str(tmp_path))
    url = tls_redis.url().replace(tls_redis.ca, str(tmp_path / "ca.crt"))
    caplog.set_level(logging.WARNING, logger="sqlcache")
    local = _cache(url, engine, f"t{uuid.uuid4().hex[:10]}", local_bytes=1 << 20)
    try:
        uid = make_user(engine, "v0")
        assert user_name(engine, uid) == "v0"
        # one server: the tracking socket's own TLS says so; a cluster: the slot table's read refuses first
        said = "certificate verify failed" if not tls_redis.cluster else "cannot read the cluster's slots"
        wait_for(lambda: said in caplog.text, "the tracking connection's refusal")
        assert not serving(local) and local.stats()["local_hits"] == 0
        assert tls_redis.tracking_ids() == []
    finally:
        local.detach(engine)
        local.close()
