"""Writing a big file around the page cache (O_DIRECT).

Written through the page cache, every byte of a staged file is first copied into pages
the kernel must find, zero and account, then written to disk by the fsync that makes the
file durable.  On this project's virtual machines that copy was the largest cost of a
big file: 2 to 5 CPU seconds per 2 GiB (`copy_folio_from_iter_atomic`, 45-55% of perf's
samples of cartd), where the disk itself took 2 GiB in 0.75 s with O_DIRECT.  A big file
is also read once, soon, by its download, so caching it on the way in buys little.

O_DIRECT wants the buffer, the file offset and the length aligned to the device's block.
Pieces from the archive are copied into one page-aligned buffer; whole blocks are
written, the remainder waits for the next batch, and the file's last partial block goes
through the page cache (O_DIRECT is turned off for it).  A file system that refuses
O_DIRECT, or a write it rejects, falls back to ordinary writes: the bytes are the same.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os

BLOCK = 4096  # a multiple of every common logical block size (512, 4096)


def direct_writer(fd: int, capacity: int) -> DirectWriter | None:
    """A writer for the open file `fd`; None where its file system refuses O_DIRECT."""
    return DirectWriter(fd, capacity) if _set_direct(fd, True) else None


class DirectWriter:
    """Appends pieces to a file opened for O_DIRECT, copied through a buffer of about
    `capacity` bytes; one caller (thread) at a time."""

    def __init__(self, fd: int, capacity: int) -> None:
        self._fd = fd
        size = -(-max(capacity, BLOCK) // BLOCK) * BLOCK
        self._buffer = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
        self._view = memoryview(self._buffer)
        self._held = 0  # bytes at the buffer's start that are not written yet
        self._offset = 0  # where the buffer's first byte goes in the file
        self.direct = True

    def write(self, pieces: list[bytes]) -> None:
        """Copy the pieces in; write every whole block, hold back the rest."""
        for piece in pieces:
            data = memoryview(piece)
            while data:
                taken = min(len(self._view) - self._held, len(data))
                self._view[self._held : self._held + taken] = data[:taken]
                self._held += taken
                data = data[taken:]
                if self._held == len(self._view):
                    self._write_blocks()
        self._write_blocks()

    def finish(self) -> None:
        """Write the held tail through the page cache (the fsync after makes it durable)."""
        if self.direct:
            self._go_buffered()
        self._write(self._view[: self._held])
        self._held = 0
        self.close()

    def close(self) -> None:
        """Give the buffer back; while a failed write's traceback still holds a view of
        it, that happens when the traceback goes (an error here would hide the failure)."""
        self._view.release()
        with contextlib.suppress(BufferError):
            self._buffer.close()

    def _write_blocks(self) -> None:
        whole = self._held - self._held % BLOCK
        if whole:
            self._write(self._view[:whole])
            rest = self._held - whole
            self._view[:rest] = self._view[whole : self._held]
            self._held = rest

    def _write(self, data: memoryview) -> None:
        """All of `data` at the current offset; a short or refused direct write continues
        without O_DIRECT, since what is left may no longer be aligned."""
        while data:
            try:
                written = os.pwrite(self._fd, data, self._offset)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._go_buffered()
                continue
            if written < len(data) and self.direct:
                self._go_buffered()
            data = data[written:]
            self._offset += written

    def _go_buffered(self) -> None:
        if not _set_direct(self._fd, False):
            raise OSError(errno.EINVAL, "cannot turn O_DIRECT off")
        self.direct = False


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off; False where the file system refuses."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)
    except OSError:
        return False
    return True
