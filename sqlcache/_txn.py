"""What one database transaction wrote, and which tables a statement writes. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ForeignKey, MetaData, Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase

from . import _keys, _sa

if TYPE_CHECKING:
    from sqlalchemy.engine.default import DefaultExecutionContext
    from sqlalchemy.orm import InstanceState

    from ._hierarchy import Hierarchy
    from ._keys import Layout
    from ._protocol import Clock

__all__ = [
    "FkIndex",
    "IdentityWrite",
    "ScopeChange",
    "TxnState",
    "cascade_targets",
    "coarse_keys",
    "dml_tables",
    "fk_actions",
    "is_write_sql",
    "nested_dml_tables",
    "reached",
    "replaces_on_conflict",
    "rows_changed",
    "scope_changes",
]

# Text SQL is parsed only far enough to tell a read from a write; a write we cannot attribute to a
# table invalidates everything (the d:* dependency), which is always safe.
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_READ_VERBS = frozenset(
    {
        "select",
        "show",
        "explain",
        "describe",
        "desc",
        "values",
        "table",
        "pragma",
        "set",
        "begin",
        "start",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "end",
        "fetch",
        "declare",
        "close",
        "listen",
        "unlisten",
        "notify",
        "reset",
        "discard",
        "prepare",
        "deallocate",
        "use",
        "analyze",
        "vacuum",
        "checkpoint",
    }
)
_DML_WORD = re.compile(r"\b(insert|update|delete|merge|replace|truncate)\b", re.I)


# literals, quoted names and comments, which may hold a ";" that ends nothing
_QUOTED_OR_COMMENT = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|--[^\n]*|/\*.*?\*/", re.S)


def is_write_sql(sql: str) -> bool:
    """True unless ``sql`` is recognisably a read (or transaction control) statement. A string of
    several statements (``SELECT 1; DELETE FROM users``, which some drivers run) counts as a write
    unless every statement in it is a read."""
    if ";" in sql:
        statements = [s for s in _QUOTED_OR_COMMENT.sub(" ", sql).split(";") if s.strip()]
        if len(statements) > 1:
            return any(_is_write_statement(s) for s in statements)
    return _is_write_statement(sql)


def _is_write_statement(sql: str) -> bool:
    m = _LEADING_COMMENTS.match(sql)
    rest = sql[m.end() if m else 0 :]
    word = re.match(r"[A-Za-z]+", rest)
    if word is None:
        return bool(rest.strip())
    verb = word.group(0).lower()
    if verb == "with":  # a CTE may hide a data-modifying statement
        return _DML_WORD.search(rest) is not None
    if verb == "pragma":  # SQLite: "PRAGMA x = y" changes state, "PRAGMA x" / "PRAGMA x(y)" reads
        return "=" in rest
    if verb in _RUNS_WHAT_FOLLOWS:
        return _runs_a_write(verb, _QUOTED_OR_COMMENT.sub(" ", rest))
    return verb not in _READ_VERBS


# Read verbs that may run a statement after all (rare: their text is cleaned of comments and quotes,
# then looked at further):
# - EXPLAIN (DESCRIBE / DESC in MySQL) with ANALYZE runs the statement it explains (PostgreSQL
#   "EXPLAIN ANALYZE [VERBOSE] stmt" or "EXPLAIN (ANALYZE, ...) stmt", ANALYSE spelled either way;
#   MySQL 8 "EXPLAIN ANALYZE [FORMAT=TREE] stmt"): it is the write that statement is. Without
#   ANALYZE it only plans it (SQLite's EXPLAIN [QUERY PLAN] too).
# - ANALYZE followed by a statement runs it (MariaDB "ANALYZE [FORMAT=JSON] stmt"); ANALYZE of a
#   table gathers statistics (PostgreSQL, MySQL: "ANALYZE [VERBOSE] t", "ANALYZE TABLE t").
# - BEGIN NOT ATOMIC ... END is a MariaDB compound statement, which may run anything; any other
#   BEGIN starts a transaction.
_RUNS_WHAT_FOLLOWS = frozenset({"explain", "describe", "desc", "analyze", "analyse", "begin"})
_ANALYZE_WORD = re.compile(r"\banaly[sz]e\b", re.I)
_OPTIONS = re.compile(
    r"[a-z]+\s*(?P<paren>\([^)]*\))?"
    r"(?P<words>(?:\s*(?:analy[sz]e|verbose|extended|partitions|query\s+plan|format\s*=?\s*\w+)\b)*)\s*",
    re.I,
)
# what MariaDB's ANALYZE runs (anything else after ANALYZE names tables)
_STATEMENT_VERBS = frozenset({"select", "insert", "update", "delete", "replace", "with", "values"})
_NOT_ATOMIC = re.compile(r"begin\s+not\s+atomic\b", re.I)


def _runs_a_write(verb: str, cleaned: str) -> bool:
    if verb == "begin":
        return _NOT_ATOMIC.match(cleaned) is not None
    m = _OPTIONS.match(cleaned)
    assert m is not None  # it starts with the verb
    statement = cleaned[m.end() :]
    if verb in ("analyze", "analyse"):
        first = re.match(r"[A-Za-z]+", statement)
        if first is None or first.group(0).lower() not in _STATEMENT_VERBS:
            return False  # statistics of tables
        return _is_write_statement(statement)
    if _ANALYZE_WORD.search(m.group("paren") or "") or _ANALYZE_WORD.search(m.group("words")):
        return _is_write_statement(statement)
    return False  # EXPLAIN without ANALYZE: planned, not run


# -- statements that change what an unqualified name (or a row-security policy) resolves to -------
#
# A statement's text is the same for every tenant; what it reads is not, once a connection has run
# one of these. Recognised: PostgreSQL SET [SESSION | LOCAL] search_path / SCHEMA / ROLE / SESSION
# AUTHORIZATION / a custom setting (a dotted name: ``app.tenant``, what row-level security policies
# read), set_config() in any statement, RESET of those, RESET ALL, DISCARD ALL; MySQL / MariaDB USE.
# Other settings (timeouts, work_mem, NAMES, isolation) do not change which rows a statement returns.

_SCOPE_VERB = re.compile(r"(set|reset|discard|use)\b", re.I)
_NAME = r'"?[A-Za-z_][\w$]*"?(?:\."?[A-Za-z_][\w$]*"?)?'
_SET = re.compile(
    rf"set\s+(?:(session|local)\s+(?!authorization\b))?(session\s+authorization|{_NAME})\s*(?:(?:to|=)\s*)?(\S*)",
    re.I,
)
_RESET = re.compile(rf"reset\s+(session\s+authorization|{_NAME})\s*;?\s*$", re.I)
_DISCARD_ALL = re.compile(r"discard\s+all\s*;?\s*$", re.I)
_USE = re.compile(r"use\s+(`[^`]+`|[\w$]+)\s*;?\s*$", re.I)
_SET_CONFIG = re.compile(r"\bset_config\s*\(", re.I)
_CONFIG_GATE = re.compile(r"_[cC][oO][nN][fF][iI][gG]")  # a literal first character: a fast scan
_SET_CONFIG_CALL = re.compile(
    r"set_config\s*\(\s*(?:'([^']*)'\s*,\s*(?:'[^']*'|%\(\w+\)s|%s|\?|:\w+|\$\d+)\s*,\s*(true)\s*\)|'([^']*)')?",
    re.I,
)
_TRACKED = frozenset({"search_path", "role", "session_authorization"})
_RESET_ALL = "all"  # RESET ALL: every setting but role and session authorization (PostgreSQL's rule)
_EVERYTHING = "*"  # DISCARD ALL resets it; set_config() of a name we cannot read sets it


@dataclass(frozen=True)
class ScopeChange:
    """One statement's effect on name resolution: ``setting`` (``search_path``, ``role``,
    ``session_authorization``, ``database``, a custom ``a.b``, ``all`` for RESET ALL, ``*``) is set
    (``reset`` False; ``local``: until the transaction ends) or back at the connection's default
    (``reset`` True). ``value``: USE's database."""

    setting: str
    local: bool = False
    reset: bool = False
    value: str | None = None


def _setting(name: str) -> str:
    name = re.sub(r"\s+", "_", name.replace('"', "").lower())
    return "search_path" if name == "schema" else name


def _tracked(setting: str) -> bool:
    return setting in _TRACKED or "." in setting


def _one(part: str, alone: bool) -> list[ScopeChange]:
    m = _LEADING_COMMENTS.match(part)
    rest = part[m.end() if m else 0 :]
    out: list[ScopeChange] = []
    verb = _SCOPE_VERB.match(rest)
    if verb is not None:
        word = verb.group(1).lower()
        if word == "set":
            s = _SET.match(rest)
            if s is not None:
                setting = _setting(s.group(2))
                if _tracked(setting):
                    value = s.group(3).strip("'\";").lower()
                    default = value == "default" or (setting == "role" and value == "none")
                    local = (s.group(1) or "").lower() == "local"
                    # a reset only counts when it is the whole statement (a SET in a batch marks)
                    out.append(ScopeChange(setting, local, default and alone and not local))
        elif word == "reset" and alone:
            r = _RESET.match(rest)
            if r is not None:
                out.append(ScopeChange(_setting(r.group(1)), reset=True))
        elif word == "discard" and alone:
            if _DISCARD_ALL.match(rest):
                out.append(ScopeChange(_EVERYTHING, reset=True))
        elif word == "use":
            # USE of the engine's own database puts it back: the caller knows which one that is
            u = _USE.match(rest)
            out.append(ScopeChange("database", value=u.group(1).strip("`") if u and alone else None))
    for c in _SET_CONFIG.finditer(rest) if _CONFIG_GATE.search(rest) else ():
        call = _SET_CONFIG_CALL.match(rest, c.start())
        name = call.group(1) or call.group(3) if call is not None else None
        local = call is not None and call.group(2) is not None
        # a name we cannot read (a bound parameter, an expression) may be any setting
        out.append(ScopeChange(_setting(name) if name else _EVERYTHING, local))
    return [x for x in out if _tracked(x.setting) or x.setting in ("database", _RESET_ALL, _EVERYTHING)]


def scope_changes(sql: str) -> list[ScopeChange]:
    """What ``sql`` does to name resolution on its connection; [] for nearly every statement."""
    if ";" not in sql.rstrip().rstrip(";"):
        return _one(sql, True)
    # several statements in one string (psycopg2 allows it): each one's marks count, resets do not
    out: list[ScopeChange] = []
    for part in sql.split(";"):
        out += [c for c in _one(part, False) if not c.reset]
    return out


def dml_tables(context: DefaultExecutionContext) -> list[Table]:
    """The tables a compiled INSERT/UPDATE/DELETE writes (its target table)."""
    stmt: Any = getattr(context.compiled, "statement", None)
    return _target_tables(getattr(stmt, "table", None))


def nested_dml_tables(context: DefaultExecutionContext) -> list[Table]:
    """The targets of the INSERT/UPDATE/DELETE statements nested in a compiled DML statement (a
    data-modifying CTE, PostgreSQL's ``WITH gone AS (DELETE FROM things ... RETURNING id) INSERT INTO
    log SELECT id FROM gone``). Walked only when the SQL holds a second DML verb."""
    compiled = context.compiled
    sql = getattr(compiled, "string", "")
    if not isinstance(sql, str) or len(_DML_VERB.findall(sql)) < 2:
        return []
    stmt: Any = getattr(compiled, "statement", None)
    out: list[Table] = []
    for element in visitors.iterate(stmt):
        if element is not stmt and isinstance(element, UpdateBase):
            out.extend(t for t in _target_tables(getattr(element, "table", None)) if t not in out)
    return out


_DML_VERB = re.compile(r"\b(?:INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def _target_tables(table: Any) -> list[Table]:
    """The tables of a DML target: a Table, or every table an alias or join names."""
    if isinstance(table, Table):
        return [table]
    out: list[Table] = []
    if table is not None:
        for t in _sa.from_objects(table, ()):
            out.extend(x for x in _sa.from_objects(t, (t,)) if isinstance(x, Table))
    return out


_CASCADING = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})


def _action(value: object) -> str | None:
    """An FK action the database runs itself (normalised), or None (NO ACTION, RESTRICT, none)."""
    if isinstance(value, str):
        action = " ".join(value.upper().split())
        if action in _CASCADING:
            return action
    return None


#: FK actions by the full name of the table they start from: (child table, its ON DELETE action, its
#: ON UPDATE action), either None when it has none
FkIndex = dict[str, list[tuple[Table, str | None, str | None]]]


def _referred_table_name(fk: ForeignKey) -> str | None:
    """The full name of the table ``fk`` refers to, resolved or not (None: not known)."""
    try:
        return str(fk.column.table.fullname)
    except SQLAlchemyError:  # the referred table is not (yet) in the MetaData: its name as written
        key = getattr(fk, "target_table_key", None)  # SQLAlchemy 2.1
        if isinstance(key, str):
            return key
        try:
            return fk.target_fullname.rsplit(".", 1)[0]
        except SQLAlchemyError:
            return None


def fk_actions(metadatas: Iterable[MetaData]) -> tuple[FkIndex, list[MetaData]]:
    """Every FK action declared in ``metadatas``, by the referred table's full name, and the MetaData
    of the referred tables (where further actions leading to those tables are declared)."""
    index: FkIndex = {}
    referred: dict[int, MetaData] = {}
    for md in metadatas:
        for table in list(md.tables.values()):
            for fk in list(table.foreign_keys):
                on_delete, on_update = _action(fk.ondelete), _action(fk.onupdate)
                if on_delete is None and on_update is None:
                    continue
                name = _referred_table_name(fk)
                if name is None:
                    continue
                index.setdefault(name, []).append((table, on_delete, on_update))
                try:
                    parent = fk.column.table.metadata
                except SQLAlchemyError:
                    continue
                if parent is not None:
                    referred[id(parent)] = parent
    return index, list(referred.values())


def reached(index: FkIndex, name: str, deleted: bool, updated: bool) -> set[Table]:
    """Tables FK actions change, directly or through further actions, when rows of the table named
    ``name`` are deleted (``deleted``) or updated (``updated``). A child whose rows an action deletes
    (ON DELETE CASCADE) passes deletes on; one whose rows it updates (SET NULL, SET DEFAULT, ON UPDATE
    CASCADE) passes updates on. The table itself is among them when actions lead back to it (a tree's
    ON DELETE CASCADE to its own rows): other rows of it change than the statement names."""
    out: dict[str, Table] = {}
    todo = [(name, True)] if deleted else []
    if updated:
        todo.append((name, False))
    seen: set[tuple[str, bool]] = set()
    while todo:
        step = todo.pop()
        if step in seen:
            continue
        seen.add(step)
        parent, deleting = step
        for child, on_delete, on_update in index.get(parent, ()):
            action = on_delete if deleting else on_update
            if action is None:
                continue
            out[child.fullname] = child
            todo.append((child.fullname, deleting and action == "CASCADE"))
    return set(out.values())


# An INSERT or UPDATE with conflict handling may delete or update rows of its table other than those
# it names, and so run the FK actions of their children: SQLite INSERT / UPDATE OR REPLACE and MySQL
# REPLACE delete the rows they conflict with (MySQL may do it as an update), ON CONFLICT DO UPDATE and
# ON DUPLICATE KEY UPDATE update them. SQLAlchemy renders a plain INSERT as "INSERT INTO" and a
# plain UPDATE as "UPDATE <table>"; any other start (a prefix, a CTE, a construct compiled its own
# way) counts as possibly both.
_PLAIN_INSERT = re.compile(r"INSERT\s+INTO\s", re.I)
_PLAIN_UPDATE = re.compile(r"UPDATE(?!\s+OR\s)\s", re.I)
_UPDATES_ON_CONFLICT = re.compile(r"\b(?:ON\s+DUPLICATE\s+KEY|DO)\s+UPDATE\b", re.I)


def rows_changed(sql: str, kind: str) -> tuple[bool, bool]:
    """Whether a DML statement of ``kind`` (``insert``, ``update``, ``delete``) may delete, and whether
    it may update, rows already in its table, as FK actions see them; (False, False) for a plain INSERT.
    """
    if kind == "delete":
        return True, False
    m = _LEADING_COMMENTS.match(sql)
    start = m.end() if m else 0
    if kind == "update":
        return _PLAIN_UPDATE.match(sql, start) is None, True
    if _PLAIN_INSERT.match(sql, start) is None:
        return True, True
    # ON CONFLICT DO NOTHING changes nothing; a literal or name holding these words only costs more
    return False, _UPDATES_ON_CONFLICT.search(sql, start) is not None


def replaces_on_conflict(table: Table) -> bool:
    """Whether SQLite resolves a conflict on one of ``table``'s constraints by REPLACE (declared with
    ``sqlite_on_conflict``): any INSERT or UPDATE of it may delete rows."""
    for c in table.constraints:
        if str(c.dialect_kwargs.get("sqlite_on_conflict", "")).upper() == "REPLACE":
            return True
    for col in table.columns:
        for name in ("sqlite_on_conflict_primary_key", "sqlite_on_conflict_unique"):
            if str(col.dialect_kwargs.get(name, "")).upper() == "REPLACE":
                return True
    return False


def cascade_targets(table: Table, deleted: bool, updated: bool, among: Iterable[MetaData] = ()) -> set[Table]:
    """Tables the database itself may change when rows of ``table`` are deleted or updated (FK actions
    declared in its MetaData or in ``among``). Tables are matched by full name (the ORM's statements
    name an annotated copy of the table; another MetaData may declare its own copy)."""
    index, _ = fk_actions({id(md): md for md in (table.metadata, *among)}.values())
    return reached(index, table.fullname, deleted, updated)


@dataclass(eq=False)
class IdentityWrite:
    """One row the unit of work wrote: its hierarchy, primary key and, for repopulation, its state."""

    hierarchy: Hierarchy
    pk: tuple[Any, ...]
    state: InstanceState[Any] | None  # None once deleted
    cls: type[Any] | None  # None: written through an unregistered class of the hierarchy
    # the instance itself, held until commit: the identity map holds clean objects only weakly, and the
    # repopulated entry is encoded from the instance's state at the pre-commit point
    obj: Any = None
    # the columns this transaction's UPDATEs wrote, each stored exactly as assigned (Commits._written);
    # None: the row's new state is not known without reading it back (no repopulation)
    written: set[str] | None = None


@dataclass(eq=False)
class TxnState:
    """Writes of one database transaction on one connection, and its snapshot clock."""

    identities: dict[str, IdentityWrite] = field(default_factory=dict)  # identity dep key -> write
    tables: dict[str, Table] = field(default_factory=dict)  # every table written
    bulk: dict[str, Table] = field(default_factory=dict)  # tables written by statements, rows unknown
    everything: bool = False  # a write we could not attribute to a table
    began_sql: bool = False  # a statement ran: the database snapshot may already be fixed
    clock0: Clock | None = None  # invalidation clock read before the first statement
    outbox: Any = None  # durable: (relay, row id) of the outbox row already written (AUTOCOMMIT)
    translated: bool = False  # a write ran under a schema_translate_map

    def wrote_anything(self) -> bool:
        return bool(self.identities or self.tables or self.everything)


def coarse_keys(layout: Layout, st: TxnState) -> list[str]:
    """Table-wide dependency keys covering everything ``st`` wrote: a few keys however many rows (a
    huge transaction's release, a bounded outbox row). Coarser, never weaker: every identity entry
    depends on its tables' bulk keys, every query on its tables' keys."""
    if st.everything:
        return list(layout.everything)
    tables = set(st.tables) | set(st.bulk)
    for w in st.identities.values():
        tables.update(w.hierarchy.tables)
    out = []
    for name in sorted(tables):
        p = layout.at(name)
        out += [_keys.bulk_dep_key(p, name), _keys.table_dep_key(p, name)]
    return out
