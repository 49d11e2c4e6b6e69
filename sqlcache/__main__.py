"""``python -m sqlcache``: the command line of ``sqlcache.cli``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        # a Ctrl-C that reached the top after a command's own handling (the demo reports its own and
        # returns 130; one delivered late, once its handler was put back, lands here): no traceback,
        # and the shell's code for an interrupted command
        code = 130
    sys.exit(code)
