"""Threads reading and writing at random: no read that started after a commit returned sees older data."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..models import User

pytestmark = pytest.mark.concurrency

ROWS = 8
SECONDS = 2.0


@pytest.mark.parametrize("mode", ["invalidate", "repopulate"])
def test_random_reads_and_writes(engine: Engine, cache: SQLCache, mode: str) -> None:
    """No reader sees a version older than the last commit before it started; Redis ends equal to the DB."""
    cache.register(User, mode=mode)  # type: ignore[arg-type]
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}", version=0) for i in range(1, ROWS + 1)])
        s.commit()
    committed = dict.fromkeys(range(1, ROWS + 1), 0)
    lock = threading.Lock()
    violations: list[str] = []
    errors: list[BaseException] = []
    counts = {"reads": 0, "writes": 0}
    stop = time.monotonic() + SECONDS
    sqlite = engine.dialect.name == "sqlite"

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                uid = rnd.randint(1, ROWS)
                with Session(engine) as s:
                    if rnd.random() < 0.7:
                        u = s.get(User, uid, with_for_update=not sqlite)
                        u.version += 1
                        v = u.version
                        s.commit()
                    else:
                        s.execute(update(User).where(User.id == uid).values(version=User.version + 1))
                        v = s.get(User, uid).version
                        s.commit()
                with lock:
                    committed[uid] = max(committed[uid], v)
                    counts["writes"] += 1
        except BaseException as exc:
            errors.append(exc)

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                uid = rnd.randint(1, ROWS)
                with lock:
                    floor = committed[uid]
                with Session(engine) as s:
                    v = s.get(User, uid).version
                if v < floor:
                    violations.append(f"user {uid}: read version {v} after version {floor} was committed")
                with lock:
                    counts["reads"] += 1
        except BaseException as exc:
            errors.append(exc)

    writers = 1 if sqlite else 2
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not violations, violations[:5]
    assert counts["reads"] > 50 and counts["writes"] > 5, counts
    for uid in range(1, ROWS + 1):
        with Session(engine) as s:
            truth = s.get(User, uid, populate_existing=True).version
        with Session(engine) as s:
            assert s.get(User, uid).version == truth
    assert cache.stats()["hits"] > 0
