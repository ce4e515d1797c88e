"""The operator commands, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

CARTD = str(Path(sys.executable).parent / "cartd")


def _sync_url(db_url: str) -> str:
    return db_url.replace("+aiosqlite", "").replace("+aiomysql", "+pymysql")


def _head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(files("cartd") / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_db_upgrade_is_idempotent(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "CARTD_DATABASE_URL": db_url}
    for _ in range(2):
        result = subprocess.run(
            [CARTD, "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    engine = sa.create_engine(_sync_url(db_url))
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == _head_revision()
        assert {"carts", "cart_files"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_unreachable_database_fails_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CARTD_DATABASE_URL": "mysql+aiomysql://root@127.0.0.1:1/none",
        "DATABASE_CONNECT_ATTEMPTS": "2",
        "DATABASE_CONNECT_WAIT": "0",
    }
    result = subprocess.run(
        [CARTD, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "database not reachable (attempt 1/2)" in result.stderr


def test_help_lists_commands() -> None:
    result = subprocess.run([CARTD, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "db" in result.stdout
