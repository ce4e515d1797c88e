"""Shared directory fsyncs: a rename is never reported durable before an fsync that began
after it, and renames that wait together share one fsync."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from cartd import volume
from cartd.volume import DirSync


async def test_renames_during_an_fsync_wait_for_the_next_one_and_share_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    calls: list[list[Path]] = []
    gate = threading.Event()
    real = volume._fsync_dirs

    def fsync_dirs(directories: list[Path]) -> dict[Path, OSError]:
        calls.append(directories)
        assert gate.wait(10)
        return real(directories)

    monkeypatch.setattr(volume, "_fsync_dirs", fsync_dirs)
    syncs = DirSync()
    early = asyncio.create_task(syncs.sync(first))
    while not calls:  # the first fsync is running, in its thread
        await asyncio.sleep(0.001)
    late = [asyncio.create_task(syncs.sync(d)) for d in (first, first, second)]
    assert not early.done()
    gate.set()
    await asyncio.gather(early, *late)
    # The renames that came during the first fsync were not covered by it: one more
    # fsync, of each directory once, covers all three.
    assert calls == [[first], [first, second]]


async def test_a_failed_fsync_fails_only_its_own_directory(tmp_path: Path) -> None:
    present, missing = tmp_path / "here", tmp_path / "gone"
    present.mkdir()
    syncs = DirSync()
    results = await asyncio.gather(syncs.sync(present), syncs.sync(missing), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], FileNotFoundError)
    assert os.path.isdir(present)
