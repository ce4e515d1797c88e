"""Who may use a volume (and a SQLite database) at once: advisory locks held while running.

Start-up recovery deletes `.part` files and unknown cart directories, and `cartd fsck
--repair` deletes whatever the database does not account for.  A sole service (SQLite)
and fsck therefore take the volume's lock exclusively and refuse to run without it.
Replicas sharing a MariaDB database take it shared: they coordinate through the database
(leases, holds), and their recovery spares each other's work, but an fsck must still wait
until they all stop.  (flock is per host: replicas on other hosts of a network volume are
not seen; docs/scaling.md says what to do instead.)

SQLite serves one process only, so a second `cartd serve` on the same database file
refuses to start, whatever volume it names.  The kernel drops a flock when its holder
dies, so a SIGKILLed service never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

LOCK_NAME = ".cartd.lock"
SQLITE_LOCK_SUFFIX = ".cartd-lock"


class VolumeBusy(RuntimeError):
    """Another process (a running `cartd serve`, or an fsck) holds the volume."""


class DatabaseBusy(VolumeBusy):
    """Another `cartd serve` uses this SQLite database file."""


@contextmanager
def _flock(path: Path, mode: int, busy: Exception) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        yield
    finally:
        os.close(fd)


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold the volume's lock for the duration of the block, or raise VolumeBusy at once."""
    root.mkdir(parents=True, exist_ok=True)
    busy = VolumeBusy(f"volume {root} is in use by another cartd process (lock {root / LOCK_NAME})")
    with _flock(root / LOCK_NAME, fcntl.LOCK_EX, busy):
        yield


@contextmanager
def shared(root: Path) -> Iterator[None]:
    """A replica's hold on a volume that other replicas (never an fsck) may share."""
    root.mkdir(parents=True, exist_ok=True)
    busy = VolumeBusy(
        f"volume {root} is locked exclusively by a cartd fsck or by a cartd using SQLite "
        f"(lock {root / LOCK_NAME})"
    )
    with _flock(root / LOCK_NAME, fcntl.LOCK_SH, busy):
        yield


@contextmanager
def serving(root: Path, *, sole: bool, sqlite_file: Path | None = None) -> Iterator[None]:
    """The locks `cartd serve` needs.  A sole service (SQLite) holds the volume
    exclusively, as its recovery assumes; with a SQLite file it also holds the database,
    so that a second service on it refuses to start whatever volume it names."""
    if not sole:
        with shared(root):
            yield
        return
    if sqlite_file is None:  # in-memory SQLite: no file that another process could open
        with exclusive(root):
            yield
        return
    lock = sqlite_file.with_name(sqlite_file.name + SQLITE_LOCK_SUFFIX)
    busy = DatabaseBusy(
        f"SQLite database {sqlite_file} is in use by another cartd process (lock {lock}); "
        "SQLite supports a single cartd replica: to run several, use MariaDB or MySQL "
        "(see docs/scaling.md)"
    )
    with ExitStack() as stack:
        lock.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_flock(lock, fcntl.LOCK_EX, busy))
        stack.enter_context(exclusive(root))
        yield
