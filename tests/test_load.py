"""Concurrency and load: 200 HEAD pollers, 20 downloads and 20 carts staging at once, on
each database, against a real `cartd serve` process (bench/load.py runs it longer)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from archive_server import ArchiveServer
from cartd_proc import Cartd, cartd_env
from load import MIN_POLLS, Load, LoadConfig

SEED = 5150
# All of the concurrency, with small carts so that CI stays short (bench/load.py
# takes sizes as options).
CONFIG = LoadConfig(seed=SEED, pollers=200, downloaders=20, staging=20, files_per_cart=3)


@pytest.mark.timeout(300)
def test_pollers_downloads_and_staging_at_once(
    db_url: str, archive: ArchiveServer, tmp_path: Path
) -> None:
    env = cartd_env(db_url, tmp_path / "volume", archive.url)
    service = Cartd(env, tmp_path / "cartd.log", "warning").wait_up()
    try:
        report = asyncio.run(Load(service.url, archive, CONFIG).run())
    finally:
        service.terminate()
        try:
            service.proc.wait(timeout=60)
        finally:
            service.kill()
    print(f"load seed {SEED}: {report.summary()}")
    log = service.log_text()
    assert "database is locked" not in log
    assert "unhandled error" not in log, log[-3000:]
    assert not any(code >= 500 for code in report.codes), report.codes
    # The storm really happened: every poller polled, every downloader downloaded.
    assert report.heads >= MIN_POLLS * CONFIG.pollers, report.summary()
    assert report.downloads >= CONFIG.downloaders, report.summary()
    # A bound, not a target: past the 30 s pool timeout a HEAD would have been a 500.
    assert report.worst_head < 30.0, report.summary()
