"""Readiness: can this process do its job right now?  (Liveness needs no code: answering is it.)

Three things must hold: the database answers, the volume takes writes, and the staging
worker runs.  Each check is bounded by CARTD_READY_TIMEOUT, because a probe that hangs on a
stuck database is worse than one that says so: the orchestrator's own timeout would report
nothing but "timed out".  The checks run concurrently, and each failure names its cause.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from cartd.db import store
from cartd.runtime import Runtime


@dataclass(frozen=True)
class Check:
    name: str
    problem: str | None = None  # None: passed

    @property
    def ok(self) -> bool:
        return self.problem is None


async def readiness(runtime: Runtime) -> list[Check]:
    timeout = runtime.settings.ready_timeout
    database, volume = await asyncio.gather(
        _bounded("database", _database(runtime), timeout),
        _bounded("volume", asyncio.to_thread(probe_volume, runtime.volume.carts_dir), timeout),
    )
    worker = Check("worker", None if runtime.worker.alive else "the staging worker is not running")
    return [database, volume, worker]


async def _bounded(name: str, check: Awaitable[None], seconds: float) -> Check:
    try:
        async with asyncio.timeout(seconds):
            await check
    except TimeoutError:
        return Check(name, f"no answer within {seconds:g}s")
    except Exception as exc:
        return Check(name, f"{type(exc).__name__}: {exc}"[:500])
    return Check(name)


async def _database(runtime: Runtime) -> None:
    async with runtime.sessions() as session:
        await store.ping(session)


def probe_volume(directory: Path) -> None:
    """Create, write and delete a file where staged files go: the real path of a fetch."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-") as probe:
        probe.write(b"ok")
        probe.flush()
