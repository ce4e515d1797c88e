"""Restart recovery: the database is the truth, the volume is reconciled with it at start-up.

The first test runs `cartd serve` as a real process and kills it with SIGKILL in the middle
of a download, so nothing gets a chance to clean up; the second restarts the in-thread
service over a volume whose staged files were damaged while it was down.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_server import ArchiveServer
from conftest import Service, entry, free_port, part_files, size_or_zero, volume_files, wait_for

MiB = 1024 * 1024
CARTD = Path(sys.executable).parent / "cartd"


class CartdProcess:
    """`cartd serve` in a subprocess, with its output kept in a log file for diagnosis."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(CARTD),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"cartd exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"cartd did not start:\n{self.log_tail()}"
            try:
                if self.client.get("/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no finally block, no cleanup runs."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def post(self, cart_id: str, fileids: list[dict[str, Any]]) -> httpx.Response:
        return self.client.post(f"/{cart_id}", json={"fileids": fileids})

    def status(self, cart_id: str) -> dict[str, Any]:
        response = self.client.get(f"/{cart_id}/status")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait_settled(self, cart_id: str, timeout: float = 30.0) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.client.head(f"/{cart_id}")
            state = (
                response.status_code,
                response.headers["X-Pacifica-Status"],
                response.headers["X-Pacifica-Message"],
            )
            if state[1] != "staging" or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


@pytest.fixture
def start_cartd(db_url: str, archive: ArchiveServer, tmp_path: Path) -> Iterator[Any]:
    """Factory for cartd processes sharing one database and volume; all killed at teardown."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env.update(
        {
            "CARTD_DATABASE_URL": db_url,
            "VOLUME_PATH": str(tmp_path / "volume"),
            "ARCHIVE_INTERFACE_URL": archive.url,
            "CARTD_RETRY_INITIAL": "0.02",
            "CARTD_RETRY_MAX": "0.2",
            "CARTD_STATUS_POLL_INITIAL": "0.02",
            "CARTD_STATUS_POLL_MAX": "0.2",
            "CARTD_ARCHIVE_UNREACHABLE_TIMEOUT": "10",
            "CARTD_FETCH_CONCURRENCY": "2",
            "CARTD_DATABASE_CONNECT_ATTEMPTS": "3",
            "CARTD_DATABASE_CONNECT_WAIT": "0.5",
        }
    )
    started: list[CartdProcess] = []

    def start() -> CartdProcess:
        process = CartdProcess(env, tmp_path / "cartd.log")
        started.append(process)
        process.wait_up()
        return process

    yield start
    for process in started:
        process.kill()


def tar_digests(content: bytes) -> dict[str, str]:
    """sha256 of every regular member, by path below the bundle's top directory."""
    digests: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                digest = hashlib.sha256(extracted.read()).hexdigest()
                digests[member.name.split("/", 1)[1]] = digest
    return digests


def test_sigkill_mid_download_resumes_to_a_correct_cart_and_sweeps_the_volume(
    start_cartd: Callable[[], CartdProcess], archive: ArchiveServer, tmp_path: Path
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
