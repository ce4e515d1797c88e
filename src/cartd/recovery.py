"""Start-up reconciliation of the database (the truth) with the volume.

Runs before the worker claims anything, so nothing is in flight: every `staging` row was
interrupted, every `.part` file is garbage, every directory without a live cart is an
orphan, and every staged row whose file is gone (or has the wrong size) must be fetched again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass

from cartd.db import store
from cartd.db.session import SessionFactory
from cartd.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    requeued: int
    orphan_dirs: int
    restaged: int


def _sweep_volume(volume: Volume, live: set[int]) -> int:
    orphans = 0
    for cart_id, path in volume.cart_dirs().items():
        if cart_id in live:
            volume.remove_parts(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            orphans += 1
    return orphans


def _missing(volume: Volume, staged: list[tuple[int, int, int | None]]) -> list[int]:
    gone = []
    for cart_id, file_id, size in staged:
        path = volume.file_path(cart_id, file_id)
        try:
            if size is not None and path.stat().st_size != size:
                gone.append(file_id)
        except FileNotFoundError:
            gone.append(file_id)
    return gone


async def recover(sessions: SessionFactory, volume: Volume) -> RecoveryReport:
    volume.ensure()
    async with sessions.begin() as session:
        requeued = await store.requeue_interrupted(session)
        live = await store.live_cart_ids(session)
        staged = list(await store.staged_files(session))
    orphans = await asyncio.to_thread(_sweep_volume, volume, live)
    missing = await asyncio.to_thread(_missing, volume, staged)
    async with sessions.begin() as session:
        await store.restage_files(session, missing)
    report = RecoveryReport(requeued, orphans, len(missing))
    if requeued or orphans or missing:
        log.warning("recovered after restart: %s", report)
    return report
