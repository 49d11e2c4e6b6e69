"""The shape of the package, read from its source: imports point one way, one module talks to Redis,
one module touches SQLAlchemy's private attributes, and no module reaches into another's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sqlcache"

# the commands (demo, bench, relay) talk to Redis and to the ORM's internals on purpose: the demo checks
# the Redis URL it is given, the benchmark's floor is a raw GET and a hand-built object
CLI = "sqlcache.cli"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> tuple[set[str], set[str], list[tuple[str, str]]]:
    """(modules imported at run time, modules imported for annotations only, (module, name) pairs of
    every ``from x import y``) of one module; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    runtime: set[str] = set()
    annotations: set[str] = set()
    names: list[tuple[str, str]] = []

    def visit(nodes: list[ast.stmt], into: set[str]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.body, annotations)
                visit(node.orelse, into)
                continue
            if isinstance(node, ast.Import):
                into.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                for a in node.names:
                    names.append((target, a.name))
                    # "from . import signals" imports the module sqlcache.signals
                    sub = f"{target}.{a.name}"
                    into.add(sub if sub in _modules() else target)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], into)

    visit(tree.body, runtime)
    return runtime, annotations, names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {
        name: {m for m in _imports(name, path)[0] if m in mods and m != name} for name, path in mods.items()
    }


def test_no_import_cycles() -> None:
    """No module of the package imports (at run time) a module that imports it back, however far."""
    graph = _graph()
    graph.pop("sqlcache")  # the package re-exports the public names; nothing imports it for them
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_parts_never_import_the_facade() -> None:
    """No part imports sqlcache.cache, not even for annotations: each receives the narrow interface it
    needs. (The public plugin module names the facade's type in annotations only.)"""
    for name, path in _modules().items():
        if name in ("sqlcache", "sqlcache.cache") or name.startswith(CLI):
            continue
        runtime, annotations, _ = _imports(name, path)
        assert "sqlcache.cache" not in runtime, name
        if name != "sqlcache.plugin":
            assert "sqlcache.cache" not in annotations, name


def test_only_the_stores_import_redis() -> None:
    """The one I/O seam: redis-py is imported at run time by the stores only, one per I/O world
    (sqlcache._store for sync code, sqlcache._astore for asyncio), the cluster's routers (sync and
    asyncio) and the local tier's tracking connections."""
    for name, path in _modules().items():
        if name in (
            "sqlcache._store",
            "sqlcache._storelate",
            "sqlcache._astore",
            "sqlcache._astorelate",
            "sqlcache._aclient",
            "sqlcache._cluster",
            "sqlcache._acluster",
            "sqlcache._shardstore",
            "sqlcache._shardsplit",
            "sqlcache._ashardstore",
            "sqlcache._tracking",
            "sqlcache._ctracking",
            "sqlcache._stracking",
            "sqlcache._pools",
        ) or name.startswith(CLI):
            continue
        runtime, _, _ = _imports(name, path)
        assert not any(m == "redis" or m.startswith("redis.") for m in runtime), name


def test_no_module_imports_another_modules_private_names() -> None:
    """``from sqlcache.x import _y`` nowhere: a private name stays in its module."""
    for name, path in _modules().items():
        for target, imported in _imports(name, path)[2]:
            if target.startswith("sqlcache") and imported.startswith("_") and imported != "__version__":
                assert f"{target}.{imported}" in _modules(), f"{name} imports {target}.{imported}"


def _imported_modules(tree: ast.Module) -> set[str]:
    """Names a module binds to sqlcache modules (``from . import _keys``, ``import sqlcache._x as y``)."""
    ours = {m.rpartition(".")[2] for m in _modules()}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("sqlcache")):
            out.update(a.asname or a.name for a in node.names if a.name in ours)
        elif isinstance(node, ast.Import):
            out.update(a.asname for a in node.names if a.asname and a.name.startswith("sqlcache"))
    return out


def _private_attributes(path: Path) -> list[tuple[int, str]]:
    """``x._name`` and ``getattr(x, "_name")`` (not on ``self``, not a dunder, not on one of our own
    modules imported here) in one file."""
    tree = ast.parse(path.read_text())
    modules = _imported_modules(tree)
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
            and not node.args[1].value.startswith("__")
        ):
            out.append((node.lineno, node.args[1].value))
            continue
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__"):
            continue
        value = node.value
        if isinstance(value, ast.Name) and (value.id in ("self", "cls") or value.id in modules):
            continue
        out.append((node.lineno, attr))
    return out


# redis-py's private names, each used in one place: a connection's socket and parser (_pools.Wire)
REDIS_PY_PRIVATE = {"sqlcache._pools": {"_sock", "_parser", "_writer"}}


def test_private_sqlalchemy_attributes_live_in_two_modules() -> None:
    """Only sqlcache._sa and sqlcache._sabuild touch underscored attributes of objects they did not
    define (SQLAlchemy's); elsewhere an underscored attribute is the module's own or its class's own (or
    one of redis-py's listed in REDIS_PY_PRIVATE)."""
    found = {}
    for name, path in _modules().items():
        if name in ("sqlcache._sa", "sqlcache._sabuild") or name.startswith(CLI):
            continue
        own = (
            {
                n.name
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            }
            | _assigned_attributes(path)
            | REDIS_PY_PRIVATE.get(name, set())
        )
        bad = [(line, attr) for line, attr in _private_attributes(path) if attr not in own]
        if bad:
            found[name] = bad
    assert not found, found


def _assigned_attributes(path: Path) -> set[str]:
    """Attribute names a module's own classes assign (``self._x = ...``) or declare in ``__slots__``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            out.update(
                e.value
                for e in ast.walk(node.value)
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return out


def test_plugins_use_public_names_only() -> None:
    """First-party plugins import sqlcache's public modules only, never ``sqlcache._anything``."""
    plugins = PACKAGE.parent / "plugins"
    for path in sorted(plugins.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                assert not (parts[0] == "sqlcache" and any(p.startswith("_") for p in parts[1:])), (path, n)


def test_cli_is_not_loaded_by_import() -> None:
    """``import sqlcache`` loads neither the commands nor their dependencies."""
    import subprocess
    import sys

    code = "import sys, sqlcache; print(sorted(m for m in sys.modules if m.startswith('sqlcache.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
