"""Run a transaction again when the database picked it as a deadlock victim.

InnoDB settles a lock-order conflict by rolling back one of the transactions with error
1213 (or 1205 once innodb_lock_wait_timeout passes).  The victim's work is undone whole,
so running it again is safe, and MariaDB expects applications to do so.  Without this, a
HEAD poller whose `touch` lost to the staging worker's claim answered 500, and
pacifica-downloader reads a 500 as a failed cart.  SQLite (one connection) never gets here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
ATTEMPTS = 6


def is_deadlock(exc: BaseException) -> bool:
    """A MySQL/MariaDB deadlock or lock-wait timeout, which rolled the transaction back."""
    if not isinstance(exc, DBAPIError):
        return False
    args: tuple[object, ...] = tuple(getattr(exc.orig, "args", ()))
    return bool(args) and args[0] in (DEADLOCK, LOCK_WAIT_TIMEOUT)


async def retry_deadlocks(operation: Callable[[], Awaitable[T]]) -> T:
    """Run `operation` (one or more whole transactions), again after a deadlock, a few times."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await operation()
        except DBAPIError as exc:
            if attempt == ATTEMPTS or not is_deadlock(exc):
                raise
            log.info("deadlock victim (attempt %d); running the transaction again", attempt)
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")
