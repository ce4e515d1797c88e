"""Loaded into each benchmarked cartd with BENCH_LOOPWATCH=DIR (see harness.py).

A tail latency of many milliseconds at a modest request rate means that the event loop was
busy for that long.  This records each loop iteration whose callbacks ran longer than
BENCH_LOOPWATCH_MS (default 10), and each garbage collection that paused the process for
more than a tenth of that, one JSON line each in DIR/loop-<pid>.jsonl, with a wall-clock
time to set against the benchmark's phases.  It times the selector's wait apart, so an
idle loop records nothing.  Its own cost is two clock reads per iteration.
"""

from __future__ import annotations

import asyncio.base_events
import gc
import json
import os
import selectors
import sys
import time
from typing import Any

_WHERE = os.environ.get("BENCH_LOOPWATCH")


def _install(where: str) -> None:
    out = open(os.path.join(where, f"loop-{os.getpid()}.jsonl"), "w", buffering=1)  # noqa: SIM115
    limit = float(os.environ.get("BENCH_LOOPWATCH_MS", "10")) / 1000
    waited = [0.0]
    select = selectors.EpollSelector.select
    run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def timed_select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            waited[0] += time.perf_counter() - started

    def timed_run_once(self: asyncio.AbstractEventLoop) -> None:
        waited[0], started = 0.0, time.perf_counter()
        try:
            run_once(self)
        finally:
            busy = time.perf_counter() - started - waited[0]
            if busy > limit:
                out.write(json.dumps({"kind": "loop", "ms": busy * 1000, "t": time.time()}) + "\n")

    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
            return
        paused = time.perf_counter() - gc_started[0]
        if paused > limit / 10:
            record = {"kind": "gc", "ms": paused * 1000, "generation": info["generation"]}
            out.write(json.dumps({**record, "t": time.time()}) + "\n")

    selectors.EpollSelector.select = timed_select  # type: ignore[method-assign,assignment]
    asyncio.base_events.BaseEventLoop._run_once = timed_run_once  # type: ignore[attr-defined]
    gc.callbacks.append(on_gc)


if _WHERE and os.path.basename(sys.argv[0]) == "cartd":
    _install(_WHERE)
