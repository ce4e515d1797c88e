"""Benchmark 5: peak RSS of cartd under concurrent downloads plus staging, and a huge POST.

A fresh `cartd serve` is sampled (psutil, every 20 ms) while `mem_downloads` curls fetch a
ready cart of `mem_files` big files and a `mem_stage_files` cart stages; then while a cart
of `post_files` entries is POSTed (staging of that cart is cancelled by a DELETE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import (
    Cartd,
    FileIds,
    MiB,
    RssSampler,
    cartd,
    curl,
    fresh_database,
    post_cart,
    stage,
    wait_ready,
)
from sizes import Sizes

TARGET_MIB = 150
STAGING_GRACE = 60  # seconds of staging alone sampled after the downloads, at most


def _settles(service: Cartd, cart_id: str, timeout: float) -> bool:
    try:
        wait_ready(service, cart_id, timeout)
    except TimeoutError:
        return False
    return True


def huge_cart(small: FileIds, count: int) -> FileIds:
    """`count` entries reusing the archive's small files under distinct paths."""
    return [{**small[n % len(small)], "path": f"p{n // 1000}/{n}"} for n in range(count)]


def run(work: Path, archive_url: str, big: FileIds, small: FileIds, sizes: Sizes) -> dict[str, Any]:
    with fresh_database("sqlite", work) as db, cartd(db, work, archive_url) as service:
        stage(service, "memory", big[: sizes.mem_files])
        url = f"{service.url}/memory"
        with RssSampler(service.proc.pid) as busy:
            post_cart(service, "stage", small[: sizes.mem_stage_files])
            curl([url] * sizes.mem_downloads)
            staged = _settles(service, "stage", STAGING_GRACE)
        fileids = huge_cart(small, sizes.post_files)
        with RssSampler(service.proc.pid) as posting:
            post_cart(service, "posted", fileids)
        service.client.delete("/posted", timeout=300).raise_for_status()
    peak = max(busy.peak_mib, posting.peak_mib)
    return {
        "downloads": sizes.mem_downloads,
        "download_bytes": sizes.mem_files * sizes.big_size,
        "staging_files": sizes.mem_stage_files,
        "staging_finished": staged,
        "posted_files": sizes.post_files,
        "start_rss_mib": round(busy.samples[0][1] / MiB, 1),
        "peak_rss_busy_mib": busy.peak_mib,
        "peak_rss_post_mib": posting.peak_mib,
        "timeline": [(round(t, 2), round(rss / MiB, 1)) for t, rss in busy.samples[::5]],
        "target": f"peak <= {TARGET_MIB} MiB",
        "met": peak <= TARGET_MIB,
    }
