"""The deciding half of the I/O seam: what each Redis operation sends, and how its reply is judged.

Pure: no client, no socket, no clock of its own. A store (``_store.Store`` for redis-py today; an
asyncio or cluster store beside it) only carries these calls to Redis and hands the replies back
here. The Lua scripts themselves live in ``lua/`` and are named after the operation that runs them.

The :class:`Store` protocol is the seam: every part of the core that needs Redis talks to one object
of this shape, and plugins may wrap it (``PluginHost.wrap_store``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import CodecError

__all__ = [
    "SCRIPTS",
    "PendingRead",
    "ReadLater",
    "ReadResult",
    "RepopEntry",
    "ScriptCalls",
    "SentLock",
    "Store",
    "StoreSlot",
    "clock_reading",
    "fill_call",
    "fill_lock_key",
    "generations_call",
    "judge_generations",
    "judge_lock",
    "judge_read",
    "judge_read_many",
    "lock_call",
    "read_keys",
    "read_many_keys",
    "release_call",
    "send_read",
    "unlock_call",
]

#: Every script a store loads, by the operation that runs it (``lua/<name>.lua``).
SCRIPTS = ("generations", "fill", "lock", "release", "unlock")

# (keys, args) of one script call
Call = tuple[list[str], list[Any]]

#: A reading of the invalidation clock: an int for a cache in one slot; for a sharded cache, the
#: reading of each shard read (by the namespace that starts its keys), since each shard draws
#: generations from a clock of its own and only one shard's generations compare with its clock.
Clock = int | dict[str, int]


def merge_clocks(first: Clock, later: Clock) -> Clock:
    """Clock readings taken before a transaction's snapshot, kept together: the first of each shard."""
    if type(first) is dict and type(later) is dict:
        return {**later, **first}
    return first


def earliest(a: Clock, b: Clock) -> Clock:
    """The tighter of two fill bounds (two connections' snapshots): per shard, the smaller; a shard
    only one of them knows bounds nothing it can vouch for, so it is left out (its fills refused)."""
    if type(a) is dict or type(b) is dict:
        if type(a) is not dict or type(b) is not dict:
            return {}
        return {s: min(v, b[s]) for s, v in a.items() if s in b}
    return min(a, b)  # type: ignore[type-var]


@dataclass(eq=False, slots=True)  # not frozen: a frozen dataclass is slow to build, and this is per read
class ReadResult:
    """What a read found: a payload on a hit; otherwise the generations a later fill must present.

    ``generations`` is None when the read could not vouch for them (a dependency missing, locked or
    unreadable); :meth:`Store.generations` then asks Redis to create or repair them.
    """

    hit: bool
    payload: bytes | None
    generations: bytes | None
    clock: Clock
    locked: bool
    stale: bool = False  # a valid entry past its TTL, served only under stale-while-revalidate
    swr: bool = False  # a stale-while-revalidate entry (its fresh-until is Redis's to judge)


@dataclass(eq=False, slots=True)
class SentLock:
    """A lock call written to a connection whose reply is read after the database COMMIT; ``store``:
    the store that wrote it, which must read the reply (a connection belongs to one I/O world)."""

    conn: Any
    store: Any = None


@dataclass(frozen=True, slots=True)
class RepopEntry:
    """An entry a committing writer wants to write after releasing its locks (repopulate mode)."""

    key: str
    dep_keys: tuple[str, ...]
    ttl_ms: int
    payload: bytes
    # per dependency: "=" if this writer locked it, else the generation lock.lua reported for it
    seen: tuple[str, ...]


class PendingRead(Protocol):
    """A read written to Redis whose reply is not taken yet (a store's ``send_read``)."""

    def result(self) -> ReadResult:
        """The reply, judged as ``Store.read`` judges it; ``CacheUnavailable`` if Redis did not answer."""

    def drop(self) -> None:
        """The reply taken and not used; never raises for Redis."""


class ReadLater:
    """The :class:`PendingRead` of a store that does not split its reads: nothing is sent until
    :meth:`result`, which is the store's own ``read`` (a wrapper's, the local tier's, an asyncio store's)."""

    __slots__ = ("_args", "_store")

    def __init__(self, store: Store, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> None:
        self._store = store
        self._args = (clock_key, entry_key, dep_keys)

    def result(self) -> ReadResult:
        return self._store.read(*self._args)

    def drop(self) -> None:
        pass  # nothing was sent


def send_read(store: Store, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> PendingRead:
    """``store.send_read(...)`` where the store's class defines it (see :class:`Store`), else a
    :class:`ReadLater`."""
    if getattr(type(store), "send_read", None) is None:
        return ReadLater(store, clock_key, entry_key, dep_keys)
    pending: PendingRead = store.send_read(clock_key, entry_key, dep_keys)  # type: ignore[attr-defined]
    return pending


class Store(Protocol):
    """One way of carrying the protocol to Redis. Every method raises ``CacheUnavailable`` when Redis
    cannot answer; none raises anything else for an outage.

    A store may also offer ``send_read(clock_key, entry_key, dep_keys) -> PendingRead``: ``read`` in two
    steps, the MGET written first, so that the caller's own work runs while Redis answers. The core
    uses it only where the store's class defines it: a wrapper that delegates what it does not define
    (``__getattr__``) must still have its ``read`` called.
    """

    def read(self, clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> ReadResult:
        """The whole hit path: the entry, the clock and the dependencies at one instant."""

    def read_many(self, clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]) -> list[ReadResult]:
        """Several reads in one round trip: ``entries`` holds (entry key, dependency keys) per read; one
        MGET of every key they name, so all are judged at one instant (``cache.get_many``)."""

    def generations(
        self, clock_key: str, dep_keys: Sequence[str], gen_ttl_ms: int, row_writes: str | None = None
    ) -> ReadResult:
        """Create missing generations, repair garbage, expire dead locks (a miss's slow case).

        ``row_writes``: when ``dep_keys[0]`` is a row's identity dependency, its table's row-writes key;
        a missing row dependency then borrows that key's generation (the warm-up rule, consistency.md).
        """

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
    ) -> int:
        """Store an entry if its generations are unchanged: 1 stored, 0 refused, 2 after the snapshot."""

    def try_fill_lock(self, entry_key: str, token: str, ttl_ms: int) -> bool:
        """Take the entry's stampede lock: True if this caller is the one to query."""

    def unlock_fill(self, clock_key: str, entry_key: str, token: str) -> None:
        """Drop the stampede lock if it is still this token's."""

    def lock(
        self,
        clock_key: str,
        lock_keys: Sequence[str],
        watch_keys: Sequence[str],
        token: str,
        lock_ttl_ms: int,
        gen_ttl_ms: int,
    ) -> list[str]:
        """Lock before a COMMIT and wait for the reply: the generations of ``watch_keys``."""

    def send_lock(
        self, clock_key: str, lock_keys: Sequence[str], token: str, lock_ttl_ms: int, gen_ttl_ms: int
    ) -> SentLock:
        """Lock before a COMMIT without waiting; the reply is read by :meth:`release_after`."""

    def release_after(
        self,
        sent: SentLock,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        announce: tuple[str, bytes] | None = None,
    ) -> bool:
        """Release behind a sent lock; returns whether the lock itself had succeeded."""

    def release(
        self,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        entries: Sequence[RepopEntry] = (),
        announce: tuple[str, bytes] | None = None,
    ) -> int:
        """Fresh generations for ``dep_keys``, this token's locks dropped; returns entries written."""

    def delete(self, *keys: str) -> None:
        """Delete entries (an undecodable one, say)."""

    def delete_matching(self, pattern: str, batch: int = 500) -> int:
        """Delete every key matching ``pattern`` (SCAN, never KEYS); returns how many."""

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` without holding up others of this world (a thread sleeps; a task yields)."""


class StoreSlot:
    """The store the core uses now: one object the parts share, so that a plugin's wrapper (added or
    removed at any time) reaches them all at once."""

    __slots__ = ("base", "current")

    def __init__(self, base: Store) -> None:
        self.base = base
        self.current: Store = base


def fill_lock_key(entry_key: str) -> str:
    """The stampede lock of an entry (under the same prefix)."""
    return entry_key + ":lock"


# Clock readings and fresh-until stamps are plain decimals below 2^53 (what Lua's doubles count exactly);
# anything longer or larger was not written by sqlcache and is never trusted (nor parsed: int() of a
# 5,000-digit string raises).
_MAX_CLOCK = 2**53 - 1
_MAX_DIGITS = 16
# dependencies' generations as an MGET returns them, joined by commas (one C call checks them all)
_GENERATIONS = re.compile(rb"[0-9]{1,%d}(?:,[0-9]{1,%d})*\Z" % (_MAX_DIGITS, _MAX_DIGITS))


def _number(raw: bytes | None) -> int | None:
    """A clock or stamp read from Redis, or None if it is not one sqlcache could have written."""
    if raw is None or len(raw) > _MAX_DIGITS or not raw.isdigit():
        return None
    value = int(raw)
    return value if value <= _MAX_CLOCK else None


def clock_reading(raw: bytes | None) -> int | None:
    """A clock as an MGET returned it: 0 if missing (it bounds nothing), None if sqlcache did not
    write it (unknown: no hit, no bound)."""
    return 0 if raw is None else _number(raw)


def read_keys(clock_key: str, entry_key: str, dep_keys: Sequence[str]) -> list[str]:
    """The keys of a read's MGET, in the order :func:`judge_read` expects."""
    return [entry_key, clock_key, *dep_keys]


def judge_read(values: Sequence[bytes | None], now: Callable[[], float]) -> ReadResult:
    """Judge a read's MGET reply (entry, clock, dependencies).

    MGET is atomic, so the entry and the generations it is checked against are one instant's. An entry
    is ``g1,g2,...|payload``, valid only if each dependency holds exactly that generation (a locked
    dependency holds more than digits, so it never matches). ``now`` (wall clock, seconds) is asked only
    whether a stale-while-revalidate entry is past its fresh-until.
    """
    entry, clock_raw = values[0], values[1]
    # the hit path: plain loops and inline checks (a helper call per value costs more than the check)
    if clock_raw is None:
        clock = 0
    elif len(clock_raw) <= _MAX_DIGITS and clock_raw.isdigit() and int(clock_raw) <= _MAX_CLOCK:
        clock = int(clock_raw)
    else:
        # not a clock sqlcache wrote: unknown, so it bounds nothing, and a miss goes through
        # generations.lua, which repairs it before the SELECT
        return ReadResult(False, None, None, 0, False)
    deps = values[2:]
    try:
        joined = b",".join(deps)  # type: ignore[arg-type]
    except TypeError:  # a dependency missing (None)
        return ReadResult(False, None, None, clock, False)
    # each one a generation: 1 to 16 digits (a comma inside one would add a part)
    if deps and (_GENERATIONS.match(joined) is None or joined.count(b",") != len(deps) - 1):
        return ReadResult(False, None, None, clock, False)
    if entry is not None:
        sep = entry.find(b"|")
        header = entry[:sep] if sep >= 0 else b""
        if sep >= 0 and header == joined:
            return ReadResult(True, entry[sep + 1 :], joined, clock, False)
        if sep >= 0 and header.startswith(joined + b";F"):
            fresh_until = _number(header[len(joined) + 2 :])
            if fresh_until is not None:
                # valid (nothing invalidated it) but maybe past its TTL: stale-while-revalidate
                stale = fresh_until < now() * 1000
                return ReadResult(True, entry[sep + 1 :], joined, clock, False, stale, True)
    return ReadResult(False, None, joined, clock, False)


def read_many_keys(
    clock_key: str, entries: Sequence[tuple[str, Sequence[str]]]
) -> tuple[list[str], list[list[int]]]:
    """The keys of one MGET for several reads, each key once (the clock first, dependencies the reads
    share once), and per read the positions in the reply of what :func:`judge_read` expects: its
    entry, the clock, its dependencies."""
    keys = [clock_key]
    at = {clock_key: 0}
    layout: list[list[int]] = []
    for entry_key, dep_keys in entries:
        positions = []
        for k in (entry_key, clock_key, *dep_keys):
            i = at.get(k)
            if i is None:
                i = at[k] = len(keys)
                keys.append(k)
            positions.append(i)
        layout.append(positions)
    return keys, layout


def judge_read_many(
    values: Sequence[bytes | None], layout: Sequence[Sequence[int]], keys: int, now: Callable[[], float]
) -> list[ReadResult]:
    """Judge the MGET of :func:`read_many_keys` (``keys`` long) read by read. A reply of another length
    is not one Redis gives to that MGET: CodecError, and the database answers."""
    if not isinstance(values, list) or len(values) != keys:
        raise CodecError(f"MGET of {keys} keys answered with {type(values).__name__}")
    return [judge_read([values[i] for i in positions], now) for positions in layout]


def generations_call(
    clock_key: str, dep_keys: Sequence[str], gen_ttl_ms: int, row_writes: str | None = None
) -> Call:
    if row_writes is None:
        return [clock_key, *dep_keys], [gen_ttl_ms, 0]
    return [clock_key, *dep_keys, row_writes], [gen_ttl_ms, 1]


def judge_generations(reply: Sequence[Any]) -> ReadResult:
    return ReadResult(False, None, reply[0], int(reply[1]), reply[2] == 1)


def fill_call(
    clock_key: str,
    entry_key: str,
    dep_keys: Sequence[str],
    payload: bytes,
    ttl_ms: int,
    generations: bytes,
    snapshot_clock: Clock | None,
    gen_ttl_ms: int,
    fresh_until_ms: int | None,
    lock_token: str,
    header: bytes = b"",
) -> Call:
    """``header``: the generations to store when ``dep_keys`` are only the entry's dependencies in its
    own shard (``generations`` theirs); b"": ``generations`` themselves."""
    keys = [clock_key, entry_key, fill_lock_key(entry_key), *dep_keys]
    if snapshot_clock is None:
        bound = ""
    else:  # a shard's reading where one clock is expected bounds nothing: every generation is after it
        bound = str(snapshot_clock) if type(snapshot_clock) is int else "0"
    suffix = "" if fresh_until_ms is None else f";F{fresh_until_ms}"
    return keys, [payload, ttl_ms, generations, bound, gen_ttl_ms, suffix, lock_token, header]


def unlock_call(clock_key: str, entry_key: str, token: str) -> Call:
    return [clock_key, fill_lock_key(entry_key)], [token]


def lock_call(
    clock_key: str,
    lock_keys: Sequence[str],
    watch_keys: Sequence[str],
    token: str,
    lock_ttl_ms: int,
    gen_ttl_ms: int,
) -> Call:
    return [clock_key, *lock_keys, *watch_keys], [token, len(lock_keys), lock_ttl_ms, gen_ttl_ms]


def judge_lock(reply: Sequence[bytes]) -> list[str]:
    """The generations lock.lua reported for the watched keys."""
    return [g.decode() for g in reply]


def release_call(
    clock_key: str,
    dep_keys: Sequence[str],
    token: str,
    gen_ttl_ms: int,
    entries: Sequence[RepopEntry] = (),
    announce: tuple[str, bytes] | None = None,
) -> Call:
    keys: list[str] = [clock_key, *dep_keys]
    channel, message = announce or ("", b"")
    args: list[Any] = [token, len(dep_keys), gen_ttl_ms, len(entries), channel, message]
    for e in entries:
        keys.append(e.key)
        keys.extend(e.dep_keys)
        args.extend([len(e.dep_keys), e.ttl_ms, e.payload, *e.seen])
    return keys, args


class ScriptCalls:
    """The script operations of a store, built once: each builds its call with the functions below,
    hands it to the store's ``_eval`` and judges the reply. A store supplies ``_eval`` (how a script
    reaches its Redis) and the operations that are not one script (``read``, ``send_lock``, ...).
    ``shield``: a release, once begun, should finish even if its caller is interrupted (asyncio)."""

    def _eval(
        self, operation: str, script: str, keys: list[Any], args: list[Any], shield: bool = False
    ) -> Any:
        raise NotImplementedError

    def generations(
        self, clock_key: str, dep_keys: Sequence[str], gen_ttl_ms: int, row_writes: str | None = None
    ) -> ReadResult:
        """Create missing generations, repair garbage, expire dead locks; the miss path's slow case."""
        keys, args = generations_call(clock_key, dep_keys, gen_ttl_ms, row_writes)
        return judge_generations(self._eval("read", "generations", keys, args))

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
        keys, args = fill_call(
            clock_key, entry_key, dep_keys, payload, ttl_ms, generations, snapshot_clock, gen_ttl_ms,
            fresh_until_ms, lock_token, header,
        )  # fmt: skip
        return int(self._eval("fill", "fill", keys, args))

    def unlock_fill(self, clock_key: str, entry_key: str, token: str) -> None:
        """Drop the stampede lock if it is still ours (it may have expired and been taken by another)."""
        keys, args = unlock_call(clock_key, entry_key, token)
        self._eval("unlock", "unlock", keys, args)

    def lock(
        self,
        clock_key: str,
        lock_keys: Sequence[str],
        watch_keys: Sequence[str],
        token: str,
        lock_ttl_ms: int,
        gen_ttl_ms: int,
    ) -> list[str]:
        keys, args = lock_call(clock_key, lock_keys, watch_keys, token, lock_ttl_ms, gen_ttl_ms)
        return judge_lock(self._eval("lock", "lock", keys, args))

    def release(
        self,
        clock_key: str,
        dep_keys: Sequence[str],
        token: str,
        gen_ttl_ms: int,
        entries: Sequence[RepopEntry] = (),
        announce: tuple[str, bytes] | None = None,
    ) -> int:
        keys, args = release_call(clock_key, dep_keys, token, gen_ttl_ms, entries, announce)
        return int(self._eval("release", "release", keys, args, shield=True))
