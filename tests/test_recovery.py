"""Restart recovery: the database is the truth, the volume is reconciled with it at start-up.

The first test runs `cartd serve` as a real process and kills it with SIGKILL in the middle
of a download, so nothing gets a chance to clean up; the second restarts the in-thread
service over a volume whose staged files were damaged while it was down.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archive_server import ArchiveServer
from cartd_proc import Cartd, cartd_env, tar_digests
from conftest import Service, entry, part_files, size_or_zero, volume_files, wait_for

MiB = 1024 * 1024
CARTD = Path(sys.executable).parent / "cartd"


@pytest.fixture
def start_cartd(db_url: str, archive: ArchiveServer, tmp_path: Path) -> Iterator[Any]:
    """Factory for cartd processes sharing one database and volume; all killed at teardown."""
    env = cartd_env(db_url, tmp_path / "volume", archive.url, fetch_concurrency="2")
    started: list[Cartd] = []

    def start() -> Cartd:
        process = Cartd(env, tmp_path / "cartd.log")
        started.append(process)
        return process.wait_up()

    yield start
    for process in started:
        process.kill()


def test_sigkill_mid_download_resumes_to_a_correct_cart_and_sweeps_the_volume(
    start_cartd: Callable[[], Cartd], archive: ArchiveServer, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    first = start_cartd()

    # A cart deleted in the database whose directory survived (a crash between the DELETE's
    # commit and its rmtree), and a directory no cart ever owned.
    archive.add_file("gone", b"deleted cart")
    assert first.post("gone", [entry("gone", "g.txt", b"deleted cart")]).status_code == 201
    assert first.wait_settled("gone") == (204, "ready", "")
    (deleted_dir,) = (volume / "carts").iterdir()
    assert first.client.delete("/gone").status_code == 200
    deleted_dir.mkdir()
    (deleted_dir / "1").write_bytes(b"leftover")
    stray_dir = volume / "carts" / "987654321"
    stray_dir.mkdir()
    (stray_dir / "5.part").write_bytes(b"stray")

    blobs = {"small": os.urandom(1000)}
    blobs.update({f"big{i}": os.urandom(5 * MiB // 2) for i in range(3)})  # 3 archive chunks
    for name, data in blobs.items():
        archive.add_file(name, data)
    archive.get_chunk_delay = 0.3  # about 1 s per big GET
    fileids = [entry(name, f"d/{name}.bin", data, "sha256") for name, data in blobs.items()]
    assert first.post("cart", fileids).status_code == 201

    def interrupted_mid_download() -> bool:
        staged = first.status("cart")["files_staged"]
        return staged >= 1 and any(size_or_zero(p) > 0 for p in part_files(volume))

    wait_for(interrupted_mid_download, "one file staged and another half-downloaded", 20.0)
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    interrupted = part_files(volume)
    assert interrupted, "the kill did not interrupt a download"
    gets_before = archive.count("GET")
    # A half-written file that no fetch will overwrite: only the start-up sweep removes it.
    (interrupted[0].parent / "424242.part").write_bytes(b"half")

    archive.get_chunk_delay = 0.0
    second = start_cartd()
    assert not deleted_dir.exists(), "a deleted cart's directory survived start-up"
    assert not stray_dir.exists(), "a stray cart directory survived start-up"
    assert second.wait_settled("cart") == (204, "ready", "")
    assert archive.count("GET") > gets_before
    download = second.client.get("/cart", params={"filename": "cart.tar"})
    assert download.status_code == 200
    expected = {f"d/{name}.bin": hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    assert tar_digests(download.content) == expected
    assert part_files(volume) == []
    assert second.client.head("/gone").status_code == 404


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_staged_file_damaged_while_down_is_fetched_again(
    make_service: Callable[..., Service], archive: ArchiveServer, damage: str
) -> None:
    blobs = {"keep": os.urandom(20_000), "lose": os.urandom(30_000)}
    for name, data in blobs.items():
        archive.add_file(name, data)
    fileids = [entry(name, f"{name}.bin", data) for name, data in blobs.items()]
    first = make_service()
    assert first.post("c", fileids).status_code == 201
    assert first.wait_settled("c") == (204, "ready", "")
    first.thread.stop()

    (victim,) = [p for p in volume_files(first.volume) if p.read_bytes() == blobs["lose"]]
    if damage == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(blobs["lose"][:1000])

    second = make_service()
    assert second.wait_settled("c") == (204, "ready", "")
    assert archive.count("GET", "lose") == 2
    assert archive.count("GET", "keep") == 1
    download = second.client.get("/c", params={"filename": "c.tar"})
    assert download.status_code == 200
    assert tar_digests(download.content) == {
        f"{name}.bin": hashlib.sha256(data).hexdigest() for name, data in blobs.items()
    }
