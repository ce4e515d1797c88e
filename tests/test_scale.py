"""Scale-out proofs: cartd replicas (real processes) sharing one MariaDB database and one
volume, and SQLite refusing a second process.

The replicas use short leases (LEASE s, renewed every POLL s) so that a SIGKILLed
replica's files are taken over within seconds.  The archive logs every GET body it sends
(start, end, whole or abandoned); those logs are the referee for "never two fetches of one
file at once" and "a DELETE elsewhere stops the fetch".
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from archive_server import ArchiveServer, GetStream
from cartd.cache import ALLOWANCE
from cartd.volume_lock import DatabaseBusy, VolumeBusy, serving
from cartd_proc import Cartd, cartd_env, tar_digests
from conftest import database, entry, part_files, sync_url, wait_for
from test_cache import Mount, set_last_used, tmpfs  # noqa: F401 - a fixture
from test_observability import TcpForwarder

MiB = 1 << 20
LEASE = 2.0
POLL = 0.5
SCALE = {
    "lease_seconds": str(LEASE),
    "cancel_poll_interval": str(POLL),
    "progress_interval": "0.1",
}
Start = Callable[..., list[Cartd]]


@pytest.fixture
def mariadb_url(tmp_path: Path) -> Iterator[str]:
    """Replicas need a server database: these proofs run on MariaDB only."""
    with database("mariadb", tmp_path) as url:
        yield url


@pytest.fixture
def replicas(mariadb_url: str, archive: ArchiveServer, tmp_path: Path) -> Iterator[Start]:
    """Start `n` cartd processes on one database and one volume; all killed at teardown."""
    started: list[Cartd] = []

    def start(n: int, volume: Path | None = None, **overrides: str) -> list[Cartd]:
        env = cartd_env(mariadb_url, volume or tmp_path / "volume", archive.url, **overrides)
        group = [Cartd(env, tmp_path / f"cartd-{len(started) + i}.log") for i in range(n)]
        started.extend(group)
        return [replica.wait_up() for replica in group]

    yield start
    for replica in started:
        replica.kill()


def query(db_url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def leased_by(db_url: str, replica: Cartd, *, mid_stream: bool = False) -> list[int]:
    """File rows `replica` is fetching now (and, if asked, has written part of)."""
    sql = "SELECT id FROM cart_files WHERE state = 'staging' AND lease_owner LIKE :owner"
    if mid_stream:
        sql += " AND bytes_staged > 0"
    return [int(str(r[0])) for r in query(db_url, sql, owner=f"%:{replica.proc.pid}:%")]


def streams_of(archive: ArchiveServer, file_id: str) -> list[GetStream]:
    return sorted(
        (s for s in list(archive.streams) if s.file_id == file_id), key=lambda s: s.started
    )


def alive(replicas: list[Cartd]) -> list[Cartd]:
    return [r for r in replicas if r.proc.poll() is None]


def kill_mid_fetch(victim: Cartd, db_url: str) -> dict[str, float]:
    """SIGKILL `victim` (which holds a lease now); returns its leases (archive id ->
    expiry), final now that nobody can renew them."""
    victim.kill()
    sql = "SELECT archive_id, lease_expires FROM cart_files WHERE lease_owner LIKE :owner"
    rows = query(db_url, sql, owner=f"%:{victim.proc.pid}:%")
    return {str(file_id): float(str(expires)) for file_id, expires in rows}


def test_replicas_share_the_work_and_take_over_a_killed_one(
    replicas: Start, archive: ArchiveServer, mariadb_url: str
) -> None:
    group = replicas(3, fetch_concurrency="3", **SCALE)
    archive.get_chunk_delay = 0.2  # a 3 MiB file streams for 0.6 s: long enough to be cut
    rng = random.Random(8)
    victim, orphaned = group[0], {}
    expected: dict[str, dict[str, str]] = {}
    for n in range(30):
        uid, files = f"scale-{n}", {"big.bin": os.urandom(3 * MiB), "small.txt": os.urandom(999)}
        fileids = []
        for path, data in files.items():
            archive.add_file(f"{uid}/{path}", data)
            fileids.append(entry(f"{uid}/{path}", path, data, "sha256"))
        target = victim if n == 15 and not orphaned else rng.choice(alive(group))
        assert target.post(uid, fileids).status_code == 201
        expected[uid] = {p: entry("", p, d, "sha256")["hashsum"] for p, d in files.items()}
        if not orphaned and n >= 5 and leased_by(mariadb_url, victim, mid_stream=True):
            orphaned = kill_mid_fetch(victim, mariadb_url)  # mid-stream, more carts to come
        elif not orphaned and n == 15:  # it just got a cart: it claims at once
            wait_for(lambda: bool(leased_by(mariadb_url, victim)), "the victim's claim", 30)
            orphaned = kill_mid_fetch(victim, mariadb_url)
    assert orphaned, "the killed replica held no lease"
    to_wall = time.time() - time.monotonic()  # GetStream times are monotonic

    survivors = alive(group)
    for uid in expected:
        # Every survivor: one that answered HEAD while the cart staged keeps that answer
        # for up to CARTD_HEAD_CACHE_TTL after another replica finished it (the README bound).
        wait_for(
            lambda u=uid: all(s.state(u)[1] != "staging" for s in survivors), f"{uid} done", 60
        )
        assert rng.choice(survivors).state(uid) == (204, "ready", "")
        download = rng.choice(survivors).client.get(f"/{uid}")
        assert download.status_code == 200
        assert tar_digests(download.content) == expected[uid]

    for file_id in {s.file_id for s in archive.streams}:
        for earlier, later in itertools.pairwise(streams_of(archive, file_id)):
            assert earlier.ended is not None, f"{file_id} is still streaming"
            assert earlier.ended <= later.started, f"{file_id} was fetched twice at once"
            # A repeat is a takeover of the dead replica's file, after its lease lapsed.
            assert file_id in orphaned, f"{file_id} was fetched again, yet never orphaned"
            assert later.started + to_wall >= orphaned[file_id] - 0.01, file_id
    for file_id, expiry in orphaned.items():  # each one taken over, once its lease lapsed
        takeover = [s for s in streams_of(archive, file_id) if s.started + to_wall >= expiry]
        assert [s.whole for s in takeover] == [True], f"{file_id}: {takeover}"


def test_delete_on_one_replica_stops_the_fetch_on_another(
    replicas: Start, archive: ArchiveServer, mariadb_url: str, tmp_path: Path
) -> None:
    first, second = replicas(2, **SCALE)
    archive.get_chunk_delay = 0.2  # 30 MiB: six seconds of streaming if nobody stops it
    data = os.urandom(30 * MiB)
    archive.add_file("slow", data)
    assert first.post("doomed", [entry("slow", "slow.bin", data)]).status_code == 201
    wait_for(lambda: bool(archive.streams), "the fetch to start", 30)
    fetcher, other = (first, second) if leased_by(mariadb_url, first) else (second, first)
    assert leased_by(mariadb_url, fetcher), "neither replica holds the lease"

    assert other.client.delete("/doomed").status_code == 200
    # The bound: one renewal interval, plus a chunk the archive was already sending.
    stream = archive.streams[0]
    wait_for(lambda: stream.ended is not None, "the fetcher to hang up", POLL + 2.0)
    assert not stream.whole
    wait_for(lambda: not part_files(tmp_path / "volume"), "the .part file to go", 5)
    assert len(archive.streams) == 1, "the deleted cart was fetched again"
    assert fetcher.proc.poll() is None
    assert fetcher.state("doomed")[0] == 404


def test_two_replicas_evicting_at_once_spare_a_held_cart_and_never_overcommit(
    replicas: Start,
    archive: ArchiveServer,
    mariadb_url: str,
    tmpfs: Mount,  # noqa: F811
) -> None:
    one, two = replicas(2, volume=tmpfs(20), **SCALE)
    old = {uid: os.urandom(4 * MiB) for uid in ("held", "x", "y", "z")}
    for uid, data in old.items():
        archive.add_file(uid, data)
        assert one.post(uid, [entry(uid, f"{uid}.bin", data)]).status_code == 201
        assert one.wait_settled(uid) == (204, "ready", "")
    with one.client.stream("GET", "/held") as download:  # a download in progress on one
        body = download.iter_bytes()
        first = next(body)
        for rank, uid in enumerate(("held", "x", "y", "z")):  # held is the LRU's first pick
            set_last_used(mariadb_url, uid, 1000.0 + rank)
        archive.get_chunk_delay = 0.1
        new = {uid: os.urandom(4 * MiB + MiB // 2) for uid in ("new-1", "new-2")}
        for replica, (uid, data) in zip((one, two), new.items(), strict=True):
            archive.add_file(uid, data)
            assert replica.post(uid, [entry(uid, f"{uid}.bin", data)]).status_code == 201
        for replica, uid in zip((two, one), new, strict=True):
            assert replica.wait_settled(uid) == (204, "ready", ""), "space was overcommitted"
        content = first + b"".join(body)
    assert tar_digests(content) == {"held.bin": entry("", "", old["held"], "sha256")["hashsum"]}
    assert two.state("held") == (204, "ready", "")
    reasons = dict(query(mariadb_url, "SELECT uid, deleted_reason FROM carts"))
    evicted = sorted(uid for uid, reason in reasons.items() if reason == "evicted")
    assert "held" not in evicted, reasons
    assert len(evicted) >= 2, reasons
    for uid, data in new.items():
        assert tar_digests(two.client.get(f"/{uid}").content) == {
            f"{uid}.bin": entry("", "", data, "sha256")["hashsum"]
        }


def test_a_second_process_on_one_sqlite_database_refuses_to_start(
    archive: ArchiveServer, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'cartd.db'}"
    env = cartd_env(db_url, tmp_path / "volume-1", archive.url)
    running = Cartd(env, tmp_path / "first.log")
    try:
        running.wait_up()
        second_env = cartd_env(db_url, tmp_path / "volume-2", archive.url)
        second = Cartd(second_env, tmp_path / "second.log")
        assert second.proc.wait(timeout=60) != 0
        log = second.log_text()
        assert "is in use by another cartd process" in log, log[-2000:]
        assert "SQLite supports a single cartd replica" in log
        assert running.client.get("/").status_code == 200
    finally:
        running.kill()


def test_replicas_answer_for_each_others_carts(replicas: Start, archive: ArchiveServer) -> None:
    one, two = replicas(2, **SCALE)
    data = os.urandom(1000)
    archive.add_file("anywhere", data)
    assert one.post("anywhere", [entry("anywhere", "a.bin", data)]).status_code == 201
    assert two.wait_settled("anywhere") == (204, "ready", "")
    assert two.status("anywhere")["files_staged"] == 1
    assert tar_digests(two.client.get("/anywhere").content) == {
        "a.bin": entry("", "", data, "sha256")["hashsum"]
    }
    assert two.client.delete("/anywhere").status_code == 200
    assert one.state("anywhere")[0] == 404
    with pytest.raises(httpx.HTTPStatusError):
        one.status("anywhere")


def _enter(lock: AbstractContextManager[None]) -> None:
    with lock:
        pass


def test_the_volume_lock_follows_the_recovery_mode(tmp_path: Path) -> None:
    """A sole service (any SQLite, in-memory included) recovers destructively, so it holds
    the volume alone; replicas share it, and never with a sole service."""
    root = tmp_path / "volume"
    with serving(root, sole=True), pytest.raises(VolumeBusy):  # in-memory SQLite
        _enter(serving(root, sole=False))
    with serving(root, sole=False), serving(root, sole=False), pytest.raises(VolumeBusy):
        _enter(serving(root, sole=True))
    db = tmp_path / "cartd.db"
    with serving(root, sole=True, sqlite_file=db), pytest.raises(DatabaseBusy):
        _enter(serving(tmp_path / "other-volume", sole=True, sqlite_file=db))


def test_a_cart_deleted_while_another_replica_streams_it_is_swept_after_the_download(
    replicas: Start, archive: ArchiveServer, tmp_path: Path
) -> None:
    """DELETE on B must not pull the files from under A's download; once A's hold lapses,
    some replica's cache pass removes the directory."""
    streamer, deleter = replicas(2, cache_check_interval="0.2", **SCALE)
    data = os.urandom(24 * MiB)  # more than loopback buffers hold: A is still sending
    archive.add_file("big", data)
    assert streamer.post("c", [entry("big", "big.bin", data)]).status_code == 201
    assert streamer.wait_settled("c") == (204, "ready", "")
    carts_dir = tmp_path / "volume" / "carts"
    with streamer.client.stream("GET", "/c", params={"filename": "c.tar"}) as download:
        chunks = download.iter_bytes()
        body = [next(chunks)]
        assert deleter.client.delete("/c").status_code == 200
        assert deleter.state("c")[0] == 404
        time.sleep(LEASE + 1.0)  # the hold outlives a lease only because A renews it
        assert list(carts_dir.iterdir()), "the files went while a download held them"
        body.extend(chunks)
    assert tar_digests(b"".join(body)) == {"big.bin": entry("", "", data, "sha256")["hashsum"]}
    wait_for(lambda: not list(carts_dir.iterdir()), "the sweep to remove the files", 15)


def test_a_replica_cut_off_from_the_database_stops_its_fetches(
    mariadb_url: str, archive: ArchiveServer, tmp_path: Path
) -> None:
    """A replica that cannot renew its leases stops fetching before they can lapse, so the
    replica that takes its files over never fetches beside it."""
    forwarder = TcpForwarder(("127.0.0.1", 3306)).start()
    url = mariadb_url.replace(":3306/", f":{forwarder.port}/")
    replica = Cartd(cartd_env(url, tmp_path / "volume", archive.url, **SCALE), tmp_path / "r.log")
    try:
        replica.wait_up()
        archive.get_chunk_delay = 0.2  # 30 MiB: six seconds of streaming if nobody stops it
        data = os.urandom(30 * MiB)
        archive.add_file("slow", data)
        assert replica.post("cut", [entry("slow", "s.bin", data)]).status_code == 201
        wait_for(lambda: bool(archive.streams), "the fetch to start", 30)
        forwarder.stop()
        stream = archive.streams[0]
        wait_for(lambda: stream.ended is not None, "the cut-off replica to hang up", LEASE + 2)
        assert not stream.whole
        assert "leases not renewed in time: stopping 1 fetch(es)" in replica.log_text()
        assert replica.proc.poll() is None  # it stops fetching, not living
    finally:
        replica.kill()


def promises(db_url: str) -> dict[str, int | None]:
    """Each file's promised space, by archive id (NULL: none recorded)."""
    rows = query(db_url, "SELECT archive_id, reserved FROM cart_files")
    return {str(key): None if value is None else int(str(value)) for key, value in rows}


def test_a_claim_promises_its_files_space_that_a_bigger_file_replaces(
    replicas: Start, archive: ArchiveServer, mariadb_url: str
) -> None:
    """On a shared volume with room, the claim itself promises each file ALLOWANCE bytes
    (other replicas count them at once), so that a small file needs no transaction of its
    own before its download; a file that proves bigger reserves its real size."""
    (one,) = replicas(1, **SCALE)
    small = {f"s{n}": os.urandom(1000) for n in range(3)}
    for name, data in small.items():
        archive.add_file(name, data, tape_delay=math.inf)  # claimed, then waits on tape
    big = os.urandom(3 * MiB)
    archive.add_file("big", big)
    archive.get_chunk_delay = 1.0  # the big GET lasts about 3 s
    files = {**small, "big": big}
    cart = [entry(name, f"{name}.bin", data) for name, data in files.items()]
    assert one.post("c", cart).status_code == 201
    expected = {**dict.fromkeys(small, ALLOWANCE), "big": 3 * MiB}
    wait_for(lambda: promises(mariadb_url) == expected, "the claim's and the big file's promises")
    archive.get_chunk_delay = 0.0
    for name, data in small.items():
        archive.add_file(name, data)  # the recall finishes
    assert one.wait_settled("c") == (204, "ready", "")
    assert promises(mariadb_url) == dict.fromkeys(files)
    assert tar_digests(one.client.get("/c").content) == {
        f"{name}.bin": entry("", "", data, "sha256")["hashsum"] for name, data in files.items()
    }


def test_near_its_watermark_a_volume_promises_each_file_its_exact_size(
    replicas: Start, archive: ArchiveServer, mariadb_url: str
) -> None:
    """Claims promise nothing when the allowances would take the volume below its high
    watermark: every file then reserves its real size once known, as before."""
    (one,) = replicas(1, cache_high_watermark="100%", **SCALE)
    archive.add_file("t", b"on tape", tape_delay=math.inf)
    assert one.post("c", [entry("t", "t.bin", b"on tape")]).status_code == 201
    wait_for(lambda: archive.count("HEAD", "t") >= 2, "the file to be claimed and polled")
    assert promises(mariadb_url) == {"t": None}
