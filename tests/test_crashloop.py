"""Crash recovery under repeated SIGKILL (the long version is bench/crashloop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive_server import ArchiveServer
from crashloop import KILL_POINTS, CrashLoop

SEED = 20261128
KILLS = 10


@pytest.mark.timeout(400)
def test_ten_sigkills_at_random_points_lose_nothing(
    db_url: str, archive: ArchiveServer, tmp_path: Path
) -> None:
    print(f"crash loop seed {SEED}")
    report = CrashLoop(tmp_path, db_url, archive, SEED).run(KILLS)
    print(report)
    assert sum(report.kills.values()) == KILLS
    assert set(report.kills) == set(KILL_POINTS), report.kills
    assert report.deleted >= 2
