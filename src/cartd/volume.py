"""Where staged bytes live on disk.

Layout: `<volume>/carts/<cart row id>/<file row id>`.  Bundle paths never touch the file
system, so no client-supplied path can escape its cart directory, and a reused cart uid
gets a fresh directory.  In-progress downloads are `<file row id>.<replica tag>.part`; only
a completed, verified, fsynced file is renamed to its final name, so a crash can never
leave a partial file that looks staged.  The replica tag keeps two replicas' attempts at
one file apart: a replica that lost its lease but has not noticed yet cannot write into
the file its successor is writing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

PART_SUFFIX = ".part"
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range, do not wait


class Hold:
    """One download's claim on a cart's files; releasing twice is harmless."""

    def __init__(self, volume: Volume, cart_id: int) -> None:
        self._volume = volume
        self._cart_id = cart_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._volume._release(self._cart_id)


class Volume:
    def __init__(self, root: Path, tag: str = "", *, shared: bool = False) -> None:
        self.root = root.resolve()
        self.tag = tag
        # Other replicas use this volume too: their downloads hold carts through the
        # database (`carts.held_until`), and this process's downloads must do the same.
        self.shared = shared
        self.carts_dir = self.root / "carts"
        self._streams: Counter[int] = Counter()
        self._doomed: set[int] = set()
        self.dir_sync = DirSync()

    def ensure(self) -> None:
        self.carts_dir.mkdir(parents=True, exist_ok=True)

    def cart_dir(self, cart_id: int) -> Path:
        return self.carts_dir / str(cart_id)

    def file_path(self, cart_id: int, file_id: int) -> Path:
        return self.cart_dir(cart_id) / str(file_id)

    def part_path(self, cart_id: int, file_id: int) -> Path:
        tag = f".{self.tag}" if self.tag else ""
        return self.cart_dir(cart_id) / f"{file_id}{tag}{PART_SUFFIX}"

    def hold(self, cart_id: int) -> Hold:
        """Keep a cart's files on disk, even across a DELETE, until the hold is released.

        A download takes it before planning its tar, so the files it is about to promise
        in a Content-Length cannot vanish between the plan and the last byte.
        """
        self._streams[cart_id] += 1
        return Hold(self, cart_id)

    def _release(self, cart_id: int) -> None:
        self._streams[cart_id] -= 1
        if self._streams[cart_id]:
            return
        del self._streams[cart_id]
        if cart_id in self._doomed:
            self._doomed.discard(cart_id)
            asyncio.get_running_loop().run_in_executor(
                None, shutil.rmtree, self.cart_dir(cart_id), True
            )

    def is_streaming(self, cart_id: int) -> bool:
        return bool(self._streams.get(cart_id))

    def streaming_carts(self) -> list[int]:
        """Carts this process streams now; their hold in the database is renewed."""
        return sorted(self._streams)

    async def remove_cart(self, cart_id: int) -> None:
        """Delete a cart's files now, or when its last running download ends."""
        if self._streams[cart_id]:
            self._doomed.add(cart_id)
            return
        self._streams.pop(cart_id, None)
        await asyncio.to_thread(shutil.rmtree, self.cart_dir(cart_id), True)

    def cart_dirs(self) -> dict[int, Path]:
        """Every cart directory on disk, by cart row id (for start-up reconciliation)."""
        found: dict[int, Path] = {}
        if self.carts_dir.is_dir():
            for entry in self.carts_dir.iterdir():
                if entry.is_dir() and entry.name.isdigit():
                    found[int(entry.name)] = entry
        return found

    def parts(self, cart_dir: Path) -> list[tuple[int | None, Path]]:
        """Half-written downloads in a cart directory, with the file row id each is for."""
        found: list[tuple[int | None, Path]] = []
        for part in cart_dir.glob(f"*{PART_SUFFIX}"):
            head = part.name.split(".", 1)[0]
            found.append((int(head) if head.isdigit() else None, part))
        return found


def commit_file(part: Path, final: Path, mtime: float) -> None:
    """fsync, set the archive's mtime, then rename: the order makes the final name a promise.

    The rename is durable only once the directory is fsynced (`DirSync`): the caller must
    wait for that before it records the file as staged.
    """
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(part, (mtime, mtime))
    os.replace(part, final)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the os module does not offer; None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Have the kernel start writing these bytes to disk now, without waiting for it.

    Left alone, a big download's pages stay dirty until the fsync that makes the file
    durable (the kernel's own writeback starts only when a tenth of memory is dirty), and
    that fsync then writes gigabytes after the last byte arrived.  Started as each batch
    is written, the disk works while the network does, and the final fsync finds little
    left.  Advisory: False where it is not available or refused, and nothing is lost.
    """
    if _SYNC_FILE_RANGE is None:
        return False
    return _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


def _fsync_dirs(directories: list[Path]) -> dict[Path, OSError]:
    """fsync each directory; the failures, by directory (the others are durable)."""
    failed: dict[Path, OSError] = {}
    for directory in directories:
        try:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            failed[directory] = exc
    return failed


class DirSync:
    """Directory fsyncs shared by the renames that wait for them.

    Small files are renamed into one cart directory by the hundred per second.  One fsync
    of the directory makes every rename done before it began durable, so renames that
    arrive while an fsync runs wait together for the next one: one fsync per batch, not
    per file, and no timer.
    """

    def __init__(self) -> None:
        self._pending: dict[Path, list[asyncio.Future[None]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def sync(self, directory: Path) -> None:
        """Return once `directory` was fsynced after this call began."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(directory, []).append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="cartd-dir-sync")
        await asyncio.shield(future)  # a cancelled caller must not stop the others' fsync

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            failed = await asyncio.to_thread(_fsync_dirs, list(batch))
            for directory, futures in batch.items():
                for future in (f for f in futures if not f.done()):
                    if (error := failed.get(directory)) is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(None)
