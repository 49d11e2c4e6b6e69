"""How the local tier's tracking connection reads the settings of sqlcache's other connections: TLS as
redis-py reads its ``ssl_*`` settings, credentials as redis-py takes them, nothing secret in a repr."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from redis.credentials import CredentialProvider

from sqlcache._tracking import TrackingError, target_of
from sqlcache.errors import ConfigurationError


class Fixed(CredentialProvider):
    def __init__(self, *answer: Any) -> None:
        self.answer = answer

    def get_credentials(self) -> Any:
        return self.answer


def test_ssl_cert_reqs_none_means_no_verification_as_for_redis_py() -> None:
    """redis-py reads ``ssl_cert_reqs=None`` as "do not verify"; so does the tracking connection."""
    context = target_of({"host": "h", "ssl_cert_reqs": None}, True, 1.0).tls_context()
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    strict = target_of({"host": "h"}, True, 1.0).tls_context()
    assert strict.verify_mode == ssl.CERT_REQUIRED
    optional = target_of({"host": "h", "ssl_cert_reqs": "optional"}, True, 1.0).tls_context()
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_without_tls_no_ssl_setting_is_kept() -> None:
    target = target_of({"host": "h", "port": 7000, "ssl_cert_reqs": None, "password": "pw"}, False, 1.0)
    assert not target.tls and target.settings == {"password": "pw"}
    assert (target.host, target.port, target.timeout) == ("h", 7000, 1.0)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"username": "u", "password": "pw"}, ("u", "pw")),
        ({"username": b"u", "password": b"p\xc3\xa9"}, ("u", "pé")),
        ({"credential_provider": Fixed("pw")}, (None, "pw")),
        ({"credential_provider": Fixed(b"u", b"pw")}, ("u", "pw")),
        ({"credential_provider": Fixed(None, "pw")}, (None, "pw")),
    ],
)
def test_credentials_are_read_as_redis_py_takes_them(settings: dict[str, Any], expected: Any) -> None:
    assert target_of({"host": "h", **settings}, False, 1.0).credentials() == expected


def test_a_credential_provider_answering_something_else_fails_the_connection() -> None:
    with pytest.raises(TrackingError, match="neither"):
        target_of({"credential_provider": Fixed("a", "b", "c")}, False, 1.0).credentials()


def test_no_secret_in_a_repr() -> None:
    target = target_of({"host": "h", "password": "hunter2", "ssl_password": "keypass"}, True, 1.0)
    assert "hunter2" not in repr(target) and "keypass" not in repr(target)
    assert "hunter2" not in repr(target.at("other", 1))


def test_settings_the_tracking_cannot_use_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="OCSP"):
        target_of({"ssl_validate_ocsp": True}, True, 1.0)
    with pytest.raises(ConfigurationError, match=r"no such file: ssl_certfile='/nonexistent/c\.pem'"):
        target_of({"ssl_certfile": "/nonexistent/c.pem"}, True, 1.0)
    with pytest.raises(ConfigurationError, match="is none of"):
        target_of({"ssl_cert_reqs": "maybe"}, True, 1.0)
