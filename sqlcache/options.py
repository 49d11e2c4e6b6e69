"""The ``cached()`` query option."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm.interfaces import UserDefinedOption

from .config import validate_ttl
from .errors import ConfigurationError

__all__ = ["CacheOption", "QueryPolicy", "cached"]


@dataclass(frozen=True, slots=True)
class QueryPolicy:
    """What ``cached()`` asked for: ``ttl`` seconds (None: the cache default) and user tags."""

    ttl: int | None = None
    tags: tuple[str, ...] = ()
    swr: int | None = None


class CacheOption(UserDefinedOption):
    """Marks a statement for the query cache; its payload is a :class:`QueryPolicy`."""

    payload: QueryPolicy
    propagate_to_loaders = False


def cached(ttl: int | None = None, tags: Iterable[str] = (), swr: int | None = None) -> CacheOption:
    """Cache this query's result in Redis: ``select(User).options(cached(ttl=60, tags=["org:3"]))``.

    Every table the statement reads is a dependency automatically (joins, subqueries, CTEs,
    inheritance tables, and the tables its eager loads read); ``tags`` add user tags, invalidated with
    :meth:`SQLCache.invalidate_tags`. Works with ``Session.execute/scalars/scalar`` and legacy
    ``Query.options()``.

    ``swr`` (seconds): once the TTL has passed, the entry may still be served for up to ``swr`` more
    seconds while one caller refreshes it, but never after a commit or ``invalidate_tags`` invalidated it
    (expired and invalidated are different states). Callers that miss one key together elect one to
    query; the others wait up to the cache's ``stampede_wait`` for its fill.

    Read from the database instead: ``with_for_update``, ``yield_per``, ``populate_existing``,
    executemany parameters, and anything a transaction reads after writing one of the tables.

    :raises ConfigurationError: on a bad ``ttl`` or ``swr``, or a tag that is not a non-empty string.

    .. versionadded:: 0.1
    """
    validate_ttl(ttl, "ttl")
    validate_ttl(swr, "swr")
    if isinstance(tags, str):
        tags = (tags,)
    tag_tuple = tuple(tags)
    for t in tag_tuple:
        if not isinstance(t, str) or not t:
            raise ConfigurationError(f"tags must be non-empty strings, got {t!r}")
    return CacheOption(QueryPolicy(ttl, tuple(sorted(set(tag_tuple))), swr))
