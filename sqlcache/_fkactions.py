"""Which tables FK actions (ON DELETE / ON UPDATE CASCADE, SET NULL, SET DEFAULT) may change when a
statement writes a table: searched in every MetaData sqlcache knows of, worked out once per statement
shape until that set of MetaData or their tables change. No I/O."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.sql import visitors

from . import _sa
from ._txn import FkIndex, fk_actions, reached, replaces_on_conflict, rows_changed

__all__ = ["FkActions", "metadata_in"]

_NONE: frozenset[Any] = frozenset()


def metadata_in(statement: Any) -> list[MetaData]:
    """The MetaData of every table ``statement`` names (where FK actions into them are declared)."""
    found: dict[int, MetaData] = {}
    for element in visitors.iterate(statement):
        if isinstance(element, Table):
            found[id(element.metadata)] = element.metadata
    return list(found.values())


@dataclass(eq=False)
class _Memo:
    """FK actions of one version of the known MetaData, and the answers worked out from them."""

    version: tuple[int, int] | None
    index: FkIndex
    cascades: dict[tuple[str, bool, bool], set[Table]] = field(default_factory=dict)
    cascaded: dict[tuple[str, str, str], AbstractSet[Table]] = field(default_factory=dict)


class FkActions:
    """The tables the database changes itself when a statement writes a table.

    An FK action is declared on the child table, in the child's MetaData, which need not be the written
    table's (a second declarative base, a Core ``MetaData()`` of another module). Searched: the MetaData
    of every live ORM registry (declarative bases), of every registered class's tables, of every table
    a statement wrote or a cached query read, and of the tables their FK actions refer to (so a chain
    of actions through a MetaData nothing else names is followed). FK actions that exist only in the
    database, or in a MetaData none of these reach, are not seen.

    The answers are memoized under a version of that set: the number of MetaData learned (or found
    collected) and the number of tables in them, a few ``len()`` per statement; a table added to a
    known MetaData, or a new registry or MetaData, makes the next statement work them out again.
    (A ForeignKey appended to an existing Table object later is noticed with the next table added.)
    Known MetaData are held weakly; the child tables the current answers name are held by them.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._known: dict[int, weakref.ref[MetaData]] = {}  # by id, weakly: a dropped MetaData goes
        self._refs: tuple[weakref.ref[MetaData], ...] = ()
        self._epoch = 0  # moves whenever a MetaData is learned or found collected
        self._registries: weakref.WeakSet[Any] = weakref.WeakSet()  # ORM registries whose MetaData are known
        self._memo = _Memo(None, {})

    def after_fork(self) -> None:
        self._mutex = threading.Lock()

    def learn(self, metadatas: Iterable[MetaData | None]) -> None:
        """Search ``metadatas`` too from now on (a registered class's, a table's a cached query read)."""
        new = [md for md in metadatas if md is not None and not self._knows(md)]
        if new:
            with self._mutex:
                self._add(new)

    def cascades(self, table: Any, deleted: bool, updated: bool) -> AbstractSet[Table]:
        """Tables FK actions change when a statement deletes (``deleted``) or updates (``updated``) rows
        of ``table``; every write of a table that replaces on conflict (SQLite) counts as both."""
        return self._cascades(self._current(table), table, deleted, updated)

    def cascaded(self, table: Any, sql: str, kind: str) -> AbstractSet[Table]:
        """Tables FK actions may change when the ``kind`` (``insert``, ``update``, ``delete``) statement
        ``sql`` writes ``table`` (a few ``len()`` and one dict look-up per statement once seen)."""
        memo = self._current(table)
        k = (table.fullname, sql, kind)
        out = memo.cascaded.get(k)
        if out is None:
            out = _NONE
            # the statement is looked at only if FK actions start from the table at all
            if self._cascades(memo, table, True, True):
                out = self._cascades(memo, table, *rows_changed(sql, kind))
            if len(memo.cascaded) > 4096:
                memo.cascaded.clear()
            memo.cascaded[k] = out
        return out

    def _cascades(self, memo: _Memo, table: Any, deleted: bool, updated: bool) -> AbstractSet[Table]:
        k = (table.fullname, deleted, updated)  # the ORM's statements name annotated copies of tables
        out = memo.cascades.get(k)
        if out is None:
            if replaces_on_conflict(table):
                deleted = updated = True
            out = reached(memo.index, table.fullname, deleted, updated) if deleted or updated else set()
            memo.cascades[k] = out
        return out

    # -- the known MetaData ----------------------------------------------------------------------------

    def _knows(self, md: MetaData) -> bool:
        ref = self._known.get(id(md))
        return ref is not None and ref() is md

    def _add(self, metadatas: Iterable[MetaData]) -> None:  # under the mutex
        added = False
        for md in metadatas:
            if not self._knows(md):
                self._known[id(md)] = weakref.ref(md)
                added = True
        if added:
            self._refs = tuple(self._known.values())
            self._epoch += 1

    def _version(self) -> tuple[int, int]:
        tables = 0
        for ref in self._refs:
            md = ref()
            if md is None:
                return self._epoch, -1  # collected: the next rebuild forgets it
            tables += len(md.tables)
        return self._epoch, tables

    def _current(self, table: Any) -> _Memo:
        """The memo of the MetaData as they are now, ``table``'s and every live registry's among them."""
        md = table.metadata
        if not self._knows(md) or _sa.mapper_registry_count() != len(self._registries):
            # SQLAlchemy's configure mutex is taken before ours, never under it: a thread configuring
            # mappers may run DML (and come here) while holding it
            registries = (
                _sa.mapper_registries() if _sa.mapper_registry_count() != len(self._registries) else []
            )
            with self._mutex:
                self._add([md])
                for registry in registries:
                    self._registries.add(registry)
                self._add(registry.metadata for registry in registries)
        memo = self._memo
        if memo.version != self._version():
            memo = self._rebuild()
        return memo

    def _rebuild(self) -> _Memo:
        with self._mutex:
            while True:
                gone = [k for k, ref in self._known.items() if ref() is None]
                if gone:
                    for k in gone:
                        del self._known[k]
                    self._refs = tuple(self._known.values())
                    self._epoch += 1
                version = self._version()  # before the walk: a table added meanwhile moves it again
                if self._memo.version == version:
                    return self._memo  # another thread rebuilt it
                metadatas = [md for ref in self._refs if (md := ref()) is not None]
                index, referred = fk_actions(metadatas)
                unknown = [md for md in referred if not self._knows(md)]
                if not unknown:
                    self._memo = _Memo(version, index)
                    return self._memo
                self._add(unknown)  # a chain of actions through a MetaData only reached by reference
