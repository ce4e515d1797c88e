"""Staging failure paths, end to end: the real service against the real archive server.

Every test drives cartd over HTTP and scripts the archive (faults, tape, outages), then
checks what PROTOCOL.md sections 2-4 promise: the cart's final state and message, the bytes
in the tar, how many requests the archive saw, and what is left in the volume.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import math
import os
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import archive_server
from archive_server import CHUNK_SIZE as CHUNK
from archive_server import ArchiveServer
from cartd import staging, volume
from cartd.direct_write import DirectWriter
from conftest import (
    MakeService,
    Service,
    entry,
    part_files,
    size_or_zero,
    volume_files,
    wait_for,
)
from test_observability import scrape, total

HASH_MISMATCH = "Failed to pull file(File hash does not match provided hash)"
MiB = 1024 * 1024
ARCHIVE_MTIME = 1444938166.5


def members(
    service: Service, cart_id: str, name: str = "cart.tar"
) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """Download a ready cart: its regular files by path below the top directory."""
    download = service.client.get(f"/{cart_id}", params={"filename": name})
    assert download.status_code == 200, download.text
    assert int(download.headers["content-length"]) == len(download.content)
    found: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name.split("/", 1)[1]] = (member, extracted.read())
    return found


def contents(service: Service, cart_id: str) -> dict[str, bytes]:
    return {path: data for path, (_, data) in members(service, cart_id).items()}


def post_and_settle(
    service: Service, cart_id: str, fileids: list[dict[str, Any]]
) -> tuple[tuple[int, str, str], float]:
    """Create a cart and wait until it leaves `staging`; also return how long that took."""
    started = time.monotonic()
    assert service.post(cart_id, fileids).status_code == 201
    state = service.wait_settled(cart_id)
    return state, time.monotonic() - started


# --- checksums -----------------------------------------------------------------------------


def test_checksum_mismatch_once_is_retried(service: Service, archive: ArchiveServer) -> None:
    data = os.urandom(100_000)
    archive.add_file("f", data)
    archive.inject("GET", "corrupt", file_id="f", times=1)
    assert service.post("c", [entry("f", "f.bin", data)]).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert contents(service, "c") == {"f.bin": data}
    assert archive.count("GET", "f") == 2


def test_checksum_always_wrong_fails_after_exactly_two_gets(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("f", b"what the archive really holds")
    assert service.post("c", [entry("f", "f.txt", b"what the client expects")]).status_code == 201
    assert service.wait_settled("c") == (500, "error", HASH_MISMATCH)
    assert archive.count("GET", "f") == 2
    assert service.client.get("/c").status_code == 409


# --- missing files -------------------------------------------------------------------------


def test_missing_file_404_fails_fast_without_retries(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    service = make_service(archive_unreachable_timeout=10.0)
    archive.missing_status = 404
    (code, status, message), elapsed = post_and_settle(
        service, "c", [entry("no-such-file", "x", b"")]
    )
    assert (code, status) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert "no-such-file" in message
    assert elapsed < 2.0, f"a 404 must not be retried for {elapsed:.1f}s"
    assert archive.count("POST", "no-such-file") == 1
    assert archive.count("GET", "no-such-file") == 0


def test_missing_file_reference_500_fails_after_bounded_retries(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    service = make_service(archive_unreachable_timeout=1.0)
    (code, status, message), elapsed = post_and_settle(
        service, "c", [entry("no-such-file", "x", b"")]
    )
    assert (code, status) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert "no-such-file" in message
    assert elapsed < 1.0 + 2.0
    posts = archive.count("POST", "no-such-file")
    assert 2 <= posts <= 40, f"{posts} POSTs in about 1 s is not a bounded backoff"


# --- tape ----------------------------------------------------------------------------------


def test_tape_file_comes_online_with_spaced_status_polls(
    service: Service, archive: ArchiveServer
) -> None:
    data = os.urandom(10_000)
    archive.add_file("t", data, tape_delay=1.0)
    state, elapsed = post_and_settle(service, "c", [entry("t", "t.bin", data)])
    assert state == (204, "ready", "")
    assert elapsed >= 1.0
    assert contents(service, "c") == {"t.bin": data}
    heads = archive.count("HEAD", "t")
    # status_poll_initial=0.02, max=0.2: about 10 polls in 1 s; a fixed 20 ms spin gives ~50.
    assert 2 <= heads <= 25, f"{heads} HEADs to wait 1 s for a tape recall"


def test_tape_that_never_comes_online_hits_the_stage_timeout(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    service = make_service(stage_timeout=0.5)
    archive.add_file("t", b"on tape forever", tape_delay=math.inf)
    (code, status, message), elapsed = post_and_settle(
        service, "c", [entry("t", "t.txt", b"on tape forever")]
    )
    assert (code, status) == (500, "error")
    assert "stage timeout" in message
    assert elapsed < 0.5 + 2.0
    assert archive.count("GET", "t") == 0


# --- outages -------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["set_down", "stopped"])
def test_archive_down_past_the_limit_gives_up(
    make_service: Callable[..., Service], archive: ArchiveServer, outage: str
) -> None:
    service = make_service(archive_unreachable_timeout=1.0)
    archive.add_file("f", b"data")
    if outage == "stopped":
        archive.stop()
    else:
        archive.set_down(True)
    (code, status, message), elapsed = post_and_settle(service, "c", [entry("f", "f.txt", b"data")])
    assert (code, status) == (500, "error")
    assert "unreachable" in message or "gave up" in message, message
    assert 0.5 <= elapsed < 1.0 + 2.0, f"gave up after {elapsed:.1f}s, the limit is 1 s"


def test_archive_down_briefly_then_back_is_ready(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    service = make_service(archive_unreachable_timeout=5.0)
    data = b"survives a short outage"
    archive.add_file("f", data)
    archive.set_down(True)
    revive = threading.Timer(0.5, archive.set_down, args=(False,))
    revive.start()
    try:
        assert service.post("c", [entry("f", "f.txt", data)]).status_code == 201
        assert service.wait_settled("c") == (204, "ready", "")
    finally:
        revive.cancel()
        revive.join()
    assert any(code == archive_server.NO_ANSWER for _, _, code in archive.requests)
    assert contents(service, "c") == {"f.txt": data}


# --- transient faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "kind"),
    [
        ("POST", "503"),
        ("HEAD", "503"),
        ("GET", "503"),
        ("POST", "drop"),
        ("HEAD", "drop"),
        ("GET", "drop"),
        ("GET", "truncate"),
        ("GET", "reset"),
    ],
)
def test_transient_fault_is_retried_to_ready(
    service: Service, archive: ArchiveServer, verb: str, kind: str
) -> None:
    data = os.urandom(3 * MiB // 2)  # two archive chunks, so a truncated body is visible
    archive.add_file("f", data)
    archive.inject(verb, kind, file_id="f", times=2)
    assert service.post("c", [entry("f", "f.bin", data, "sha256")]).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert contents(service, "c") == {"f.bin": data}
    assert archive.count(verb, "f") >= 3
    assert part_files(service.volume) == []


# --- media errors --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["media_error", "no_media"])
def test_media_fault_is_a_file_error_and_service_keeps_working(
    service: Service, archive: ArchiveServer, kind: str
) -> None:
    archive.add_file("bad", b"unreadable tape")
    archive.inject("HEAD", kind, file_id="bad", times=1)
    assert service.post("c1", [entry("bad", "bad.txt", b"unreadable tape")]).status_code == 201
    code, status, message = service.wait_settled("c1")
    assert (code, status) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert "bad" in message
    assert "media" in message.lower()
    assert archive.count("HEAD", "bad") == 1
    assert archive.count("GET", "bad") == 0

    archive.add_file("good", b"fine")
    assert service.post("c2", [entry("good", "good.txt", b"fine")]).status_code == 201
    assert service.wait_settled("c2") == (204, "ready", "")
    assert contents(service, "c2") == {"good.txt": b"fine"}


# --- isolation and cancellation ------------------------------------------------------------


def test_bad_cart_does_not_affect_a_concurrently_staging_good_cart(
    service: Service, archive: ArchiveServer
) -> None:
    good = os.urandom(50_000)
    archive.add_file("good", good, tape_delay=math.inf)  # held on tape: surely in flight
    archive.add_file("bad", b"real bytes")
    assert service.post("good-cart", [entry("good", "g.bin", good)]).status_code == 201
    wait_for(lambda: archive.count("HEAD", "good") >= 1)
    assert service.post("bad-cart", [entry("bad", "b.txt", b"other")]).status_code == 201
    assert service.wait_settled("bad-cart") == (500, "error", HASH_MISMATCH)
    assert service.state("good-cart") == (204, "staging", "")
    archive.add_file("good", good)  # the recall finishes
    assert service.wait_settled("good-cart") == (204, "ready", "")
    assert contents(service, "good-cart") == {"g.bin": good}


class InFlight:
    """Counts GET handlers running inside the archive server (its log only sees starts)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def wrap(self, original: Callable[..., None]) -> Callable[..., None]:
        def counted(handler: Any, *args: Any) -> None:
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                original(handler, *args)
            finally:
                with self.lock:
                    self.now -= 1

        return counted


@pytest.fixture
def get_gauge(monkeypatch: pytest.MonkeyPatch) -> InFlight:
    gauge = InFlight()
    monkeypatch.setattr(archive_server._Handler, "_get", gauge.wrap(archive_server._Handler._get))
    return gauge


@pytest.mark.parametrize("direct_write_min", [0, MiB], ids=["page-cache", "direct"])
def test_delete_during_fetch_cancels_and_cleans_up(
    make_service: MakeService, archive: ArchiveServer, get_gauge: InFlight, direct_write_min: int
) -> None:
    service = make_service(direct_write_min=direct_write_min)
    data = os.urandom(8 * MiB)
    archive.add_file("slow", data)
    archive.get_chunk_delay = 0.5  # 8 chunks: about 4 s per GET
    assert service.post("c", [entry("slow", "slow.bin", data)]).status_code == 201
    wait_for(lambda: any(size_or_zero(p) > 0 for p in part_files(service.volume)))
    cart_dirs = list((service.volume / "carts").iterdir())
    assert len(cart_dirs) == 1

    started = time.monotonic()
    response = service.client.delete("/c")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["message"] == "Cart Deleted Successfully"
    assert elapsed < 1.0, f"DELETE took {elapsed:.1f}s while a fetch was in flight"
    assert service.state("c")[0] == 404
    assert not cart_dirs[0].exists()
    assert part_files(service.volume) == []
    # The fetch was cancelled, not left running: the archive sees its GET hang up.
    wait_for(lambda: get_gauge.now == 0, timeout=2.0)

    # The worker is free for the next cart, and the cancelled fetch left nothing behind.
    archive.get_chunk_delay = 0.0
    archive.add_file("next", b"next")
    assert service.post("c2", [entry("next", "n.txt", b"next")]).status_code == 201
    assert service.wait_settled("c2") == (204, "ready", "")
    assert not cart_dirs[0].exists()
    assert part_files(service.volume) == []


def test_fetch_concurrency_bounds_concurrent_gets(
    make_service: Callable[..., Service], archive: ArchiveServer, get_gauge: InFlight
) -> None:
    service = make_service(fetch_concurrency=2)
    archive.get_chunk_delay = 0.1  # two chunks per file: each GET lasts about 0.2 s
    blobs = {f"f{i}": os.urandom(3 * MiB // 2) for i in range(6)}
    for name, data in blobs.items():
        archive.add_file(name, data)
    fileids = [entry(name, f"{name}.bin", data) for name, data in blobs.items()]
    assert service.post("c", fileids).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert get_gauge.peak == 2, f"archive saw at most {get_gauge.peak} GETs at once"
    assert contents(service, "c") == {f"{name}.bin": data for name, data in blobs.items()}


def test_a_verified_file_that_cannot_be_made_durable_fails_its_cart_alone(
    make_service: Callable[..., Service],
    archive: ArchiveServer,
    get_gauge: InFlight,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small file hands its fetch slot on once verified, before its fsync and rename.
    If those then fail (here the disk answers EIO once), its cart must still end in error
    rather than wait forever, and the slot must not be handed on twice or lost: the next
    cart stages with the full concurrency."""
    real_commit = staging.commit_file
    failures = [OSError(errno.EIO, "Input/output error")]

    def commit_once_failing(part: Path, final: Path, mtime: float) -> None:
        if failures:
            raise failures.pop()
        real_commit(part, final, mtime)

    monkeypatch.setattr(staging, "commit_file", commit_once_failing)
    service = make_service(fetch_concurrency=2)
    archive.add_file("lost", b"never durable")
    assert service.post("doomed", [entry("lost", "l.txt", b"never durable")]).status_code == 201
    code, status, message = service.wait_settled("doomed")
    assert (code, status) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert "Input/output error" in message

    archive.get_chunk_delay = 0.2  # one chunk each: every GET lasts about 0.2 s
    blobs = {f"n{i}": os.urandom(1000) for i in range(6)}
    for name, data in blobs.items():
        archive.add_file(name, data)
    cart = [entry(name, f"{name}.bin", data) for name, data in blobs.items()]
    assert service.post("next", cart).status_code == 201
    assert service.wait_settled("next") == (204, "ready", "")
    assert get_gauge.peak == 2
    assert contents(service, "next") == {f"{name}.bin": data for name, data in blobs.items()}
    assert part_files(service.volume) == []


def test_a_fetch_cancelled_while_made_durable_waits_for_its_fsync(
    make_service: Callable[..., Service], archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verified file's fsync and rename run in a thread that a cancellation (here: a
    sibling fails the cart) cannot stop.  The fetch must outlive that thread: ending first,
    it would let the worker report idle, and a DELETE remove the cart's directory, while the
    `.part` is still on the volume and about to be renamed."""
    entered, release = threading.Event(), threading.Event()
    real_commit = staging.commit_file

    def first_commit_held(part: Path, final: Path, mtime: float) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(30)
        real_commit(part, final, mtime)

    monkeypatch.setattr(staging, "commit_file", first_commit_held)
    # One slot: "held" is fetched first and hands its slot to "bad" once verified.
    service = make_service(fetch_concurrency=1)
    archive.add_file("held", b"verified, then slow to sync")
    archive.add_file("bad", b"what the archive holds")
    cart = [entry("held", "held.txt", b"verified, then slow to sync"), entry("bad", "b", b"x")]
    assert service.post("doomed", cart).status_code == 201
    assert service.wait_settled("doomed")[:2] == (500, "error")
    assert entered.is_set()
    assert len(part_files(service.volume)) == 1  # held's, in its fsync
    assert total(scrape(service.client), "cartd_fetches_in_flight") == 1
    release.set()
    wait_for(lambda: total(scrape(service.client), "cartd_fetches_in_flight") == 0, "idle")
    assert part_files(service.volume) == []


@pytest.mark.parametrize("direct_write_min", [0, MiB], ids=["page-cache", "direct"])
def test_large_file_is_staged_in_many_transfer_chunks(
    make_service: Callable[..., Service], archive: ArchiveServer, direct_write_min: int
) -> None:
    """Direct: 20 batches, far more than the pipeline keeps queued for its threads."""
    service = make_service(transfer_size=MiB, direct_write_min=direct_write_min)
    data = os.urandom(20 * MiB + 12345)
    archive.add_file("big", data)
    assert service.post("c", [entry("big", "big.bin", data, "sha256")]).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert service.status("c")["bytes_staged"] == len(data)
    staged = contents(service, "c")["big.bin"]
    assert hashlib.sha256(staged).hexdigest() == hashlib.sha256(data).hexdigest()


def test_big_files_are_staged_around_the_page_cache_byte_exact(
    make_service: MakeService, archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of at least CARTD_DIRECT_WRITE_MIN bytes go through a DirectWriter (O_DIRECT);
    smaller ones do not.  Either way the staged bytes are exactly the archive's, whatever
    the size's alignment, and a wrong checksum is still caught."""
    writers: list[DirectWriter | None] = []
    real = staging.direct_writer

    def recording(fd: int, capacity: int) -> DirectWriter | None:
        writers.append(real(fd, capacity))
        return writers[-1]

    monkeypatch.setattr(staging, "direct_writer", recording)
    service = make_service(transfer_size=MiB, direct_write_min=MiB)
    sizes = {"small": MiB - 1, "exact": MiB, "odd": 3 * MiB + 123, "blocks": 2 * MiB + 4096}
    blobs = {name: os.urandom(size) for name, size in sizes.items()}
    for name, data in blobs.items():
        archive.add_file(name, data)
    archive.add_file("liar", os.urandom(2 * MiB))
    cart = [entry(name, f"{name}.bin", data, "sha256") for name, data in blobs.items()]
    assert service.post("c", cart).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert contents(service, "c") == {f"{name}.bin": data for name, data in blobs.items()}
    assert len(writers) == 3, "only the three big files get direct writers"
    assert all(writers), "this volume's file system refused O_DIRECT"

    assert service.post("bad", [entry("liar", "l.bin", os.urandom(2 * MiB))]).status_code == 201
    assert service.wait_settled("bad") == (500, "error", HASH_MISMATCH)
    assert part_files(service.volume) == []


def test_a_direct_write_failing_mid_file_fails_the_file_and_leaves_nothing(
    make_service: MakeService, archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while batches are queued for the threads: the failure must reach
    the cart (as the full-disk message), and the partial file must go."""
    real_pwrite = os.pwrite
    calls = itertools.count()

    def full_after_five(fd: int, data: memoryview, offset: int) -> int:
        if next(calls) >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_five)
    service = make_service(transfer_size=MiB, direct_write_min=MiB)
    data = os.urandom(12 * MiB)
    archive.add_file("big", data)
    assert service.post("c", [entry("big", "big.bin", data)]).status_code == 201
    code, status, message = service.wait_settled("c")
    assert (code, status) == (500, "error")
    assert "space" in message.lower(), message
    wait_for(lambda: total(scrape(service.client), "cartd_fetches_in_flight") == 0, "idle")
    assert part_files(service.volume) == []


def test_a_direct_write_failing_once_near_the_end_is_not_lost(
    make_service: MakeService, archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of fewer batches than the pipeline queues: a failed write is only seen when
    the last batches are checked, and it must be: the bytes on disk are not the file."""
    real_pwrite = os.pwrite
    calls = itertools.count()

    def second_write_fails(fd: int, data: memoryview, offset: int) -> int:
        if next(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", second_write_fails)
    service = make_service(transfer_size=MiB, direct_write_min=MiB)
    data = os.urandom(3 * MiB + 5)
    archive.add_file("big", data)
    assert service.post("c", [entry("big", "big.bin", data)]).status_code == 201
    code, status, message = service.wait_settled("c")
    assert (code, status) == (500, "error"), message
    assert "Input/output error" in message
    wait_for(lambda: total(scrape(service.client), "cartd_fetches_in_flight") == 0, "idle")
    assert part_files(service.volume) == []


def test_staged_file_keeps_the_archive_mtime(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("f", b"old file", mtime=ARCHIVE_MTIME)
    assert service.post("c", [entry("f", "f.txt", b"old file")]).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    (on_disk,) = volume_files(service.volume)
    assert on_disk.stat().st_mtime == pytest.approx(ARCHIVE_MTIME, abs=1e-3)
    assert members(service, "c")["f.txt"][0].mtime == int(ARCHIVE_MTIME)


# --- file: archive -------------------------------------------------------------------------


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "local-archive"
    (root / "sub" / "dir").mkdir(parents=True)
    return root


def test_local_archive_serves_files_and_subdirectory_ids(
    make_service: Callable[..., Service], local_root: Path
) -> None:
    top, deep = b"top level", os.urandom(70_000)
    (local_root / "top.txt").write_bytes(top)
    (local_root / "sub" / "dir" / "deep.bin").write_bytes(deep)
    os.utime(local_root / "sub" / "dir" / "deep.bin", (ARCHIVE_MTIME, ARCHIVE_MTIME))
    service = make_service(archive_interface_url=f"file://{local_root}", transfer_size=16384)
    fileids = [entry("top.txt", "/top.txt", top), entry("sub/dir/deep.bin", "a/deep.bin", deep)]
    assert service.post("c", fileids).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    found = members(service, "c")
    assert {path: data for path, (_, data) in found.items()} == {
        "top.txt": top,
        "a/deep.bin": deep,
    }
    assert found["a/deep.bin"][0].mtime == int(ARCHIVE_MTIME)


def test_local_archive_checksum_is_verified(
    make_service: Callable[..., Service], local_root: Path
) -> None:
    (local_root / "f.txt").write_bytes(b"on disk")
    service = make_service(archive_interface_url=f"file://{local_root}")
    assert service.post("c", [entry("f.txt", "f.txt", b"expected")]).status_code == 201
    assert service.wait_settled("c") == (500, "error", HASH_MISMATCH)


@pytest.mark.parametrize("escape", ["dotdot", "file_symlink", "dir_symlink"])
def test_local_archive_refuses_ids_that_escape_the_root(
    make_service: Callable[..., Service], local_root: Path, tmp_path: Path, escape: str
) -> None:
    secret = b"outside the archive"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(secret)
    if escape == "dotdot":
        file_id = "../outside/secret.txt"
    elif escape == "file_symlink":
        (local_root / "link.txt").symlink_to(outside / "secret.txt")
        file_id = "link.txt"
    else:
        (local_root / "sub" / "linkdir").symlink_to(outside)
        file_id = "sub/linkdir/secret.txt"
    service = make_service(archive_interface_url=f"file://{local_root}")
    # The hash is right, so only the containment check can stop the file being served.
    assert service.post("c", [entry(file_id, "s.txt", secret)]).status_code == 201
    code, status, message = service.wait_settled("c")
    assert (code, status) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert file_id in message
    assert service.client.get("/c").status_code == 409
    assert volume_files(service.volume) == []


def test_waiting_for_an_archive_slot_is_not_a_fault(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    """With one archive connection, files queue behind a slow GET; the queueing must not
    count against the unreachable-archive budget (it used to fail them with PoolTimeout)."""
    service = make_service(archive_concurrency=1, archive_unreachable_timeout=0.5)
    archive.get_chunk_delay = 0.2  # each 3 MiB GET takes about 0.6 s; six queue up
    files = {f"q{n}": os.urandom(3 * 1024 * 1024) for n in range(6)}
    for file_id, data in files.items():
        archive.add_file(file_id, data)
    cart = [entry(file_id, f"{file_id}.bin", data) for file_id, data in files.items()]
    assert service.post("queued", cart).status_code == 201
    assert service.wait_settled("queued", timeout=60) == (204, "ready", "")


def test_the_archive_never_answers_more_requests_at_once_than_allowed(
    make_service: Callable[..., Service], archive: ArchiveServer
) -> None:
    """ARCHIVE_CONCURRENCY bounds what the archive sees at once, whatever the fetch
    concurrency (the reference server truncates concurrent GETs); and it is used."""
    service = make_service(archive_concurrency=2, fetch_concurrency=8)
    archive.get_chunk_delay = 0.1  # each 2 MiB GET takes about 0.2 s: they overlap
    files = {f"b{n}": os.urandom(2 * MiB) for n in range(10)}
    for file_id, data in files.items():
        archive.add_file(file_id, data)
    cart = [entry(file_id, f"{file_id}.bin", data) for file_id, data in files.items()]
    assert service.post("bounded", cart).status_code == 201
    assert service.wait_settled("bounded", timeout=60) == (204, "ready", "")
    assert archive.peak_in_flight == 2


def test_a_failed_file_cancels_its_siblings_in_flight(
    make_service: Callable[..., Service], archive: ArchiveServer, get_gauge: InFlight
) -> None:
    """Once one file fails the cart, fetching the others is wasted work: they are cut off,
    their partial files removed, and they are shown waiting rather than staging."""
    service = make_service(fetch_concurrency=2)
    slow = os.urandom(8 * MiB)
    archive.add_file("slow", slow)
    archive.add_file("bad", b"what the archive holds")
    archive.get_chunk_delay = 0.5  # the 8 MiB GET would take about 4 s
    cart = [entry("slow", "slow.bin", slow), entry("bad", "bad.txt", b"something else")]
    assert service.post("doomed", cart).status_code == 201
    assert service.wait_settled("doomed")[:2] == (500, "error")
    assert archive.count("GET", "slow") == 1  # the sibling's fetch had really started
    wait_for(lambda: get_gauge.now == 0, "the slow GET to be cut off", timeout=2.0)
    assert part_files(service.volume) == []
    states = {f["id"]: f["state"] for f in service.status("doomed")["files"]}
    assert states == {"slow": "waiting", "bad": "error"}


def test_a_written_chunk_leaves_the_reservation_at_once(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    """Bytes on disk must stop counting as promised when they land, not when the next chunk
    arrives: with a slow archive the space would otherwise be counted twice meanwhile, and
    other fetches refused for space the volume has."""
    service = make_service(transfer_size=CHUNK, progress_interval=0.05)
    data = os.urandom(2 * CHUNK)
    archive.add_file("slow", data)
    archive.get_gate = threading.Event()  # the archive sends one chunk, then waits
    try:
        assert service.post("c", [entry("slow", "slow.bin", data)]).status_code == 201
        wait_for(lambda: service.status("c")["bytes_staged"] == CHUNK, "the first chunk", 15)
        samples = scrape(service.client)
        assert samples[("cartd_cache_bytes", (("kind", "reserved"),))] == CHUNK
    finally:
        archive.get_gate.set()
    assert service.wait_settled("c") == (204, "ready", "")


def test_a_large_file_goes_to_disk_as_it_arrives(
    make_service: Callable[..., Service], archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each big batch starts its own writeback once written, so the fsync that makes the
    file durable finds little left to write: the ranges tile the file from its start."""
    calls: list[tuple[int, int, bool]] = []
    real = staging.start_writeback

    def recording(fd: int, offset: int, length: int) -> bool:
        accepted = real(fd, offset, length)
        calls.append((offset, length, accepted))
        return accepted

    monkeypatch.setattr(staging, "start_writeback", recording)
    service = make_service(transfer_size=MiB)
    data = os.urandom(8 * MiB + 12345)
    archive.add_file("big", data)
    assert service.post("c", [entry("big", "big.bin", data)]).status_code == 201
    assert service.wait_settled("c") == (204, "ready", "")
    assert contents(service, "c")["big.bin"] == data
    assert calls[0][0] == 0
    assert all(at + size == after for (at, size, _), (after, _, _) in itertools.pairwise(calls))
    assert len(data) - MiB < calls[-1][0] + calls[-1][1] <= len(data)  # a short tail need not
    assert all(accepted for *_, accepted in calls)  # the kernel took every request


def test_writeback_is_advisory() -> None:
    assert not volume.start_writeback(-1, 0, 4096)  # refused: nothing raised


def test_a_short_writev_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk can make writev write part of a batch; the rest must follow in order."""
    real_writev = os.writev

    def at_most_100_bytes(fd: int, buffers: list[memoryview]) -> int:
        first = bytes(buffers[0])[:100]
        return real_writev(fd, [first])

    monkeypatch.setattr(os, "writev", at_most_100_bytes)
    pieces = [os.urandom(250), b"", os.urandom(99), os.urandom(1000)]
    target = tmp_path / "batch"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)
    try:
        staging.write_all(fd, pieces)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"".join(pieces)
