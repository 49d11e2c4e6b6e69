"""Telling reads from writes in text SQL, and database-side cascades."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint

from sqlcache._txn import cascade_targets, is_write_sql, replaces_on_conflict, rows_changed, scope_changes


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
        # EXPLAIN without ANALYZE only plans the statement; with it, the statement runs: a read
        "EXPLAIN DELETE FROM users",
        "EXPLAIN (FORMAT JSON) UPDATE users SET name = 'x'",
        "EXPLAIN QUERY PLAN DELETE FROM users",
        "EXPLAIN FORMAT=JSON DELETE FROM users",
        "DESCRIBE users",
        "EXPLAIN ANALYZE SELECT * FROM users",
        "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
        "EXPLAIN ANALYZE WITH x AS (SELECT 'delete') SELECT * FROM x",
        # ANALYZE of a table gathers statistics (PostgreSQL, MySQL); MariaDB's of a SELECT runs it
        "ANALYZE users",
        "ANALYSE VERBOSE users",
        "ANALYZE (VERBOSE) users",
        "ANALYZE TABLE users",
        "ANALYZE NO_WRITE_TO_BINLOG TABLE users",
        "ANALYZE FORMAT=JSON SELECT * FROM users",
        "BEGIN",
        "BEGIN WORK",
        "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "begin isolation level repeatable read, read only",
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


# statements that run a write although their first word reads as a read (found by review q, s1)
_RUN_WRITES = [
    # PostgreSQL runs the statement EXPLAIN ANALYZE explains (either syntax, ANALYSE spelled either way)
    "EXPLAIN ANALYZE DELETE FROM users WHERE id = 1",
    "explain analyse update users set name = 'x'",
    "EXPLAIN (ANALYZE, BUFFERS) UPDATE users SET name = 'x'",
    "EXPLAIN (ANALYZE) UPDATE users SET name = 'x'",
    "EXPLAIN (FORMAT JSON, ANALYZE TRUE) INSERT INTO users (name) VALUES ('x')",
    "EXPLAIN ANALYZE VERBOSE DELETE FROM users",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM users RETURNING id) SELECT * FROM d",
    "EXPLAIN ANALYZE EXECUTE remove_user(1)",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    # MySQL 8 EXPLAIN ANALYZE (DESCRIBE is its synonym); MariaDB's ANALYZE statement runs what it names
    "EXPLAIN ANALYZE FORMAT=TREE DELETE FROM users",
    "DESCRIBE ANALYZE UPDATE users SET name = 'x'",
    "ANALYZE DELETE FROM users WHERE id = 1",
    "ANALYZE FORMAT=JSON UPDATE users SET name = 'x'",
    # MariaDB compound statement outside a stored program
    "BEGIN NOT ATOMIC UPDATE users SET name = 'x'; END",
    "begin not atomic select 1; end",
    "BEGIN NOT ATOMIC DECLARE n INT DEFAULT 1; IF n THEN DELETE FROM users; END IF; END",
]


@pytest.mark.parametrize("sql", _RUN_WRITES)
def test_statements_that_run_a_write(sql: str) -> None:
    """EXPLAIN ANALYZE / MariaDB ANALYZE of a write, and BEGIN NOT ATOMIC, run a write: not reads."""
    assert is_write_sql(sql)


_GAPS = ["  ", "\n", "\t", " /* c; 'x' */ ", " -- c\n", "\n-- c;\n  "]


def _respelled(sql: str, gaps: list[str], upper: list[bool]) -> str:
    """``sql`` with each space replaced by a gap (comments included) and each word's case flipped."""
    words = sql.split(" ")
    out = []
    for i, w in enumerate(words):
        out.append(w.upper() if upper[i % len(upper)] else w.lower())
        if i < len(words) - 1:
            out.append(gaps[i % len(gaps)])
    return "".join(out)


@given(
    st.sampled_from(_RUN_WRITES),
    st.lists(st.sampled_from(_GAPS), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=1, max_size=6),
    st.sampled_from(["", "  ", "/* lead */ ", "-- lead\n"]),
)
def test_statements_that_run_a_write_in_any_case_and_spacing(
    sql: str, gaps: list[str], upper: list[bool], lead: str
) -> None:
    """Case, whitespace and comments between the words do not hide a write."""
    assert is_write_sql(lead + _respelled(sql, gaps, upper))


@given(
    st.sampled_from(
        [
            "EXPLAIN SELECT 1",
            "EXPLAIN DELETE FROM users",
            "EXPLAIN (FORMAT JSON) UPDATE users SET name = 1",
            "EXPLAIN ANALYZE SELECT * FROM users",
            "SELECT * FROM users",
            "ANALYZE users",
            "BEGIN WORK",
        ]
    ),
    st.lists(st.sampled_from(_GAPS), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=1, max_size=6),
)
def test_reads_in_any_case_and_spacing(sql: str, gaps: list[str], upper: list[bool]) -> None:
    """Plain EXPLAIN, EXPLAIN ANALYZE of a SELECT, a SELECT and BEGIN stay reads however spelled."""
    assert not is_write_sql(_respelled(sql, gaps, upper))


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
    ("sql", "kind", "expected"),
    [
        ("DELETE FROM users WHERE id = ?", "delete", (True, False)),
        ("UPDATE users SET name=? WHERE users.id = ?", "update", (False, True)),
        ("UPDATE orders SET total=?", "update", (False, True)),  # a table named or...
        ("UPDATE OR REPLACE users SET name=?", "update", (True, True)),  # SQLite: deletes a conflicting row
        ("update  or  ignore users set name=?", "update", (True, True)),
        ("INSERT INTO users (id, name) VALUES (?, ?)", "insert", (False, False)),
        ("INSERT INTO users (id, name) VALUES (?, ?), (?, ?) RETURNING users.id", "insert", (False, False)),
        ("INSERT INTO users (name) SELECT t.name FROM t JOIN u ON t.id = u.id", "insert", (False, False)),
        ("/* c */ INSERT INTO users DEFAULT VALUES", "insert", (False, False)),
        ("INSERT INTO users (id) VALUES (%(id)s) ON CONFLICT DO NOTHING", "insert", (False, False)),
        ("INSERT OR REPLACE INTO users (id, name) VALUES (?, ?)", "insert", (True, True)),
        ("REPLACE INTO users (id, name) VALUES (%s, %s)", "insert", (True, True)),
        ("INSERT IGNORE INTO users (id) VALUES (%s)", "insert", (True, True)),
        (
            "WITH d AS (DELETE FROM t RETURNING id) INSERT INTO users (id) SELECT id FROM d",
            "insert",
            (True, True),
        ),
        (
            "INSERT INTO users (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            "insert",
            (False, True),
        ),
        (
            "INSERT INTO users (id) VALUES (%(id)s) ON CONFLICT ON CONSTRAINT pk\n do  update SET id = 2",
            "insert",
            (False, True),
        ),
        (
            "INSERT INTO users (id, name) VALUES (%s, %s) ON DUPLICATE KEY UPDATE name = VALUES(name)",
            "insert",
            (False, True),
        ),
    ],
)
def test_rows_changed(sql: str, kind: str, expected: tuple[bool, bool]) -> None:
    """Review q, h7: an INSERT or UPDATE with conflict handling may delete or update rows it does not
    name (and so run their FK actions); a plain INSERT, as the unit of work's, changes none."""
    assert rows_changed(sql, kind) == expected


def test_replaces_on_conflict() -> None:
    """A SQLite conflict clause of REPLACE on a table's constraint or column makes any write a delete."""
    md = MetaData()
    plain = Table(
        "plain", md, Column("id", Integer, primary_key=True), Column("code", String(5), unique=True)
    )
    by_column = Table(
        "by_column",
        md,
        Column("id", Integer, primary_key=True),
        Column("code", String(5), unique=True, sqlite_on_conflict_unique="REPLACE"),
    )
    by_pk = Table(
        "by_pk", md, Column("id", Integer, primary_key=True, sqlite_on_conflict_primary_key="replace")
    )
    by_constraint = Table(
        "by_constraint",
        md,
        Column("id", Integer, primary_key=True),
        Column("code", String(5)),
        UniqueConstraint("code", sqlite_on_conflict="REPLACE"),
    )
    ignoring = Table(
        "ignoring", md, Column("id", Integer, primary_key=True, sqlite_on_conflict_primary_key="IGNORE")
    )
    assert not replaces_on_conflict(plain) and not replaces_on_conflict(ignoring)
    assert (
        replaces_on_conflict(by_column)
        and replaces_on_conflict(by_pk)
        and replaces_on_conflict(by_constraint)
    )


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
