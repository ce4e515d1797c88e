"""cartd.heap: heap freed by transfer buffers goes back to the system."""

from __future__ import annotations

import subprocess
import sys

# Megabyte buffers (transfer chunks) allocated between small malloc'd objects that outlive
# them, as while staging; prints how many MiB of RSS freeing the buffers gave back, at
# once ("plain") or within 10 s ("tuned": the trim thread runs every second; "woken": only
# when release_soon asks).
CHURN = """
import sys, time
from cartd import heap
tuned = sys.argv[1] != "plain"
if sys.argv[1] == "woken":
    heap.TRIM_INTERVAL = 3600  # only release_soon can make it trim within the test
if tuned:
    heap.tune()

def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 >> 20

first = b"x" * (4 << 20)
del first  # glibc's mmap threshold follows a freed mapped block up, to 4 MiB
chunks, pins = [], []
for n in range(64):
    chunks.append(bytes([n % 256]) * (1 << 20))
    pins.append(bytearray(1000))  # above pymalloc's 512 bytes: from malloc, after the chunk
before = rss()
del chunks
if sys.argv[1] == "woken":
    heap.release_soon()
deadline = time.monotonic() + (10 if tuned else 0)
while before - rss() < 56 and time.monotonic() < deadline:
    time.sleep(0.05)
print(before - rss())
"""


def _returned_mib(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout)


def test_freed_megabyte_chunks_leave_the_resident_set() -> None:
    assert _returned_mib("tuned") >= 56


def test_release_soon_trims_without_waiting_for_the_interval() -> None:
    assert _returned_mib("woken") >= 56


def test_without_the_tuning_glibc_keeps_them() -> None:
    """The test above would pass without heap.tune if glibc gave them back itself."""
    assert _returned_mib("plain") < 16
