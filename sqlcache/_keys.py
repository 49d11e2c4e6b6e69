"""Pure: every Redis key shape. No client, no clock, no globals.

Every key starts with the cache's namespace: its prefix with ``%`` and ``:`` escaped (``%25``, ``%3A``),
then ``:``. On a Redis Cluster the prefix is first made a hash tag (``slot_prefix``), so that every key
of the cache is in one slot and every script's keys are on one node. Prefixes ``a`` and ``a:b``
never share a key, and ``clear()`` of one never reaches the other's keys (a plain ``a:*`` would match
every key of ``a:b``).

{ns}:clock                      the invalidation clock (generations are drawn from it)
{ns}:lineage                    run id:replication id of the server whose data this is (lineage.lua)
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
{ns}:layout                     how many shards the cache's keys are spread over (lineage.lua checks it)

Sharded (``SQLCache(cluster, shards=n)``): each table and each user tag belongs to one of ``n`` shards,
each with a hash tag of its own (:class:`Layout`). Keys of a table or a tag start with their shard's
namespace; every shard has its own clock, lineage, layout and dependency of every entry. Shard 0 is the
unsharded namespace itself.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from hashlib import blake2b
from urllib.parse import quote

from ._codec import encode_body

__all__ = [
    "Layout",
    "bulk_dep_key",
    "channel",
    "clock_key",
    "global_dep_key",
    "identity_dep_key",
    "identity_entry_key",
    "layout_key",
    "lineage_key",
    "namespace",
    "pk_token",
    "query_key",
    "row_writes_key",
    "scan_pattern",
    "shard_of",
    "shard_prefixes",
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


def layout_key(prefix: str) -> str:
    return f"{namespace(prefix)}:layout"


def shard_of(name: str, n: int) -> int:
    """The shard of a table or a tag among ``n``: the same in every process, whatever it registered."""
    if n == 1:
        return 0
    return int.from_bytes(blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") % n


def shard_prefixes(base: str, n: int, slot: Callable[[str], int], slots: int = 16384) -> list[str]:
    """The prefixes of ``n`` shards of a cache whose unsharded prefix is ``base`` (a hash tag,
    :func:`slot_prefix`): ``base`` itself for shard 0, then ``{inner%s<i>.<salt>}``, the salt the
    first that puts the shard's slot (``slot`` of a key that starts with it) in the i-th of ``n`` equal
    ranges after shard 0's, so that the shards spread evenly over a cluster's nodes.

    No other prefix's namespace can start like a shard's: escaping makes every ``%`` of a namespace
    ``%25`` followed by ``25``, ``7B``, ``7D`` or ``3A``, and a shard's tag holds ``%25s``."""
    if not (base.startswith("{") and base.endswith("}")):
        raise ValueError(f"not a hash-tag prefix: {base!r}")
    out = [base]
    start = slot(clock_key(base))
    width = slots // n
    for i in range(1, n):
        low = (start + i * width) % slots
        salt = 0
        while True:
            candidate = f"{base[:-1]}%s{i}.{salt}}}"
            if (slot(clock_key(candidate)) - low) % slots < width:
                break
            salt += 1
        out.append(candidate)
    return out


class Layout:
    """Which prefix starts the keys of each table and tag, and the dependency of every entry of each
    shard. Pure. One shard: every key starts with ``base`` (the keys of an unsharded cache)."""

    __slots__ = ("_at", "base", "everything", "n", "namespaces", "prefixes")

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.prefixes = tuple(prefixes)
        self.base = self.prefixes[0]
        self.n = len(self.prefixes)
        self.namespaces = tuple(namespace(p) for p in self.prefixes)
        #: the dependency of every entry, one per shard: writes that cannot be attributed, fences
        self.everything = tuple(global_dep_key(p) for p in self.prefixes)
        self._at: dict[str, str] = {}

    def at(self, name: str) -> str:
        """The prefix of the shard of table or tag ``name``."""
        if self.n == 1:
            return self.base
        p = self._at.get(name)
        if p is None:
            if len(self._at) > 65536:
                self._at.clear()
            p = self._at[name] = self.prefixes[shard_of(name, self.n)]
        return p

    def everything_of(self, keys: Sequence[str]) -> list[str]:
        """The dependency of every entry of each shard that ``keys`` are in (an entry spanning shards
        depends on each one's: a fence of any of them must reach it)."""
        if self.n == 1:
            return [self.everything[0]]
        out: list[str] = []
        for k in keys:
            for i, ns in enumerate(self.namespaces):
                if k.startswith(ns) and k[len(ns) : len(ns) + 1] == ":":
                    g = self.everything[i]
                    if g not in out:
                        out.append(g)
                    break
        return out

    def owns(self, key: str) -> bool:
        """Whether ``key`` is one of this cache's."""
        return any(key.startswith(ns + ":") for ns in self.namespaces)

    def is_row_writes(self, key: str) -> bool:
        return any(key.startswith(ns + ":d:r:") for ns in self.namespaces)


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
