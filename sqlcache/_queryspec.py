"""What a cached statement shape reads and returns (tables, entity columns, result metadata, how
``unique()`` tells its rows apart), worked out once per shape. No I/O."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import InstrumentedAttribute
from sqlalchemy.sql.schema import Column

from . import _sa, _sabuild
from ._hierarchy import Conv, Hierarchy, check_supported, type_converters
from ._querykey import Uncacheable, digest, stable, tables_read
from ._rows import LAYOUT as ROWS_LAYOUT

__all__ = ["QuerySpec", "column_extras", "describe", "refuse_rows_before_unique"]

HierarchyOf = Callable[[Mapper[Any]], Hierarchy]


@dataclass(eq=False)
class QuerySpec:
    """What a statement shape reads and returns, computed once per shape."""

    digest: str
    tables: tuple[str, ...]
    columns: tuple[Hierarchy | None, ...]
    aliased: bool = False  # an entity is an aliased() class: load paths come from the statement itself
    extras: list[tuple[Any, ...]] | None = None  # per column, row._mapping keys besides the name
    types: tuple[Any, ...] = ()  # per column, the SQL type of a non-entity column (None for entities)
    # per column, value <-> codec converters of a non-entity column whose values need one (enums)
    to_plain: tuple[Conv | None, ...] = field(init=False)
    from_plain: tuple[Conv | None, ...] = field(init=False)
    # every extra is an object any statement of this shape names the same way (a mapped class, its
    # attributes, a table's columns); labels and functions are built anew with each statement
    stable_extras: bool = field(init=False)
    model: str | None = field(init=False)  # the first entity column's class name (for plugins)
    any_entity: bool = field(init=False)  # the ORM marks such results "filtered": legacy Query uniques
    # derived once: which columns are entities, their load paths (not for aliased entities, whose paths
    # are the alias's own), and result metadata per (column names, legacy Query) (hits share it, as
    # SQLAlchemy's cached statements share theirs)
    entities: list[bool] = field(init=False)
    paths: list[Any] = field(init=False)
    metas: dict[tuple[tuple[str | None, ...], bool], SimpleResultMetaData] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.entities = [h is not None for h in self.columns]
        self.paths = [_sa.path_registry(h.mapper) if h is not None else None for h in self.columns]
        self.any_entity = any(self.entities)
        self.model = next((h.mapper.class_.__name__ for h in self.columns if h is not None), None)
        self.stable_extras = all(_shared_object(x) for ex in self.extras or () for x in ex)
        convs = [type_converters(t, t) if t is not None else (None, None) for t in self.types]
        self.to_plain = tuple(c[0] for c in convs) if any(c[0] for c in convs) else ()
        self.from_plain = tuple(c[1] for c in convs) if any(c[1] for c in convs) else ()

    def unique_filters(self, legacy: bool) -> list[Any]:
        """Per column, how ``unique()`` tells rows apart, as the ORM decides it: entities by identity,
        columns of a type producing unhashable values (JSON, ARRAY) refused (by identity for a legacy
        Query), columns of an unknown type by hash where they can be hashed."""
        out: list[Any] = []
        for i, entity in enumerate(self.entities):
            type_ = self.types[i] if i < len(self.types) else None
            if entity:
                out.append(id)
            elif type_ is not None and (_sa.type_is_unknown(type_) or not type_.hashable):
                out.append(_unhashable_filter(type_, legacy, _sa.type_is_unknown(type_)))
            else:
                out.append(None)
        return out

    def metadata(self, keys: Sequence[str | None], stmt: Any, legacy: bool) -> SimpleResultMetaData:
        if self.aliased or not self.stable_extras:
            # the row mapping's keys are this statement's own objects (an alias's attributes, labels,
            # functions): a statement built again has new ones
            return _sabuild.result_metadata(keys, lambda: self.unique_filters(legacy), column_extras(stmt))
        k = (tuple(keys), legacy)
        meta = self.metas.get(k)
        if meta is None:
            meta = _sabuild.result_metadata(keys, lambda: self.unique_filters(legacy), self.extras)
            # a legacy filter for values of unknown type remembers what it met: not shared
            stateful = legacy and any(t is not None and _sa.type_is_unknown(t) for t in self.types)
            if not stateful and len(self.metas) < 8:
                self.metas[k] = meta  # an entry's names are the statement's: one or two in practice
        return meta


def _shared_object(o: Any) -> bool:
    """Whether ``o`` is one object for every statement naming it: a mapped class, a class's own
    attribute, a column of a Table (not of an alias or a subquery)."""
    if isinstance(o, type):
        return True
    if isinstance(o, InstrumentedAttribute):
        return getattr(o, "class_", None) is not None and getattr(o.class_, o.key, None) is o
    if isinstance(o, Column):
        # a table's column, or an annotated copy of it (hashed and matched as the column itself)
        return isinstance(o.table, Table)
    return False


def refuse_rows_before_unique(_row: Any) -> Any:
    raise InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that include "
        "joined eager loads against collections"
    )


def _unhashable_filter(type_: Any, legacy: bool, uncertain: bool) -> Callable[[Any], Any]:
    """unique()'s key for a column whose values may not hash (SQLAlchemy's rule for ORM results)."""
    if legacy and not uncertain:
        return id
    if legacy:
        use_id = False

        def hash_or_id(value: Any) -> Any:
            nonlocal use_id
            if not use_id:
                try:
                    return hash(value)
                except TypeError:
                    use_id = True
            return id(value)

        return hash_or_id

    def refuse(value: Any) -> Any:
        if uncertain:
            try:
                return hash(value)
            except TypeError:
                pass
        produce = "the values returned appear to be" if uncertain else "this datatype produces"
        raise InvalidRequestError(
            f"Can't apply uniqueness to row tuple containing value of type {type_!r}; {produce} "
            "non-hashable values"
        )

    return refuse


def describe(stmt: Any, ck: Any, engine: Engine, hierarchy: HierarchyOf) -> QuerySpec:
    """Tables, result columns and shape digest of a statement (computed once per shape)."""
    compiled = stmt.compile(dialect=engine.dialect)
    columns: list[Hierarchy | None] = []
    aliased = False
    for desc in stmt.column_descriptions:
        entity, expr = desc.get("entity"), desc.get("expr")
        if entity is not None and expr is entity:
            insp = sa_inspect(entity)
            mapper = insp if isinstance(insp, Mapper) else getattr(insp, "mapper", None)
            if not isinstance(mapper, Mapper):
                raise Uncacheable("entity without a mapper")
            aliased = aliased or insp is not mapper
            check_supported(mapper)
            columns.append(hierarchy(mapper))
        else:
            columns.append(None)
    fps = [h.fingerprint if h is not None else None for h in columns]
    # the driver too: two drivers of one database may return other Python types for a column
    dialect = f"{engine.dialect.name}+{engine.dialect.driver}"
    # the SQL too: the cache key names a table by its name and a column by its table and key, so two Table
    # objects of one table (columns in another order, a subset) would otherwise share entries
    shape_digest = digest([ROWS_LAYOUT, stable(ck.key), dialect, fps, compiled.string])
    extras = column_extras(stmt)
    if len(extras) != len(columns):
        raise Uncacheable("result columns do not match the column descriptions")
    types = tuple(
        None if h is not None else d.get("type")
        for h, d in zip(columns, stmt.column_descriptions, strict=True)
    )
    # an entity's every table, and what its columns read, even where this SQL does not name them (a
    # subclass loaded by a second SELECT: polymorphic_load="selectin")
    tables = set(tables_read(compiled, stmt))
    for h in columns:
        if h is not None:
            tables.update(h.tables, h.reads)
    return QuerySpec(shape_digest, tuple(sorted(tables)), tuple(columns), aliased, extras, types)


def column_extras(stmt: Any) -> list[tuple[Any, ...]]:
    """Per result column, what a database result's row mapping accepts as a key besides the name: the
    entity, the ORM attribute and its column, or the Core column."""
    out: list[tuple[Any, ...]] = []
    for desc in stmt.column_descriptions:
        expr = desc.get("expr")
        if expr is None:
            out.append(())
            continue
        column = getattr(expr, "expression", None) if expr is not desc.get("entity") else None
        out.append((expr,) if column is None or column is expr else (expr, column))
    return out
