"""Fetching one file: stage, wait for it to leave tape, stream, verify, commit.

Each step either returns or raises ArchiveFileError with the text that ends up in the
cart's error message.  Transient faults are retried inside the step that met them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cartd import heap
from cartd.archive import Archive, ArchiveFileError, FileInfo, Media, TransientArchiveError
from cartd.cache import NO_SPACE, Cache, NoSpace, Reservation
from cartd.checksums import Checksums, Hasher
from cartd.db.store import FileJob
from cartd.direct_write import DirectWriter, direct_writer
from cartd.metrics import Metrics
from cartd.retry import Backoff, retry_transient
from cartd.settings import Settings
from cartd.volume import Volume, commit_file, start_writeback

log = logging.getLogger(__name__)
IOV_MAX = 1024  # POSIX requires at least 16; Linux allows 1024 buffers per writev

HASH_MISMATCH = "File hash does not match provided hash"


@dataclass(frozen=True)
class Staged:
    size: int
    mtime: float
    checksums: Checksums


class Stager:
    """Holds the archive, volume and timing policy that every file fetch shares."""

    def __init__(
        self,
        archive: Archive,
        volume: Volume,
        cache: Cache,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.archive = archive
        self.volume = volume
        self.cache = cache
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.backoff = Backoff(settings.retry_initial, settings.retry_max)

    async def _retry(self, operation: Callable[[], Any]) -> Any:
        return await retry_transient(
            operation,
            self.backoff,
            self.settings.archive_unreachable_timeout,
            self.metrics.retries.inc,
        )

    async def bring_online(self, job: FileJob) -> FileInfo:
        """Ask for the file, then poll until it is on disk, within the stage timeout."""
        await self._retry(lambda: self.archive.stage(job.archive_id))
        deadline = time.monotonic() + self.settings.stage_timeout
        next_delay = Backoff(
            self.settings.status_poll_initial, self.settings.status_poll_max
        ).delays()
        while True:
            info: FileInfo = await self._retry(lambda: self.archive.status(job.archive_id))
            if info.media is Media.DISK:
                return info
            delay = next_delay()
            if time.monotonic() + delay > deadline:
                raise ArchiveFileError(
                    f"file {job.archive_id!r} still on tape after the stage timeout of "
                    f"{self.settings.stage_timeout:g}s"
                )
            await asyncio.sleep(delay)

    async def fetch(
        self, job: FileJob, info: FileInfo, verified: Callable[[], None] = lambda: None
    ) -> Staged:
        """Reserve the space, then download and verify; the reservation ends with the fetch.

        `verified` is called once the bytes are downloaded and checked, before they are
        made durable: the archive connection is free from then on.
        """
        try:
            reservation = await self.cache.reserve(job.file_id, job.cart_id, info.size)
        except NoSpace as exc:
            raise ArchiveFileError(str(exc)) from None
        try:
            return await self._fetch_reserved(job, info, reservation, verified)
        finally:
            self.cache.release(job.file_id)

    async def _fetch_reserved(
        self, job: FileJob, info: FileInfo, reservation: Reservation, verified: Callable[[], None]
    ) -> Staged:
        """Download and verify; a checksum mismatch earns exactly one more download."""
        final = self.volume.file_path(job.cart_id, job.file_id)
        part = self.volume.part_path(job.cart_id, job.file_id)
        part.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            sums = await self._retry(lambda: self._transfer(job, info, part, reservation))
            if sums.requested == job.hashsum.lower():
                verified()
                await _make_durable(part, final, info.mtime)
                await self.volume.dir_sync.sync(final.parent)
                self.metrics.file_staged(info.size)
                return Staged(size=info.size, mtime=info.mtime, checksums=sums)
            part.unlink(missing_ok=True)
            self.metrics.checksum_failures.inc()
            log.warning("checksum mismatch on %s (attempt %d)", job.archive_id, attempt)
        raise ArchiveFileError(HASH_MISMATCH)

    async def _transfer(
        self, job: FileJob, info: FileInfo, part: Path, reservation: Reservation
    ) -> Checksums:
        """One download attempt into `part`; a short or long body is a transient fault."""
        reservation.written = 0
        try:
            received, sums = await self._stream_to(part, job, reservation)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ArchiveFileError(NO_SPACE) from exc
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if received != info.size:
            part.unlink(missing_ok=True)
            raise TransientArchiveError(
                f"archive sent {received} bytes of {job.archive_id!r}, expected {info.size}"
            )
        return sums

    async def _stream_to(
        self, part: Path, job: FileJob, reservation: Reservation
    ) -> tuple[int, Checksums]:
        """Write and hash in worker threads while the next bytes download.

        A file that fits in one transfer also gets the SHA-256 and CRC-32 that manifests and
        zip headers need, in the same pass; a bigger one leaves them to digests.py.  Stops
        reading once the body exceeds the announced size: a misbehaving archive must not be
        able to fill the volume.
        """
        batch = self.settings.transfer_size
        hasher = Hasher(job.hashtype, extras=reservation.size <= batch)
        received = 0
        with open(part, "wb", buffering=0) as handle:  # noqa: ASYNC230 - writes run in to_thread
            direct = 0 < self.settings.direct_write_min <= reservation.size
            writer = direct_writer(handle.fileno(), 2 * batch) if direct else None
            pipeline = _Pipeline(handle, hasher, reservation, batch, writer)
            try:
                async with self.archive.open(job.archive_id) as chunks:
                    async for chunk in chunks:
                        received += len(chunk)
                        if received > reservation.size:
                            break
                        await pipeline.put(chunk)
                await pipeline.flush()
            finally:
                await pipeline.settle()
                if received >= PARALLEL_HASHING:  # megabyte chunks were freed: give them back
                    heap.release_soon()
        return received, hasher.result()


async def _make_durable(part: Path, final: Path, mtime: float) -> None:
    """fsync and rename; a disk that fails them must not leave the verified bytes behind
    as a stray part file (the file row records the error, and nothing refers to them).

    A cancelled fetch (its cart failed or was deleted) still waits for the thread: were
    the fetch to end first, the worker would count it done, and a DELETE remove the cart's
    directory, while the `.part` is still there and about to be renamed.
    """
    commit = asyncio.ensure_future(asyncio.to_thread(commit_file, part, final, mtime))
    interrupted = await _wait_out([commit])
    failure = commit.exception()
    if failure is not None:
        part.unlink(missing_ok=True)
    if interrupted:
        raise asyncio.CancelledError
    if failure is not None:
        raise failure


async def _wait_out(jobs: list[asyncio.Future[Any]]) -> bool:
    """Wait until every thread's job is done, through any cancellation; True if one came.

    A thread cannot be stopped, and it uses the file (its descriptor, its name) until it
    returns: whoever started it must not unwind, and close or remove the file, before then.
    The caller raises the cancellation once the threads are done.
    """
    interrupted = False
    while not all(job.done() for job in jobs):
        try:
            await asyncio.wait(jobs)
        except asyncio.CancelledError:
            interrupted = True
    return interrupted


PARALLEL_HASHING = 1 << 20  # a batch at least this big is hashed by several threads
IN_FLIGHT = 4  # a big file's batches queued for its threads at once (memory: 4 batches)


class _Pipeline:
    """One batch in worker threads (written, hashed) while the event loop reads the next.

    The archive's bytes arrive as socket reads of some 64 KiB.  They are gathered, not
    joined (a copy of every byte), into batches of `batch` bytes, so that each batch costs
    one thread hop.  Hashing in the loop would stall the archive's TCP stream; beside it,
    it overlaps, and each digest of a big batch gets its own thread.  Batches stay in
    order: the next one starts only after every part of the previous one is done.

    A big file's batches go to a `DirectWriter`, around the page cache, and do not wait
    for each other: each stream (the write, each digest) has a thread of its own that
    takes the batches in order, and the loop reads on until IN_FLIGHT batches are queued.
    Waiting on each batch's threads had left the loop idle for 2.0 of a 2 GiB file's 2.1 s.
    """

    def __init__(
        self,
        handle: Any,
        hasher: Hasher,
        reservation: Reservation,
        batch: int,
        writer: DirectWriter | None = None,
    ) -> None:
        self.handle, self.hasher, self.reservation = handle, hasher, reservation
        self.batch, self.writer = batch, writer
        self._gathered: list[bytes] = []
        self._size = 0
        self._offset = 0  # where the next batch goes in the file
        self._pending: list[asyncio.Future[None]] = []
        # A big file's batches whose jobs have not been checked yet, oldest first.
        self._queued: deque[list[asyncio.Future[None]]] = deque()
        streams = 1 + len(hasher.parts()) if writer is not None else 0
        self._streams = [ThreadPoolExecutor(1, "cartd-stream") for _ in range(streams)]

    async def put(self, chunk: bytes) -> None:
        self._gathered.append(chunk)
        self._size += len(chunk)
        if self._size >= self.batch:
            await self._submit()

    def _take(self) -> tuple[list[bytes], int]:
        pieces, size = self._gathered, self._size
        self._gathered, self._size = [], 0
        return pieces, size

    async def _submit(self) -> None:
        if self.writer is not None:
            await self._queue(self.writer)
            return
        await self._wait()
        pieces, size = self._take()
        fd, offset = self.handle.fileno(), self._offset
        self._offset += size
        if size < PARALLEL_HASHING:
            jobs = [asyncio.to_thread(_write_and_hash, fd, self.hasher, pieces)]
        else:
            jobs = [asyncio.to_thread(_write_out, fd, pieces, offset, size)]
            jobs += [asyncio.to_thread(_each, part, pieces) for part in self.hasher.parts()]
        self._pending = [asyncio.ensure_future(job) for job in jobs]
        # The first job writes: its bytes leave the reservation the moment they are on disk,
        # not when the next batch arrives, which on a slow archive could be much later; the
        # space accounting would count them twice (used on disk, and still promised).
        self._pending[0].add_done_callback(partial(self._credit, size))

    async def _queue(self, writer: DirectWriter) -> None:
        """Queue a big file's batch on its streams' threads, after checking the oldest
        batch once IN_FLIGHT are queued."""
        while len(self._queued) >= IN_FLIGHT:
            await self._check_oldest()
        pieces, size = self._take()
        loop = asyncio.get_running_loop()
        functions: list[Callable[[list[bytes]], None]] = [writer.write]
        functions += [partial(_each, part) for part in self.hasher.parts()]
        streams = zip(self._streams, functions, strict=True)
        jobs = [loop.run_in_executor(thread, work, pieces) for thread, work in streams]
        jobs[0].add_done_callback(partial(self._credit, size))
        self._queued.append(jobs)

    async def _check_oldest(self) -> None:
        """Wait for the oldest batch and raise its failure; it leaves the queue only once
        done, so that `settle` still waits for it if this wait is cancelled."""
        oldest = self._queued[0]
        await asyncio.wait(oldest)
        self._queued.popleft()
        failures = [job.exception() for job in oldest]
        if (failure := next((f for f in failures if f is not None), None)) is not None:
            raise failure

    def _credit(self, size: int, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is None:
            self.reservation.written += size

    async def flush(self) -> None:
        """Write what is gathered and wait for it; a cancelled caller leaves it to `settle`."""
        if self._gathered:
            await self._submit()
        while self._queued:
            await self._check_oldest()
        await self._wait()
        if self.writer is not None:  # its last partial block
            self._pending = [asyncio.ensure_future(asyncio.to_thread(self.writer.finish))]
            await self._wait()

    async def _wait(self) -> None:
        if self._pending:
            await asyncio.shield(asyncio.gather(*self._pending))
            self._pending = []

    async def settle(self) -> None:
        """After a failure: the threads must be done with the file before it is closed
        (a descriptor closed under a thread's write may by then be another file's)."""
        jobs = [*self._pending, *(job for batch in self._queued for job in batch)]
        interrupted = await _wait_out(jobs)
        for job in jobs:
            if not job.cancelled():
                job.exception()  # retrieved: the failure that matters is ours
        for stream in self._streams:
            stream.shutdown(wait=False)  # idle by now: its thread ends
        if self.writer is not None:
            self.writer.close()
        if interrupted:
            raise asyncio.CancelledError


def _each(update: Callable[[bytes], Any], pieces: list[bytes]) -> None:
    for piece in pieces:
        update(piece)


def _write_out(fd: int, pieces: list[bytes], offset: int, size: int) -> None:
    """A big batch: written, and on its way to the disk before the final fsync asks."""
    write_all(fd, pieces)
    start_writeback(fd, offset, size)


def _write_and_hash(fd: int, hasher: Hasher, pieces: list[bytes]) -> None:
    write_all(fd, pieces)
    for piece in pieces:
        hasher.update(piece)


def write_all(fd: int, pieces: list[bytes]) -> None:
    """One writev for a batch of pieces.

    The kernel then sees one big write and can cache the file in large folios, which the
    downloads read back faster (about a tenth, A/B of `make bench` downloads); and nothing is
    joined in Python.  A short write (a full disk) continues where it stopped, so the
    next call raises the error.
    """
    views = [memoryview(piece) for piece in pieces if piece]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
