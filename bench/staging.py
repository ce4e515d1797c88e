"""Benchmark 2: a cart of N small files, from POST to `ready`, against a bare loop.

Both sides fetch the same files from the same archive (a separate process on loopback) in
the same session, so the ratio is meaningful on a noisy shared machine:

- reference: a bare httpx script doing POST, HEAD, GET per file at concurrency 8, with the
  sha1 check and the write to disk (no database, no fsync);
- cartd: `cartd serve` as a separate process, timed from the POST until HEAD says ready.

The archive is tests/archive_server.py ("test") or pacifica-archiveinterface 0.4.2 with a
thread pool of 1 ("reference", from .venv-archive).  Alone, for one size:

    .venv/bin/python bench/staging.py --files 1000 [--archive reference]
                                      [--database mariadb] [--repeat 3] [--out FILE]

On a shared machine one run a side swings by a third; `--repeat` runs each side that
many times, alternating which goes first, and the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from harness import Cartd, FileIds, archive, cartd, fresh_database, stage, write_files
from report import emit

TARGET = 1.2
CONCURRENCY = 8


async def bare_loop(base: str, cart: FileIds, dest: Path, concurrency: int) -> float:
    """What a careful hand-written script does: stage, check status, stream, verify."""
    dest.mkdir()
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(item: dict[str, str]) -> None:
            url = base + quote(item["id"], safe="")
            async with slots:
                (await client.post(url)).raise_for_status()
                head = await client.head(url)
                assert head.headers["X-Pacifica-File-Storage-Media"] == "disk"
                digest = hashlib.sha1()
                with open(dest / item["id"], "wb") as handle:
                    async with client.stream("GET", url) as response:
                        async for chunk in response.aiter_bytes():
                            digest.update(chunk)
                            handle.write(chunk)
                assert digest.hexdigest() == item["hashsum"]

        started = time.perf_counter()
        await asyncio.gather(*(one(item) for item in cart))
        return time.perf_counter() - started


def bare(base: str, cart: FileIds, work: Path) -> float:
    dest = work / f"bare-{time.monotonic_ns()}"
    try:
        return asyncio.run(bare_loop(base, cart, dest, CONCURRENCY))
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def matrix(
    work: Path,
    root: Path,
    small: FileIds,
    kind: str,
    db_kind: str,
    counts: tuple[int, ...],
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Every size against one archive and database, each `repeat` times back to back with
    its reference; the medians make the ratio."""
    rows = []
    with (
        archive(kind, root) as base,
        fresh_database(db_kind, work) as db,
        cartd(db, work, base, fetch_concurrency=str(CONCURRENCY)) as service,
    ):
        for count in counts:
            references, tooks = interleaved(base, service, small[:count], work, repeat)
            reference, took = statistics.median(references), statistics.median(tooks)
            ratio = took / reference
            rows.append(
                {
                    "archive": kind,
                    "database": db_kind,
                    "files": count,
                    "reference_s": round(reference, 2),
                    "cartd_s": round(took, 2),
                    "ratio": round(ratio, 2),
                    "runs": repeat,
                    "reference_runs_s": [round(t, 2) for t in references],
                    "cartd_runs_s": [round(t, 2) for t in tooks],
                    "target": f"<= {TARGET} x reference",
                    "met": ratio <= TARGET,
                }
            )
    return rows


def interleaved(
    base: str, service: Cartd, cart: FileIds, work: Path, repeat: int
) -> tuple[list[float], list[float]]:
    """Seconds of the bare loop and of cartd, `repeat` each, alternating which goes first
    so that neither side always meets the machine in the same state."""
    references: list[float] = []
    tooks: list[float] = []
    for run in range(repeat):
        for side in ("bare", "cartd") if run % 2 == 0 else ("cartd", "bare"):
            if side == "bare":
                references.append(bare(base, cart, work))
            else:
                tooks.append(stage(service, f"small-{len(cart)}-{run}", cart))
    return references, tooks


def linearity(work: Path, root: Path, small: FileIds, counts: tuple[int, ...]) -> dict[str, float]:
    """cartd alone (test archive, SQLite): seconds per cart size, to see the growth."""
    seconds = {}
    with (
        archive("test", root) as base,
        fresh_database("sqlite", work) as db,
        cartd(db, work, base) as service,
    ):
        for count in counts:
            seconds[str(count)] = round(stage(service, f"linear-{count}", small[:count]), 2)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--archive", choices=["test", "reference"], default="test")
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=3, help="runs a side; medians count")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cartd-staging-") as tmp:
        work = Path(tmp)
        small = write_files(work / "archive", "s", args.files, args.size)
        rows = matrix(
            work, work / "archive", small, args.archive, args.database, (args.files,), args.repeat
        )
    emit({"benchmark": "staging_small_files", "size": args.size, **rows[0]}, args.out)


if __name__ == "__main__":
    main()
