"""Telling reads from writes in text SQL, and database-side cascades."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table

from sqlcache._txn import cascade_targets, is_write_sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  select * from users",
        "-- comment\nSELECT 1",
        "/* hint */ SELECT 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SHOW transaction_isolation",
        "PRAGMA table_info(users)",
        "SAVEPOINT sa_1",
        "RELEASE SAVEPOINT sa_1",
        "EXPLAIN SELECT 1",
    ],
)
def test_reads(sql: str) -> None:
    """Reads and transaction control are not writes."""
    assert not is_write_sql(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE users SET name = 'x'",
        "insert into users values (1)",
        "DELETE FROM users",
        "-- c\n/* d */ TRUNCATE users",
        "WITH d AS (DELETE FROM users RETURNING id) SELECT * FROM d",
        "REPLACE INTO users VALUES (1)",
        "CREATE TABLE t (x int)",
        "DROP TABLE t",
        "CALL do_things()",
        "PRAGMA foreign_keys = ON",
        "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
    ],
)
def test_writes(sql: str) -> None:
    """Anything that is not recognisably a read counts as a write."""
    assert is_write_sql(sql)


def test_cascade_targets() -> None:
    """FK actions CASCADE / SET NULL reach dependent tables transitively; RESTRICT does not."""
    md = MetaData()
    parent = Table("parent", md, Column("id", Integer, primary_key=True))
    child = Table(
        "child",
        md,
        Column("id", Integer, primary_key=True),
        Column("pid", ForeignKey("parent.id", ondelete="CASCADE")),
    )
    grandchild = Table(
        "grandchild",
        md,
        Column("id", Integer, primary_key=True),
        Column("cid", ForeignKey("child.id", ondelete="SET NULL")),
    )
    Table(
        "other",
        md,
        Column("id", Integer, primary_key=True),
        Column("pid", ForeignKey("parent.id", ondelete="RESTRICT")),
    )
    Table(
        "upd",
        md,
        Column("id", Integer, primary_key=True),
        Column("pid", ForeignKey("parent.id", onupdate="CASCADE")),
    )
    assert cascade_targets(parent, deleted=True, updated=False) == {child, grandchild}
    assert {t.name for t in cascade_targets(parent, deleted=False, updated=True)} == {"upd"}
    assert cascade_targets(grandchild, deleted=True, updated=True) == set()
