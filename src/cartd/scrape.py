"""The state gauges, read when /metrics is scraped (metrics.py says why not maintained).

The database reads are bounded by CARTD_READY_TIMEOUT: a scrape during a database outage
still answers, with the last counts and `cartd_database_up 0`, so the outage shows on the
dashboard instead of as a failed scrape.
"""

from __future__ import annotations

import asyncio
import logging

import psutil

from cartd.db import store
from cartd.metrics import CART_STATES
from cartd.runtime import Runtime

log = logging.getLogger(__name__)


async def collect_state(runtime: Runtime) -> None:
    metrics = runtime.metrics
    metrics.fetches_in_flight.set(runtime.worker.in_flight)
    disk = await asyncio.to_thread(psutil.disk_usage, str(runtime.volume.root))
    reserved = runtime.cache.reserved()
    for kind, value in (
        ("used", disk.used),
        ("reserved", reserved),
        ("free", disk.free - reserved),
        ("total", disk.total),
    ):
        metrics.cache_bytes.labels(kind).set(value)
    try:
        async with asyncio.timeout(runtime.settings.ready_timeout):
            await _database_state(runtime)
    except Exception as exc:
        log.warning("metrics: could not read the database: %r", exc)
        metrics.database_up.set(0)
    else:
        metrics.database_up.set(1)


async def _database_state(runtime: Runtime) -> None:
    async with runtime.sessions() as session:
        counts = await store.cart_counts(session)
        depth = await store.queue_depth(session)
    for state in CART_STATES:
        runtime.metrics.carts.labels(state).set(counts.get(state, 0))
    runtime.metrics.queue_depth.set(depth)
