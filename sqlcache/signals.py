"""Blinker signals sent by every :class:`~sqlcache.SQLCache`; the sender is always the cache.

Each signal and the keyword arguments its receivers get:

- ``cache_hit``: ``key`` (str), ``kind`` (``"identity"`` or ``"query"``)
- ``cache_miss``: ``key`` (str), ``kind`` (``"identity"`` or ``"query"``)
- ``invalidated``: ``identities`` (list of ``(mapped class, pk tuple)``), ``tags`` (list of str),
  ``remote`` (bool: came from another process)
- ``cache_error``: ``exc`` (the exception), ``operation`` (str: ``"read"``, ``"fill"``, ``"lock"``,
  ``"release"``, ``"decode"``, ``"encode"``, ...)

Connect with ``signals.invalidated.connect_via(cache)`` to hear one cache only. A receiver that raises
is logged and counted in ``stats()["signal_errors"]``; it never undoes a commit that already happened.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["cache_error", "cache_hit", "cache_miss", "invalidated"]

_namespace = Namespace()

cache_hit = _namespace.signal("cache-hit", doc="An entry was served from Redis.")
cache_miss = _namespace.signal("cache-miss", doc="No valid entry: the database answered.")
invalidated = _namespace.signal("invalidated", doc="Identities and tags were invalidated after a commit.")
cache_error = _namespace.signal("cache-error", doc="Redis failed or an entry could not be decoded.")
