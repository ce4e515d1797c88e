"""Benchmark 4: HEAD polling of a ready cart with wrk while a big cart stages.

First, for scale, wrk flat out with nothing staging.  Then two wrk runs while the big cart
stages: at a fixed offered rate (Poisson arrivals from
bench/head.lua, since wrk2 is not in Debian) for the p99, then flat out for the ceiling.
`busy_staging` says whether the big cart was still staging when each run ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import Cartd, FileIds, cartd, fresh_database, post_cart, stage, wrk
from sizes import Sizes

TARGET_RPS = 3000
TARGET_P99_MS = 20


def _staging(service: Cartd) -> bool:
    return bool(service.client.head("/busy").headers["X-Pacifica-Status"] == "staging")


def run(work: Path, archive_url: str, small: FileIds, db_kind: str, sizes: Sizes) -> dict[str, Any]:
    with fresh_database(db_kind, work) as db, cartd(db, work, archive_url) as service:
        stage(service, "polled", small[:10])
        url = f"{service.url}/polled"
        conns, seconds = sizes.poll_connections, sizes.poll_seconds
        idle = wrk(url, conns, seconds) if sizes.poll_idle else None  # for scale
        post_cart(service, "busy", small[: sizes.poll_files])
        fixed = wrk(url, conns, seconds, sizes.poll_rate)
        fixed["busy_staging"] = _staging(service)
        ceiling = wrk(url, conns, seconds)
        ceiling["busy_staging"] = _staging(service)
    return {
        "database": db_kind,
        "connections": conns,
        "seconds": seconds,
        "offered_rate": sizes.poll_rate,
        "fixed_rate": fixed,
        "ceiling": ceiling,
        "idle_ceiling": idle,
        "target": f"ceiling >= {TARGET_RPS} req/s, p99 <= {TARGET_P99_MS} ms at fixed rate",
        "met_ceiling": ceiling["requests_per_s"] >= TARGET_RPS,
        "met_p99": fixed.get("p99_ms", 1e9) <= TARGET_P99_MS,
    }
