"""Bounded exponential backoff with jitter: every wait in cartd ends."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cartd.archive import ArchiveFileError, TransientArchiveError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float

    def delays(self) -> Callable[[], float]:
        """A stateful generator of full-jitter delays that double up to `maximum`."""
        ceiling = self.initial

        def next_delay() -> float:
            nonlocal ceiling
            delay = random.uniform(ceiling / 2, ceiling)
            ceiling = min(ceiling * 2, self.maximum)
            return delay

        return next_delay


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    backoff: Backoff,
    give_up_after: float,
    on_retry: Callable[[], object] = lambda: None,
) -> T:
    """Run `operation`, retrying TransientArchiveError until `give_up_after` seconds pass.

    Giving up turns the last transient error into a file error whose text says for how long
    the archive kept failing, so the cart's message explains itself.  `on_retry` runs before
    each repeat (the metrics count them).
    """
    started = time.monotonic()
    next_delay = backoff.delays()
    attempts = 0
    while True:
        attempts += 1
        try:
            return await operation()
        except TransientArchiveError as exc:
            elapsed = time.monotonic() - started
            if elapsed >= give_up_after:
                raise ArchiveFileError(
                    f"{exc} (gave up after {attempts} attempts over {elapsed:.0f}s)"
                ) from exc
            # The last wait is cut to the deadline and followed by one more try, so the
            # archive gets the whole configured time, not up to one backoff less.
            await asyncio.sleep(min(next_delay(), give_up_after - elapsed))
            on_retry()
