"""The Store over a Redis Cluster with a cache's keys spread over ``n`` shards (``SQLCache(cluster,
shards=n)``): every table and every user tag belongs to one shard, each shard is a hash tag of its
own (``_keys.Layout``), and the shards' slots spread evenly over the slot space, so over the nodes.

Each shard is a whole copy of the protocol's state for its keys: its own clock, lineage, layout key and
dependency of every entry. A call whose keys lie in one shard (an identity hit of a single-table class,
a fill, most locks) goes whole to that shard's primary, exactly as on one server. A call spanning
shards (a query reading tables of two shards, a commit writing both) is split: one script or MGET per
shard, every node's share written before any reply is read, so a call costs one round trip whatever
the number of nodes. docs/pages/deployment.md explains why the protocol stays correct when the steps of
one commit land on different nodes at different times:

- a read checks an entry against every dependency, in every shard, in one exchange; an entry is valid
  only while each holds exactly the generation the entry recorded, unlocked;
- a fill checks atomically only its own shard's dependencies (one script); the others it records, and a
  later read refuses the entry if any moved: a fill can be born invalid, never wrongly valid;
- under repeatable read a fill's bound is the clock of each shard as read before the snapshot; a shard
  not read before the snapshot bounds nothing, and the fill is refused;
- a repopulating release writes an entry only when its dependencies all lie in its shard (the check of
  "newest lock" is one script); others are invalidated instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from . import _keys
from . import _protocol as proto
from ._health import Health
from ._protocol import Clock, ReadResult, RepopEntry
from ._settle import Owed
from .errors import CacheUnavailable, CodecError

__all__ = ["Shard", "ShardSplit", "ShardTable", "slot_of"]

_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    ns: str  # what starts each of its keys, up to the closing brace of its hash tag
    slot: int
    clock: str


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


class ShardTable:
    """The shards of one cache: what every world's router splits calls by (built once, shared)."""

    def __init__(self, layout: _keys.Layout) -> None:
        self.shards: list[Shard] = []
        self.by_ns: dict[str, Shard] = {}
        self.by_pattern: dict[str, Shard] = {}
        for i, (p, ns) in enumerate(zip(layout.prefixes, layout.namespaces, strict=True)):
            clock = _keys.clock_key(p)
            shard = Shard(i, ns, slot_of(clock), clock)
            self.shards.append(shard)
            self.by_ns[ns] = shard
            self.by_pattern[_keys.scan_pattern(p)] = shard


class ShardSplit:
    """What a sharded router does the same in both I/O worlds: split each call by shard, send each
    share to the node serving its shard (``_on`` for one shard, ``_exchange`` for several, supplied by
    the world), and put the replies back together. Mixed into a cluster router."""

    _table: ShardTable
    _refresh: bool
    _cluster: Any
    health: Health

    _claimed = False  # shard 0's layout claim checked (by lineage.lua on a connection to its node)

    def _node_at(self, slot: int, operation: str) -> Any:  # a RedisStore or an AsyncRedisStore
        """The router's node for ``slot``; before the first call to any other shard, one to shard 0's
        node, whose lineage check holds the claim every layout shares: a process laid out otherwise is
        refused before it writes or reads any shard (only shard 0's name is the same in every layout)."""
        route: Any = super()._node_at  # type: ignore[misc]
        if not self._claimed:
            first = self._table.shards[0]
            route(first.slot, operation).read(first.clock, first.ns + ":layout", ())
            if self.health.conflict is not None:
                raise CacheUnavailable(f"{operation} ({self.health.conflict})")
            self._claimed = True
        return route(slot, operation)

    if TYPE_CHECKING:  # supplied by the world's transport

        def _exchange(
            self, operation: str, work: Sequence[tuple[Shard, list[list[Any]]]], wait: bool = False
        ) -> list[list[Any]]: ...

    def _served(self, name: str) -> Callable[[], list[int]]:
        def served() -> list[int]:
            cluster = self._cluster
            if cluster is None:
                return []
            out = []
            for shard in self._table.shards:
                try:
                    node = cluster.nodes_manager.get_node_from_slot(shard.slot)
                except _ERRORS:
                    continue
                if node is not None and node.name == name:
                    out.append(shard.index)
            return out

        return served

    # -- which shard, which node ------------------------------------------------------------------

    def _shard(self, key: str) -> Shard:
        return self._table.by_ns[key[: key.index("}") + 1]]

    def _releases(
        self,
        conns: Sequence[tuple[Any, Any, int]],
        groups: dict[Shard, list[str]],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None,
        later: bool,
    ) -> list[tuple[Any, Any, int, list[list[Any]], list[Owed]]]:
        """Per lock connection ``(node, conn, locks)`` of a commit: ``(node, conn, locks, commands,
        owed)``, the releases of the shards that node serves now, to go behind its locks (WAIT added
        when the cache asks replicas), and if ``later`` one :class:`Owed` per release, the last holding
        the connection. The shards left in ``groups`` moved since the locks went out."""
        wait_for = self.health.wait
        pid, since = os.getpid(), time.monotonic()
        plan: list[tuple[Any, Any, int, list[list[Any]], list[Owed]]] = []
        for node, conn, locks in conns:
            commands: list[list[Any]] = []
            owed: list[Owed] = []
            for shard, keys in list(groups.items()):
                if self._node_at(shard.slot, "release") is node:
                    keys_, args = proto.release_call(shard.clock, keys, token, gen_ttl_ms, (), announce)
                    owed.append(Owed(conn, pid, since, shard.clock, keys, token, gen_ttl_ms, announce, False))
                    announce = None  # published once
                    commands.append(["EVALSHA", node.sha("release"), len(keys_), *keys_, *args])
                    del groups[shard]
            if wait_for is not None:
                commands.append(["WAIT", *wait_for])
            if owed:
                owed[-1].holds = True
            plan.append((node, conn, locks, commands, owed if later else []))
        return plan

    def _group(self, keys: Iterable[str]) -> dict[Shard, list[str]]:
        """``keys`` by shard, each shard's in their order (shards in the order first met)."""
        out: dict[Shard, list[str]] = {}
        for k in keys:
            out.setdefault(self._shard(k), []).append(k)
        return out

    def _on(self, shard: Shard, operation: str, fn: Callable[[Any], Any]) -> Any:
        """``fn`` on the store of the node serving ``shard``; a failure makes the router ask again."""
        store = self._node_at(shard.slot, operation)
        try:
            return fn(store)
        except CacheUnavailable:
            self._refresh = True
            raise

    @staticmethod
    def _clocks(shard: Shard, clock: Clock) -> dict[str, int]:
        if type(clock) is dict:
            return clock
        return {shard.ns: clock} if clock else {}  # type: ignore[dict-item]

    # -- reads ------------------------------------------------------------------------------------

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        shard = self._shard(entry_key)
        if all(self._shard(k) is shard for k in dep_keys):  # one shard: the single server's MGET
            r: ReadResult = self._on(shard, "read", lambda s: s.read(shard.clock, entry_key, dep_keys))
            r.clock = self._clocks(shard, r.clock)
            return r
        return self.read_many(clock_key, [(entry_key, dep_keys)])[0]

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        """One MGET per shard involved (its clock first), all nodes at once; each read judged on the
        values of every shard it spans."""
        groups: dict[Shard, dict[str, None]] = {}
        for entry_key, dep_keys in entries:
            for k in (entry_key, *dep_keys):
                groups.setdefault(self._shard(k), {})[k] = None
        work = [(shard, [["MGET", shard.clock, *keys]]) for shard, keys in groups.items()]
        replies = self._exchange("read", work)
        values: dict[str, bytes | None] = {}
        clocks: dict[Shard, bytes | None] = {}
        for (shard, keys), rs in zip(groups.items(), replies, strict=True):
            got = rs[0]
            if not isinstance(got, list) or len(got) != len(keys) + 1:
                raise CodecError(f"MGET of {len(keys) + 1} keys answered with {type(got).__name__}")
            clocks[shard] = got[0]
            values.update(zip(keys, got[1:], strict=True))
        out = []
        for entry_key, dep_keys in entries:
            shard = self._shard(entry_key)
            r = proto.judge_read(
                [values[entry_key], clocks[shard], *(values[k] for k in dep_keys)], time.time
            )
            spanned = {shard, *(self._shard(k) for k in dep_keys)}
            readings = {s.ns: proto.clock_reading(clocks[s]) for s in spanned}
            if any(v is None for v in readings.values()):
                # a shard's clock is not one sqlcache wrote: unknown; the miss repairs it
                out.append(ReadResult(False, None, None, {}, False))
                continue
            r.clock = {ns: v for ns, v in readings.items() if v}
            out.append(r)
        return out

    def clocks(self) -> dict[str, int]:
        """Every shard's clock, one exchange (a transaction about to fix its snapshot notes them all)."""
        shards = self._table.shards
        replies = self._exchange("read", [(s, [["GET", s.clock]]) for s in shards])
        out = {}
        for shard, rs in zip(shards, replies, strict=True):
            v = proto.clock_reading(rs[0])
            if v:  # a missing or unreadable clock bounds nothing: that shard's fills are refused
                out[shard.ns] = v
        return out

    def generations(
        self, clock_key: str, dep_keys: Sequence[str], gen_ttl_ms: int, row_writes: str | None = None
    ) -> ReadResult:
        groups = self._group(dep_keys)
        if len(groups) == 1:
            shard = next(iter(groups))
            r: ReadResult = self._on(
                shard, "read", lambda s: s.generations(shard.clock, dep_keys, gen_ttl_ms, row_writes)
            )
            r.clock = self._clocks(shard, r.clock)
            return r
        work = []
        for shard, keys in groups.items():
            # the row's own dependency leads its shard's group, with its table's row-writes key
            rw = row_writes if row_writes is not None and keys[0] == dep_keys[0] else None
            keys_, args = proto.generations_call(shard.clock, keys, gen_ttl_ms, rw)
            work.append((shard, [["EVALSHA", "generations", len(keys_), *keys_, *args]]))
        replies = self._exchange("read", self._scripted(work))
        gens: dict[str, bytes] = {}
        clocks: dict[str, int] = {}
        locked = False
        for (shard, keys), rs in zip(groups.items(), replies, strict=True):
            r = proto.judge_generations(rs[0])
            gens.update(zip(keys, (r.generations or b"").split(b","), strict=True))
            clocks[shard.ns] = r.clock  # type: ignore[assignment]
            locked = locked or r.locked
        return ReadResult(False, None, b",".join(gens[k] for k in dep_keys), clocks, locked)

    def _scripted(self, work: list[tuple[Shard, list[list[Any]]]]) -> list[tuple[Shard, list[list[Any]]]]:
        """``work`` with each EVALSHA's script name replaced by its SHA1 on the node serving the shard."""
        out = []
        for shard, commands in work:
            node = self._node_at(shard.slot, "read")
            out.append(
                (shard, [[c[0], node.sha(c[1]), *c[2:]] if c[0] == "EVALSHA" else c for c in commands])
            )
        return out

    def fill(
        self,
        clock_key: str,
        entry_key: str,
        dep_keys: Sequence[str],
        payload: bytes,
        ttl_ms: int,
        generations: bytes,
        snapshot_clock: Clock | None,
        gen_ttl_ms: int,
        fresh_until_ms: int | None = None,
        lock_token: str = "",
        header: bytes = b"",
    ) -> int:
        """``header`` is this store's to choose (the whole generations when the check covers only the
        entry's own shard); a caller's is not taken."""
        shard = self._shard(entry_key)
        gens = generations.split(b",")
        if len(gens) != len(dep_keys):
            return self._refused(0, clock_key, entry_key, lock_token)
        shards = [self._shard(k) for k in dep_keys]
        if snapshot_clock is not None:
            # t0 the transaction's snapshot; a shard's clock read before t0 bounds the generations it
            # drew before t0; a shard whose clock was not read before t0 bounds nothing: refused
            bound = snapshot_clock if type(snapshot_clock) is dict else {}
            for s, g in zip(shards, gens, strict=True):
                limit = bound.get(s.ns)
                if limit is None or int(g) > limit:
                    return self._refused(2, clock_key, entry_key, lock_token)
        own = [i for i, s in enumerate(shards) if s is shard]
        keys = [dep_keys[i] for i in own]
        checked = b",".join(gens[i] for i in own)
        header = b"" if len(own) == len(dep_keys) else generations
        return int(
            self._on(
                shard, "fill",
                lambda s: s.fill(
                    shard.clock, entry_key, keys, payload, ttl_ms, checked, None, gen_ttl_ms,
                    fresh_until_ms, lock_token, header,
                ),
            )
        )  # fmt: skip

    def _refused(self, outcome: int, clock_key: str, entry_key: str, lock_token: str) -> int:
        """A fill refused before fill.lua ran: the caller's stampede lock is dropped all the same (fill.lua
        would have), so that the next caller does not wait for a fill that will never come."""
        if lock_token:
            self.unlock_fill(clock_key, entry_key, lock_token)
        return outcome

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        shard = self._shard(entry_key)
        return bool(self._on(shard, "lock", lambda s: s.try_fill_lock(entry_key, token, ttl_ms)))

    def unlock_fill(self, clock_key: str, entry_key: str, token: str) -> None:
        shard = self._shard(entry_key)
        self._on(shard, "unlock", lambda s: s.unlock_fill(shard.clock, entry_key, token))

    # -- commits ----------------------------------------------------------------------------------

    def lock(
        self,
        clock_key: str,
        lock_keys: Sequence[str],
        watch_keys: Sequence[str],
        token: str,
        lock_ttl_ms: int,
        gen_ttl_ms: int,
    ) -> list[str]:
        locks, watches = self._group(lock_keys), self._group(watch_keys)
        work = []
        for shard in {**locks, **watches}:
            keys, args = proto.lock_call(
                shard.clock, locks.get(shard, []), watches.get(shard, []), token, lock_ttl_ms, gen_ttl_ms
            )
            work.append((shard, [["EVALSHA", "lock", len(keys), *keys, *args]]))
        seen: dict[str, str] = {}
        for (shard, _), rs in zip(work, self._exchange("lock", self._scripted(work)), strict=True):
            seen.update(zip(watches.get(shard, []), proto.judge_lock(rs[0]), strict=True))
        return [seen[k] for k in watch_keys]

    def release(
        self,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        entries: Sequence[RepopEntry] = (),
        announce: tuple[str, bytes] | None = None,
    ) -> int:
        groups = self._group(dep_keys)
        by_shard: dict[Shard, list[RepopEntry]] = {}
        for e in entries:
            shard = self._shard(e.key)
            if all(self._shard(k) is shard for k in e.dep_keys):
                by_shard.setdefault(shard, []).append(e)
            # else: its dependencies span shards, and "newest lock" cannot be checked in one script: the
            # release invalidates it like any other
        work = []
        for shard, keys in groups.items():
            keys_, args = proto.release_call(
                shard.clock, keys, token, gen_ttl_ms, by_shard.get(shard, ()), announce
            )
            announce = None  # published once
            work.append((shard, [["EVALSHA", "release", len(keys_), *keys_, *args]]))
        replies = self._exchange("release", self._scripted(work), wait=True)
        return sum(int(rs[0]) for rs in replies)

    def delete(self, *keys: str) -> None:
        for shard, group in self._group(keys).items():
            self._on(shard, "delete", lambda s, g=group: s.delete(*g))  # type: ignore[misc]

    def delete_matching(
        self, pattern: str, batch: int = 500, on_batch: Callable[[int], None] | None = None
    ) -> int:
        """A shard's keys are in its slot: SCAN the node serving it (the base shard's for others)."""
        shard = self._table.by_pattern.get(pattern) or self._table.shards[0]
        return int(self._on(shard, "clear", lambda s: s.delete_matching(pattern, batch, on_batch)))
