"""Lock tokens never repeat across processes, even in a child forked without Python's fork hooks."""

from __future__ import annotations

import ctypes
import os
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc fork through ctypes")
def test_a_child_forked_without_fork_hooks_draws_its_own_tokens() -> None:
    """uWSGI forks its workers without running Python's at-fork hooks (py-call-osafterfork off): the
    child must not hand out the tokens its parent will."""
    libc = ctypes.CDLL(None)
    r, w = os.pipe()
    new_token()
    pid = libc.fork()
    if pid == 0:  # the child: write its next two tokens, and leave at once
        try:
            os.write(w, (new_token() + new_token()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    os.close(r)
    assert len(child) == 64
    assert child != new_token() + new_token()
