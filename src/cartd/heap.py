"""glibc heap tuning for `cartd serve`: few arenas, and freed heap given back promptly.

glibc gives threads that allocate at once arenas of their own (up to 8 per core), and
each keeps the memory it once held.  Download reads and digests run in worker threads
with megabyte buffers, so the arenas add up: two of them cut peak RSS by about a tenth
in `make bench` (8 concurrent downloads, a 100,000-file POST).

Transfer chunks of 1 MiB also come from the heap (glibc raises its mmap threshold to the
size of any mapped block freed), between small objects that keep the freed space from
going back on its own: staging a 1 GiB cart left 57 MiB of free heap resident for good.
malloc_trim returns it.  Fixing the mmap threshold would too, but mapping and unmapping
every chunk halved download throughput.  The trim runs in a thread of its own, outside
the GIL, every second and as soon as a big file is staged; it takes well under a
millisecond when little is free, and about 14 ms to give back 100 MiB.

Only `cartd serve` tunes the heap; elsewhere (tests, other libc) `release_soon` does
nothing.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2
TRIM_INTERVAL = 1.0  # seconds between malloc_trim calls, at most

_wake = threading.Event()


def tune() -> None:
    """Cap the arenas and start the trim thread, before any other thread allocates."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to do
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    trimmer = threading.Thread(
        target=_trim_forever, args=(libc.malloc_trim,), name="malloc-trim", daemon=True
    )
    trimmer.start()


def release_soon() -> None:
    """Trim now rather than within the second: megabytes of buffers were just freed."""
    _wake.set()


def _trim_forever(malloc_trim: Callable[[int], int]) -> None:
    while True:
        _wake.wait(TRIM_INTERVAL)
        _wake.clear()
        malloc_trim(0)
