"""Benchmark 3: one large file, cartd's staging (sha1 verified) against a bare GET.

The bare GET is an httpx stream written to disk without hashing, the cheapest script a
user would write; curl writing the same file is recorded for scale.  Ratio: bare seconds
over cartd seconds (POST to ready), so higher is better.

A bare GET ends with the file's bytes still dirty in the page cache; cartd fsyncs before it
calls a file staged (a crash must not leave a "staged" file short).  When the disk writes
slower than loopback delivers, that fsync alone sets cartd's time, so the same bare GET
followed by an fsync is measured too: its ratio is what cartd's own code costs.  Every
step starts after `os.sync()`, so no step pays for the previous one's dirty pages.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from harness import FileIds, cartd, fresh_database, stage

TARGET = 0.9


def bare_get(url: str, dest: Path, *, durable: bool = False) -> tuple[float, float]:
    """Wall and CPU seconds (CPU: robust to a busy machine, where wall time is not)."""
    os.sync()
    started, cpu = time.perf_counter(), time.process_time()
    with open(dest, "wb") as handle, httpx.stream("GET", url, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            handle.write(chunk)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    took = time.perf_counter() - started, time.process_time() - cpu
    dest.unlink()
    return took


def curl_get(url: str, dest: Path) -> float:
    os.sync()
    started = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(dest), url], check=True)
    took = time.perf_counter() - started
    dest.unlink()
    return took


def run(work: Path, archive_url: str, huge: FileIds) -> dict[str, Any]:
    url = archive_url + huge[0]["id"]
    bare_s, bare_cpu = bare_get(url, work / "bare-huge")
    durable_s, _ = bare_get(url, work / "bare-huge", durable=True)
    curl_s = curl_get(url, work / "curl-huge")
    with fresh_database("sqlite", work) as db, cartd(db, work, archive_url) as service:
        os.sync()
        cpu = psutil.Process(service.proc.pid).cpu_times()
        cartd_s = stage(service, "huge", huge)
        after = psutil.Process(service.proc.pid).cpu_times()
    cartd_cpu = after.user + after.system - cpu.user - cpu.system
    ratio = bare_s / cartd_s
    return {
        "bare_get_s": round(bare_s, 2),
        "bare_get_fsync_s": round(durable_s, 2),
        "curl_s": round(curl_s, 2),
        "cartd_s": round(cartd_s, 2),
        "bare_get_cpu_s": round(bare_cpu, 2),
        "cartd_cpu_s": round(cartd_cpu, 2),
        "ratio": round(ratio, 3),
        "ratio_vs_durable": round(durable_s / cartd_s, 3),
        "target": f">= {TARGET} x bare GET speed",
        "met": ratio >= TARGET,
    }
