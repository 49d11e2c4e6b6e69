"""Telling reads from writes in text SQL, and database-side cascades."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table

from sqlcache._txn import cascade_targets, is_write_sql, scope_changes


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


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET search_path TO tenant_a", [("search_path", False, False)]),
        ("set session search_path = 'a', public", [("search_path", False, False)]),
        ("SET LOCAL search_path TO a", [("search_path", True, False)]),
        ("SET SCHEMA 'a'", [("search_path", False, False)]),
        ("/* c */ SET search_path TO a; SELECT 1", [("search_path", False, False)]),
        ("SET ROLE bob", [("role", False, False)]),
        ("SET ROLE NONE", [("role", False, True)]),
        ("SET SESSION AUTHORIZATION bob", [("session_authorization", False, False)]),
        ("SET LOCAL app.tenant = 42", [("app.tenant", True, False)]),
        ('SET "app.tenant" = 1', [("app.tenant", False, False)]),
        ("SET search_path TO DEFAULT", [("search_path", False, True)]),
        ("RESET search_path", [("search_path", False, True)]),
        ("RESET ALL", [("all", False, True)]),
        ("DISCARD ALL", [("*", False, True)]),
        ("USE tenant_b", [("database", False, False)]),
        ("SELECT set_config('search_path', 'a', false)", [("search_path", False, False)]),
        ("SELECT SET_CONFIG('app.t', %(p)s, true)", [("app.t", True, False)]),
        ("SELECT set_config(%(name)s, %(v)s, false)", [("*", False, False)]),
        # a nested call's boolean is not taken for set_config's is_local: the longer-lived mark
        (
            "SELECT set_config('search_path', current_setting('x', true) || ',a', true)",
            [("search_path", False, False)],
        ),
        ("SELECT * FROM users", []),
        ("SET statement_timeout = 5000", []),
        ("SET NAMES utf8mb4", []),
        ("SET @tenant = 1", []),
        ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", []),
        ("RESET statement_timeout", []),
        ("SELECT set_config('statement_timeout', '1', false)", []),
        ("SELECT 1; RESET search_path", []),  # a reset counts only as a statement of its own
    ],
)
def test_scope_changes(sql: str, expected: list[tuple[str, bool, bool]]) -> None:
    """Statements that change what names (or row-security settings) resolve to, and their resets."""
    assert [(c.setting, c.local, c.reset) for c in scope_changes(sql)] == expected


def test_use_names_its_database() -> None:
    """USE carries its database, so that USE of the engine's own one counts as a reset."""
    assert [c.value for c in scope_changes("USE `tenant_b`;")] == ["tenant_b"]
    assert [c.value for c in scope_changes("USE a; SELECT 1")] == [None]


@pytest.mark.parametrize(
    ("sql", "write"),
    [
        ("SELECT 1; DELETE FROM users", True),
        ("select 1 ;\n  update users set name = 'x'", True),
        ("SELECT 1; SELECT 2", False),
        ("SELECT 1;", False),
        ("SELECT ';' AS a", False),
        ("SELECT 1 -- ; DELETE FROM users", False),
        ("SELECT 1 /* ; DELETE FROM users */", False),
        ('SELECT 1 AS ";delete"', False),
        ("SELECT 'it''s; fine'; INSERT INTO t VALUES (1)", True),
    ],
)
def test_several_statements_in_one_string_count_as_a_write_if_any_is(sql: str, write: bool) -> None:
    """Issue 12 (found with point 9): only the first statement of ``SELECT 1; DELETE ...`` was read."""
    assert is_write_sql(sql) is write


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT reset_config('x')",
        "SELECT asset_config(1)",
        "WITH user_set_config (k, v) AS (SELECT 1, 2) SELECT * FROM user_set_config",
    ],
)
def test_names_that_merely_end_in_set_config_change_nothing(sql: str) -> None:
    """Only the function set_config() itself changes a setting (found in review: no word boundary)."""
    assert scope_changes(sql) == []
