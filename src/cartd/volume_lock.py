"""One cartd per volume: an advisory lock held for as long as a process owns the volume.

Start-up recovery deletes `.part` files and unknown cart directories, and `cartd fsck
--repair` deletes whatever the database does not account for.  Either would destroy a
download in flight if another cartd were staging into the same directory, so both take
this lock first and refuse to run without it.  The kernel drops a flock when its holder
dies, so a SIGKILLed service never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".cartd.lock"


class VolumeBusy(RuntimeError):
    """Another process (a running `cartd serve`, or an fsck) holds the volume."""


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold the volume's lock for the duration of the block, or raise VolumeBusy at once."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(
                f"volume {root} is in use by another cartd process (lock {root / LOCK_NAME})"
            ) from None
        yield
    finally:
        os.close(fd)
