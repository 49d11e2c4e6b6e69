"""Signed entries: with a secret, an HMAC over the entry's key and payload sits in front of the payload."""

from __future__ import annotations

import hashlib
import hmac

from .errors import CodecError, ConfigurationError

__all__ = ["Sealer"]

_MAC_SIZE = 16


class Sealer:
    """Seals payloads on the way to Redis and checks them on the way back; a no-op without a secret.

    :raises ConfigurationError: a secret that is not bytes or str of at least 16 characters.
    """

    def __init__(self, secret: bytes | str | None) -> None:
        if secret is not None and (not isinstance(secret, (bytes, str)) or len(secret) < 16):
            raise ConfigurationError("secret must be bytes or str of at least 16 characters")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        #: bytes a sealed payload has beyond the payload itself
        self.overhead = _MAC_SIZE if self._secret is not None else 0

    def seal(self, entry_key: str, payload: bytes) -> bytes:
        if self._secret is None:
            return payload
        return self._mac(entry_key, payload) + payload

    def unseal(self, entry_key: str, data: bytes) -> bytes:
        """The payload; CodecError if it was not sealed with this secret for this very key."""
        if self._secret is None:
            return data
        tag, payload = data[:_MAC_SIZE], data[_MAC_SIZE:]
        if len(tag) != _MAC_SIZE or not hmac.compare_digest(tag, self._mac(entry_key, payload)):
            raise CodecError("entry not signed with this cache's secret")
        return payload

    def _mac(self, entry_key: str, payload: bytes) -> bytes:
        assert self._secret is not None
        mac = hmac.new(self._secret, entry_key.encode(), hashlib.sha256)
        mac.update(b"\0")
        mac.update(payload)
        return mac.digest()[:_MAC_SIZE]
