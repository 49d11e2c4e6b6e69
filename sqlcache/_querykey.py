"""What a cached query is keyed by: SQLAlchemy's cache key made stable across processes, its digest,
and the tables a statement reads. No I/O."""

from __future__ import annotations

import enum
import types
from hashlib import blake2b
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.interfaces import MapperProperty
from sqlalchemy.sql import visitors
from sqlalchemy.sql.operators import custom_op
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.selectable import TableClause

from ._codec import encode_body
from ._hierarchy import class_id, is_text, table_name
from .errors import CodecError

__all__ = ["Uncacheable", "digest", "stable", "tables_read"]


class Uncacheable(Exception):
    """The statement holds something we cannot key stably across processes."""


def stable(o: Any) -> Any:
    """SQLAlchemy's cache key with every process-specific object replaced by a stable name.

    The key holds tables, mappers, types, operator functions and option classes; their reprs carry
    memory addresses, so each is named instead. Anything unknown makes the statement uncacheable
    rather than risk two different statements sharing a key.
    """
    if o is None or type(o) in (str, int, float, bool, bytes):
        return o
    if isinstance(o, str) and not isinstance(o, enum.Enum):
        # quoted_name (alias and label names): its quoting changes the SQL, so it is part of the key
        return ("Q", str(o), getattr(o, "quote", None), type(o).__qualname__)
    if isinstance(o, (tuple, list)):
        return tuple(stable(x) for x in o)
    if isinstance(o, Table):
        return ("T", table_name(o))
    if isinstance(o, Mapper):
        return ("M", class_id(o))
    if isinstance(o, MapperProperty):
        return ("P", class_id(o.parent), o.key)
    if isinstance(o, Column):
        return ("C", table_name(o.table), o.key)
    if isinstance(o, type):
        return ("Y", f"{o.__module__}.{o.__qualname__}")
    if isinstance(o, types.CodeType):
        # lambda statements (with_loader_criteria, the ORM's lazy loaders): two lambdas can share a line,
        # so the code itself is named, with its constants and names, not just where it sits
        return (
            "K",
            f"{o.co_filename}:{o.co_firstlineno}:{o.co_name}",
            blake2b(o.co_code, digest_size=16).hexdigest(),
            stable(o.co_consts),
            o.co_names,
        )
    if isinstance(o, enum.Enum):
        return ("E", f"{type(o).__qualname__}.{o.name}")
    if isinstance(o, custom_op):
        # Column.op("..."): named by what it renders and how it groups (its repr is an address)
        return ("O", o.opstring, o.precedence, o.is_comparison, o.natural_self_precedent, o.eager_grouping,
                _named(o.return_type), _named(o.python_impl))  # fmt: skip
    mod = getattr(o, "__module__", None) or ""
    if callable(o) and (mod == "_operator" or mod == "operator" or mod.startswith("sqlalchemy.")):
        return ("F", f"{mod}.{_named(o)}")
    raise Uncacheable(type(o).__qualname__)


def _named(o: Any) -> str | None:
    """A name for ``o`` that is the same in every process: its qualified name, or a repr that holds no
    memory address; Uncacheable otherwise."""
    if o is None:
        return None
    name = getattr(o, "__qualname__", None)
    if isinstance(name, str):
        return f"{getattr(o, '__module__', None) or ''}.{name}"
    text = repr(o)
    if " at 0x" in text:
        raise Uncacheable(f"{type(o).__qualname__} has no name that outlives the process")
    return text


def digest(parts: Any) -> str:
    try:
        return blake2b(encode_body(parts), digest_size=16).hexdigest()
    except CodecError:
        pass
    try:  # bound values the codec does not store (Python enum members) are keyed by name
        return blake2b(encode_body(_keyable(parts)), digest_size=16).hexdigest()
    except CodecError as exc:
        raise Uncacheable(str(exc)) from exc


def _keyable(o: Any) -> Any:
    if isinstance(o, enum.Enum):
        cls = type(o)
        return ("\x00enum", f"{cls.__module__}.{cls.__qualname__}", o.name)
    if type(o) is list or type(o) is tuple:
        return type(o)(_keyable(x) for x in o)
    return o


def tables_read(compiled: Any, statement: Any) -> tuple[str, ...]:
    """Every table the compiled statement reads: FROMs, joins, subqueries, CTEs, inheritance tables,
    lightweight ``table()`` constructs by their names.

    :raises Uncacheable: the statement holds SQL text (``text()``, a textual select, a literal column
        naming a subquery): the tables that text reads are unknown, so no write could be relied on to
        invalidate its entry.
    """
    core = getattr(getattr(compiled, "compile_state", None), "statement", None)
    if core is None:
        core = statement
    names = set()
    for element in visitors.iterate(core):
        if isinstance(element, TableClause):  # Table included
            names.add(table_name(element))
        elif is_text(element):
            raise Uncacheable("SQL text: the tables it reads are unknown")
    return tuple(sorted(names))
