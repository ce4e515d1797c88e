"""Start-up reconciliation of the database (the truth) with the volume.

Runs before the worker claims anything.  A sole replica (SQLite) has nothing in flight:
every `staging` row was interrupted and every `.part` file is garbage.  Replicas sharing a
database and a volume (MariaDB) must spare each other's work: only `staging` rows whose
lease lapsed, or whose owner provably died on this host (a restart), are requeued, and a
`.part` file survives while its file row is leased.
Either way, every directory without a live (or still streamed) cart is an orphan, and
every staged row whose file is gone (or has the wrong size) must be fetched again.

The volume is listed before the database is read: a `.part` file that existed at listing
time belongs to a claim already committed, so the snapshot shows its lease if it is alive.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cartd.db import store
from cartd.db.session import SessionFactory
from cartd.replica import Replica, dead_here
from cartd.volume import Volume

log = logging.getLogger(__name__)

Inventory = dict[int, tuple[Path, list[tuple[int | None, Path]]]]


@dataclass(frozen=True)
class RecoveryReport:
    requeued: int
    orphan_dirs: int
    restaged: int


def _inventory(volume: Volume) -> Inventory:
    return {cart_id: (path, volume.parts(path)) for cart_id, path in volume.cart_dirs().items()}


def _sweep_volume(found: Inventory, live: set[int], leased: set[int]) -> int:
    orphans = 0
    for cart_id, (path, parts) in found.items():
        if cart_id not in live:
            shutil.rmtree(path, ignore_errors=True)
            orphans += 1
            continue
        for file_id, part in parts:
            if file_id not in leased:
                part.unlink(missing_ok=True)
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


async def recover(
    sessions: SessionFactory, volume: Volume, me: Replica, *, sole: bool
) -> RecoveryReport:
    """Reconcile; `sole` says no other replica can be running (the SQLite lock holds)."""
    volume.ensure()
    async with sessions.begin() as session:
        if sole:
            requeued = await store.requeue_interrupted(session)
        else:
            owners = {*await store.lease_owners(session), *await store.hold_owners(session)}
            dead = [owner for owner in owners if dead_here(owner, me)]
            requeued = await store.requeue_expired(session, dead)
            await store.release_holds(session, dead)
    found = await asyncio.to_thread(_inventory, volume)
    async with sessions.begin() as session:
        live = await store.live_cart_ids(session)
        leased = await store.leased_files(session)
        staged = list(await store.staged_files(session))
    orphans = await asyncio.to_thread(_sweep_volume, found, live, leased)
    missing = await asyncio.to_thread(_missing, volume, staged)
    async with sessions.begin() as session:
        await store.restage_files(session, missing)
    report = RecoveryReport(requeued, orphans, len(missing))
    if requeued or orphans or missing:
        log.warning("recovered after restart: %s", report)
    return report
