"""The schema's version policy, and the Alembic migrations that carry it out.

The migrations live in the top-level alembic/ directory, shipped in the wheel as
cartd/migrations.  Start-up compares the database's revision with the code's head:

- an empty database (none of cartd's tables, no revision) is a fresh install and gets the
  whole schema, so `make serve` and a first `compose up` need no set-up step;
- a database at head starts as it is;
- a database behind head is refused unless `CARTD_AUTO_MIGRATE` is on: upgrading a schema
  that holds data is a step an operator takes on purpose (backups, several replicas, a
  rollback plan), with `cartd db upgrade`;
- a database at a revision this code does not know (written by a newer cartd), or with
  cartd's tables but no revision at all, is always refused: guessing could lose data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from cartd.db.models import Base
from cartd.db.store import schema_lock

if TYPE_CHECKING:  # imported where used: a server at head never needs them (see _status)
    from alembic.config import Config
    from alembic.script import ScriptDirectory

T = TypeVar("T")

# The newest migration's revision: a start-up at head is told from alembic_version alone
# (tests/test_migrations.py holds it to alembic/versions).
HEAD = "0005"


class SchemaState(enum.Enum):
    EMPTY = "empty"
    CURRENT = "current"
    BEHIND = "behind"
    UNKNOWN = "unknown"  # a revision this code does not have: a newer cartd wrote it
    UNVERSIONED = "unversioned"  # cartd's tables without a recorded revision


@dataclass(frozen=True)
class SchemaStatus:
    state: SchemaState
    revision: str | None  # the database's
    head: str  # the code's

    def describe(self) -> str:
        """One sentence for an operator: where the schema is and what to do about it."""
        at = f"database schema is at revision {self.revision}"
        match self.state:
            case SchemaState.EMPTY:
                return f"database is empty: `cartd db upgrade` creates the schema ({self.head})"
            case SchemaState.CURRENT:
                return f"{at}, this cartd's head: up to date"
            case SchemaState.BEHIND:
                return (
                    f"{at}, behind this cartd's {self.head}: run `cartd db upgrade` "
                    "(or start with CARTD_AUTO_MIGRATE=1 to upgrade at start-up)"
                )
            case SchemaState.UNKNOWN:
                return (
                    f"{at}, which this cartd (head {self.head}) does not know: a newer cartd "
                    f"upgraded it. Run that newer cartd, or use its `cartd db downgrade "
                    f"{self.head}` first"
                )
        return (
            f"database has cartd's tables but no recorded revision: it was not created by "
            f"`cartd db upgrade`. Point CARTD_DATABASE_URL at an empty database "
            f"(head {self.head})"
        )


class SchemaMismatch(RuntimeError):
    """The database's schema is not one this cartd may run on as it stands."""

    def __init__(self, status: SchemaStatus) -> None:
        super().__init__(status.describe())
        self.status = status


def scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(None))


def alembic_config(connection: Connection | None) -> Config:
    """Our migrations, run on `connection` (None: only to read the scripts)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("cartd") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _recorded(connection: Connection) -> list[str]:
    """The revisions in alembic_version, read as Alembic would but without importing it:
    Alembic and what it loads (Mako, Pygments) are about 10 MB that `cartd serve` would
    keep for good after a check that finds the schema at head."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return []
    rows = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
    return [str(revision) for revision in rows.scalars()]


def _status(connection: Connection) -> SchemaStatus:
    if _recorded(connection) == [HEAD]:
        return SchemaStatus(SchemaState.CURRENT, HEAD, HEAD)
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    script = scripts()
    head = script.get_current_head()
    assert head is not None, "the migrations have no single head"
    revisions = MigrationContext.configure(connection).get_current_heads()
    if not revisions:
        ours = set(sa.inspect(connection).get_table_names()) & set(Base.metadata.tables)
        return SchemaStatus(SchemaState.UNVERSIONED if ours else SchemaState.EMPTY, None, head)
    revision = revisions[0]
    if revision == head:
        return SchemaStatus(SchemaState.CURRENT, revision, head)
    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    return SchemaStatus(SchemaState.BEHIND if known else SchemaState.UNKNOWN, revision, head)


def _upgrade(connection: Connection) -> SchemaStatus:
    status = _status(connection)
    if status.state in (SchemaState.UNKNOWN, SchemaState.UNVERSIONED):
        raise SchemaMismatch(status)
    if status.state is not SchemaState.CURRENT:
        _upgrade_to_head(connection)
    return status


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command

    command.upgrade(alembic_config(connection), "head")


async def status(engine: AsyncEngine) -> SchemaStatus:
    async with engine.connect() as conn:
        return await conn.run_sync(_status)


async def require_current(engine: AsyncEngine) -> None:
    """Admin commands read and write the tables as this cartd defines them: refuse others."""
    found = await status(engine)
    if found.state is not SchemaState.CURRENT:
        raise SchemaMismatch(found)


def _locked(connection: Connection, change: Callable[[Connection], T]) -> T:
    with schema_lock(connection):
        return change(connection)


async def upgrade(engine: AsyncEngine) -> SchemaStatus:
    """Bring the schema to head; a no-op at head.  Returns the status found before."""
    async with engine.begin() as conn:
        return await conn.run_sync(_locked, _upgrade)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Step the schema back to `revision` (`base` drops every table), for a rollback."""
    async with engine.begin() as conn:
        await conn.run_sync(_locked, lambda c: _downgrade(c, revision))


def _downgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(connection), revision)


def _prepare(connection: Connection, auto_migrate: bool) -> SchemaStatus:
    status = _status(connection)
    if status.state is SchemaState.EMPTY or (
        status.state is SchemaState.BEHIND and auto_migrate
    ):
        _upgrade_to_head(connection)
    elif status.state is not SchemaState.CURRENT:
        raise SchemaMismatch(status)
    return status


async def prepare(engine: AsyncEngine, auto_migrate: bool) -> SchemaStatus:
    """Start-up's policy (see the module docstring): create, upgrade, accept or refuse."""
    async with engine.begin() as conn:
        return await conn.run_sync(_locked, lambda c: _prepare(c, auto_migrate))
