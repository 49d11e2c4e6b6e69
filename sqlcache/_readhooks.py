"""The read side of ``do_orm_execute`` (installed by ``_wiring``): which SELECTs the cache answers, and
through which reader.

- ``Session.get`` and many-to-one lazy loads (a SELECT by primary key of a registered class): the
  identity reader;
- statements with ``cached(...)``, and lazy loads of collections of registered objects: the query
  reader;
- everything else, or a read whose bind is not attached, whose connection resolves names its own way,
  that an application listener after ours may change, or that an autoflush will change: SQLAlchemy
  runs it (counted as a bypass where the cache would otherwise have answered).
"""

from __future__ import annotations

import logging
import weakref
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import Connection

from . import _sa
from ._transactions import Transactions
from .config import ModelPolicy
from .options import CacheOption, QueryPolicy

if TYPE_CHECKING:
    from sqlalchemy.engine.result import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from ._identity import IdentityReader
    from ._queryread import QueryReader
    from ._readthrough import ReadThrough

log = logging.getLogger("sqlcache")

__all__ = ["ReadHooks", "ReadPolicies"]


class ReadPolicies(Protocol):
    """The registry, as the read hooks see it."""

    def policy_for(self, mapper: Mapper[Any]) -> ModelPolicy | None: ...


class ReadHooks:
    """Which reads of ORM executions one cache answers.

    :param pools: the pools of the attached engines (the wiring's own set, kept up to date by it).
    """

    def __init__(
        self,
        txns: Transactions,
        policies: ReadPolicies,
        identities: IdentityReader,
        queries: QueryReader,
        reads: ReadThrough,
        pools: weakref.WeakSet[Any],
    ) -> None:
        self._txns = txns
        self._policies = policies
        self._identities = identities
        self._queries = queries
        self._reads = reads
        self._pools = pools
        self._warned_listener = False  # _listener_after's log line, once

    def _attached_bind(self, orm_state: ORMExecuteState) -> Any | None:
        """The engine or connection this execution goes to, if it is attached; else None.

        Asked exactly as the ORM asks right after this event (``get_bind(**bind_arguments)``, nothing
        added: a ``get_bind()`` override may accept nothing more). A horizontally sharded session with
        no shard chosen yet picks shards in its own execute hook, through user code that expects an
        instance: not called here, and such a read is not cached.
        """
        args = orm_state.bind_arguments
        session = orm_state.session
        if hasattr(session, "shard_chooser") and "shard_id" not in args:
            return None
        bind = session.get_bind(**args)
        if bind.engine.pool not in self._pools:
            return None
        self._txns.routed(session, bind)  # a Connection an override answered: its writes are the read's
        return bind

    def translation(self, orm_state: ORMExecuteState, bind: Any) -> str | None:
        """ "" or a digest of what makes the same statement read other rows: the ``schema_translate_map``
        in effect (execution options over those of the session's connection, of the bind) and a shard
        (identity token, shard id). Part of every entry key; dependencies stay per table name, so a
        write under any map or on any shard invalidates them all.

        None: the read must not use the cache, because the connection it runs on resolves names its own
        way (a SET search_path, USE, SET ROLE, ... ran on it, perhaps in an earlier checkout). Once
        that was ever seen on the pool, a session with no connection yet takes it first, as the ORM
        would right after this event: the connection it gets, and what its ``after_begin`` /
        ``engine_connect`` hooks run, decide."""
        pool = bind.engine.pool
        txns = self._txns
        conn = txns.connection_for(orm_state.session, pool)
        if conn is None:
            if isinstance(bind, Connection) and not (bind.closed or bind.invalidated):
                conn = bind
            elif txns.switching(pool):
                conn = orm_state.session.connection(bind_arguments=orm_state.bind_arguments)
        if conn is not None and txns.scoped(conn):
            return None
        stm = orm_state.execution_options.get("schema_translate_map")
        if stm is None:
            stm = (conn if conn is not None else bind).get_execution_options().get("schema_translate_map")
        shard = (
            _sa.shard_token(orm_state)
            or orm_state.execution_options.get("identity_token")
            or orm_state.execution_options.get("_sa_shard_id")
            or orm_state.bind_arguments.get("shard_id")
        )
        if not stm and shard is None:
            return ""
        text = repr((_sa.translate_map_items(stm or {}), repr(shard)))
        return blake2b(text.encode(), digest_size=8).hexdigest()

    def read(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        """A SELECT's answer from the cache, or None: SQLAlchemy runs it (and a miss's fill follows)."""
        if _sa.pending_autoflush(orm_state):
            # SQLAlchemy autoflushes after this event, then runs the statement against the flushed
            # rows (a pending insert found by a get, a changed column matched by a WHERE): only the
            # database can answer that
            if any(isinstance(o, CacheOption) for o in orm_state.user_defined_options):
                self._reads.bypass("query")
            else:
                found = _sa.pk_load(orm_state)
                if found is not None and self._policies.policy_for(found[0]) is not None:
                    self._reads.bypass("identity", found[0].class_.__name__)
            return None
        for opt in orm_state.user_defined_options:
            if isinstance(opt, CacheOption):
                route = self._route(orm_state, "query", None, opt.payload.tags)
                if route is None:
                    return None
                return self._queries.read(orm_state, opt.payload, route[0].engine, route[1])
        found = _sa.pk_load(orm_state)
        if found is None:
            if orm_state.is_relationship_load:
                return self._relationship_load(orm_state)
            return None
        mapper, pk = found
        policy = self._policies.policy_for(mapper)
        if policy is None:
            return None
        route = self._route(orm_state, "identity", mapper.class_.__name__)
        if route is None:
            return None
        return self._identities.read(orm_state, mapper, pk, policy, route[1])

    def _route(
        self, orm_state: ORMExecuteState, kind: str, model: str | None, tags: tuple[str, ...] = ()
    ) -> tuple[Any, str] | None:
        """The attached bind a read of ``kind`` goes to and its translation (see :meth:`translation`);
        None if the database must answer: the bind is not attached (not counted), an application
        listener runs after ours, or the connection resolves names its own way (both counted as
        bypasses)."""
        bind = self._attached_bind(orm_state)
        if bind is None:
            return None
        if _sa.app_listener_after(orm_state):
            self._listener_after(kind, model, tags)
            return None
        tr = self.translation(orm_state, bind)
        if tr is None:
            self._reads.bypass(kind, model, tags)
            return None
        return bind, tr

    def _listener_after(self, kind: str, model: str | None, tags: tuple[str, ...] = ()) -> None:
        """A read the database answers because an application listener runs after ours (see
        :func:`_sa.app_listener_after`); said once per cache in the log, counted each time."""
        self._reads.bypass(kind, model, tags)
        if not self._warned_listener:
            self._warned_listener = True
            log.warning(
                "sqlcache: a do_orm_execute listener runs after sqlcache's (registered after "
                "cache.attach(), or on a Session instance); reads it may change are not cached "
                "(docs/pages/query-cache.md)"
            )

    def _relationship_load(self, orm_state: ORMExecuteState) -> Result[Any] | None:
        """A lazy load of a collection of registered objects: cached like a query on its tables."""
        mapper = orm_state.bind_mapper
        if mapper is None:
            return None
        policy = self._policies.policy_for(mapper)
        if policy is None:
            return None
        route = self._route(orm_state, "query", mapper.class_.__name__)
        if route is None:
            return None
        policy_ = QueryPolicy(ttl=policy.ttl)
        return self._queries.read(orm_state, policy_, route[0].engine, route[1], relationship=True)
