"""Alembic environment.

`cartd` passes its own open connection in `config.attributes["connection"]` (so migrations
run inside the service's engine and event loop); the plain `alembic` command line gets a
fresh engine from `CARTD_DATABASE_URL` via Settings instead.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from cartd.db.models import Base
from cartd.db.session import create_engine
from cartd.settings import Settings

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    engine = create_engine(Settings())
    async with engine.begin() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_standalone())


main()
