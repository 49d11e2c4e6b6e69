"""A complete small plugin: slow-operation logging and a per-model hit ratio, in one file.

Run with a Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL overrides).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache, signals
from sqlcache.plugin import Operation, PluginHost


class HitRatioPlugin:
    """Counts identity reads per model and result; logs any cache operation slower than ``slow_ms``."""

    name = "hit-ratio"

    def __init__(self, slow_ms: float = 50.0) -> None:
        self.slow_ms = slow_ms
        self.results: Counter[tuple[str, str]] = Counter()
        self.invalidations = 0
        self.slow: list[tuple[str, float]] = []

    def setup(self, host: PluginHost) -> None:
        # everything added through the host is removed by the host itself when the plugin goes
        host.add_operation_hook(self._timed)
        host.connect(signals.invalidated, self._on_invalidated)

    def close(self) -> None:
        self.results.clear()  # nothing else to undo: the host disconnected the hook and the receiver

    @contextmanager
    def _timed(self, op: Operation) -> Iterator[None]:
        start = time.perf_counter()
        yield  # the operation runs here; op.result is set when we resume
        elapsed_ms = (time.perf_counter() - start) * 1000
        if op.name == "read" and op.model is not None and op.result is not None:
            self.results[(op.model, op.result)] += 1
        if elapsed_ms > self.slow_ms:
            self.slow.append((op.name, elapsed_ms))

    def _on_invalidated(self, sender: SQLCache, **kwargs: Any) -> None:
        self.invalidations += 1

    def ratio(self, model: str) -> float:
        hits = self.results[(model, "hit")]
        total = hits + self.results[(model, "miss")]
        return hits / total if total else 0.0


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_plugin_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "example.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    plugin = HitRatioPlugin()
    redis_url = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
    cache = SQLCache(redis_url, prefix="example-plugin", plugins=[plugin])
    cache.attach(engine)
    cache.register(User)
    with Session(engine) as s:
        s.add(User(id=1, name="ann"))
        s.commit()
    cache.clear()

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(engine) as s:
        s.get(User, 1)  # miss
    statements.clear()
    for _ in range(3):
        with Session(engine) as s:
            s.get(User, 1)  # hits
    print("hits sent", len(statements), "SQL statements")
    with Session(engine) as s:
        user = s.get(User, 1)  # a fourth hit
        assert user is not None
        user.name = "bob"
        s.commit()  # the second commit heard (the insert was the first)
    print("User hit ratio:", round(plugin.ratio("User"), 2), "- invalidations heard:", plugin.invalidations)
    assert plugin.ratio("User") == 0.8 and plugin.invalidations == 2
    cache.clear()
    cache.close()  # closes the plugin too


if __name__ == "__main__":
    main()
