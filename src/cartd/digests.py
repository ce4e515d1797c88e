"""SHA-256 and CRC-32 of big files, computed after they are staged.

A big file is ready once the client's own digest matches (checksums.py says why the other
two wait).  This pass computes them right after, while the file is most likely still in
the page cache, so that a zip or a manifest asked for later finds them recorded.  It is a
cache and never a dependency: a download that comes first computes what it needs itself
(downloads.py), and work lost to a restart costs nothing but that.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import SQLAlchemyError

from cartd.checksums import file_extras
from cartd.db import store
from cartd.db.session import SessionFactory
from cartd.volume import Volume

log = logging.getLogger(__name__)


class DigestBackfill:
    """One file at a time in one worker thread: it must not compete with staging for CPU."""

    def __init__(self, sessions: SessionFactory, volume: Volume) -> None:
        self.sessions = sessions
        self.volume = volume
        self._queue: asyncio.Queue[tuple[int, int, str | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cartd-digests")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def add(self, cart_id: int, file_id: int, sha256: str | None) -> None:
        """A staged file whose CRC-32 (and SHA-256, unless given) is not recorded yet."""
        self._queue.put_nowait((cart_id, file_id, sha256))

    async def _run(self) -> None:
        while True:
            cart_id, file_id, sha256 = await self._queue.get()
            try:
                await self.fill(cart_id, file_id, sha256)
            except Exception:  # the loop must outlive any one file
                log.exception("computing the digests of file row %d failed", file_id)

    async def fill(self, cart_id: int, file_id: int, sha256: str | None) -> None:
        """One file's pass, unless a zip or manifest asked for it first and recorded them
        already: a whole read of a big file saved."""
        async with self.sessions() as session:
            if await store.checksums_known(session, file_id):
                return
        path = self.volume.file_path(cart_id, file_id)
        try:
            extras = await asyncio.to_thread(file_extras, path, sha256)
        except FileNotFoundError:  # deleted or evicted since: nothing left to describe
            return
        try:
            async with self.sessions.begin() as session:
                await store.record_checksums(session, {file_id: extras})
        except SQLAlchemyError as exc:  # a download will compute them if it needs them
            log.warning("could not save the digests of file row %d: %s", file_id, exc)
