"""Plugins are top-level packages under ``<repo>/plugins`` (as the wheel installs them): import them."""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGINS = str(Path(__file__).resolve().parents[2] / "plugins")
if _PLUGINS not in sys.path:
    sys.path.insert(0, _PLUGINS)
