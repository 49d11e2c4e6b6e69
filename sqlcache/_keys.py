"""Pure: every Redis key shape. No client, no clock, no globals.

Every key starts with the cache's namespace: its prefix with ``%`` and ``:`` escaped (``%25``, ``%3A``),
then ``:``. On a Redis Cluster the prefix is first made a hash tag (``slot_prefix``), so that every key
of the cache is in one slot and every script's keys are on one node. Prefixes ``a`` and ``a:b``
never share a key, and ``clear()`` of one never reaches the other's keys (a plain ``a:*`` would match
every key of ``a:b``).

{ns}:clock                      the invalidation clock (generations are drawn from it)
{ns}:lineage                    the run id of the server process whose data this is (lineage.lua)
{ns}:e:{fp}:{entity}:{pk}       identity entry of one mapped class (fp = schema fingerprint)
{ns}:d:i:{table}:{pk}           dependency: one row identity (table = base table of the hierarchy)
{ns}:d:b:{table}                dependency: rows of a table changed by statements we cannot
                                    attribute to rows (Core DML, ORM bulk statements)
{ns}:d:t:{table}                dependency: anything in a table changed (queries read it)
{ns}:d:r:{table}                not a dependency of any entry: moved with every row dependency of the
                                    table (a missing row dependency borrows its generation)
{ns}:d:u:{tag}                  dependency: a user tag
{ns}:d:*                        dependency of every entry: moved by writes we cannot attribute
                                    to a table (text SQL) and by a fence after lost invalidations
{ns}:stats:{process}            one process's published stats() (publish_stats=), with a short TTL
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from hashlib import blake2b
from urllib.parse import quote

from ._codec import encode_body

__all__ = [
    "bulk_dep_key",
    "channel",
    "clock_key",
    "global_dep_key",
    "identity_dep_key",
    "identity_entry_key",
    "lineage_key",
    "namespace",
    "pk_token",
    "query_key",
    "row_writes_key",
    "scan_pattern",
    "slot_prefix",
    "stats_key",
    "stats_pattern",
    "table_dep_key",
    "tag_dep_key",
]

_GLOB = re.compile(r"([*?\[\]\\])")


def namespace(prefix: str) -> str:
    """The prefix as it starts every key: ``%`` and ``:`` escaped, so that no prefix is another's start."""
    if "%" not in prefix and ":" not in prefix:
        return prefix
    return prefix.replace("%", "%25").replace(":", "%3A")


def lineage_key(prefix: str) -> str:
    return f"{namespace(prefix)}:lineage"


def slot_prefix(prefix: str) -> str:
    """The key prefix of a cache on a Redis Cluster with every key in one slot: ``prefix`` as a hash tag
    (``{prefix}``), with ``{`` and ``}`` escaped (``%7B``, ``%7D``) so that the tag is exactly it."""
    inner = prefix.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + inner + "}"


def clock_key(prefix: str) -> str:
    return f"{namespace(prefix)}:clock"


def pk_token(pk: Sequence[object]) -> str:
    """A canonical, injective text form of a primary key tuple."""
    parts = []
    for v in pk:
        if type(v) is int:
            parts.append(str(v))
        elif type(v) is str:
            parts.append("s" + quote(v, safe=""))
        elif type(v) is uuid.UUID:
            parts.append("u" + v.hex)
        else:
            parts.append("h" + blake2b(encode_body(v), digest_size=16).hexdigest())
    return ",".join(parts)


def identity_entry_key(prefix: str, fingerprint: str, entity: str, pk: Sequence[object]) -> str:
    return f"{namespace(prefix)}:e:{fingerprint}:{entity}:{pk_token(pk)}"


def identity_dep_key(prefix: str, table: str, pk: Sequence[object]) -> str:
    return f"{namespace(prefix)}:d:i:{table}:{pk_token(pk)}"


def bulk_dep_key(prefix: str, table: str) -> str:
    return f"{namespace(prefix)}:d:b:{table}"


def table_dep_key(prefix: str, table: str) -> str:
    return f"{namespace(prefix)}:d:t:{table}"


def row_writes_key(prefix: str, table: str) -> str:
    return f"{namespace(prefix)}:d:r:{table}"


def tag_dep_key(prefix: str, tag: str) -> str:
    return f"{namespace(prefix)}:d:u:{tag}"


def query_key(prefix: str, digest: str) -> str:
    return f"{namespace(prefix)}:q:{digest}"


def channel(prefix: str) -> str:
    """The pub/sub channel invalidations are broadcast on."""
    return f"{namespace(prefix)}:invalidated"


def global_dep_key(prefix: str) -> str:
    return f"{namespace(prefix)}:d:*"


def scan_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for every key under ``prefix`` and nothing else."""
    return _GLOB.sub(r"\\\1", namespace(prefix)) + ":*"


def stats_key(prefix: str, process: str) -> str:
    """Where one process publishes its counters; ``process`` is made of ``[A-Za-z0-9._~%-]`` only."""
    return f"{namespace(prefix)}:stats:{process}"


def stats_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for the published counters of every process under ``prefix``."""
    return _GLOB.sub(r"\\\1", namespace(prefix)) + ":stats:*"
