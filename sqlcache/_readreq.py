"""What a read asks the read protocol (``_readthrough``) for: a :class:`Read` (its entry, dependencies,
how a hit is rebuilt and a result encoded), what it needs of the execution it answers, and a direct
read in flight (:class:`Sent`: its request written, its reply not taken yet)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._protocol import PendingRead, ReadLater, ReadResult
from ._report import Reporter, Running
from .errors import CacheUnavailable, CodecError

if TYPE_CHECKING:
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import Session

__all__ = ["Encode", "Execution", "OnHit", "Read", "Sent", "Unservable"]

OnHit = Callable[[bytes], Any]  # a Result for an ORM execution; whatever a direct read wants
# the result, unique() required, the load's runid, the tables the load was seen to read (LOADED)
Encode = Callable[["FrozenResult[Any]", bool, int, "set[str]"], "bytes | None"]


class Execution(Protocol):
    """What a read needs of the execution it answers (an ORMExecuteState, or a direct read's load)."""

    @property
    def session(self) -> Session: ...

    def invoke_statement(self) -> Result[Any]: ...


class Unservable(Exception):
    """A valid entry that cannot answer this particular load (it lacks an attribute asked for)."""


class Read:
    """What one read asks for. ``on_hit`` rebuilds the result from a payload (never None; raising
    CodecError if it cannot, Unservable if it may not); ``encode`` turns the database's result into a
    payload, or None when it must not be stored. ``protect``: callers that miss together elect one to
    query while the others wait a bounded time for its fill. ``swr_ms``: an entry past its TTL but not
    invalidated may be served that much longer while one caller refreshes it. ``row_writes``: for a
    read whose first dependency is a row's identity, its table's row-writes key (see
    ``Store.generations``)."""

    __slots__ = (
        "deps",
        "encode",
        "key",
        "kind",
        "model",
        "on_hit",
        "protect",
        "row_writes",
        "swr_ms",
        "tags",
        "ttl_ms",
    )

    def __init__(
        self,
        kind: str,
        key: str,
        deps: list[str],
        ttl_ms: int,
        on_hit: OnHit,
        encode: Encode,
        *,
        protect: bool = False,
        swr_ms: int = 0,
        model: str | None = None,
        tags: tuple[str, ...] = (),
        row_writes: str | None = None,
    ) -> None:
        self.kind = kind
        self.key = key
        self.deps = deps
        self.ttl_ms = ttl_ms
        self.on_hit = on_hit
        self.encode = encode
        self.protect = protect
        self.swr_ms = swr_ms
        self.model = model
        self.tags = tags
        self.row_writes = row_writes


class Sent:
    """A direct read begun by :meth:`ReadThrough.send`; its reply is taken once, by :meth:`results` or
    :meth:`drop`. Operation hooks see the read only if its reply is used: from :meth:`results` on.
    ``early``: whether its request went out at once (else it is sent by :meth:`results`)."""

    __slots__ = ("_failure", "_pending", "_rep", "early")

    def __init__(
        self, rep: Reporter, pending: PendingRead | None, failure: CacheUnavailable | None = None
    ) -> None:
        self._rep = rep
        # None: nothing was sent (an outage, reported: failure; or the journal not applied yet)
        self._pending = pending
        self._failure = failure
        self.early = pending is not None and not isinstance(pending, ReadLater)

    def results(self, rd: Read) -> tuple[list[ReadResult] | None, list[Running] | None]:
        """What :meth:`ReadThrough.fetch` returns for ``rd``, the read sent: no results after an outage
        (reported now: a dropped read reports nothing) or when Redis must not be read."""
        pending, self._pending = self._pending, None
        rep = self._rep
        try:
            run = rep.begin("read", rd.kind, rd.key, rd.model, rd.tags, len(rd.deps)) if rep.hooks else None
        except BaseException:  # a hook interrupted (KeyboardInterrupt): the reply is still taken
            if pending is not None:
                pending.drop()
            raise
        runs = None if run is None else [run]
        if pending is None:
            if run is not None:
                run.end("error", self._failure)
            if self._failure is not None:
                rep.report(self._failure, "read")
            return None, runs
        try:
            return [pending.result()], runs
        except (CacheUnavailable, CodecError) as exc:  # degrade("read") spelled out
            if run is not None:
                run.end("error", exc)
            rep.report(exc, "read")
            return None, runs

    def drop(self) -> None:
        """The reply taken and not used (the reader answers another way)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.drop()
