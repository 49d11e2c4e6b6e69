"""What sqlcache knows of a mapped class: which column types it can cache, the schema fingerprint that
keeps entries of an older definition out, and the shapes (column order, converters, identity keys)
entries are written and rebuilt with. No I/O."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from sqlalchemy import types as sqltypes
from sqlalchemy.orm import ColumnProperty, Mapper
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.selectable import Alias, Select, TableClause, TextualSelect

from . import _sa
from .errors import CodecError, ConfigurationError

__all__ = [
    "Conv",
    "Hierarchy",
    "Shape",
    "check_supported",
    "class_id",
    "fingerprint",
    "hierarchy_for",
    "table_name",
    "type_converters",
]

Conv = Callable[[Any], Any]

# Generic types whose ORM values the codec round-trips exactly. Dialect types subclass these.
_SUPPORTED: tuple[type[sqltypes.TypeEngine[Any]], ...] = (
    sqltypes.Integer,
    sqltypes.Numeric,
    sqltypes.Float,  # a Numeric in 2.0, not in 2.1
    sqltypes.String,  # Text, Unicode, UnicodeText, and dialect strings
    sqltypes.Boolean,
    sqltypes.Date,
    sqltypes.DateTime,
    sqltypes.Time,
    sqltypes.Interval,
    sqltypes.Uuid,
    sqltypes.Enum,
    sqltypes.JSON,
    _sa.BINARY,  # LargeBinary, BINARY, VARBINARY, BLOB
    sqltypes.ARRAY,
)


def _dialect_extras() -> tuple[type[sqltypes.TypeEngine[Any]], ...]:
    extra: list[type[sqltypes.TypeEngine[Any]]] = []
    try:
        from sqlalchemy.dialects import postgresql as pg

        extra += [pg.INET, pg.CIDR, pg.HSTORE, pg.MACADDR, pg.BIT, pg.TSVECTOR, pg.MONEY, pg.OID]
    except ImportError:  # pragma: no cover - ships with SQLAlchemy
        pass
    try:
        from sqlalchemy.dialects import mysql

        extra += [mysql.YEAR, mysql.BIT, mysql.SET]
    except ImportError:  # pragma: no cover
        pass
    return tuple(extra)


_SUPPORTED_EXTRA = _dialect_extras()


def _type_problem(type_: sqltypes.TypeEngine[Any]) -> str | None:
    if isinstance(type_, sqltypes.TypeDecorator):
        # The decorator's own Python values are checked exactly at encode time (an unexpected type is
        # an encode error, never a wrong value), so accept it when its storage type is supported.
        return _type_problem(type_.impl_instance)
    if isinstance(type_, sqltypes.ARRAY):
        item = type_.item_type
        if isinstance(item, sqltypes.Enum) and item.enum_class is not None:
            return "ARRAY of a Python enum"
        return _type_problem(item)
    if isinstance(type_, _SUPPORTED) or isinstance(type_, _SUPPORTED_EXTRA):
        return None
    return f"type {type_!r} is not one sqlcache can round-trip"


def check_supported(mapper: Mapper[Any]) -> None:
    """Raise ConfigurationError naming the first column whose type the codec cannot round-trip, or
    a loaded column of SQL text (see :func:`column_reads`)."""
    text = column_reads(mapper.base_mapper)[1]
    if text is not None:
        raise ConfigurationError(
            f"{text} is SQL text: sqlcache cannot tell which tables it reads. Make it deferred "
            "(deferred=True) or build it of SQLAlchemy constructs."
        )
    for m in mapper.base_mapper.self_and_descendants:
        for prop in m.column_attrs:
            for col in prop.columns:
                problem = _type_problem(col.type)
                if problem:
                    raise ConfigurationError(
                        f"{m.class_.__name__}.{prop.key} cannot be cached: {problem}; "
                        f"leave {m.class_.__name__} unregistered or change the column type"
                    )


def table_name(table: Any) -> str:
    """Schema-qualified name of a table (or the name of another selectable), as used in keys."""
    if table is None:
        return ""
    return str(getattr(table, "fullname", None) or getattr(table, "name", None) or table)


def _converters(col: Any) -> tuple[Conv | None, Conv | None]:
    """ORM value <-> codec value for one column, where they differ (Python enums, MySQL SET)."""
    return type_converters(col.type, col)


def type_converters(type_: Any, col: Any) -> tuple[Conv | None, Conv | None]:
    """Python value <-> codec value for values of the SQL type ``type_`` (``col`` names it in errors):
    a Python enum member is stored as its name."""
    if isinstance(type_, sqltypes.TypeDecorator):
        return None, None
    if isinstance(type_, sqltypes.Enum) and type_.enum_class is not None:
        cls: type[enum.Enum] = type_.enum_class

        def to_plain(v: Any) -> Any:
            if v is None:
                return None
            if type(v) is not cls:
                raise CodecError(f"{col} holds {v!r}, not a member of {cls.__name__}")
            return v.name

        def from_plain(v: Any) -> Any:
            if v is None:
                return None
            try:
                return cls.__members__[v]  # PEP 435, as SQLAlchemy reads it (not only enum.Enum)
            except (KeyError, TypeError, AttributeError) as exc:
                raise CodecError(f"{v!r} is not a member of {cls.__name__}") from exc

        return to_plain, from_plain
    return None, None


def _describe_type(type_: sqltypes.TypeEngine[Any]) -> str:
    text = repr(type_)
    if isinstance(type_, sqltypes.Enum) and type_.enum_class is not None:
        # the names SQLAlchemy read from the class's __members__ (PEP 435): iterating the class itself
        # needs enum.Enum, and SQLAlchemy accepts any class with __members__
        text += repr(list(type_.enums))
    return f"{type(type_).__module__}.{type(type_).__qualname__}:{text}"


def class_id(mapper: Mapper[Any]) -> str:
    cls = mapper.class_
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint(mapper: Mapper[Any]) -> str:
    """Hash of every mapped column, type, class and relationship of the hierarchy and of every class its
    relationships reach: an older definition never matches.

    Relationships count because entries hold what loading built: a query's eager-loaded collections (in
    their ``order_by``, filtered by their ``primaryjoin``), and the related classes' columns. Two
    processes (a deploy in progress) or two test runs with one class name but other relationships must
    not share entries."""
    h = blake2b(digest_size=8)
    seen: set[Mapper[Any]] = set()
    todo = [mapper.base_mapper]
    while todo:
        for m in todo:
            seen.update(m.self_and_descendants)
        reached = []
        for base in sorted(todo, key=class_id):
            for m in sorted(base.self_and_descendants, key=class_id):
                h.update(f"class {class_id(m)} {m.polymorphic_identity!r}\n".encode())
                for prop in sorted(m.column_attrs, key=lambda p: p.key):
                    cols = ",".join(f"{table_name(getattr(c, 'table', None))}.{c.name}" for c in prop.columns)
                    described = _describe_type(prop.columns[0].type)
                    h.update(f"  {prop.key} {cols} {described} {prop.deferred}\n".encode())
                for rel in sorted(m.relationships, key=lambda r: r.key):
                    if rel.parent is not m:
                        continue  # inherited: described with the class that declares it
                    h.update(f"  {_describe_relationship(rel)}\n".encode())
                    target = rel.mapper.base_mapper
                    if target not in seen and target not in reached:
                        reached.append(target)
        todo = reached
    return h.hexdigest()


def _describe_relationship(rel: Any) -> str:
    """A relationship's configuration as text: what it loads and in which order. Bound values (a
    ``primaryjoin`` comparing to a literal) are spelled out: the SQL text alone names only ``:param``."""
    from sqlalchemy.sql import visitors
    from sqlalchemy.sql.elements import BindParameter

    def expr(e: Any) -> str:
        if e is None or e is False:
            return "-"
        parts = e if isinstance(e, (list, tuple)) else [e]
        out = []
        for p in parts:
            binds = [repr(b.value) for b in visitors.iterate(p) if isinstance(b, BindParameter)]
            out.append(f"{p}{binds if binds else ''}")
        return ";".join(out)

    collection = rel.collection_class
    collection_name = getattr(collection, "__qualname__", repr(collection)) if collection is not None else "-"
    return (
        f"rel {rel.key} -> {class_id(rel.mapper)} {rel.direction.name} uselist={rel.uselist} lazy={rel.lazy}"
        f" viewonly={rel.viewonly} innerjoin={rel.innerjoin} order_by={expr(rel.order_by)}"
        f" primaryjoin={expr(rel.primaryjoin)} secondaryjoin={expr(rel.secondaryjoin)}"
        f" secondary={table_name(rel.secondary) if rel.secondary is not None else '-'}"
        f" collection={collection_name}"
    )


@dataclass(frozen=True, eq=False)
class Shape:
    """The column attributes of one concrete mapper, in a fixed order, with their converters."""

    mapper: Mapper[Any]
    class_id: str
    keys: tuple[str, ...]
    deferred: tuple[bool, ...]
    to_plain: tuple[Conv | None, ...]
    from_plain: tuple[Conv | None, ...]
    full_mask: int  # every column attribute loaded
    pk_positions: tuple[int, ...]  # where the primary key columns sit in ``keys``
    identity_class: type[Any]  # first item of this mapper's identity keys
    converted: tuple[int, ...]  # positions whose values need a converter
    pk_mask: int  # bits of the primary key columns: a partial load must include them

    def identity_key(self, mask: int, values: list[Any]) -> tuple[Any, ...]:
        """The identity key of a decoded row (values compact by mask)."""
        if mask == self.full_mask:
            pk = tuple(values[i] for i in self.pk_positions)
        else:
            loaded = {}
            it = iter(values)
            for i in range(len(self.keys)):
                if mask >> i & 1:
                    loaded[i] = next(it)
            pk = tuple(loaded[i] for i in self.pk_positions)
        return (self.identity_class, pk, None)


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """Everything needed to store and rebuild entries of one requested mapper."""

    mapper: Mapper[Any]
    fingerprint: str
    entity: str
    base_table: str
    tables: tuple[str, ...]  # every table of every mapper in the inheritance hierarchy
    shapes: dict[str, Shape]  # class id -> shape, for the mapper and its subclasses
    # other tables a loaded column reads (a column_property's scalar subquery): its entries depend on
    # them as a query depends on its tables
    reads: tuple[str, ...] = ()
    # per primary-key column, the one Python type its database compares exactly (int for an integer
    # column, UUID for a native UUID one), or None: another spelling may find the same row
    exact_pk: tuple[type | None, ...] = ()
    # a loaded column of SQL text (a subclass mapped after register()): its tables are unknown, so the
    # hierarchy's identity entries are neither read nor filled, and no query entry holds its objects
    unknown_reads: bool = False


def _shape(mapper: Mapper[Any]) -> Shape:
    props: Sequence[ColumnProperty[Any]] = list(mapper.column_attrs)
    convs = [_converters(p.columns[0]) for p in props]
    keys = tuple(p.key for p in props)
    pk_keys = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
    return Shape(
        mapper=mapper,
        class_id=class_id(mapper),
        keys=keys,
        deferred=tuple(bool(p.deferred) for p in props),
        to_plain=tuple(c[0] for c in convs),
        from_plain=tuple(c[1] for c in convs),
        full_mask=(1 << len(props)) - 1,
        pk_positions=tuple(keys.index(k) for k in pk_keys),
        identity_class=mapper.identity_key_from_primary_key(tuple([None] * len(pk_keys)))[0],
        converted=tuple(i for i, c in enumerate(convs) if c[1] is not None),
        pk_mask=sum(1 << keys.index(k) for k in pk_keys),
    )


def hierarchy_for(mapper: Mapper[Any]) -> Hierarchy:
    base = mapper.base_mapper
    tables: list[str] = []
    for m in base.self_and_descendants:
        for t in m.tables:
            if table_name(t) not in tables:
                tables.append(table_name(t))
    reads, text = column_reads(base)
    return Hierarchy(
        mapper=mapper,
        fingerprint=fingerprint(mapper),
        entity=class_id(mapper),
        base_table=table_name(base.local_table),
        tables=tuple(sorted(tables)),
        shapes={class_id(m): _shape(m) for m in mapper.self_and_descendants},
        reads=tuple(sorted(reads)),
        unknown_reads=text is not None,
        exact_pk=tuple(_exact_type(col.type) for col in base.primary_key),
    )


def _exact_type(type_: Any) -> type | None:
    """The Python type whose values a column of ``type_`` compares exactly, if any: an integer column
    compares integers (not '1', not 1.0), a native UUID column UUIDs. A TypeDecorator, a string or a
    numeric column (collations, affinity, scale) has none."""
    if isinstance(type_, sqltypes.TypeDecorator):
        return None
    if isinstance(type_, sqltypes.Integer):
        return int
    if isinstance(type_, sqltypes.Uuid) and type_.as_uuid:
        return uuid.UUID
    return None


def tables_in(selectable: Any) -> set[str]:
    """The names of the tables in ``selectable`` (a Table, a join of several, a subquery)."""
    return {table_name(e) for e in visitors.iterate(selectable) if isinstance(e, TableClause)}


def column_reads(base: Mapper[Any]) -> tuple[set[str], str | None]:
    """The tables the SQL expressions of a hierarchy's loaded (not deferred) column properties read
    (a ``column_property(select(...).scalar_subquery())`` is loaded with the row, and changes with
    those tables), and the first such property of SQL text (``Class.attr``), whose tables are
    unknown, or None. ``register()`` refuses a hierarchy with one; a subclass mapped after it makes
    the hierarchy's entries unused (``Hierarchy.unknown_reads``)."""
    out: set[str] = set()
    text: str | None = None
    own = {table_name(t) for m in base.self_and_descendants for t in m.tables}
    for m in base.self_and_descendants:
        for prop in m.column_attrs:
            if prop.deferred:
                continue  # loaded from the database when first touched, never from an entry
            for col in prop.columns:
                if isinstance(col, Column) and col.table is not None and col.table in m.tables:
                    continue
                named: set[str] = set()
                selects = []
                for element in visitors.iterate(col):
                    if isinstance(element, TableClause):
                        named.add(table_name(element))
                    elif isinstance(element, Alias) and isinstance(element.element, TableClause):
                        out.add(table_name(element.element))  # read under an alias: never correlated
                    elif isinstance(element, Select):
                        selects.append(element)
                    elif is_text(element) and text is None:
                        text = f"{m.class_.__name__}.{prop.key}"
                # the row's own tables are usually the enclosing query's, correlated (a count of the
                # row's reviews); read whole only by a subquery that does not correlate them
                for name in named:
                    if name not in own or any(not _sa.correlates(sel, name) for sel in selects):
                        out.add(name)
    return out, text


def is_text(element: Any) -> bool:
    """Whether ``element`` is SQL text that may read tables nobody can name: ``text()``, a textual
    select, a literal column holding a SELECT."""
    if isinstance(element, (TextClause, TextualSelect)):
        return True
    return (
        isinstance(element, ColumnClause) and element.is_literal and _SELECT.search(element.name) is not None
    )


_SELECT = re.compile(r"\bselect\b", re.IGNORECASE)
