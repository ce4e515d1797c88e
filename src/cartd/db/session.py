"""Engine and session factory, tuned per backend.

SQLite gets one pooled connection: every write in this process is then serialised in
Python instead of racing for SQLite's file lock, which is what produces "database is
locked".  WAL and a busy timeout still matter for the other processes (`cartd db upgrade`,
an operator's sqlite3 shell) that may open the file.  Status reads (HEAD) get a few
read-only connections of their own: under WAL a reader never waits for the writer, so a
poller no longer queues behind the staging worker's transactions on that one connection.
MariaDB gets a real pool and READ COMMITTED, so short status reads never wait on a
long-running staging transaction.  Its pool rolls back only connections that come back
with a transaction open (see `_rollback_if_open`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolResetState

from cartd.settings import Settings

log = logging.getLogger(__name__)

SessionFactory = async_sessionmaker[AsyncSession]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA busy_timeout=30000",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
    ):
        cursor.execute(pragma)
    cursor.close()


def sqlite_file(settings: Settings) -> Path | None:
    """The SQLite database file, or None for a server database (which replicas can share).

    An in-memory SQLite database has no file, and no other process can reach it anyway.
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def is_shared(settings: Settings) -> bool:
    """Several replicas can use one server database; SQLite is one process's."""
    return make_url(settings.database_url).get_backend_name() != "sqlite"


def create_engine(settings: Settings) -> AsyncEngine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_recycle=3600,
        pool_pre_ping=True,
        pool_reset_on_return=None,  # _rollback_if_open does it, when it is needed
        isolation_level="READ COMMITTED",
        connect_args={"charset": "utf8mb4"},
    )
    event.listen(engine.sync_engine, "reset", _rollback_if_open)
    return engine


def _rollback_if_open(dbapi_connection: Any, _record: Any, state: PoolResetState) -> None:
    """Roll back a connection returned to the pool only if the server said, in its last
    reply, that a transaction is still open.

    The pool's default sends a ROLLBACK for every returned connection, even one whose
    transaction the session has just committed or rolled back: a round trip per
    transaction, and most of cartd's transactions are three or four statements long.
    A connection whose state is unknown (closed) is rolled back as before.
    """
    if state.terminate_only or not state.asyncio_safe:
        return  # the pool closes it rather than reuse it; no I/O is allowed here
    driver = dbapi_connection.driver_connection
    if driver.server_status is None or driver.get_transaction_status():
        dbapi_connection.rollback()


READERS = 4


def _read_only(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def create_read_engine(settings: Settings) -> AsyncEngine | None:
    """Read-only connections for status reads on a SQLite file; None where the main
    engine serves reads as well (MariaDB's pool, or an in-memory SQLite database that a
    second connection would not see)."""
    if sqlite_file(settings) is None:
        return None
    url = make_url(settings.database_url)
    engine = create_async_engine(url, pool_size=READERS, max_overflow=0, pool_timeout=60)
    event.listen(engine.sync_engine, "connect", _read_only)
    return engine


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


async def wait_for_database(engine: AsyncEngine, settings: Settings) -> None:
    """Retry the first connection, because the database often starts after us (compose)."""
    attempts = settings.database_connect_attempts
    for attempt in range(1, attempts + 1):
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning(
                "database not reachable (attempt %d/%d): %s; retrying in %.0fs",
                attempt,
                attempts,
                exc,
                settings.database_connect_wait,
            )
            await asyncio.sleep(settings.database_connect_wait)
