"""Group commit: many short write operations share one transaction.

Each fetched file ends with a small write.  With hundreds of small files finishing per
second, one transaction each makes the database round trips the bottleneck (and SQLite
has one connection).  Operations that arrive while a transaction is in flight wait and go
together in the next one, so batching needs no timer and adds no latency when idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db.session import SessionFactory

log = logging.getLogger(__name__)
T = TypeVar("T")
DRAIN_SECONDS = 10.0
Operation = Callable[[AsyncSession], Awaitable[Any]]


class GroupCommit:
    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions
        self._pending: list[tuple[Operation, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, operation: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Apply `operation` in the next shared transaction and return its result.

        The wait is shielded: a caller cancelled mid-way (a DELETE) does not withdraw a
        state change that may already be on its way to the database.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((operation, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="cartd-group-commit")
        return await asyncio.shield(future)

    async def drain(self) -> None:
        """Let the batch in flight finish before the engine goes away (shutdown)."""
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher], timeout=DRAIN_SECONDS)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._apply(batch)
            except Exception:
                log.warning("group commit of %d failed; retrying one by one", len(batch))
                for item in batch:
                    await self._apply_alone(*item)
                continue
            for (_operation, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _apply(self, batch: list[tuple[Operation, asyncio.Future[Any]]]) -> list[Any]:
        async with self.sessions.begin() as session:
            return [await operation(session) for operation, _future in batch]

    async def _apply_alone(self, operation: Operation, future: asyncio.Future[Any]) -> None:
        """One bad operation must not fail its neighbours: isolate it after a batch fails."""
        try:
            async with self.sessions.begin() as session:
                result = await operation(session)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)
