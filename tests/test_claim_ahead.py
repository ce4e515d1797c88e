"""The worker's ahead queue, against the real database layer.

A stand-in stager decides how long each fetch takes, so the tests can hold fetches open
while they look at the leases: jobs claimed ahead are leased like running ones, renewed
like them, dropped with their cart, and never claimed while fetches are slow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa

from cartd import worker as worker_module
from cartd.archive import FileInfo, Media
from cartd.cache import Claim
from cartd.checksums import Checksums
from cartd.db import store
from cartd.db.models import CartFile
from cartd.db.session import SessionFactory
from cartd.db.store import FileJob, Lease
from cartd.staging import Staged, Stager
from cartd.worker import Worker
from conftest import store_sessions

LEASE = Lease("test-owner", 60.0)


class SoleCache:
    """A one-replica volume's cache as the worker sees it: claims promise no space."""

    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions

    def cart_finished(self, cart_id: int) -> None:
        pass

    async def claim(self, limit: int, claim: Claim) -> list[FileJob]:
        async with self.sessions.begin() as session:
            return await claim(session, None)


class FakeStager:
    """Fetches that end at once while `quick`, else wait for `gate`."""

    def __init__(self, sessions: SessionFactory) -> None:
        self.settings = SimpleNamespace(transfer_size=1 << 20)
        self.cache = SoleCache(sessions)
        self.volume = SimpleNamespace(shared=False, streaming_carts=list)
        self.quick = 0  # this many more fetches end at once
        self.gate = asyncio.Event()
        self.started: list[FileJob] = []

    async def bring_online(self, job: FileJob) -> FileInfo:
        self.started.append(job)
        if self.quick > 0:
            self.quick -= 1
        else:
            await self.gate.wait()
        return FileInfo(size=1, mtime=0.0, media=Media.DISK)

    async def fetch(self, job: FileJob, info: FileInfo, verified: Callable[[], None]) -> Staged:
        verified()
        return Staged(size=1, mtime=0.0, checksums=Checksums("x", "0" * 64, 0))


async def new_cart(sessions: SessionFactory, uid: str, count: int) -> int:
    rows = [(f"{uid}{i}", f"f{i}", "sha1", "0" * 40) for i in range(count)]
    async with sessions.begin() as session:
        cart = await store.insert_cart(session, uid, f"fp-{uid}", rows)
    return cart.id


async def leases(sessions: SessionFactory) -> dict[int, float]:
    """Leased (staging) file rows and their lease expiry."""
    async with sessions() as session:
        rows = await session.execute(
            sa.select(CartFile.id, CartFile.lease_expires).where(CartFile.state == "staging")
        )
        return {file_id: float(expires or 0) for file_id, expires in rows.all()}


async def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_quick_fetches_claim_ahead_leased_renewed_and_dropped_with_their_cart(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "AHEAD_WINDOW_SECONDS", 3600.0)  # a loaded test host
    async with store_sessions(db_url) as sessions:
        stager = FakeStager(sessions)
        stager.quick = 6
        cart_id = await new_cart(sessions, "ahead", 40)
        worker = Worker(sessions, cast(Stager, stager), 2, LEASE, renew_interval=3600)
        worker.start()
        try:
            # Six quick fetches, then two that hang: the worker claims ahead of them, at most
            # two rounds (4 jobs), and starts no more than its concurrency.
            await until(lambda: _started(stager, 6 + 2), "the quick fetches")
            await until(lambda: _staged(sessions, 6), "the quick fetches' outcomes")
            await until(lambda: _more_than(sessions, 2), "the ahead claim")
            await worker._claim()  # one more pass may top the queue up, not beyond its bound
            assert 2 < len(await leases(sessions)) <= 2 + 4
            assert len(stager.started) == 6 + 2
            assert worker.in_flight == 2
            before = await leases(sessions)
            await asyncio.sleep(0.01)  # time.time() must move on for the renewal to show
            await worker.renew()
            after = await leases(sessions)
            assert set(after) == set(before)
            assert all(after[file_id] > before[file_id] for file_id in before), "not renewed"

            async with sessions.begin() as session:  # what a DELETE does first
                assert await store.mark_deleted(session, cart_id, "deleted")
            await worker.cancel_cart(cart_id)
            stager.gate.set()
            await until(lambda: _idle(worker), "the cancelled fetches to end")
            assert len(stager.started) == 6 + 2, "a job claimed ahead ran after its cart's DELETE"
        finally:
            await worker.stop()


async def test_a_stop_gives_back_the_jobs_claimed_ahead(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other replicas need not wait a whole lease for jobs this one never started."""
    monkeypatch.setattr(worker_module, "AHEAD_WINDOW_SECONDS", 3600.0)
    async with store_sessions(db_url) as sessions:
        stager = FakeStager(sessions)
        stager.quick = 6
        await new_cart(sessions, "stop", 40)
        worker = Worker(sessions, cast(Stager, stager), 2, LEASE, renew_interval=3600)
        worker.start()
        try:
            await until(lambda: _started(stager, 6 + 2), "the quick fetches")
            await until(lambda: _more_than(sessions, 2), "the ahead claim")
        finally:
            await worker.stop()
        running = {job.file_id for job in stager.started[6:]}
        assert set(await leases(sessions)) == running  # interrupted: requeued at the next start


async def test_slow_fetches_claim_nothing_ahead(db_url: str) -> None:
    async with store_sessions(db_url) as sessions:
        stager = FakeStager(sessions)
        await new_cart(sessions, "slow", 10)
        worker = Worker(sessions, cast(Stager, stager), 2, LEASE, renew_interval=3600)
        worker.start()
        try:
            await until(lambda: _started(stager, 2), "two fetches")
            assert await worker._claim() == 0  # nothing finishes: nothing is claimed ahead
            assert len(await leases(sessions)) == 2
        finally:
            await worker.stop()


async def _more_than(sessions: SessionFactory, count: int) -> bool:
    return len(await leases(sessions)) > count


async def _staged(sessions: SessionFactory, count: int) -> bool:
    async with sessions() as session:
        staged = await session.execute(sa.select(sa.func.count()).where(CartFile.state == "staged"))
        return staged.scalar_one() == count


async def _started(stager: FakeStager, count: int) -> bool:
    return len(stager.started) == count


async def _idle(worker: Worker) -> bool:
    return worker.in_flight == 0
