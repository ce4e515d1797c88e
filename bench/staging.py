"""Staging benchmark: a cart of N small files, from POST to `ready`, against a bare loop.

Both sides fetch the same files from the same test archive server (a separate process on
loopback) in the same session, so the ratio is meaningful on a noisy shared machine:

- reference: a bare httpx script doing POST, HEAD, GET per file at concurrency 8, with the
  sha1 check and the write to disk (no database, no fsync);
- cartd: `cartd serve` as a separate process, timed from the POST until HEAD says ready.

    .venv/bin/python bench/staging.py --files 1000 [--database mariadb] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
from report import emit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def make_files(root: Path, count: int, size: int) -> list[dict[str, str]]:
    cart = []
    for number in range(count):
        data = os.urandom(size)
        (root / f"f{number}").write_bytes(data)
        cart.append(
            {
                "id": f"f{number}",
                "path": f"d{number % 100}/f{number}",
                "hashtype": "sha1",
                "hashsum": hashlib.sha1(data).hexdigest(),
            }
        )
    return cart


async def bare_loop(base: str, cart: list[dict[str, str]], dest: Path, concurrency: int) -> float:
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


def database_url(kind: str, work: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{work / 'cartd.db'}", None
    name = f"cartd_bench_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["mariadb", "-uroot", "-h127.0.0.1", "-e", f"CREATE DATABASE {name}"], check=True
    )
    return f"mysql+aiomysql://root@127.0.0.1/{name}", name


def time_cartd(archive: str, cart: list[dict[str, str]], work: Path, db: str) -> float:
    port = free_port()
    env = {
        **os.environ,
        "CARTD_DATABASE_URL": db,
        "VOLUME_PATH": str(work / "volume"),
        "ARCHIVE_INTERFACE_URL": archive,
        "CARTD_FETCH_CONCURRENCY": "8",
    }
    server = subprocess.Popen(
        [str(BIN / "cartd"), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=work,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        with httpx.Client(base_url=url, timeout=60) as client:
            started = time.perf_counter()
            client.post("/bench", json={"fileids": cart}).raise_for_status()
            while (state := client.head("/bench").headers["X-Pacifica-Status"]) == "staging":
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
        if state != "ready":
            raise RuntimeError(f"cart ended {state}")
        return elapsed
    finally:
        server.terminate()
        server.wait(30)


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "archive").mkdir()
        cart = make_files(work / "archive", args.files, args.size)
        port = free_port()
        archive = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "archive_server.py"),
                "--root",
                str(work / "archive"),
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
        )
        db, created = database_url(args.database, work)
        try:
            base = f"http://127.0.0.1:{port}/"
            wait_http(base)
            reference = asyncio.run(bare_loop(base, cart, work / "bare", 8))
            cartd = time_cartd(base, cart, work, db)
        finally:
            archive.terminate()
            if created:
                subprocess.run(
                    ["mariadb", "-uroot", "-h127.0.0.1", "-e", f"DROP DATABASE {created}"],
                    check=False,
                )
    return {
        "benchmark": "staging_small_files",
        "files": args.files,
        "size": args.size,
        "database": args.database,
        "reference_s": round(reference, 2),
        "cartd_s": round(cartd, 2),
        "ratio": round(cartd / reference, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--out", type=Path)
    result = run(parser.parse_args())
    emit(result, parser.parse_args().out)


if __name__ == "__main__":
    main()
