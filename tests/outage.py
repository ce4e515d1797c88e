"""The archive-outage proof: the archive vanishes while carts stage, then comes back (or not).

Two ways to vanish: `stopped` (nothing listens: connection refused) and `dropped` (the
archive accepts and closes every connection unanswered, like a crashed process behind a
load balancer).  Promises checked:

- shorter than CARTD_ARCHIVE_UNREACHABLE_TIMEOUT: every cart keeps saying `staging`
  during the outage, the archive sees a bounded number of requests (exponential backoff
  capped at CARTD_RETRY_MAX, not a spin), and every cart completes with the right bytes;
- longer: every cart fails, within the limit plus one backoff, with a message that says
  the archive was unreachable.

Used by tests/test_outage.py (seconds) and bench/outage.py (a minute, production clocks).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from archive_server import ArchiveServer
from cartd_proc import tar_digests
from conftest import entry

MODES = ("stopped", "dropped")


@dataclass(frozen=True)
class Clocks:
    """The service's retry settings, which bound how often it may ask during an outage."""

    retry_initial: float
    retry_max: float
    fetch_concurrency: int

    def request_bound(self, seconds: float) -> int:
        """Most requests a backoff allows in `seconds`: per file in flight, the doubling
        steps up to the cap, then one per half-cap (full jitter waits at least that)."""
        doublings = math.ceil(math.log2(self.retry_max / self.retry_initial)) + 1
        per_file = doublings + math.ceil(seconds / (self.retry_max / 2)) + 1
        return self.fetch_concurrency * per_file


@dataclass
class OutageReport:
    mode: str
    outage: float
    carts: int
    files: int
    requests_during_outage: int
    request_bound: int
    recovered_after: float  # seconds from the archive's return to the last cart ready


def publish(
    archive: ArchiveServer, prefix: str, carts: int, files: int
) -> dict[str, list[dict[str, Any]]]:
    plans = {}
    for number in range(carts):
        uid = f"{prefix}-{number}"
        blobs = {f"{uid}/{i}": os.urandom(50_000 + i) for i in range(files)}
        for file_id, data in blobs.items():
            archive.add_file(file_id, data)
        plans[uid] = [
            entry(fid, f"f{i}.bin", d, "sha256") for i, (fid, d) in enumerate(blobs.items())
        ]
    return plans


def go_away(archive: ArchiveServer, mode: str) -> None:
    if mode == "stopped":
        archive.stop()
    else:
        archive.set_down(True)


def come_back(archive: ArchiveServer, mode: str) -> None:
    if mode == "stopped":
        archive.start()
    else:
        archive.set_down(False)


def states(client: httpx.Client, uids: list[str]) -> dict[str, tuple[int, str, str]]:
    found = {}
    for uid in uids:
        head = client.head(f"/{uid}")
        found[uid] = (
            head.status_code,
            head.headers["X-Pacifica-Status"],
            head.headers["X-Pacifica-Message"],
        )
    return found


def survive(
    client: httpx.Client, archive: ArchiveServer, clocks: Clocks, mode: str, outage: float
) -> OutageReport:
    """The archive goes away right after the POSTs and returns after `outage` seconds."""
    plans = publish(archive, "waits", carts=4, files=3)
    go_away(archive, mode)
    for uid, fileids in plans.items():
        assert client.post(f"/{uid}", json={"fileids": fileids}).status_code == 201
    before = len(archive.requests)
    back_at = time.monotonic() + outage
    while time.monotonic() < back_at:  # the outage itself: carts must not give up
        assert {s[1] for s in states(client, list(plans)).values()} == {"staging"}
        time.sleep(0.2)
    during = len(archive.requests) - before
    come_back(archive, mode)
    deadline = time.monotonic() + 120
    while {s[1] for s in states(client, list(plans)).values()} != {"ready"}:
        assert time.monotonic() < deadline, states(client, list(plans))
        time.sleep(0.1)
    recovered = time.monotonic() - back_at
    for uid, fileids in plans.items():
        tar = client.get(f"/{uid}", params={"filename": "o.tar"}).content
        assert set(tar_digests(tar)) == {f["path"] for f in fileids}
    bound = clocks.request_bound(outage)
    return OutageReport(mode, outage, len(plans), 12, during, bound, recovered)


def give_up(
    client: httpx.Client, archive: ArchiveServer, mode: str, limit: float, retry_max: float
) -> dict[str, tuple[int, str, str]]:
    """The archive stays away: every cart fails, in about `limit` seconds, saying why.

    A file gives up once the next backoff would cross the limit, so up to one `retry_max`
    before it."""
    plans = publish(archive, "gives-up", carts=4, files=2)
    go_away(archive, mode)
    started = time.monotonic()
    for uid, fileids in plans.items():
        assert client.post(f"/{uid}", json={"fileids": fileids}).status_code == 201
    deadline = started + limit * 3 + 10
    while "staging" in {s[1] for s in states(client, list(plans)).values()}:
        assert time.monotonic() < deadline, "carts kept waiting past the limit"
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert elapsed >= limit - retry_max, f"gave up after {elapsed:.1f}s; the limit is {limit}s"
    come_back(archive, mode)
    return states(client, list(plans))
