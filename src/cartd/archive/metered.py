"""Latency and outcome of every archive request, for both backends, in one wrapper.

Wrapping the `Archive` protocol instead of instrumenting pacifica.py and local.py keeps the
backends about the archive alone, and measures both the same way: a verb's duration covers
the whole call, including for `open` the whole transfer, and its outcome is read from the
exception it ends with, in the terms the retry policy uses (transient or file error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from cartd.archive.base import Archive, ArchiveFileError, FileInfo, TransientArchiveError
from cartd.metrics import Metrics


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, TransientArchiveError):
        return "transient"
    if isinstance(exc, ArchiveFileError):
        return "file_error"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"  # e.g. the volume failed while a transfer was being written


class MeteredArchive:
    def __init__(self, inner: Archive, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    @contextmanager
    def _timed(self, verb: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.metrics.archive_request(verb, outcome, time.perf_counter() - started)

    async def stage(self, file_id: str) -> None:
        with self._timed("stage"):
            await self.inner.stage(file_id)

    async def status(self, file_id: str) -> FileInfo:
        with self._timed("status"):
            return await self.inner.status(file_id)

    @asynccontextmanager
    async def open(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        with self._timed("open"):
            async with self.inner.open(file_id) as chunks:
                yield chunks

    async def aclose(self) -> None:
        await self.inner.aclose()
