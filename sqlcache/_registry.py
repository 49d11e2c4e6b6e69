"""Which mapped classes are cached, how, and what sqlcache knows of their hierarchies. No I/O."""

from __future__ import annotations

import threading
from collections.abc import Set as AbstractSet
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper

from . import _sa
from ._fkactions import FkActions
from ._hierarchy import Hierarchy, check_supported, class_id, hierarchy_for
from .config import ModelPolicy

__all__ = ["Registry", "mapper_of"]


def mapper_of(cls: type[Any]) -> Mapper[Any]:
    """The mapper of a mapped class; ConfigurationError for anything else."""
    from .errors import ConfigurationError

    try:
        mapper = sa_inspect(cls)
    except NoInspectionAvailable:
        mapper = None
    if not isinstance(mapper, Mapper):
        raise ConfigurationError(f"{cls!r} is not a mapped class")
    return mapper


class Registry:
    """Policies of the registered classes (inherited by subclasses), hierarchies and cascade targets,
    each worked out once.

    :param default_ttl: seconds of an entry whose policy gives none (``None``: no expiry).
    """

    def __init__(self, default_ttl: int | None) -> None:
        self._default_ttl = default_ttl
        self._mutex = threading.Lock()
        self._policies: dict[Mapper[Any], ModelPolicy] = {}
        self._policy_memo: dict[Mapper[Any], ModelPolicy | None] = {}
        self._hierarchies: dict[Mapper[Any], Hierarchy] = {}
        self.fk_actions = FkActions()
        # records_rows_of, by id of a statement cache: the base mapper of a registered hierarchy whose
        # cache it is (checked at each use: a mapper configured again gets a new one), or absent from
        # the registered ones (ids only, no cache held: a dropped registry's would keep its tables and
        # statements alive; an id reused by a registered hierarchy's new cache can only make its
        # statements count as bulk writes, which is safe, until the next register())
        self._recorded_caches: dict[int, Mapper[Any]] = {}
        self._other_caches: set[int] = set()
        self.repopulating = False
        self.version = 0  #: moves at every register(): what was worked out from the registrations is stale

    def after_fork(self) -> None:
        self._mutex = threading.Lock()
        self.fk_actions.after_fork()

    def register(self, mapper: Mapper[Any], policy: ModelPolicy) -> None:
        """:raises ConfigurationError: if a column type cannot round-trip."""
        check_supported(mapper)
        # FK actions into the hierarchy's tables are searched in their MetaData (among others)
        self.fk_actions.learn(
            getattr(t, "metadata", None) for m in mapper.base_mapper.self_and_descendants for t in m.tables
        )
        with self._mutex:
            self._policies[mapper] = policy
            self.version += 1
            self._policy_memo.clear()
            self._recorded_caches.clear()
            self._other_caches.clear()
            self._hierarchies.clear()
            #: whether any registered class repopulates (a commit looks no further when none does)
            self.repopulating = any(p.mode == "repopulate" for p in self._policies.values())

    def policy_for(self, mapper: Mapper[Any]) -> ModelPolicy | None:
        """The policy of ``mapper`` or of its nearest registered ancestor; None if not cached."""
        try:
            return self._policy_memo[mapper]
        except KeyError:
            pass
        found = None
        for m in mapper.iterate_to_root():
            found = self._policies.get(m)
            if found is not None:
                break
        self._policy_memo[mapper] = found
        return found

    def records_rows_of(self, compiled_cache: Any) -> bool:
        """Whether a statement the unit of work runs with ``compiled_cache`` writes only rows the mapper
        events name to sqlcache.

        SQLAlchemy's persistence runs a hierarchy's INSERT, UPDATE and DELETE statements with its base
        mapper's statement cache (``execution_options["compiled_cache"]``); the rows of a hierarchy with
        a registered class are recorded by its events (its unregistered classes' rows are never a
        registered class's identity). A statement run during the flush with no such cache (a mapper
        listener's own, a relationship's many-to-many rows) or another hierarchy's is a bulk write of
        its tables: nothing names its rows.
        """
        if compiled_cache is None:
            return False
        key = id(compiled_cache)
        base = self._recorded_caches.get(key)
        if base is not None and _sa.persistence_cache(base) is compiled_cache:
            return True
        if key in self._other_caches:
            return False
        version = self.version
        for mapper in list(self._policies):
            if _sa.persistence_cache(mapper) is compiled_cache:
                self._recorded_caches[key] = mapper.base_mapper
                return True
        if version == self.version:  # not a register() meanwhile, whose class this may be
            if len(self._other_caches) > 4096:  # registries built again and again
                self._other_caches.clear()
            self._other_caches.add(key)
        return False

    def hierarchy(self, mapper: Mapper[Any]) -> Hierarchy:
        h = self._hierarchies.get(mapper)
        if h is None:
            h = hierarchy_for(mapper)
            self._hierarchies[mapper] = h
        return h

    def ttl_ms(self, ttl: int | None) -> int:
        """Milliseconds of an entry whose own ttl is ``ttl`` (None: the default); 0 means no expiry."""
        chosen = ttl if ttl is not None else self._default_ttl
        return (chosen or 0) * 1000

    def cascades(self, table: Any, deleted: bool, updated: bool) -> AbstractSet[Any]:
        """Tables the database changes itself (FK actions) when a statement deletes or updates rows of
        ``table``; for a table that replaces on conflict (SQLite), when any statement writes it."""
        return self.fk_actions.cascades(table, deleted, updated)

    def cascaded(self, table: Any, sql: str, kind: str) -> AbstractSet[Any]:
        """Tables FK actions may change when the ``kind`` (``insert``, ``update``, ``delete``) statement
        ``sql`` writes ``table``."""
        return self.fk_actions.cascaded(table, sql, kind)

    def class_for(self, cid: str) -> type[Any] | None:
        """The registered class (or subclass) whose class id is ``cid`` (a broadcast names it so)."""
        for mapper in list(self._policies):
            for m in mapper.self_and_descendants:
                if class_id(m) == cid:
                    return m.class_
        return None
