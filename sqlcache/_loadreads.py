"""What a loading miss reads: while a miss loads (in this context), the tables of every statement it runs
and of every cached read nested in it (eager loads, subclass loads, a query's nested miss), which the
entry it fills must depend on."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from contextvars import ContextVar, Token
from typing import Any

from ._querykey import Uncacheable, tables_read

__all__ = ["UNKNOWN_TABLES", "LoadReads"]

#: in the tables a load was seen to read: it ran SQL whose tables are unknown (text)
UNKNOWN_TABLES = "\x00unknown"
#: SQL text that may read a table: any that is not transaction control or a setting (BEGIN, SAVEPOINT,
#: RELEASE, COMMIT, ROLLBACK, SET without a subquery)
_MAY_READ = re.compile(r"\b(?:select|from|with|table|values|call|exec|execute|do|handler)\b", re.IGNORECASE)


class LoadReads:
    """The tables loading misses read, per context, for one cache."""

    def __init__(self) -> None:
        self._loading: ContextVar[set[str] | None] = ContextVar("sqlcache_loading", default=None)
        self._statement_tables: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()

    def begin(self, loaded: set[str]) -> Token[set[str] | None]:
        """A miss starts loading in this context: what it reads goes into ``loaded`` until :meth:`end`."""
        return self._loading.set(loaded)

    def end(self, token: Token[set[str] | None]) -> None:
        """The load begun with ``token`` is over (the load around it, if any, collects again)."""
        self._loading.reset(token)

    def loading(self) -> bool:
        """Whether a miss is loading in this context (see :meth:`saw_statement`)."""
        return self._loading.get() is not None

    def saw_tables(self, tables: Iterable[str]) -> None:
        """A read nested in a loading miss (served from Redis or not) depends on ``tables``."""
        seen = self._loading.get()
        if seen is not None:
            seen.update(tables)

    def saw_statement(self, compiled: Any, sql: str) -> None:
        """A statement ran while a miss loads: the tables it reads (UNKNOWN_TABLES for SQL text that
        may read any: anything but transaction control and settings, such as an engine's ``begin``
        listener sending ``BEGIN`` itself, SQLAlchemy's pysqlite recipe)."""
        seen = self._loading.get()
        if seen is None:
            return
        if compiled is None:  # exec_driver_sql
            if _MAY_READ.search(sql):
                seen.add(UNKNOWN_TABLES)
            return
        tables = self._statement_tables.get(compiled)
        if tables is None:
            try:
                tables = tables_read(compiled, compiled.statement)
            except Uncacheable:
                tables = (UNKNOWN_TABLES,) if _MAY_READ.search(sql) else ()
            if len(self._statement_tables) > 4096:
                self._statement_tables.clear()
            self._statement_tables[compiled] = tables  # held weakly: never keeps a statement alive
        seen.update(tables)
