"""`cartd fsck`: every kind of disagreement between database and volume is found, the repair
leaves a consistent pair that the service then finishes correctly, and it refuses to touch a
volume that a running service owns."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from archive_server import ArchiveServer
from cartd_proc import Cartd, cartd_env, run_fsck, tar_digests
from conftest import MakeService, Service, entry, sync_url

BLOBS = {f"{cart}{n}": os.urandom(5000 + 100 * n) for cart in "abc" for n in range(3)}


@pytest.fixture
def db(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url(db_url))
    yield engine
    engine.dispose()


def file_rows(db: sa.Engine) -> dict[str, tuple[int, int]]:
    """archive id -> (cart row id, file row id)."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT archive_id, cart_id, id FROM cart_files")).all()
    return {archive_id: (cart_id, file_id) for archive_id, cart_id, file_id in rows}


def execute(db: sa.Engine, statement: str, **params: object) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(statement), params)


def staged_carts(service: Service, archive: ArchiveServer) -> None:
    for name, data in BLOBS.items():
        archive.add_file(name, data)
    for cart in "abc":
        fileids = [entry(n, f"{n}.bin", d, "sha256") for n, d in BLOBS.items() if n[0] == cart]
        assert service.post(cart, fileids).status_code == 201
    for cart in "abc":
        assert service.wait_settled(cart) == (204, "ready", "")


def damage(volume: Path, db: sa.Engine) -> None:
    """One of every disagreement fsck knows, as crashes and operators leave them."""
    rows = file_rows(db)
    carts = volume / "carts"
    path = {name: carts / str(cart) / str(file) for name, (cart, file) in rows.items()}
    (carts / "999999").mkdir()
    (carts / "999999" / "1").write_bytes(b"orphan")
    (carts / "notes.txt").write_text("not a cart")
    (path["a0"].parent / "424242.part").write_bytes(b"half")
    (path["a0"].parent / "777777").write_bytes(b"stray")
    path["a0"].unlink()
    path["a1"].write_bytes(b"short")
    flipped = bytearray(path["a2"].read_bytes())
    flipped[10] ^= 0xFF
    path["a2"].write_bytes(bytes(flipped))
    execute(db, "UPDATE carts SET state = 'staging' WHERE uid = 'b'")
    execute(db, "UPDATE cart_files SET state = 'waiting' WHERE id = :id", id=rows["c0"][1])


EXPECTED_KINDS = {
    "orphan-dir",
    "unknown-entry",
    "part-file",
    "stray-file",
    "missing-file",
    "wrong-size",
    "cart-not-ready",
    "ready-not-staged",
}


def kinds(output: str) -> set[str]:
    return {line.split()[0] for line in output.splitlines() if not line.startswith("fsck:")}


def test_fsck_finds_every_disagreement_and_repair_restores_consistency(
    make_service: MakeService, archive: ArchiveServer, db_url: str, db: sa.Engine, tmp_path: Path
) -> None:
    first = make_service()
    staged_carts(first, archive)
    first.thread.stop()
    env = cartd_env(db_url, first.volume, archive.url)
    clean = run_fsck(env, "--checksums")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problems" in clean.stdout

    damage(first.volume, db)
    report = run_fsck(env)
    assert report.returncode == 1, report.stdout + report.stderr
    assert kinds(report.stdout) == EXPECTED_KINDS, report.stdout
    deep = run_fsck(env, "--checksums")
    assert kinds(deep.stdout) == EXPECTED_KINDS | {"wrong-checksum"}, deep.stdout

    repaired = run_fsck(env, "--repair", "--checksums")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "still wrong" not in repaired.stdout
    assert run_fsck(env, "--checksums").returncode == 0

    second = make_service()
    for cart in "abc":
        assert second.wait_settled(cart) == (204, "ready", ""), cart
        download = second.client.get(f"/{cart}", params={"filename": "x.tar"})
        assert download.status_code == 200
        expected = {
            f"{n}.bin": hashlib.sha256(d).hexdigest() for n, d in BLOBS.items() if n[0] == cart
        }
        assert tar_digests(download.content) == expected
    second.thread.stop()
    final = run_fsck(env, "--checksums")
    assert final.returncode == 0, final.stdout


def test_fsck_refuses_a_volume_in_use_and_a_second_service_cannot_start(
    service: Service, archive: ArchiveServer, db_url: str, tmp_path: Path
) -> None:
    """With SQLite a second service is refused; with MariaDB it joins as a replica (the
    volume is shared), and fsck is refused while either runs."""
    env = cartd_env(db_url, service.volume, archive.url)
    busy = run_fsck(env, "--repair")
    assert busy.returncode == 2
    assert "in use by another cartd process" in busy.stderr
    rival = Cartd(env, tmp_path / "rival.log")
    if db_url.startswith("sqlite"):
        assert rival.proc.wait(timeout=60) != 0
        rival.client.close()
        assert "in use by another cartd process" in rival.log_text()
    else:
        try:
            rival.wait_up()
            refused = run_fsck(env, "--repair")
            assert refused.returncode == 2
            assert "in use by another cartd process" in refused.stderr
        finally:
            rival.kill()
    assert service.client.get("/").status_code == 200
