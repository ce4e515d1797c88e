"""Cache space management on a real, small tmpfs volume (mounting needs root, as in CI)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from archive_server import ArchiveServer
from conftest import MakeService, Service, entry, sync_url, wait_for

MiB = 1 << 20
CARTD = str(Path(sys.executable).parent / "cartd")
Mount = Callable[[int], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """Mount tmpfs volumes of a given size in MiB; unmounted after every service stopped."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        target = tmp_path / f"tmpfs-{len(mounted)}"
        target.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(target)], check=True
        )
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def set_last_used(db_url: str, uid: str, when: float, service: Service | None = None) -> None:
    """Age a cart by rewriting its last-use time: the policy under test reads only that.

    The in-thread `service` first writes the HEAD uses it noted (the polls that waited for
    the cart), or it would count them, and a later flush would overwrite `when`.
    """
    if service is not None:
        service.wait_uses_written()
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE carts SET last_used_at = :t WHERE active_uid = :u"),
                {"t": when, "u": uid},
            )
    finally:
        engine.dispose()


def deleted_reason(db_url: str, uid: str) -> str:
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    sa.text("SELECT deleted_reason FROM carts WHERE uid = :u ORDER BY id DESC"),
                    {"u": uid},
                ).scalar()
            )
    finally:
        engine.dispose()


def ready_cart(service: Service, archive: ArchiveServer, uid: str, size: int) -> bytes:
    data = os.urandom(size)
    archive.add_file(uid, data)
    assert service.post(uid, [entry(uid, f"{uid}.bin", data)]).status_code == 201
    assert service.wait_settled(uid) == (204, "ready", "")
    return data


def exists(service: Service, uid: str) -> bool:
    return service.client.head(f"/{uid}").status_code != 404


def test_lru_cart_is_evicted_first(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(volume_path=tmpfs(8))
    for uid in ("a", "b", "c"):
        ready_cart(service, archive, uid, 2 * MiB)
    for uid, when in (("a", 2000.0), ("b", 1000.0), ("c", 3000.0)):
        set_last_used(db_url, uid, when, service)  # least recently used: b, then a, then c
    newest = ready_cart(service, archive, "d", 3 * MiB)
    assert [exists(service, uid) for uid in "abc"] == [True, False, True]
    assert service.client.get("/d").content.endswith(bytes(512))  # a whole tar
    assert len(newest) == 3 * MiB
    assert deleted_reason(db_url, "b") == "evicted"
    assert service.client.get("/b").status_code == 404  # gone, not an error


def test_buffer_time_protects_recent_carts_and_nothing_is_evicted_in_vain(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(volume_path=tmpfs(8), lru_buffer_time=3600)
    ready_cart(service, archive, "recent", 3 * MiB)
    ready_cart(service, archive, "old", 2 * MiB)
    set_last_used(db_url, "old", 1000.0, service)
    # 3 MiB free + 2 MiB evictable cannot hold 5.5 MiB: "old" must survive.
    data = os.urandom(5 * MiB + MiB // 2)
    archive.add_file("big", data)
    assert service.post("big", [entry("big", "big.bin", data)]).status_code == 201
    code, state, message = service.wait_settled("big")
    assert (code, state) == (500, "error")
    assert "No Space Available" in message
    assert exists(service, "old")
    assert exists(service, "recent")
    assert archive.count("GET", "big") == 0


def test_file_larger_than_the_volume_fails_before_any_get(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(volume_path=tmpfs(8))
    ready_cart(service, archive, "bystander", 2 * MiB)
    set_last_used(db_url, "bystander", 1000.0, service)
    archive.add_file("huge", os.urandom(9 * MiB))
    huge = entry("huge", "huge.bin", b"")  # the checksum never gets looked at
    assert service.post("huge", [huge]).status_code == 201
    code, state, message = service.wait_settled("huge")
    assert (code, state) == (500, "error")
    assert "No Space Available" in message
    assert archive.count("GET", "huge") == 0
    assert exists(service, "bystander")


def test_cart_larger_than_the_volume_fails_without_eviction(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(volume_path=tmpfs(8), fetch_concurrency=1)
    ready_cart(service, archive, "bystander", 1 * MiB)
    set_last_used(db_url, "bystander", 1000.0, service)
    parts = [os.urandom(3 * MiB) for _ in range(3)]
    for number, data in enumerate(parts):
        archive.add_file(f"part{number}", data)
    cart = [entry(f"part{n}", f"p{n}.bin", data) for n, data in enumerate(parts)]
    assert service.post("toobig", cart).status_code == 201
    code, state, message = service.wait_settled("toobig")
    assert (code, state) == (500, "error")
    assert "No Space Available" in message
    assert exists(service, "bystander")


def test_concurrent_carts_never_overcommit(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer
) -> None:
    """Two staging carts that together need 9 MiB of an 8 MiB volume: reservations refuse a
    file before its GET, instead of a write failing half-way with ENOSPC."""
    service = make_service(volume_path=tmpfs(8), fetch_concurrency=8, lru_buffer_time=3600)
    carts: dict[str, list[bytes]] = {}
    for uid in ("left", "right"):
        carts[uid] = [os.urandom(3 * MiB // 2) for _ in range(3)]
        for number, data in enumerate(carts[uid]):
            archive.add_file(f"{uid}{number}", data, tape_delay=0.2)
    for uid, files in carts.items():
        cart = [entry(f"{uid}{n}", f"{n}.bin", data) for n, data in enumerate(files)]
        assert service.post(uid, cart).status_code == 201
    outcomes = {uid: service.wait_settled(uid) for uid in carts}
    assert sorted(state for _, state, _ in outcomes.values()) == ["error", "ready"], outcomes
    for uid, (_, state, message) in outcomes.items():
        if state == "ready":
            body = service.client.get(f"/{uid}").content
            assert all(data in body for data in carts[uid])
            continue
        assert message == "Failed to pull file(No Space Available)"
        failed = [f["id"] for f in service.status(uid)["files"] if f["state"] == "error"]
        assert len(failed) == 1
        assert archive.count("GET", failed[0]) == 0


def test_cart_being_downloaded_is_not_evicted(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(volume_path=tmpfs(64))
    data = ready_cart(service, archive, "busy", 40 * MiB)
    set_last_used(db_url, "busy", 1000.0, service)
    with service.client.stream("GET", "/busy") as download:
        chunks = download.iter_bytes()
        first = next(chunks)  # the server is now blocked mid-stream on a full socket
        big = os.urandom(30 * MiB)
        archive.add_file("needy", big)
        assert service.post("needy", [entry("needy", "n.bin", big)]).status_code == 201
        assert service.wait_settled("needy")[1] == "error"
        body = first + b"".join(chunks)
    assert data in body
    assert exists(service, "busy")


def test_watermark_task_evicts_down_to_the_high_mark(
    tmpfs: Mount, make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    volume = tmpfs(8)
    loading = make_service(volume_path=volume)
    for number in range(5):
        ready_cart(loading, archive, f"w{number}", 1 * MiB)
        set_last_used(db_url, f"w{number}", 1000.0 + number, loading)
    loading.thread.stop()
    service = make_service(
        volume_path=volume,
        cache_low_watermark="50%",
        cache_high_watermark="5MiB",
        cache_check_interval=0.05,
    )
    # Waits on the row, not on HEAD: a HEAD is a use, and polling w1 before the first pass
    # would make it the most recently used cart.
    wait_for(lambda: deleted_reason(db_url, "w1") == "evicted", "the watermark task to evict")
    # 3 MiB free < 50%; evicting w0, w1 (oldest) brings free space to 5 MiB.
    assert [exists(service, f"w{n}") for n in range(5)] == [False, False, True, True, True]


def test_expired_cart_is_deleted_even_while_staging(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service(cache_check_interval=0.05, cart_ttl_max=60)
    archive.add_file("slow", b"on tape", tape_delay=math.inf)
    response = service.client.post(
        "/ttl", json={"ttl": 1, "fileids": [entry("slow", "slow.txt", b"on tape")]}
    )
    assert response.status_code == 201
    expires = service.status("ttl")["expires_at"]
    assert expires is not None
    assert 0 < expires - time.time() <= 1
    wait_for(lambda: not exists(service, "ttl"), "expiry", timeout=10)
    assert deleted_reason(db_url, "ttl") == "expired"


def test_ttl_defaults_and_limits(make_service: MakeService, archive: ArchiveServer) -> None:
    service = make_service(cart_ttl=600, cart_ttl_max=3600)
    archive.add_file("f", b"x")
    fileids = [entry("f", "f.txt", b"x")]
    too_long = service.client.post("/long", json={"ttl": 7200, "fileids": fileids})
    assert too_long.status_code == 400
    assert "3600" in too_long.json()["message"]
    assert service.post("default", fileids).status_code == 201
    remaining = service.status("default")["expires_at"] - time.time()
    assert 590 < remaining <= 600


def test_head_and_get_count_as_use(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service()
    ready_cart(service, archive, "used", 1000)
    for request in (service.client.head, service.client.get):
        set_last_used(db_url, "used", 1000.0, service)
        request("/used")
        # A GET writes it at once; a HEAD's use is written by the next flush (about 1 s).
        wait_for(lambda: service.status("used")["last_used_at"] > time.time() - 60, "a use")


def _cartd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CARTD, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


def test_admin_list_and_purge(
    make_service: MakeService, archive: ArchiveServer, db_url: str, tmp_path: Path
) -> None:
    service = make_service()
    ready_cart(service, archive, "ancient", 1000)
    ready_cart(service, archive, "fresh", 2000)
    set_last_used(db_url, "ancient", time.time() - 40 * 86400, service)
    env: dict[str, Any] = {"CARTD_DATABASE_URL": db_url, "VOLUME_PATH": str(service.volume)}
    listing = _cartd(env, "carts", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["CART", "STATE", "FILES", "BYTES"]
    assert lines[1].split()[:4] == ["ancient", "ready", "1", "1000"]
    assert lines[2].split()[:4] == ["fresh", "ready", "1", "2000"]
    purge = _cartd(env, "purge", "--older-than", "30d")
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.splitlines() == ["purged ancient", "1 carts purged"]
    assert not exists(service, "ancient")
    assert exists(service, "fresh")
    bad = _cartd(env, "purge", "--older-than", "soon")
    assert bad.returncode != 0
    assert "not a duration" in bad.stderr
