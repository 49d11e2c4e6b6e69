"""Where FK actions are searched (every MetaData sqlcache knows of) and when the answers are worked out
again (review q, h8: the written table's own MetaData only, memoized for ever)."""

from __future__ import annotations

import gc
import uuid
import weakref
from typing import Any

import pytest
from sqlalchemy import Column, ForeignKey, ForeignKeyConstraint, Integer, MetaData, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlcache import _fkactions
from sqlcache._fkactions import FkActions
from sqlcache._txn import cascade_targets, fk_actions, reached


def parent_table(md: MetaData, name: str | None = None) -> Table:
    """A parent table; named uniquely unless told (tables are matched by name across the process's
    registries, so another test's leftovers must not match)."""
    name = name or f"parent_{uuid.uuid4().hex[:8]}"
    return Table(name, md, Column("id", Integer, primary_key=True), Column("code", Integer, unique=True))


def child_table(md: MetaData, name: str, target: Any, **actions: str) -> Table:
    ref = Column("ref", ForeignKey(target, **actions))
    return Table(name, md, Column("id", Integer, primary_key=True), ref)


def names(tables: Any) -> set[str]:
    return {t.name for t in tables}


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the walks over every known MetaData's FKs (one per version of the known MetaData)."""
    calls: list[int] = []

    def counting(metadatas: Any) -> Any:
        calls.append(1)
        return fk_actions(metadatas)

    monkeypatch.setattr(_fkactions, "fk_actions", counting)
    return calls


def test_a_child_in_a_metadata_learned_later() -> None:
    """A Core MetaData of another module is searched once sqlcache learns of it (a cached query read
    one of its tables, a statement wrote one); the answer worked out before it is dropped."""
    fks = FkActions()
    parent = parent_table(MetaData())
    other = MetaData()
    child_table(other, "child", parent.c.id, ondelete="CASCADE")
    assert names(fks.cascades(parent, True, False)) == set()
    fks.learn([other])
    assert names(fks.cascades(parent, True, False)) == {"child"}


def test_a_chain_of_actions_through_a_metadata_only_referred_to() -> None:
    """parent <- child (a MetaData nothing names) <- grandchild (known): the grandchild's FK leads to
    the child's MetaData, whose FK leads to the parent."""
    fks = FkActions()
    parent = parent_table(MetaData())
    child = child_table(MetaData(), "child", parent.c.id, ondelete="CASCADE")
    grand_md = MetaData()
    child_table(grand_md, "grandchild", child.c.id, ondelete="CASCADE")
    fks.learn([grand_md])
    assert names(fks.cascades(parent, True, False)) == {"child", "grandchild"}


def test_a_table_added_to_a_known_metadata_later(builds: list[int]) -> None:
    """A child declared after the first statement on its parent is found by the next one; nothing is
    walked again while the known MetaData and their tables stay as they are."""
    fks = FkActions()
    md = MetaData()
    parent = parent_table(md)
    for _ in range(5):
        assert names(fks.cascaded(parent, "DELETE FROM parent", "delete")) == set()
    assert len(builds) == 1
    child_table(md, "late", parent.c.id, ondelete="SET NULL")
    for _ in range(5):
        assert names(fks.cascaded(parent, "DELETE FROM parent", "delete")) == {"late"}
    assert len(builds) == 2


def test_a_declarative_base_created_later() -> None:
    """Every live ORM registry's MetaData is searched, one created after the first statement too, with
    no table of it ever written or read (another process may cache its rows)."""
    fks = FkActions()
    parent = parent_table(MetaData())
    assert names(fks.cascades(parent, True, False)) == set()

    class LaterBase(DeclarativeBase):
        pass

    class Later(LaterBase):
        __tablename__ = "later"
        id: Mapped[int] = mapped_column(primary_key=True)
        ref: Mapped[int] = mapped_column(ForeignKey(parent.c.id, ondelete="CASCADE"))

    assert names(fks.cascades(parent, True, False)) == {"later"}
    LaterBase.registry.dispose()


def test_a_collected_metadata_is_forgotten() -> None:
    """Known MetaData are held weakly: one its owner dropped (a cached query read it once) is not kept
    alive by the cache, and goes from what is searched."""
    fks = FkActions()
    parent = parent_table(MetaData())
    read = MetaData()
    parent_table(read, "read_once")
    fks.learn([read])
    assert names(fks.cascades(parent, True, False)) == set()
    gone = weakref.ref(read)
    del read
    gc.collect()
    assert gone() is None
    assert names(fks.cascades(parent, True, False)) == set()
    assert all(ref() is not None for ref in fks._known.values())


def test_a_child_of_a_table_of_the_same_name_in_another_metadata() -> None:
    """Tables are matched by full name: an FK to another MetaData's copy of the written table (a
    reflected copy, a second declaration) counts, as does the ORM's annotated copy."""
    fks = FkActions()
    parent = parent_table(MetaData())
    copy_md = MetaData()
    copy = parent_table(copy_md, parent.name)
    child_table(copy_md, "child", copy.c.id, ondelete="CASCADE")
    fks.learn([copy_md])
    assert names(fks.cascades(parent, True, False)) == {"child"}


def test_an_fk_to_a_table_not_declared_yet() -> None:
    """A string FK whose table is not in its MetaData (yet) raises nothing and still counts by name."""
    md = MetaData()
    child_table(md, "child", "elsewhere.id", ondelete="CASCADE")
    elsewhere = parent_table(MetaData(), "elsewhere")
    assert names(cascade_targets(elsewhere, True, False, among=[md])) == {"child"}


def test_actions_pass_on_what_they_do_to_their_rows() -> None:
    """ON DELETE CASCADE deletes the child's rows (its own ON DELETE actions follow); SET NULL and
    ON UPDATE actions update them (its ON UPDATE actions follow, not its ON DELETE ones)."""
    md = MetaData()
    parent_table(md, "parent")
    nulled = Table(
        "nulled",
        md,
        Column("id", Integer, primary_key=True),
        Column("ref", ForeignKey("parent.id", ondelete="SET NULL"), unique=True),
    )
    child_table(md, "on_update_of_nulled", "nulled.ref", onupdate="CASCADE")
    child_table(md, "on_delete_of_nulled", "nulled.id", ondelete="CASCADE")
    deleted = child_table(md, "deleted", "parent.code", ondelete="CASCADE")
    child_table(md, "on_delete_of_deleted", "deleted.id", ondelete="SET DEFAULT")
    index, _ = fk_actions([md])
    assert names(reached(index, "parent", True, False)) == {
        "nulled",
        "on_update_of_nulled",
        "deleted",
        "on_delete_of_deleted",
    }
    assert names(reached(index, "parent", False, True)) == set()
    assert nulled is not None and deleted is not None


def test_a_cached_query_names_the_metadata_of_what_it_reads() -> None:
    """What a cached query reads is searched from its first miss on (metadata_in): a Core table in a
    MetaData of no registry, in a subquery."""
    from sqlalchemy import select

    md = MetaData()
    core = parent_table(md)
    inner = select(core.c.id).scalar_subquery()
    assert _fkactions.metadata_in(select(inner.label("x"))) == [md]


def test_a_table_whose_actions_lead_back_to_itself() -> None:
    """A tree's ON DELETE CASCADE to its own rows: deleting a row deletes others of the same table, so
    the table is among what it reaches (the unit of work's DELETE names only its own row)."""
    md = MetaData()
    tree = Table(
        f"tree_{uuid.uuid4().hex[:8]}",
        md,
        Column("id", Integer, primary_key=True),
        Column("parent_id", Integer),
    )
    tree.append_constraint(ForeignKeyConstraint(["parent_id"], [tree.c.id], ondelete="CASCADE"))
    assert cascade_targets(tree, True, False) == {tree}
    assert cascade_targets(tree, False, True) == set()
