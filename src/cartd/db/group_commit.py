"""Group commit: many short write operations share one transaction.

Each fetched file ends with a small write.  With hundreds of small files finishing per
second, one transaction each makes the database round trips the bottleneck (and SQLite
has one connection).  Operations that arrive while a transaction is in flight wait and go
together in the next one, so batching needs no timer and adds no latency when idle.
Writes of one kind can also share their statements (`run_together`): a batch of staged
files is then one executemany rather than a few statements per file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db.session import SessionFactory

log = logging.getLogger(__name__)
T = TypeVar("T")
ItemT = TypeVar("ItemT")
DRAIN_SECONDS = 10.0
Operation = Callable[[AsyncSession], Awaitable[Any]]
# Applies several items in one go; returns one result per item, in order.
Together = Callable[[AsyncSession, Sequence[ItemT]], Awaitable[list[T]]]


@dataclass(frozen=True)
class _Joint(Generic[ItemT]):
    """An item applied together with its batch-mates of the same `together`."""

    together: Together[ItemT, Any]
    item: ItemT


Pending = Operation | _Joint[Any]


async def _run_all(session: AsyncSession, operations: Sequence[Pending]) -> list[Any]:
    """Plain operations in order, then each kind of joint item in one call."""
    results: list[Any] = [None] * len(operations)
    joints: dict[Together[Any, Any], list[int]] = {}
    for index, operation in enumerate(operations):
        if isinstance(operation, _Joint):
            joints.setdefault(operation.together, []).append(index)
        else:
            results[index] = await operation(session)
    for together, indexes in joints.items():
        items = [operations[i].item for i in indexes]  # type: ignore[union-attr]
        for index, result in zip(indexes, await together(session, items), strict=True):
            results[index] = result
    return results


class GroupCommit:
    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions
        self._pending: list[tuple[Pending, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, operation: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Apply `operation` in the next shared transaction and return its result.

        The wait is shielded: a caller cancelled mid-way (a DELETE) does not withdraw a
        state change that may already be on its way to the database.
        """
        result: T = await self._submit(operation)
        return result

    async def run_together(self, together: Together[ItemT, T], item: ItemT) -> T:
        """Apply `item` in the next shared transaction, in one `together` call with the
        other items of the batch given the same `together`."""
        result: T = await self._submit(_Joint(together, item))
        return result

    async def _submit(self, pending: Pending) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((pending, future))
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

    async def _apply(self, batch: list[tuple[Pending, asyncio.Future[Any]]]) -> list[Any]:
        async with self.sessions.begin() as session:
            return await _run_all(session, [operation for operation, _future in batch])

    async def _apply_alone(self, operation: Pending, future: asyncio.Future[Any]) -> None:
        """One bad operation must not fail its neighbours: isolate it after a batch fails."""
        try:
            async with self.sessions.begin() as session:
                (result,) = await _run_all(session, [operation])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)
