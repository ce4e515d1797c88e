"""The schema's version policy and every migration's way down and back up, on each database.

Revisions are read from Alembic's ScriptDirectory, never written here: a new migration
joins these tests by existing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from cartd import cli
from cartd.db import migrate
from cartd.db.migrate import SchemaMismatch, SchemaState
from cartd.db.models import Base
from cartd.db.session import create_engine
from cartd.runtime import running
from cartd.settings import Settings
from conftest import DATABASES, database, run_cartd

CARTD = str(Path(sys.executable).parent / "cartd")
HEAD = migrate.scripts().get_current_head()
# Newest first: head, head-1, ..., the first migration.
REVISIONS = [script.revision for script in migrate.scripts().walk_revisions()]
PREVIOUS = REVISIONS[1]  # a schema one migration behind


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=db_url))
    yield engine
    await engine.dispose()


def _schema(connection: Connection) -> dict[str, Any]:
    """Tables, their columns (name, type, nullability) and indexes: what a migration shapes."""
    inspector = sa.inspect(connection)
    return {
        table: (
            sorted(
                (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)
            ),
            sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
        if table != "alembic_version"
    }


async def _snapshot(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_schema)


async def _stamp(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


async def test_every_migration_steps_down_to_base_and_back(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    at_head = await _snapshot(engine)
    assert set(Base.metadata.tables) <= set(at_head)
    for older in [*REVISIONS[1:], "base"]:
        await migrate.downgrade(engine, older)
        status = await migrate.status(engine)
        assert status.revision == (None if older == "base" else older)
    assert await _snapshot(engine) == {}, "base must drop every table"
    assert (await migrate.status(engine)).state is SchemaState.EMPTY
    before = await migrate.upgrade(engine)
    assert (before.state, (await migrate.status(engine)).state) == (
        SchemaState.EMPTY,
        SchemaState.CURRENT,
    )
    assert await _snapshot(engine) == at_head, "base -> head must rebuild the same schema"


async def test_upgrade_is_idempotent(engine: AsyncEngine) -> None:
    first = await migrate.upgrade(engine)
    schema = await _snapshot(engine)
    second = await migrate.upgrade(engine)
    assert (first.state, second.state) == (SchemaState.EMPTY, SchemaState.CURRENT)
    assert await _snapshot(engine) == schema


@pytest.mark.parametrize("auto_migrate", [False, True])
async def test_start_up_policy(
    engine: AsyncEngine, db_url: str, tmp_path: Path, auto_migrate: bool
) -> None:
    """Empty: created.  Behind: refused, naming the fix, unless CARTD_AUTO_MIGRATE."""
    settings = Settings(
        database_url=db_url,
        volume_path=tmp_path / "volume",
        archive_interface_url=f"file:{tmp_path}",
        auto_migrate=auto_migrate,
    )
    async with running(settings):
        pass
    assert (await migrate.status(engine)).state is SchemaState.CURRENT
    await migrate.downgrade(engine, PREVIOUS)
    if auto_migrate:
        async with running(settings):
            pass
        assert (await migrate.status(engine)).revision == HEAD
        return
    with pytest.raises(SchemaMismatch, match=r"run `cartd db upgrade`.*CARTD_AUTO_MIGRATE=1"):
        async with running(settings):
            pass
    assert (await migrate.status(engine)).revision == PREVIOUS


def test_auto_migrate_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARTD_AUTO_MIGRATE", raising=False)
    assert Settings().auto_migrate is False
    monkeypatch.setenv("CARTD_AUTO_MIGRATE", "1")
    assert Settings().auto_migrate is True


async def test_a_newer_schema_is_refused_everywhere(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    await _stamp(engine, "9999_from_the_future")
    for attempt in (migrate.upgrade(engine), migrate.prepare(engine, auto_migrate=True)):
        with pytest.raises(SchemaMismatch, match="a newer cartd upgraded it") as refused:
            await attempt
        assert refused.value.status.state is SchemaState.UNKNOWN
    assert (await migrate.status(engine)).revision == "9999_from_the_future"


async def test_tables_without_a_revision_are_refused(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    with pytest.raises(SchemaMismatch, match="no recorded revision"):
        await migrate.prepare(engine, auto_migrate=True)
    assert (await migrate.status(engine)).state is SchemaState.UNVERSIONED


def test_operator_commands_report_and_refuse(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db status` exit codes; admin commands refuse a schema that is behind."""
    monkeypatch.setenv("CARTD_DATABASE_URL", db_url)
    monkeypatch.setenv("CARTD_VOLUME_PATH", str(tmp_path / "volume"))
    code, out, _ = run_cartd(capsys, "db", "status")
    assert (code, out) == (
        1,
        f"database is empty: `cartd db upgrade` creates the schema ({HEAD})\n",
    )
    assert run_cartd(capsys, "db", "upgrade")[:2] == (
        0,
        f"database schema upgraded: empty -> {HEAD}\n",
    )
    code, out, _ = run_cartd(capsys, "db", "status")
    assert (code, out) == (
        0,
        f"database schema is at revision {HEAD}, this cartd's head: up to date\n",
    )
    assert run_cartd(capsys, "db", "downgrade", PREVIOUS)[0] == 0
    assert run_cartd(capsys, "db", "status")[0] == 1
    for command in (["carts", "list"], ["purge", "--older-than", "1d"], ["fsck", "--repair"]):
        code, _, err = run_cartd(capsys, *command)
        assert code == 1
        assert "run `cartd db upgrade`" in err, command
    code, _, err = run_cartd(capsys, "db", "downgrade", "no-such-revision")
    assert code == 1
    assert "no-such-revision" in err


async def test_serve_refuses_a_schema_behind_in_one_line(tmp_path: Path) -> None:
    """The real process: exit 1, one line naming both fixes, no traceback.  (SQLite only:
    the policy above runs on both databases; this checks what the operator sees.)"""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'cartd.db'}"
    engine = create_engine(Settings(database_url=db_url))
    await migrate.upgrade(engine)
    await migrate.downgrade(engine, PREVIOUS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env |= {"CARTD_DATABASE_URL": db_url, "CARTD_VOLUME_PATH": str(tmp_path / "volume")}
    refused = subprocess.run(
        [CARTD, "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"cartd serve: database schema is at revision {PREVIOUS}, behind this cartd's {HEAD}: "
        "run `cartd db upgrade` (or start with CARTD_AUTO_MIGRATE=1 to upgrade at start-up)"
    ]
    assert (await migrate.status(engine)).revision == PREVIOUS
    await engine.dispose()


# Replicas share MariaDB; SQLite serves one host's processes (and passes with or without
# the lock, so it would prove nothing here).  Like every MariaDB test, it is collected only
# when MariaDB is among CARTD_TEST_DATABASES (CI: always).
if "mariadb" in DATABASES:

    def test_replicas_starting_together_migrate_once(tmp_path: Path) -> None:
        """compose.scale.yaml starts several cartd at once on one empty database: each runs
        the entrypoint's `cartd db upgrade`; none may fail on a table another just made."""
        with database("mariadb", tmp_path) as db_url:
            _upgrade_together(db_url, tmp_path)


def _upgrade_together(db_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env["CARTD_DATABASE_URL"] = db_url
    replicas = [
        subprocess.Popen(
            [CARTD, "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [replica.communicate(timeout=120)[0] for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0], outputs
    assert sorted(line.split(":")[0] for line in outputs) == [
        "database schema already at " + HEAD,
        "database schema upgraded",
    ]


def test_the_head_the_server_checks_for_is_the_newest_migration() -> None:
    assert migrate.HEAD == HEAD, "a new migration: set cartd.db.migrate.HEAD to its revision"


# Run in a process of its own: this one imported Alembic long ago.
_SERVE_SCHEMA = """
import asyncio, sys
from cartd import cli
from cartd import cli
from cartd.db import migrate
from cartd.db.session import create_engine
from cartd.settings import Settings

settings = Settings(database_url=sys.argv[1], connect_attempts=1)
accepted, status = cli._prepare_apart(settings)  # cartd serve's policy, in a forked child
print(accepted, status.state.value, status.revision)
engine = create_engine(settings)
print(asyncio.run(migrate.prepare(engine, False)).state.value)  # the app's check at start-up
asyncio.run(engine.dispose())
print(sorted({name.split(".")[0] for name in sys.modules} & {"alembic", "mako", "pygments"}))
"""


@pytest.mark.parametrize("auto_migrate", ["0", "1"])
async def test_serve_applies_the_policy_without_keeping_alembic(
    tmp_path: Path, auto_migrate: str
) -> None:
    """Creating or upgrading the schema happens in a child; the server's own check of a
    schema at head reads alembic_version alone, so Alembic (~10 MB) never loads in it."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'cartd.db'}"
    engine = create_engine(Settings(database_url=db_url))
    await migrate.upgrade(engine)
    await migrate.downgrade(engine, PREVIOUS if auto_migrate == "1" else "base")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env |= {"CARTD_AUTO_MIGRATE": auto_migrate}
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_SCHEMA, db_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = f"True behind {PREVIOUS}" if auto_migrate == "1" else "True empty None"
    assert done.stdout.splitlines() == [found, "current", "[]"], done.stderr
    assert (await migrate.status(engine)).state is SchemaState.CURRENT
    await engine.dispose()


def test_serve_says_why_a_database_is_not_usable(tmp_path: Path) -> None:
    """The policy's child reports a failure by its message, as the server did in-process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env |= {
        "CARTD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'cartd.db'}",
        "CARTD_VOLUME_PATH": str(tmp_path / "volume"),
        "CARTD_DATABASE_CONNECT_ATTEMPTS": "1",
    }
    refused = subprocess.run(
        [CARTD, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1, refused.stderr
    # aiosqlite's worker thread (in the schema check's child) may also print a traceback
    # as its loop closes, as before, and its lines can land inside ours: no line equality.
    reason = "cartd serve: database not usable: (sqlite3.OperationalError) unable to open"
    assert f"{reason} database file\n" in refused.stderr, refused.stderr


def test_a_schema_check_that_dies_is_reported_with_its_exit_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forked child can die without a word (killed, out of memory): `cartd serve` must
    then say how it ended, not hang or blame the schema."""
    monkeypatch.setattr(cli, "_prepare_in_child", lambda _settings, _send: os._exit(3))
    assert cli._prepare_apart(Settings()) == (False, "the schema check exited with status 3")
