"""The fault-injection soak: many carts against an archive that fails at random.

About `fault_rate` of all archive requests get a transient fault (5xx, dropped connection,
truncated or reset body), a few files hold other bytes than their checksum says, and some
files sit on tape for a random time.  The promises checked:

- every cart reaches `ready` or `error`; none is left staging past the deadline;
- every `ready` cart's tar holds exactly the right bytes (SHA-256 per member, same paths);
- the `error` carts are exactly those with a wrong-bytes file, each names the cause in its
  message, and its JSON status names the file with that cause;
- so transient faults alone never turned a cart into an error.

Used by tests/test_soak.py (small, in CI) and bench/soak.py (50 carts of 1-200 files).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from archive_server import ArchiveServer
from cartd_proc import tar_digests
from conftest import entry, part_files, wait_for

HASH_MISMATCH = "File hash does not match provided hash"


@dataclass(frozen=True)
class SoakConfig:
    seed: int
    carts: int
    max_files: int
    fault_rate: float = 0.2
    wrong_files: int = 3
    tape_share: float = 0.15
    deadline: float = 600.0


@dataclass
class CartPlan:
    fileids: list[dict[str, Any]]
    digests: dict[str, str]
    wrong: set[str] = field(default_factory=set)  # archive ids whose bytes are wrong


@dataclass
class SoakReport:
    seed: int
    carts: int = 0
    files: int = 0
    ready: int = 0
    errored: int = 0
    tape_files: int = 0
    archive_requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())


def _size(rng: random.Random) -> int:
    """Mostly small files, some empty, a few of several archive chunks (to be truncated)."""
    roll = rng.random()
    if roll < 0.03:
        return 0
    if roll < 0.06:
        return rng.randint(1_100_000, 2_500_000)
    return rng.randint(1, 40_000)


class Soak:
    def __init__(self, client: httpx.Client, archive: ArchiveServer, config: SoakConfig) -> None:
        self.client = client
        self.archive = archive
        self.config = config
        self.rng = random.Random(config.seed)
        self.plans: dict[str, CartPlan] = {}
        self.report = SoakReport(config.seed)

    def publish(self) -> None:
        """Put every file in the archive and plan the carts; wrong bytes go to a few carts."""
        doomed = set(self.rng.sample(range(self.config.carts), self.config.wrong_files))
        for number in range(self.config.carts):
            uid = f"soak-{number}"
            count = self.rng.randint(1, self.config.max_files)
            plan = CartPlan([], {})
            wrong_index = self.rng.randrange(count) if number in doomed else -1
            for index in range(count):
                self._add_file(uid, index, plan, index == wrong_index)
            self.plans[uid] = plan
            self.report.files += count
        self.report.carts = len(self.plans)

    def _add_file(self, uid: str, index: int, plan: CartPlan, wrong: bool) -> None:
        data = self.rng.randbytes(_size(self.rng))
        file_id = f"{uid}/{index}"
        tape = 0.0
        if self.rng.random() < self.config.tape_share:
            tape = self.rng.uniform(0.05, 1.0)
            self.report.tape_files += 1
        served = data + b"!" if wrong else data  # the archive holds other bytes
        self.archive.add_file(file_id, served, tape_delay=tape)
        path = f"d{index % 7}/{index}.bin"
        plan.fileids.append(entry(file_id, path, data, "sha256"))
        plan.digests[path] = hashlib.sha256(data).hexdigest()
        if wrong:
            plan.wrong.add(file_id)

    def post_all(self) -> None:
        for uid, plan in self.plans.items():
            response = self.client.post(f"/{uid}", json={"fileids": plan.fileids})
            assert response.status_code == 201, response.text

    def settle(self) -> dict[str, tuple[int, str, str]]:
        """Poll every cart until none is staging; a cart still staging at the deadline fails."""
        deadline = time.monotonic() + self.config.deadline
        settled: dict[str, tuple[int, str, str]] = {}
        while len(settled) < len(self.plans):
            for uid in self.plans.keys() - settled.keys():
                head = self.client.head(f"/{uid}")
                assert "X-Pacifica-Status" in head.headers, (uid, head.status_code, head.text)
                state = head.status_code, head.headers["X-Pacifica-Status"]
                if state[1] != "staging":
                    settled[uid] = (*state, head.headers["X-Pacifica-Message"])
            stuck = sorted(self.plans.keys() - settled.keys())
            assert time.monotonic() < deadline, f"stuck after the deadline: {stuck}"
            time.sleep(0.1)
        return settled

    def check(self, settled: dict[str, tuple[int, str, str]]) -> None:
        for uid, (code, status, message) in sorted(settled.items()):
            plan = self.plans[uid]
            if plan.wrong:
                self._check_error(uid, code, status, message)
            else:
                assert (code, status, message) == (204, "ready", ""), (uid, message)
                self._check_bytes(uid, plan)
                self.report.ready += 1

    def _check_error(self, uid: str, code: int, status: str, message: str) -> None:
        assert (code, status) == (500, "error"), (uid, code, status, message)
        assert message == f"Failed to pull file({HASH_MISMATCH})", (uid, message)
        body = self.client.get(f"/{uid}/status").json()
        failed = {f["id"]: f["error"] for f in body["files"] if f["state"] == "error"}
        assert failed == dict.fromkeys(self.plans[uid].wrong, HASH_MISMATCH), (uid, failed)
        self.report.errored += 1

    def _check_bytes(self, uid: str, plan: CartPlan) -> None:
        download = self.client.get(f"/{uid}", params={"filename": f"{uid}.tar"})
        assert download.status_code == 200, (uid, download.text[:200])
        assert int(download.headers["content-length"]) == len(download.content)
        assert tar_digests(download.content) == plan.digests, uid

    def run(self) -> SoakReport:
        started = time.monotonic()
        self.publish()
        self.archive.chaos(self.config.fault_rate, self.config.seed)
        self.post_all()
        settled = self.settle()
        self.archive.chaos(0, self.config.seed)
        self.report.seconds = time.monotonic() - started
        self.report.archive_requests = len(self.archive.requests)
        self.report.faults = Counter(
            {f"{verb} {kind}": n for (verb, kind), n in self.archive.injected.items()}
        )
        self.check(settled)
        return self.report


def fetches_in_flight(client: httpx.Client) -> float:
    """The service's own count of running fetches, as Prometheus would scrape it."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "cartd_fetches_in_flight":
            return float(family.samples[0].value)
    raise AssertionError("no cartd_fetches_in_flight in /metrics")


def assert_volume_clean(volume: Any, client: httpx.Client) -> None:
    """Once no fetch runs, no `.part` may remain.  A cart that fails cancels its siblings'
    fetches, which remove their own `.part` as they unwind, just after the cart reads
    `error`: so the check waits for the worker to go idle, not for the files to vanish."""
    wait_for(lambda: fetches_in_flight(client) == 0, "the worker to go idle", timeout=30)
    assert part_files(volume) == [], "a .part file outlived its download"
