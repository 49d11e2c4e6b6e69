"""MkDocs hooks of the documentation site (docs/mkdocs.yml): the runnable examples published with it, and
the reST the API's docstrings are written in shown as text rather than as markup.

The examples live in docs/examples/, beside the pages' folder, where the test suite runs them and where
a page's ``../examples/x.py`` link finds them in a checkout; on the site they are copied to
``examples/x.py`` and those links are rewritten to point there, so the strict build checks them too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

EXAMPLES = Path(__file__).resolve().parent / "examples"
_LINK = re.compile(r"\]\(\.\./examples/")
# mkdocstrings reads the docstrings' reST fields (:param:, :raises:) but leaves roles and directives
_ROLE = re.compile(r":(?:class|meth|func|data|attr|exc|mod|obj):<code>(~?)([^<]*)</code>")
_ADDED = re.compile(r"\.\. versionadded:: ([0-9.]+)")
_CHANGED = re.compile(r"\.\. versionchanged:: ([0-9.]+)\s*")


def on_files(files: Files, config: Any) -> Files:
    """Each docs/examples/*.py published as examples/<name>.py."""
    for source in sorted(EXAMPLES.glob("*.py")):
        files.append(
            File(
                f"examples/{source.name}",
                src_dir=str(EXAMPLES.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """A page's ``../examples/x.py`` link (right in a checkout) pointed at the published copy."""
    return _LINK.sub("](examples/", markdown)


def _role(m: re.Match[str]) -> str:
    name = re.sub(r"\s*&lt;.*&gt;$", "", m.group(2))  # :meth:`title <target>`: the title
    return f"<code>{name.rsplit('.', 1)[-1] if m.group(1) else name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """``:meth:`X``` shown as ``X`` (``~a.b.X`` as ``X``, as Sphinx does), ``.. versionadded:: N`` as text."""
    html = _ROLE.sub(_role, html)
    html = _ADDED.sub(r"<em>New in version \1.</em>", html)
    return _CHANGED.sub(r"<em>Changed in version \1:</em> ", html)
