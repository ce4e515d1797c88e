"""MariaDB's pool rolls back a returned connection only when a transaction is still open
on it: after the session's own COMMIT or ROLLBACK, a second ROLLBACK is a wasted round
trip, but a connection that comes back mid-transaction must not lend that transaction
(and its locks) to the next user."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cartd.db import migrate
from cartd.db.session import create_engine, create_session_factory
from cartd.settings import Settings
from conftest import DATABASES, database

pytestmark = pytest.mark.parametrize("kind", [k for k in DATABASES if k == "mariadb"])


async def _rollbacks(connection: AsyncConnection) -> int:
    """ROLLBACKs this server session has run so far."""
    result = await connection.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_rollback'")
    return int(result.one()[1])


async def test_a_finished_transaction_costs_no_extra_rollback(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        engine = create_engine(Settings(database_url=url))
        try:
            await migrate.upgrade(engine)
            sessions = create_session_factory(engine)
            async with sessions.begin() as session:  # one pooled connection, used in turn
                before = await _rollbacks(await session.connection())
            async with sessions.begin() as session:
                after_commit = await _rollbacks(await session.connection())
                pid = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar()
            async with sessions() as session:
                await session.execute(text("SELECT 1"))
                await session.rollback()
            async with sessions.begin() as session:
                after_rollback = await _rollbacks(await session.connection())
                same = (await session.execute(text("SELECT CONNECTION_ID()"))).scalar()
        finally:
            await engine.dispose()
    assert pid == same, "the pool handed out another connection: nothing was measured"
    assert (after_commit - before, after_rollback - after_commit) == (0, 1)


async def test_a_connection_returned_mid_transaction_is_rolled_back(
    kind: str, tmp_path: Path
) -> None:
    with database(kind, tmp_path) as url:
        engine = create_engine(Settings(database_url=url))
        try:
            await migrate.upgrade(engine)
            async with engine.connect() as connection:
                # Behind SQLAlchemy's back: it believes no transaction is open, so closing
                # the connection leaves the rollback to the pool.
                driver = (await connection.get_raw_connection()).driver_connection
                assert driver is not None
                async with driver.cursor() as cursor:
                    await cursor.execute("INSERT INTO cartd_locks (name) VALUES ('leaked')")
                    await cursor.execute("SELECT CONNECTION_ID()")
                    (pid,) = await cursor.fetchone()
            async with engine.connect() as connection:
                same = (await connection.exec_driver_sql("SELECT CONNECTION_ID()")).scalar()
                query = "SELECT COUNT(*) FROM cartd_locks WHERE name = 'leaked'"
                leaked = (await connection.exec_driver_sql(query)).scalar()
        finally:
            await engine.dispose()
    assert pid == same, "the pool handed out another connection: nothing was measured"
    assert leaked == 0
