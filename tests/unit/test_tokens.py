"""Lock tokens never repeat across processes, even in a child forked without Python's fork hooks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sqlcache._tokens import new_token


def test_tokens_are_32_hex_digits_and_distinct() -> None:
    tokens = [new_token() for _ in range(10_000)]
    assert len(set(tokens)) == len(tokens)
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)


def test_seeding_the_random_module_does_not_repeat_tokens() -> None:
    import random

    random.seed(7)
    a = new_token()
    random.seed(7)
    assert new_token() != a


_FORKED_WITHOUT_HOOKS = """
import ctypes, os, sys
from sqlcache._tokens import new_token

new_token()
r, w = os.pipe()
# PyDLL keeps the GIL across the call: the child resumes as the only thread, holding it
pid = ctypes.PyDLL(None).fork()
if pid == 0:  # the child: write its next two tokens, and leave at once
    try:
        os.write(w, (new_token() + new_token()).encode())
    finally:
        os._exit(0)
os.close(w)
os.waitpid(pid, 0)
sys.stdout.write(os.read(r, 64).decode() + " " + new_token() + new_token())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc fork through ctypes")
def test_a_child_forked_without_fork_hooks_draws_its_own_tokens() -> None:
    """uWSGI forks its workers without running Python's at-fork hooks (py-call-osafterfork off): the
    child must not hand out the tokens its parent will.

    The fork happens in an interpreter of its own with one thread, as in a prefork server's master: a
    libc fork in this process, with the threads earlier tests left running, can leave the child waiting
    for a GIL held by a thread that did not survive the fork (the parent then waited for ever)."""
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_WITHOUT_HOOKS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    child, parent = done.stdout.split(" ")
    assert len(child) == 64 and len(parent) == 64
    assert child != parent
