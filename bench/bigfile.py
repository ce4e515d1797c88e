"""Benchmark 3: one large file, cartd's staging (sha1 verified) against a bare GET.

The bare GET is an httpx stream written to disk without hashing, the cheapest script a
user would write; curl writing the same file is recorded for scale.  Ratio: bare seconds
over cartd seconds (POST to ready), so higher is better.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from harness import FileIds, cartd, fresh_database, stage

TARGET = 0.9


def bare_get(url: str, dest: Path) -> float:
    started = time.perf_counter()
    with open(dest, "wb") as handle, httpx.stream("GET", url, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            handle.write(chunk)
    took = time.perf_counter() - started
    dest.unlink()
    return took


def curl_get(url: str, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(dest), url], check=True)
    took = time.perf_counter() - started
    dest.unlink()
    return took


def run(work: Path, archive_url: str, huge: FileIds) -> dict[str, Any]:
    url = archive_url + huge[0]["id"]
    bare_s = bare_get(url, work / "bare-huge")
    curl_s = curl_get(url, work / "curl-huge")
    with fresh_database("sqlite", work) as db, cartd(db, work, archive_url) as service:
        cartd_s = stage(service, "huge", huge)
    ratio = bare_s / cartd_s
    return {
        "bare_get_s": round(bare_s, 2),
        "curl_s": round(curl_s, 2),
        "cartd_s": round(cartd_s, 2),
        "ratio": round(ratio, 3),
        "target": f">= {TARGET} x bare GET speed",
        "met": ratio >= TARGET,
    }
