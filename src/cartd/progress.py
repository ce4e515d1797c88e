"""Live progress: in-flight byte counts into the database, and the ETA estimate.

A file's `bytes_staged` used to change only when the file completed, so a cart of a few
large files showed 0% for hours and then jumped.  Each fetch already counts what it has
written (its cache Reservation); this loop copies those counts into `cart_files` every
CARTD_PROGRESS_INTERVAL seconds, in one transaction, so every reader of the database (the
status endpoint, the event stream, another process) sees the same progress.

The ETA is an estimate derived from those rows alone; see `eta_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import math

from sqlalchemy.exc import SQLAlchemyError

from cartd.cache import Cache
from cartd.db import store
from cartd.db.group_commit import GroupCommit
from cartd.db.models import CartState
from cartd.db.store import CartTotals

log = logging.getLogger(__name__)

RETRY_AFTER_DEFAULT = 5
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 30


class ProgressRecorder:
    """Copies the cache's per-fetch byte counts into `cart_files.bytes_staged`.

    The writes ride the worker's group commit: they share transactions with the staging
    outcomes instead of competing with them for the same rows.
    """

    def __init__(self, commits: GroupCommit, cache: Cache, interval: float) -> None:
        self.commits = commits
        self.cache = cache
        self.interval = interval
        self._recorded: dict[int, int] = {}  # what the database holds, to skip idle fetches

    async def flush(self) -> int:
        """Write the counts that changed since the last flush; returns how many."""
        current = self.cache.in_flight()
        changed = {k: v for k, v in current.items() if self._recorded.get(k, 0) != v}
        if changed:
            await self.commits.run(lambda session: store.record_progress(session, changed))
        self._recorded = current  # finished fetches drop out, so this never grows
        return len(changed)

    async def run(self) -> None:
        """Flush forever; a failed write is only progress lost, so log it and go on."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except SQLAlchemyError as exc:
                log.warning("could not record staging progress: %s", exc)


def eta_seconds(state: str, staging_since: float, totals: CartTotals, now: float) -> float | None:
    """Seconds until a cart is staged, estimated from its rows; None when unknowable.

    Ready is 0; error, deleted and waiting are None.  While staging, the rate is the cart's
    average throughput since its first file was claimed (`staging_since`), bytes written
    including fetches in flight.  Files whose size the archive has not reported yet are
    assumed to be as big as the average known one, so a cart of many small files is
    estimated from the files remaining.  Failed files of a partial cart are taken out at
    that size too.  A cart whose files are all empty falls back to files per second.
    Before the first byte (say, a tape recall) there is no rate: None.
    """
    if state == CartState.READY:
        return 0.0
    elapsed = now - staging_since
    if state != CartState.STAGING or elapsed <= 0:
        return None
    if totals.bytes_staged > 0 and totals.sized > 0:
        mean_size = totals.bytes_total / totals.sized
        # Unsized files count as the mean; so do failed ones (a partial cart goes on), but
        # negatively: they will never add bytes.
        unsized = totals.files - totals.sized
        expected = totals.bytes_total + (unsized - totals.errored) * mean_size
        remaining = max(expected - totals.bytes_staged, 0.0)
        return round(remaining * elapsed / totals.bytes_staged, 1)
    if totals.staged > 0:
        files_left = totals.files - totals.staged - totals.errored
        return round(files_left * elapsed / totals.staged, 1)
    return None


def retry_after(eta: float | None) -> int:
    """The Retry-After a HEAD poller gets: the ETA within 1-30 s, or 5 s when unknown."""
    if eta is None:
        return RETRY_AFTER_DEFAULT
    return min(max(math.ceil(eta), RETRY_AFTER_MIN), RETRY_AFTER_MAX)
