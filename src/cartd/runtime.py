"""Everything the service holds while it runs, built and torn down in one place.

`create_app`'s lifespan owns one Runtime; tests and the CLI can build one without HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from cartd.archive import Archive, open_archive
from cartd.archive.metered import MeteredArchive
from cartd.cache import Cache
from cartd.db.migrate import SchemaState, prepare
from cartd.db.session import (
    SessionFactory,
    create_engine,
    create_read_engine,
    create_session_factory,
    is_shared,
    wait_for_database,
)
from cartd.db.store import Lease
from cartd.metrics import Metrics
from cartd.progress import ProgressRecorder
from cartd.recovery import recover
from cartd.replica import this_process
from cartd.settings import Settings
from cartd.staging import Stager
from cartd.status_cache import Commit, StatusCache
from cartd.volume import Volume
from cartd.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    archive: Archive
    volume: Volume
    cache: Cache
    worker: Worker
    metrics: Metrics
    readers: SessionFactory  # status reads that may run beside the writer (session.py)
    answers: StatusCache  # HEAD's kept answers and unwritten cart uses


def _in_transaction(sessions: SessionFactory) -> Commit:
    """The uses' own transaction, not the worker's group commit: on a shared database a
    batch of touches can wait for (or deadlock with) another replica's cart row locks, and
    the staging outcomes must not wait with it; a failed flush is simply tried again."""

    async def commit(operation: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
        async with sessions.begin() as session:
            return await operation(session)

    return commit


async def _last_uses(answers: StatusCache, sessions: SessionFactory) -> None:
    """Write the uses still in memory at shutdown, so the next start's LRU knows them."""
    try:
        await answers.flush(_in_transaction(sessions))
    except Exception as exc:  # shutdown goes on: at worst a cart looks less recently used
        log.warning("could not record cart use at shutdown: %s", exc)


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Runtime]:
    """Connect, apply the schema policy (db/migrate.py), reconcile the volume, start the
    worker, the cache policy and the progress recorder; undo it all on exit."""
    metrics = metrics or Metrics()
    engine = create_engine(settings)
    read_engine = create_read_engine(settings)
    archive = MeteredArchive(open_archive(settings), metrics)
    try:
        await wait_for_database(engine, settings)
        schema = await prepare(engine, settings.auto_migrate)
        if schema.state is not SchemaState.CURRENT:
            log.info("database schema upgraded: %s -> %s", schema.revision or "empty", schema.head)
        sessions = create_session_factory(engine)
        readers = create_session_factory(read_engine) if read_engine else sessions
        me = this_process()
        shared = is_shared(settings)
        volume = Volume(settings.volume_path, me.tag, shared=shared)
        await recover(sessions, volume, me, sole=not shared)
        answers = StatusCache(settings.head_cache_ttl)
        cache = Cache(sessions, volume, settings, me.owner, metrics, answers)
        stager = Stager(archive, volume, cache, settings, metrics)
        lease = Lease(me.owner, settings.lease_seconds)
        worker = Worker(
            sessions, stager, settings.fetch_concurrency, lease, settings.cancel_poll_interval
        )
        log.info("replica %s started (%s volume)", me.owner, "shared" if shared else "sole")
        cache.cancel_fetches = worker.cancel_cart
        worker.start()
        progress = ProgressRecorder(worker.commits, cache, settings.progress_interval)
        loops = [
            asyncio.create_task(cache.run(), name="cartd-cache"),
            asyncio.create_task(progress.run(), name="cartd-progress"),
            asyncio.create_task(answers.run(_in_transaction(sessions)), name="cartd-uses"),
        ]
        try:
            yield Runtime(
                settings,
                engine,
                sessions,
                archive,
                volume,
                cache,
                worker,
                metrics,
                readers,
                answers,
            )
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await worker.stop()
            await _last_uses(answers, sessions)
    finally:
        await archive.aclose()
        if read_engine is not None:
            await read_engine.dispose()
        await engine.dispose()
