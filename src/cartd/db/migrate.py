"""Apply the Alembic migrations (top-level alembic/, shipped in the wheel as cartd/migrations)."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from cartd.db import store


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("cartd") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_config(connection), "head")


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the schema to head; a no-op when it is already there, so safe at every start,
    and by every replica at once (they take turns)."""
    async with engine.connect() as conn:
        await store.lock_migrations(conn)
        try:
            await conn.run_sync(_upgrade)
            await conn.commit()
        finally:
            await store.unlock_migrations(conn)
