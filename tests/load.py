"""The concurrency and load proof: pollers, downloads and staging, all at once.

While `staging` carts stage, `pollers` clients HEAD random carts as fast as they are
answered, and `downloaders` clients stream ready carts again and again, checking every
byte.  The promises checked:

- no request gets a 5xx (no cart is meant to fail, so a 500 is a server fault);
- no "database is locked" and no unhandled error in the service log;
- no lost update: every staging cart ends ready with every file staged and its byte
  counts complete, and its tar holds exactly the posted bytes;
- every download is byte-identical to the first one of its cart.

The worst HEAD latency is recorded (with p50 and p99) for the closing note.

Used by tests/test_load.py (CI) and bench/load.py (longer, bigger).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx

from archive_server import ArchiveServer
from cartd_proc import tar_digests
from conftest import entry

# A client must give up an idle connection before the server does (uvicorn: after 5 s),
# or a request sent just as the server closes it is lost.  httpx's default is also 5 s.
KEEPALIVE = 2.0


@dataclass(frozen=True)
class LoadConfig:
    seed: int
    pollers: int = 200
    downloaders: int = 20
    staging: int = 20
    files_per_cart: int = 15
    poll_interval: float = 0.5  # each poller's pause between HEADs, jittered
    poller_processes: int = 2
    deadline: float = 120.0


@dataclass
class LoadReport:
    heads: int = 0
    downloads: int = 0
    download_bytes: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    head_latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.head_latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    @property
    def worst_head(self) -> float:
        return max(self.head_latencies, default=0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "heads": self.heads,
            "downloads": self.downloads,
            "download_mib": round(self.download_bytes / 2**20, 1),
            "codes": dict(self.codes),
            "head_p50_ms": round(1000 * self.percentile(0.5), 1),
            "head_p99_ms": round(1000 * self.percentile(0.99), 1),
            "head_max_ms": round(1000 * self.worst_head, 1),
            "seconds": round(self.seconds, 1),
        }


@dataclass
class Plan:
    fileids: list[dict[str, Any]]
    digests: dict[str, str]


def plan_cart(archive: ArchiveServer, rng: random.Random, uid: str, files: int) -> Plan:
    fileids, digests = [], {}
    for index in range(files):
        data = rng.randbytes(rng.randint(1, 200_000))
        file_id = f"{uid}/{index}"
        tape = rng.uniform(0.05, 0.5) if rng.random() < 0.2 else 0.0
        archive.add_file(file_id, data, tape_delay=tape)
        fileids.append(entry(file_id, f"f{index}.bin", data, "sha256"))
        digests[f"f{index}.bin"] = hashlib.sha256(data).hexdigest()
    return Plan(fileids, digests)


class Load:
    def __init__(self, url: str, archive: ArchiveServer, config: LoadConfig) -> None:
        self.url = url
        self.archive = archive
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = LoadReport()
        self.ready: dict[str, Plan] = {}
        self.staging: dict[str, Plan] = {}
        self.tars: dict[str, str] = {}  # ready cart -> sha256 of its first download
        self.done = asyncio.Event()

    def plan(self) -> None:
        for number in range(self.config.downloaders):
            uid = f"ready-{number}"
            self.ready[uid] = plan_cart(self.archive, self.rng, uid, 8)
        for number in range(self.config.staging):
            uid = f"staging-{number}"
            self.staging[uid] = plan_cart(self.archive, self.rng, uid, self.config.files_per_cart)

    async def prepare(self, client: httpx.AsyncClient) -> None:
        """The download carts are made ready (and their tars fingerprinted) before the storm."""
        for uid, plan in self.ready.items():
            assert (await client.post(f"/{uid}", json={"fileids": plan.fileids})).status_code == 201
        for uid, plan in self.ready.items():
            await self.wait_ready(client, uid)
            tar = (await client.get(f"/{uid}", params={"filename": "r.tar"})).content
            assert tar_digests(tar) == plan.digests, uid
            self.tars[uid] = hashlib.sha256(tar).hexdigest()

    async def wait_ready(self, client: httpx.AsyncClient, uid: str) -> None:
        deadline = time.monotonic() + self.config.deadline
        while (await client.head(f"/{uid}")).headers.get("X-Pacifica-Status") != "ready":
            assert time.monotonic() < deadline, f"{uid} never became ready"
            await asyncio.sleep(0.05)

    async def downloader(self, client: httpx.AsyncClient, uid: str) -> None:
        while not self.done.is_set():
            try:
                await self.download_once(client, uid)
            except httpx.TransportError as exc:
                raise AssertionError(f"GET {uid}: {exc!r}") from exc

    async def download_once(self, client: httpx.AsyncClient, uid: str) -> None:
        hasher = hashlib.sha256()
        async with client.stream("GET", f"/{uid}", params={"filename": "r.tar"}) as response:
            self.report.codes[response.status_code] += 1
            assert response.status_code == 200, (uid, response.status_code)
            async for chunk in response.aiter_bytes():
                hasher.update(chunk)
                self.report.download_bytes += len(chunk)
        assert hasher.hexdigest() == self.tars[uid], f"download of {uid} changed"
        self.report.downloads += 1

    async def post_all(self, client: httpx.AsyncClient) -> None:
        posts = [
            client.post(f"/{uid}", json={"fileids": plan.fileids})
            for uid, plan in self.staging.items()
        ]
        for response in await asyncio.gather(*posts):
            self.report.codes[response.status_code] += 1
            assert response.status_code == 201, response.text

    async def storm(self, client: httpx.AsyncClient) -> None:
        """Everything at once: staging starts, then pollers and downloaders pile on until it
        is done (pollers begin after the POSTs, so that no HEAD races a cart's creation)."""
        started = time.monotonic()
        await self.post_all(client)
        pollers = PollerProcesses(self.url, [*self.ready, *self.staging], self.config)
        workers = [asyncio.create_task(self.downloader(client, uid)) for uid in self.ready]
        try:
            await asyncio.gather(*(self.wait_ready(client, uid) for uid in self.staging))
        finally:
            self.done.set()
            results = await asyncio.gather(*workers, return_exceptions=True)
            polled = pollers.stop()
        self.report.seconds = time.monotonic() - started
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        for latencies, codes, problems in polled:
            assert not problems, problems[:3]
            self.report.head_latencies += latencies
            self.report.heads += len(latencies)
            self.report.codes.update(codes)

    async def audit(self, client: httpx.AsyncClient) -> None:
        """No lost update: the database and the tar both show every file of every cart."""
        for uid, plan in self.staging.items():
            status = (await client.get(f"/{uid}/status")).json()
            assert status["state"] == "ready", (uid, status["state"])
            assert status["files_staged"] == status["files_total"] == len(plan.fileids), uid
            assert status["bytes_staged"] == status["bytes_total"], uid
            assert {f["state"] for f in status["files"]} == {"staged"}, uid
            tar = (await client.get(f"/{uid}", params={"filename": "s.tar"})).content
            assert tar_digests(tar) == plan.digests, uid

    async def run(self) -> LoadReport:
        self.plan()
        limits = httpx.Limits(
            max_connections=self.config.downloaders + 50, keepalive_expiry=KEEPALIVE
        )
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            await self.prepare(client)
            await self.storm(client)
            await self.audit(client)
        return self.report


Polled = tuple[list[float], Counter[int], list[str]]
MIN_POLLS = 2


class PollerProcesses:
    """The HEAD pollers, in processes of their own: measured from a client that is not
    busy hashing downloads, the latency is the service's, not the test's."""

    def __init__(self, url: str, uids: list[str], config: LoadConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        share = config.pollers // config.poller_processes
        for number in range(config.poller_processes):
            mine, theirs = context.Pipe()
            args = (theirs, url, uids, share, config.poll_interval, config.seed + number)
            process = context.Process(target=poll_in_process, args=args, daemon=True)
            process.start()
            self.pipes.append(mine)
            self.processes.append(process)
        for pipe in self.pipes:
            assert pipe.recv() == "polling"

    def stop(self) -> list[Polled]:
        for pipe in self.pipes:
            pipe.send("stop")
        results: list[Polled] = [pipe.recv() for pipe in self.pipes]
        for process in self.processes:
            process.join(30)
        return results


def poll_in_process(
    pipe: Connection, url: str, uids: list[str], pollers: int, interval: float, seed: int
) -> None:
    pipe.send(asyncio.run(_poll(pipe, url, uids, pollers, interval, random.Random(seed))))


async def _poll(
    pipe: Connection, url: str, uids: list[str], pollers: int, interval: float, rng: random.Random
) -> Polled:
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    problems: list[str] = []
    stop = asyncio.Event()

    async def poller(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(rng.uniform(0, interval))  # spread the first wave
        made = 0
        # Every poller polls at least MIN_POLLS times even if staging finishes first, so the
        # storm the test asserts on happens however fast or slow the machine is.
        while not stop.is_set() or made < MIN_POLLS:
            made += 1
            uid = rng.choice(uids)
            started = time.perf_counter()
            try:
                response = await client.head(f"/{uid}")
            except httpx.TransportError as exc:
                problems.append(f"HEAD {uid}: {exc!r}")
                continue
            latencies.append(time.perf_counter() - started)
            codes[response.status_code] += 1
            if response.status_code != 204 or "X-Pacifica-Status" not in response.headers:
                problems.append(f"HEAD {uid}: {response.status_code} {response.headers}")
            await asyncio.sleep(rng.uniform(0.5 * interval, 1.5 * interval))

    limits = httpx.Limits(
        max_connections=pollers, max_keepalive_connections=pollers, keepalive_expiry=KEEPALIVE
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(poller(client)) for _ in range(pollers)]
        pipe.send("polling")
        await asyncio.to_thread(pipe.recv)
        stop.set()
        await asyncio.gather(*tasks)
    return latencies, codes, problems
