"""Deterministic race drivers for asyncio: pause one task right after a given SELECT, let others run,
resume. The pause happens in SQLAlchemy's greenlet, awaiting an asyncio.Event on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import concurrency

# SQLAlchemy 2.0 calls it await_only, 2.1 await_
await_ = getattr(concurrency, "await_", None) or concurrency.await_only


class TaskGate:
    """Blocks ``task`` after its next matching SELECT until ``resume()``."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self._resume = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None

    def resume(self) -> None:
        self._resume.set()

    async def wait_paused(self, timeout: float = 20) -> None:
        await asyncio.wait_for(self.paused.wait(), timeout)

    def block(self) -> None:
        self.paused.set()
        await_(asyncio.wait_for(self._resume.wait(), 30))


@asynccontextmanager
async def pause_after_select(aengine: AsyncEngine, table: str) -> AsyncIterator[TaskGate]:
    gate = TaskGate()
    fired = False

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal fired
        if (
            gate.task is not None
            and asyncio.current_task() is gate.task
            and not fired
            and statement.lstrip().upper().startswith("SELECT")
            and table in statement
        ):
            fired = True
            gate.block()

    event.listen(aengine.sync_engine, "after_cursor_execute", after)
    try:
        yield gate
    finally:
        gate.resume()
        event.remove(aengine.sync_engine, "after_cursor_execute", after)
