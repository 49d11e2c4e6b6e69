"""The wheel ships the Lua scripts, py.typed and every plugin as a top-level package; .ci/run runs the
README's test command verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path: Path) -> None:
    """Building the wheel includes every .lua file and py.typed."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("sqlcache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for lua in (ROOT / "sqlcache" / "lua").glob("*.lua"):
        assert f"sqlcache/lua/{lua.name}" in names
    assert "sqlcache/py.typed" in names
    for plugin in (ROOT / "plugins").iterdir():
        if (plugin / "__init__.py").exists():
            # each plugin is a top-level package of the wheel, typed
            assert f"{plugin.name}/__init__.py" in names
            assert f"{plugin.name}/py.typed" in names
    assert not any(n.startswith("plugins/") for n in names)


def test_ci_runs_readme_test_command() -> None:
    """The test command in README.md appears verbatim in .ci/run."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^# tests\n(.+)$", readme, re.M)
    assert m, "README.md must give the test command on the line after '# tests'"
    assert m.group(1).strip() in (ROOT / ".ci" / "run").read_text()
