"""Tokens: the names of locks (a writer's pre-commit lock, a fill's stampede lock), unique among every
process that shares a prefix.

128 random bits as 32 hex digits, from a generator of sqlcache's own: seeded from the operating system,
and again in every new process (a forked child would otherwise hand out its parent's tokens; the
process id is checked at each token rather than trusted to fork hooks, which uWSGI, for one, skips by
default), and out of reach of an application that seeds the ``random`` module for its own reasons.
``uuid.uuid4()`` asks the operating system at every call: a system call that took longer than the rest of
a commit's bookkeeping on a virtual machine (measured: 5-17 µs against under 1 µs).
"""

from __future__ import annotations

import os
import random

__all__ = ["new_token"]

_rng = random.Random(os.urandom(32))
_pid = os.getpid()


def new_token() -> str:
    """A fresh lock token."""
    global _pid
    pid = os.getpid()
    if pid != _pid:  # a new process: its own seed, never its parent's sequence
        _rng.seed(os.urandom(32))
        _pid = pid
    return f"{_rng.getrandbits(128):032x}"
