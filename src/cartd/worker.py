"""The staging queue: claim file rows, fetch them concurrently, record the outcome.

A file row moves waiting -> staging (claimed here) -> staged | error (recorded here).
The database is the queue: nothing is handed over in memory, so a restart (even after
kill -9) finds every unfinished file as a row and starts it again.  Memory only holds the
asyncio tasks, so that a DELETE can cancel its cart's fetches promptly.

A small file's fetch slot is free again once it is downloaded and verified: the fsyncs and
the outcome write (in the next group commit) do not hold up the next download.  While
fetches finish quickly, the worker also claims up to two rounds of jobs ahead (leased like
running ones), so a freed slot starts its next file at once instead of after a claim
transaction.  Only small files count as quick, and those on tape finish rarely: nothing
is claimed ahead of slow fetches, so other replicas can take the waiting files.

Several replicas may share the database.  A claim is a lease (owner, expiry) that the
lease loop here renews every CARTD_CANCEL_POLL_INTERVAL seconds.  The same renewal tells
a replica which of its fetches it lost (the cart was deleted or failed on another replica,
or the lease lapsed and someone took the file over), and those are cancelled.  Leases
that lapsed, a dead replica's, go back to `waiting` for any replica to claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from cartd import logs
from cartd.archive import ArchiveFileError
from cartd.db import store
from cartd.db.deadlock import retry_deadlocks
from cartd.db.group_commit import GroupCommit
from cartd.db.session import SessionFactory
from cartd.db.store import FileJob, Lease
from cartd.digests import DigestBackfill
from cartd.staging import Stager

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 5.0
ERROR_PAUSE_SECONDS = 2.0
# Without a successful renewal for this share of the lease, fetches stop: another replica
# may take the files over once the lease lapses, and two must never fetch one file.
LEASE_SAFETY = 0.75
DB_WRITE_ATTEMPTS = 8  # about two minutes of backoff before an outcome write gives up
# Jobs claimed ahead: as many as fetches finished within this window, at most
# AHEAD_ROUNDS times the fetch concurrency.
AHEAD_WINDOW_SECONDS = 1.0
AHEAD_ROUNDS = 2
# Fetches done downloading but not yet durable and recorded still count against this.
MAX_TASK_ROUNDS = 4
T = TypeVar("T")


class Worker:
    def __init__(
        self,
        sessions: SessionFactory,
        stager: Stager,
        concurrency: int,
        lease: Lease,
        renew_interval: float,
    ) -> None:
        self.sessions = sessions
        self.stager = stager
        self.concurrency = concurrency
        self.lease = lease
        self.renew_interval = renew_interval
        self._commits = GroupCommit(sessions)
        self.digests = DigestBackfill(sessions, stager.volume)
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], FileJob] = {}
        self._fetching: set[asyncio.Task[None]] = set()  # tasks holding a slot
        self._ahead: deque[FileJob] = deque()  # leased to us, not started yet
        # When fetches finished lately; only the newest few can matter.
        self._recent: deque[float] = deque(maxlen=AHEAD_ROUNDS * concurrency)
        # Carts cancelled lately: a claim that read them as live just before the DELETE
        # committed must not start their fetches.  Bounded; older ids cannot race any more.
        self._cancelled: deque[int] = deque(maxlen=1024)
        self._renewed = time.monotonic()
        self._loop_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="cartd-worker")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="cartd-leases")
        self.digests.start()

    async def stop(self) -> None:
        """Cancel everything; interrupted files stay `staging` until their lease lapses
        (or the next start of a single replica) and are then fetched again."""
        loops = [t for t in (self._loop_task, self._lease_task) if t is not None]
        tasks = [*self._tasks, *loops]
        unstarted = [job.file_id for job in self._ahead]
        self._ahead.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._fetching.clear()
        await self.digests.stop()
        try:
            await self._commits.run(lambda s: store.give_back(s, unstarted, self.lease))
        except SQLAlchemyError as exc:  # they lapse within a lease instead
            log.warning("could not give back %d unstarted job(s): %s", len(unstarted), exc)
        await self._commits.drain()

    @property
    def commits(self) -> GroupCommit:
        """The outcome writes' shared transactions; progress writes join them, so the two
        never take the same file rows in opposite orders (a MariaDB deadlock)."""
        return self._commits

    @property
    def in_flight(self) -> int:
        """Fetches not yet finished (a metric): downloading, or past their slot and making
        the file durable or waiting for the outcome's transaction.  Zero means that no
        fetch will touch the volume again until the next claim."""
        return len(self._tasks)

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def wake(self) -> None:
        """New work exists (a cart was created or a slot freed): claim without waiting."""
        self._wake.set()

    async def cancel_cart(self, cart_id: int) -> None:
        """Stop a cart's in-flight fetches; their `finally` blocks remove partial files."""
        self._cancelled.append(cart_id)
        self._drop_ahead(cart_id)
        doomed = [task for task, job in self._tasks.items() if job.cart_id == cart_id]
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                claimed = await self._claim()
            except Exception:
                log.exception("claiming work failed; retrying")
                await asyncio.sleep(ERROR_PAUSE_SECONDS)
                continue
            if claimed:
                continue
            # Not wait_for: on 3.11 it swallows a cancel (stop()) that meets a wake() from
            # a fetch ending, and the loop would then run on, never to be stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_SECONDS):
                    await self._wake.wait()

    async def _claim(self) -> int:
        """Claim for the free slots and the ahead queue; start what fits.

        The ahead queue is refilled only once it is half empty, so that each claim
        transaction takes a good many jobs rather than one per finished fetch.
        """
        self._start_ahead()
        free = self.concurrency - len(self._fetching)
        ahead = self._ahead_target()
        if free <= 0 and len(self._ahead) > ahead // 2:
            return 0
        wanted = free + ahead - len(self._ahead)
        if wanted <= 0:
            return 0
        jobs = await retry_deadlocks(lambda: self._claim_files(wanted))
        self._ahead.extend(job for job in jobs if job.cart_id not in self._cancelled)
        self._start_ahead()
        return len(jobs)

    def _ahead_target(self) -> int:
        """Claim ahead only while fetches are quick: as many as finished lately, at most
        AHEAD_ROUNDS rounds of the fetch concurrency."""
        horizon = time.monotonic() - AHEAD_WINDOW_SECONDS
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()
        return min(len(self._recent), AHEAD_ROUNDS * self.concurrency)

    def _start_ahead(self) -> None:
        while (
            self._ahead
            and len(self._fetching) < self.concurrency
            and len(self._tasks) < MAX_TASK_ROUNDS * self.concurrency
        ):
            job = self._ahead.popleft()
            if job.cart_id in self._cancelled:  # its rows were requeued or deleted
                continue
            task = asyncio.create_task(self._process(job), name=f"fetch-{job.file_id}")
            self._tasks[task] = job
            self._fetching.add(task)
            task.add_done_callback(self._finished)

    def _drop_ahead(self, cart_id: int) -> None:
        self._ahead = deque(job for job in self._ahead if job.cart_id != cart_id)

    async def _claim_files(self, limit: int) -> list[FileJob]:
        """One claim transaction (which may promise the files some space, cache.py); a
        deadlock victim (a cart failing as its files are claimed takes the same rows in
        the other order) runs again at once."""
        return await self.stager.cache.claim(
            limit, lambda session, promise: store.claim_files(session, limit, self.lease, promise)
        )

    async def _keep_leases(self) -> None:
        """Renew, cancel what was lost, requeue what lapsed; forever, every interval."""
        while True:
            await asyncio.sleep(self.renew_interval)
            try:
                await self.renew()
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("could not renew leases: %s", exc)
                self._stop_if_unsure()

    async def renew(self) -> None:
        """One pass of the lease loop, in the outcomes' group commit (it writes the same rows)."""
        running = {job.file_id: task for task, job in self._tasks.items()}
        leased = [*running, *(job.file_id for job in self._ahead)]
        volume = self.stager.volume
        streaming = volume.streaming_carts() if volume.shared else []  # holds for others
        until = time.time() + self.lease.seconds

        async def renewal(session: AsyncSession) -> tuple[set[int], int]:
            await store.hold_carts(session, streaming, until, self.lease.owner)
            lost = await store.renew_leases(session, leased, self.lease)
            return lost, await store.requeue_expired(session)

        lost, requeued = await self._commits.run(renewal)
        self._renewed = time.monotonic()
        self._ahead = deque(job for job in self._ahead if job.file_id not in lost)
        for file_id in lost:  # a fetch that just recorded its outcome is done: no news
            if (task := running.get(file_id)) is not None and task in self._tasks:
                log.info("file row %d: lease lost (cart deleted or failed elsewhere)", file_id)
                task.cancel()
        if requeued:
            log.warning("requeued %d file(s) whose lease lapsed", requeued)
            self.wake()

    def _stop_if_unsure(self) -> None:
        """Renewals failing for most of a lease: stop fetching before someone takes over."""
        if time.monotonic() - self._renewed < self.lease.seconds * LEASE_SAFETY:
            return
        self._ahead.clear()
        if self._tasks:
            log.error("leases not renewed in time: stopping %d fetch(es)", len(self._tasks))
        for task in self._tasks:
            task.cancel()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._free_slot(task)

    def _verified(self) -> None:
        """Called in a small file's fetch task: the download is done and checked, so its
        slot is free, and it counts as a quick fetch for claiming ahead."""
        self._recent.append(time.monotonic())
        if (task := asyncio.current_task()) is not None:
            self._free_slot(task)

    def _free_slot(self, task: asyncio.Task[None]) -> None:
        """The file is downloaded (or failed): its slot goes to the next job while the
        file is made durable and its outcome waits for its transaction."""
        if task in self._fetching:
            self._fetching.discard(task)
            self._start_ahead()
        self.wake()

    async def _process(self, job: FileJob) -> None:
        logs.bind(cart_id=job.cart_uid, file=job.archive_id)  # this task's log lines only
        try:
            info = await self.stager.bring_online(job)
            # A one-chunk file spends most of its time on fsyncs and its outcome write:
            # it hands its slot on once verified.  A bigger one keeps it to the end, so
            # the status never shows more files staging than the concurrency meanwhile,
            # and its size is recorded first, to show its progress against.
            small = info.size <= self.stager.settings.transfer_size
            if not small:
                await self._settle(
                    lambda: self._commits.run(
                        lambda s: store.record_size(s, job.file_id, info.size, info.mtime)
                    )
                )
            staged = await self.stager.fetch(job, info, self._verified if small else _nothing)
        except ArchiveFileError as exc:
            await self._record_failure(job, str(exc))
            return
        except Exception as exc:
            log.exception("unexpected failure fetching %s", job.archive_id)
            await self._record_failure(job, f"internal error: {exc!r}")
            return
        sums = staged.checksums
        outcome = store.StagedFile(job, staged.size, staged.mtime, sums.crc32, sums.sha256)
        staging_done = lambda: self._commits.run_together(store.files_staged, outcome)  # noqa: E731
        finished = await self._settle(staging_done)
        if sums.crc32 is None or sums.sha256 is None:
            self.digests.add(job.cart_id, job.file_id, sums.sha256)
        if finished:
            self.stager.cache.cart_finished(job.cart_id)
            log.info("cart %s is ready", job.cart_uid)

    async def _settle(self, write: Callable[[], Awaitable[T]]) -> T:
        """Write an outcome, riding out a database blip: a lost write would strand the cart."""
        for attempt in range(1, DB_WRITE_ATTEMPTS + 1):
            try:
                return await write()
            except SQLAlchemyError as exc:
                if attempt == DB_WRITE_ATTEMPTS:
                    raise
                log.warning("database write failed (attempt %d): %s", attempt, exc)
                await asyncio.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")

    async def _record_failure(self, job: FileJob, error: str) -> None:
        log.warning("file %s of cart %s failed: %s", job.archive_id, job.cart_uid, error)
        failed = lambda: self._commits.run(lambda s: store.file_failed(s, job, error))  # noqa: E731
        if await self._settle(failed):
            self.stager.cache.cart_finished(job.cart_id)
            await self._cancel_siblings(job)

    async def _cancel_siblings(self, job: FileJob) -> None:
        """A failed cart's other fetches are wasted work; stop them (not ourselves).

        Like a DELETE, it also drops jobs of the cart that a claim already in flight
        (one that read them as waiting before the failure committed) would start.
        """
        self._cancelled.append(job.cart_id)
        self._drop_ahead(job.cart_id)
        current = asyncio.current_task()
        siblings = [
            t for t, j in self._tasks.items() if j.cart_id == job.cart_id and t is not current
        ]
        for task in siblings:
            task.cancel()


def _nothing() -> None:
    """A big file's `verified`: its slot stays taken until its outcome is recorded."""
