"""The crash-recovery proof: SIGKILL `cartd serve` at random points, restart it, repeat.

Each round posts a new cart, picks a kill point at random (while a file waits on tape or is
queued, while a `.part` file is being written, while a client streams a tar, while a DELETE
is in flight), waits until the service is there, and SIGKILLs it.  Straight after every
kill, with the service dead, `cartd fsck --checksums` must find no `staged` row that
promises bytes the volume lacks (a half-written file taken for a staged one would show up
as missing, wrong-size or wrong-checksum) and no cart whose state contradicts its files.
Only debris that start-up recovery sweeps is allowed then.  At the end one last service
finishes everything: every cart is ready with exactly the right bytes or, when its DELETE
was interrupted, deleted cleanly on a retry, and fsck finds database and volume in full
agreement.

Used by tests/test_crashloop.py (10 kills in CI) and bench/crashloop.py (long runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from archive_server import ArchiveServer
from cartd_proc import Cartd, cartd_env, run_fsck, tar_digests
from conftest import entry, part_files, size_or_zero

MiB = 1024 * 1024
KILL_POINTS = ("staging", "file-write", "download", "delete")
# What a crash may leave behind: recovery sweeps these at the next start.
CRASH_DEBRIS = {"part-file", "stray-file", "orphan-dir"}


@dataclass
class CartPlan:
    fileids: list[dict[str, Any]]
    digests: dict[str, str]
    delete_sent: bool = False


@dataclass
class CrashReport:
    seed: int
    kills: Counter[str] = field(default_factory=Counter)
    carts: int = 0
    files: int = 0
    deleted: int = 0
    debris_after_kills: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


class CrashLoop:
    """Drives one archive, one database and one volume through many cartd lifetimes."""

    def __init__(self, root: Path, db_url: str, archive: ArchiveServer, seed: int) -> None:
        self.rng = random.Random(seed)
        self.root = root
        self.archive = archive
        self.volume = root / "volume"
        self.env = cartd_env(db_url, self.volume, archive.url, fetch_concurrency="3")
        self.carts: dict[str, CartPlan] = {}
        self.report = CrashReport(seed)
        self.started: list[Cartd] = []

    def start(self) -> Cartd:
        service = Cartd(self.env, self.root / "cartd.log")
        self.started.append(service)
        return service.wait_up()

    def close(self) -> None:
        """Kill whatever a failed round left running: no cartd may outlive its proof."""
        for service in self.started:
            service.kill()

    def new_cart(self) -> tuple[str, CartPlan]:
        """A few small files, and one big one held on tape so that every window opens."""
        uid = f"cart-{len(self.carts)}"
        sizes = [self.rng.randint(1, 60_000) for _ in range(self.rng.randint(2, 6))]
        sizes.append(self.rng.randint(2 * MiB, 4 * MiB))
        fileids, digests = [], {}
        for index, size in enumerate(sizes):
            data = self.rng.randbytes(size)
            file_id = f"{uid}/{index}"
            tape = self.rng.uniform(0.05, 0.4) if self.rng.random() < 0.4 else 0.0
            self.archive.add_file(file_id, data, tape_delay=tape)
            path = f"d{index % 2}/f{index}.bin"
            fileids.append(entry(file_id, path, data, "sha256"))
            digests[path] = hashlib.sha256(data).hexdigest()
        plan = CartPlan(fileids, digests)
        self.carts[uid] = plan
        self.report.files += len(sizes)
        return uid, plan

    def ready_cart(self, service: Cartd) -> str | None:
        """The oldest live cart, once it is ready (nothing fails here, so it gets there)."""
        for uid, plan in self.carts.items():
            if not plan.delete_sent:
                return uid if service.wait_settled(uid)[1] == "ready" else None
        return None

    def live_cart(self) -> str | None:
        live = [uid for uid, plan in self.carts.items() if not plan.delete_sent]
        return self.rng.choice(live) if live else None

    def round(self, point: str) -> None:
        """One lifetime: start, post a cart, kill at the given point, then check the wreck."""
        service = self.start()
        uid, plan = self.new_cart()
        assert service.post(uid, plan.fileids).status_code == 201
        hit = self.arm(point, service, uid)
        service.kill()
        self.report.kills[hit] += 1
        self.check_wreck()

    def arm(self, point: str, service: Cartd, uid: str) -> str:
        """Wait until the chosen point is reached; returns the point that was really hit."""
        if point == "download":
            ready = self.ready_cart(service)
            if ready is not None:
                return self.mid_download(service, ready)
            point = "file-write"
        if point == "delete":
            victim = self.live_cart()
            if victim is not None:
                return self.mid_delete(service, victim)
            point = "staging"
        if point == "file-write":
            if poll(lambda: any(size_or_zero(p) > 0 for p in part_files(self.volume)), 20):
                return "file-write"
            point = "staging"
        state = service.state(uid)
        assert state[1] == "staging", f"{uid} left staging before the kill: {state}"
        time.sleep(self.rng.uniform(0, 0.3))  # a random instant while staging runs
        return "staging"

    def mid_download(self, service: Cartd, uid: str) -> str:
        started = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream("GET", f"{service.url}/{uid}", timeout=30) as response:
                    for _chunk in response.iter_bytes(65536):
                        started.set()
                        time.sleep(0.01)  # a slow client keeps the stream open
            except httpx.HTTPError:
                pass  # the server died under it: that is the point
            finally:
                started.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(20), "the download never started"
        return "download"

    def mid_delete(self, service: Cartd, uid: str) -> str:
        self.carts[uid].delete_sent = True
        url = f"{service.url}/{uid}"
        deleter = threading.Thread(target=_quiet_delete, args=(url,), daemon=True)
        deleter.start()
        time.sleep(self.rng.uniform(0, 0.03))  # kill somewhere inside the DELETE
        return "delete"

    def check_wreck(self) -> None:
        """With the service dead: the database may only be behind the volume, never ahead."""
        result = run_fsck(self.env, "--checksums")
        kinds = Counter(
            line.split()[0] for line in result.stdout.splitlines() if not line.startswith("fsck:")
        )
        promises_broken = set(kinds) - CRASH_DEBRIS
        assert not promises_broken, f"after a SIGKILL:\n{result.stdout}{result.stderr}"
        assert result.returncode in (0, 1), result.stderr
        self.report.debris_after_kills.update(kinds)

    def finish(self) -> None:
        """One last life: every cart completes or is cleanly deleted; then fsck is clean."""
        service = self.start()
        for uid, plan in self.carts.items():
            if plan.delete_sent:
                assert service.client.delete(f"/{uid}").status_code in (200, 404)
                assert service.state(uid)[0] == 404
                self.report.deleted += 1
                continue
            assert service.wait_settled(uid, timeout=120) == (204, "ready", ""), uid
            download = service.client.get(f"/{uid}", params={"filename": "c.tar"})
            assert download.status_code == 200
            assert tar_digests(download.content) == plan.digests, uid
        log = service.log_text()
        service.terminate()
        assert service.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises it
        assert "database is locked" not in log
        assert "unhandled error" not in log, log[-3000:]
        final = run_fsck(self.env, "--checksums")
        assert final.returncode == 0, f"database and volume disagree:\n{final.stdout}"
        self.report.carts = len(self.carts)

    def run(self, kills: int) -> CrashReport:
        started = time.monotonic()
        self.archive.get_chunk_delay = 0.03  # a 3 MiB file takes about 0.1 s to write
        points = list(KILL_POINTS)
        try:
            for kill in range(kills):
                if kill % len(points) == 0:
                    self.rng.shuffle(points)  # every point in turn, in a random order
                self.round(points[kill % len(points)])
            self.finish()
        finally:
            self.close()
        self.report.seconds = time.monotonic() - started
        return self.report


def _quiet_delete(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server may die first: that is the point
        httpx.delete(url, timeout=30)


def poll(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """True once the condition holds, False if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")
