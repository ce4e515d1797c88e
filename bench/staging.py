"""Benchmark 2: a cart of N small files, from POST to `ready`, against a bare loop.

Both sides fetch the same files from the same archive (a separate process on loopback) in
the same session, so the ratio is meaningful on a noisy shared machine:

- reference: a bare httpx script doing POST, HEAD, GET per file at concurrency 8, with the
  sha1 check and the write to disk (no database, no fsync);
- cartd: `cartd serve` as a separate process, timed from the POST until HEAD says ready.

The archive is tests/archive_server.py ("test") or pacifica-archiveinterface 0.4.2 with a
thread pool of 1 ("reference", from .venv-archive).  Alone, for one size:

    .venv/bin/python bench/staging.py --files 1000 [--archive reference]
                                      [--database mariadb] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from harness import FileIds, archive, cartd, fresh_database, stage, write_files
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
    work: Path, root: Path, small: FileIds, kind: str, db_kind: str, counts: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Every size against one archive and database, each back to back with its reference."""
    rows = []
    with (
        archive(kind, root) as base,
        fresh_database(db_kind, work) as db,
        cartd(db, work, base, fetch_concurrency=str(CONCURRENCY)) as service,
    ):
        for count in counts:
            cart = small[:count]
            reference = bare(base, cart, work)
            took = stage(service, f"small-{count}", cart)
            ratio = took / reference
            rows.append(
                {
                    "archive": kind,
                    "database": db_kind,
                    "files": count,
                    "reference_s": round(reference, 2),
                    "cartd_s": round(took, 2),
                    "ratio": round(ratio, 2),
                    "target": f"<= {TARGET} x reference",
                    "met": ratio <= TARGET,
                }
            )
    return rows


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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cartd-staging-") as tmp:
        work = Path(tmp)
        small = write_files(work / "archive", "s", args.files, args.size)
        rows = matrix(work, work / "archive", small, args.archive, args.database, (args.files,))
    emit({"benchmark": "staging_small_files", "size": args.size, **rows[0]}, args.out)


if __name__ == "__main__":
    main()
