"""Live progress: in-flight bytes reach the database, the ETA, ?files=0 and Retry-After.

Service tests go through the real service on both databases.  The loopback archive's
`get_chunk_delay` keeps a multi-chunk GET in flight long enough to watch it; every wait
polls a condition with a deadline.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import pytest

from archive_server import CHUNK_SIZE, ArchiveServer
from cartd.db import store
from cartd.db.store import CartTotals
from cartd.progress import eta_seconds, retry_after
from conftest import MakeService, Service, assert_error, entry, make_ready, store_sessions

# Fast progress: every in-flight count reaches the database within 50 ms.
LIVE = {"progress_interval": 0.05, "transfer_size": 65536}


def _in_flight(status: dict[str, Any]) -> bool:
    first = status["files"][0]
    return first["state"] == "staging" and 0 < first["bytes_staged"] < (first["size"] or 0)


def _wait_in_flight(service: Service, cart_id: str, timeout: float = 20) -> dict[str, Any]:
    """The first status that shows the cart's first file part-way through its download."""
    deadline = time.monotonic() + timeout
    while not _in_flight(status := service.status(cart_id)):
        assert status["files"][0]["state"] != "staged", "the file finished unobserved"
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def _watch_in_flight(service: Service, cart_id: str, timeout: float = 20) -> list[dict[str, Any]]:
    """Status snapshots while the cart's first file is part-way, until it is staged."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.status(cart_id)
        if status["files"][0]["state"] == "staged":
            return seen
        if _in_flight(status):
            seen.append(status)
        time.sleep(0.01)
    raise AssertionError("the file never finished staging")


def test_bytes_staged_grows_while_a_slow_file_streams(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(**LIVE, fetch_concurrency=1)
    big = os.urandom(5 * CHUNK_SIZE + 1000)  # six chunks of the archive's stream
    small = b"queued behind the big one"
    archive.add_file("big", big)
    archive.add_file("small", small)
    archive.get_chunk_delay = 0.2
    fileids = [entry("big", "big.bin", big), entry("small", "small.txt", small)]
    assert service.post("c", fileids).status_code == 201

    seen = _watch_in_flight(service, "c")
    archive.get_chunk_delay = 0.0
    partial = sorted({s["files"][0]["bytes_staged"] for s in seen})
    assert len(partial) >= 2, f"saw in-flight counts {partial}: progress did not grow"
    for status in seen:
        assert status["state"] == "staging"
        assert status["bytes_staged"] == status["files"][0]["bytes_staged"]
        assert (status["files_staging"], status["files_waiting"]) == (1, 1)
        eta = status["eta_seconds"]
        # One file of unknown size remains: it is counted at the known file's size.
        assert eta is not None
        assert 0 < eta < 120, status

    assert service.wait_settled("c") == (204, "ready", "")
    final = service.status("c")
    assert final["eta_seconds"] == 0
    assert final["bytes_staged"] == final["bytes_total"] == len(big) + len(small)
    assert (final["files_staging"], final["files_waiting"], final["files_staged"]) == (0, 0, 2)


def test_files_0_leaves_out_the_file_list(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "c", {"a.txt": b"a", "b/c.txt": b"bc"})
    full = service.client.get("/c/status").json()
    assert [f["path"] for f in full["files"]] == ["a.txt", "b/c.txt"]
    for value in ("0", "false"):
        short = service.client.get("/c/status", params={"files": value}).json()
        assert "files" not in short
        assert {k: v for k, v in full.items() if k != "files"} == short
    assert service.client.get("/c/status", params={"files": "1"}).json() == full
    message = assert_error(service.client.get("/c/status", params={"files": "maybe"}), 400)
    assert "files" in message


def test_eta_is_unknown_before_the_first_byte(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(**LIVE)
    archive.add_file("tape", b"held on tape", tape_delay=math.inf)
    assert service.post("c", [entry("tape", "t.txt", b"held on tape")]).status_code == 201
    deadline = time.monotonic() + 10
    while (status := service.status("c"))["state"] != "staging":
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    assert status["eta_seconds"] is None
    assert status["files_staging"] == 1


def test_retry_after_only_while_staging(make_service: MakeService, archive: ArchiveServer) -> None:
    service = make_service(**LIVE)
    archive.add_file("tape", b"held on tape", tape_delay=math.inf)
    assert service.post("slow", [entry("tape", "t.txt", b"held on tape")]).status_code == 201
    staging = service.client.head("/slow")
    assert staging.headers["X-Pacifica-Status"] == "staging"
    assert staging.headers["Retry-After"] == "5"  # no byte yet: no estimate

    make_ready(service, archive, "done", {"f.txt": b"ready"})
    assert "Retry-After" not in service.client.head("/done").headers
    gone = service.client.head("/nope")
    assert gone.status_code == 404
    assert "Retry-After" not in gone.headers

    data = os.urandom(3 * CHUNK_SIZE)
    archive.add_file("bad", data)
    wrong = {**entry("bad", "bad.bin", data), "hashsum": "0" * 40}
    assert service.post("broken", [wrong]).status_code == 201
    assert service.wait_settled("broken")[:2] == (500, "error")
    failed = service.client.head("/broken")
    assert "Retry-After" not in failed.headers
    status = service.status("broken")
    assert status["eta_seconds"] is None
    assert status["files"][0]["bytes_staged"] == 0  # its partial bytes were thrown away


def test_retry_after_follows_the_estimate(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(**LIVE)
    data = os.urandom(4 * CHUNK_SIZE)
    archive.add_file("big", data)
    archive.get_chunk_delay = 0.5
    assert service.post("c", [entry("big", "big.bin", data)]).status_code == 201
    _wait_in_flight(service, "c")
    deadline = time.monotonic() + 10
    while True:
        head = service.client.head("/c")
        if head.headers["X-Pacifica-Status"] != "staging":
            break
        value = int(head.headers["Retry-After"])
        assert 1 <= value <= 30
        if value != 5:  # an estimate, not the default
            break
        assert time.monotonic() < deadline, "Retry-After never followed an estimate"
    archive.get_chunk_delay = 0.0
    assert service.wait_settled("c") == (204, "ready", "")


# --- the database writes --------------------------------------------------------------------


async def test_progress_writes_never_overwrite_an_outcome(db_url: str) -> None:
    """A count read just before a file was recorded staged must not undo that record, and
    files put back in the queue start again from 0."""
    async with store_sessions(db_url) as sessions:
        rows = [(f"f{i}", f"f{i}", "sha1", "0" * 40) for i in range(3)]
        async with sessions.begin() as session:
            cart = await store.insert_cart(session, "c", "fingerprint", rows)
        async with sessions.begin() as session:
            done, flowing = await store.claim_files(session, 2, store.Lease("test", 60.0))
        async with sessions.begin() as session:
            await store.files_staged(session, [store.StagedFile(done, 100, 0.0, None, None)])
        async with sessions.begin() as session:
            queued = (await store.cart_files(session, cart.id))[2]
            written = {done.file_id: 40, flowing.file_id: 50, queued.id: 60}
            await store.record_progress(session, written)
        async with sessions.begin() as session:
            files = await store.cart_files(session, cart.id)
            totals = await store.cart_totals(session, cart.id)
        assert [(f.state, f.bytes_staged) for f in files] == [
            ("staged", 100),
            ("staging", 50),
            ("waiting", 0),
        ]
        assert (totals.bytes_staged, totals.staging, totals.waiting, totals.sized) == (150, 1, 1, 1)
        async with sessions.begin() as session:
            await store.requeue_interrupted(session)
            files = await store.cart_files(session, cart.id)
        assert [(f.state, f.bytes_staged) for f in files][1] == ("waiting", 0)


# --- the estimator itself --------------------------------------------------------------------


def _totals(**fields: int) -> CartTotals:
    base = {"files": 4, "staged": 0, "errored": 0, "bytes_total": 0, "bytes_staged": 0}
    return CartTotals(**{**base, **fields})


@pytest.mark.parametrize(
    ("state", "totals", "expected"),
    [
        ("ready", _totals(staged=4), 0.0),
        ("waiting", _totals(), None),
        ("error", _totals(bytes_total=100, bytes_staged=50, sized=4), None),
        ("staging", _totals(sized=4, bytes_total=100), None),  # no byte yet (tape)
        # 40 of 100 bytes in 10 s: 60 more take 15 s.
        ("staging", _totals(sized=4, bytes_total=100, bytes_staged=40), 15.0),
        # Two files of 50 known, two unknown: counted at 50 each, so 200 expected.
        ("staging", _totals(sized=2, bytes_total=100, bytes_staged=50), 30.0),
        # A partial cart: one of four 25-byte files failed, so 75 bytes are expected.
        ("staging", _totals(sized=4, errored=1, bytes_total=100, bytes_staged=25), 20.0),
        # Empty files only: files per second instead.
        ("staging", _totals(staged=1, sized=1), 30.0),
        # More written than known (unsized files in flight): no negative ETA.
        ("staging", _totals(sized=1, bytes_total=10, bytes_staged=500, files=1), 0.0),
    ],
)
def test_eta_estimator(state: str, totals: CartTotals, expected: float | None) -> None:
    assert eta_seconds(state, 1000.0, totals, 1010.0) == expected


def test_eta_needs_elapsed_time() -> None:
    totals = _totals(sized=4, bytes_total=100, bytes_staged=40)
    assert eta_seconds("staging", 1000.0, totals, 1000.0) is None


@pytest.mark.parametrize(
    ("eta", "header"), [(None, 5), (0.0, 1), (0.2, 1), (7.1, 8), (29.5, 30), (3600.0, 30)]
)
def test_retry_after_clamps_the_eta(eta: float | None, header: int) -> None:
    assert retry_after(eta) == header


async def test_a_batch_of_outcomes_reports_each_finished_cart_once(db_url: str) -> None:
    """Outcomes recorded together: every file staged, and each cart they finish reported
    ready by exactly one of them (its log line and cache bookkeeping run once)."""
    async with store_sessions(db_url) as sessions:
        carts = []
        for uid, count in (("one", 3), ("two", 2)):
            rows = [(f"{uid}{i}", f"f{i}", "sha1", "0" * 40) for i in range(count)]
            async with sessions.begin() as session:
                carts.append((await store.insert_cart(session, uid, f"fp-{uid}", rows)).id)
        async with sessions.begin() as session:
            jobs = await store.claim_files(session, 5, store.Lease("test", 60.0))
        assert {job.cart_id for job in jobs} == set(carts)
        outcomes = [store.StagedFile(job, 1, 0.0, 7, "0" * 64) for job in jobs[1:]]
        async with sessions.begin() as session:
            finished = await store.files_staged(session, outcomes)
        # The first cart still has a file staging; the second is ready, reported once.
        ready = [o.job.cart_id for o, done in zip(outcomes, finished, strict=True) if done]
        assert ready == [carts[1]]
        async with sessions.begin() as session:
            assert await store.files_staged(session, [store.StagedFile(jobs[0], 1, 0.0)]) == [True]
            files = await store.cart_files(session, carts[0])
        assert [(f.state, f.size, f.bytes_staged) for f in files] == [("staged", 1, 1)] * 3


async def test_a_batch_of_outcomes_writes_each_file_its_own_values(db_url: str) -> None:
    """More outcomes than one statement carries: every file gets its own size, mtime and
    digests, and a file that left `staging` meanwhile (requeued, so its fetch no longer
    counts) keeps its row as it is."""
    count = store.STAGED_CHUNK + 3
    async with store_sessions(db_url) as sessions:
        rows = [(f"f{i}", f"f{i}", "sha1", "0" * 40) for i in range(count)]
        async with sessions.begin() as session:
            cart = await store.insert_cart(session, "c", "fingerprint", rows)
        async with sessions.begin() as session:
            jobs = await store.claim_files(session, count, store.Lease("test", 60.0))
        async with sessions.begin() as session:
            await store.give_back(session, [jobs[5].file_id], store.Lease("test", 60.0))
        outcomes = [
            store.StagedFile(job, 10 + i, 100.5 + i, 1000 + i, f"{i:064x}")
            for i, job in enumerate(jobs)
        ]
        async with sessions.begin() as session:
            finished = await store.files_staged(session, outcomes[::-1])
            files = await store.cart_files(session, cart.id)
        assert not any(finished)  # the requeued file is still to fetch
        expected = [
            ("staged", 10 + i, 10 + i, 100.5 + i, 1000 + i, f"{i:064x}", None) for i in range(count)
        ]
        expected[5] = ("waiting", None, 0, None, None, None, None)
        got = [
            (f.state, f.size, f.bytes_staged, f.mtime, f.crc32, f.sha256, f.lease_owner)
            for f in files
        ]
        assert got == expected
