"""The benchmark's direct-read rows (issue 13): ``cache.get`` and ``cache.get_many`` hits beside
``Session.get`` hits, on the same engine, cache and entries as the single server's rows.

- ``direct get hit``: a Session opened, ``cache.get`` of one row, the Session closed (as ``get
  sqlcache hit`` does with ``Session.get``);
- ``direct get hit, open session``: ``cache.get`` of one row in a Session already open, its
  transaction begun but holding no database connection yet (a request's second read, before any
  SQL): what opening and closing the Session costs of the row above; the Session is opened and closed
  outside the timed part;
- ``get_many 50 hit``: ``cache.get_many`` of 50 rows in one Session;
- ``50 get hits``: the N+1 loop it replaces, ``Session.get`` of the same 50 rows in one Session.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

__all__ = ["direct_rows"]

MANY = 50


def direct_rows(
    engine: Engine, cache: SQLCache, model: type[Any], rnd: random.Random, ids: list[int]
) -> dict[str, Callable[[], int]]:
    """Each row measured: one call runs one operation and returns its nanoseconds."""

    def get() -> int:
        key = rnd.choice(ids)
        t0 = time.perf_counter_ns()
        with Session(engine) as s:
            cache.get(s, model, key)
        return time.perf_counter_ns() - t0

    def get_open() -> int:
        key = rnd.choice(ids)
        with Session(engine) as s:
            s.begin()  # open, its transaction begun, as a request's is by its second read
            t0 = time.perf_counter_ns()
            cache.get(s, model, key)
            return time.perf_counter_ns() - t0  # closed outside the timed part

    def many(direct: bool) -> Callable[[], int]:
        def op() -> int:
            keys = rnd.sample(ids, min(MANY, len(ids)))
            t0 = time.perf_counter_ns()
            with Session(engine) as s:
                if direct:
                    got = cache.get_many(s, model, keys)
                else:
                    got = [s.get(model, k) for k in keys]
            elapsed = time.perf_counter_ns() - t0
            assert all(o is not None for o in got)
            return elapsed

        return op

    return {
        "direct get hit": get,
        "direct get hit, open session": get_open,
        "get_many 50 hit": many(True),
        "50 get hits": many(False),
    }
