"""MariaDB picks deadlock and lock-wait victims; the API must run such a transaction again
rather than answer 500.  (Under load the victim was a HEAD whose `touch` lost to the
staging worker's claim.  HEAD now notes the use in memory, and a background write records
it: that write is the one a held row lock makes wait, on cue, here.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from conftest import DATABASES, MARIADB, entry, standalone_service, wait_for

LOCK_WAIT = 1  # seconds: the service's statements give up waiting for a row lock after this


@pytest.fixture
def short_lock_waits() -> Iterator[None]:
    """New MariaDB sessions (the service's pool) wait only LOCK_WAIT s for a row lock."""
    admin = pymysql.connect(**MARIADB, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute("SELECT @@GLOBAL.innodb_lock_wait_timeout")
        (previous,) = cursor.fetchone()
        cursor.execute(f"SET GLOBAL innodb_lock_wait_timeout = {LOCK_WAIT}")
    try:
        yield
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"SET GLOBAL innodb_lock_wait_timeout = {int(previous)}")
        admin.close()


@pytest.mark.parametrize("kind", [k for k in DATABASES if k == "mariadb"])
def test_head_answers_under_a_lock_and_its_use_is_written_once_it_lifts(
    kind: str, short_lock_waits: None, tmp_path: Path
) -> None:
    with standalone_service(kind, tmp_path) as (service, archive):
        archive.add_file("f", b"locked")
        assert service.post("c", [entry("f", "f.txt", b"locked")]).status_code == 201
        assert service.wait_settled("c") == (204, "ready", "")
        schema = service.thread.settings.database_url.rsplit("/", 1)[1]
        holder = pymysql.connect(**MARIADB, database=schema, autocommit=True)
        try:
            with holder.cursor() as cursor:
                # Long unused, so the HEAD's touch must write, and so wait for the lock.
                cursor.execute("UPDATE carts SET last_used_at = 0 WHERE uid = 'c'")
                cursor.execute("BEGIN")
                cursor.execute("SELECT id FROM carts WHERE uid = 'c' FOR UPDATE")
            # Longer than a flush interval plus a lock wait: the first write must fail.
            release = threading.Timer(LOCK_WAIT * 2.5, holder.rollback)
            release.start()
            try:
                # The use write times out waiting (1205) and is kept for the next flush.
                assert service.state("c") == (204, "ready", "")
            finally:
                release.join()
            wait_for(lambda: _last_used(holder) > 0, "the HEAD's use, written after the lock")
        finally:
            holder.close()


def _last_used(conn: pymysql.connections.Connection) -> float:
    with conn.cursor() as cursor:
        cursor.execute("SELECT last_used_at FROM carts WHERE uid = 'c'")
        (used,) = cursor.fetchone()
    return float(used)
