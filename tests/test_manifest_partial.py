"""Manifests and partial carts, through the real service (SQLite and MariaDB).

Manifests are checked the way a user checks them: extract with GNU tar, unzip or bsdtar,
then run `sha256sum -c` (and `sha1sum -c`, `md5sum -c`) inside the top directory.
Partial carts are checked through HEAD, /status, ERRORS.json in both formats, and fsck.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from archive_server import ArchiveServer
from cartd_proc import cartd_env, run_fsck
from conftest import MTIME, MakeService, Service, assert_error, entry, schema_at, sync_url

GOOD = {
    "a.txt": (b"alpha\n" * 100, "sha1"),
    "sub/b.bin": (os.urandom(3000), "md5"),
    "sub/deeper/c.csv": (b"x,y\n1,2\n", "sha256"),
    "d.dat": (b"", "sha1"),
    "spaced name \u00e9.txt": (b"unicode path\n", "sha256"),
}


def post(service: Service, cart: str, fileids: list[dict[str, Any]], **options: Any) -> None:
    response = service.client.post(f"/{cart}", json={"fileids": fileids, **options})
    assert response.status_code == 201, response.text


def publish(archive: ArchiveServer, cart: str, files: dict[str, tuple[bytes, str]]) -> list[Any]:
    fileids = []
    for index, (path, (data, hashtype)) in enumerate(files.items()):
        archive.add_file(f"{cart}-{index}", data, mtime=MTIME)
        fileids.append(entry(f"{cart}-{index}", path, data, hashtype))
    return fileids


def download(service: Service, cart: str, **params: str) -> httpx.Response:
    response = service.client.get(f"/{cart}", params=params)
    assert response.status_code == 200, response.text
    return response


def extract(body: bytes, fmt: str, tool: str, into: Path) -> None:
    archive = into.with_suffix(f".{fmt}")
    archive.write_bytes(body)
    into.mkdir()
    command = {
        "tar": ["tar", "-xpf", str(archive), "-C", str(into)],
        "unzip": ["unzip", "-q", str(archive), "-d", str(into)],
        "bsdtar": ["bsdtar", "-xpf", str(archive), "-C", str(into)],
    }[tool]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def check(tool: str, manifest: str, top: Path) -> list[str]:
    """Run `<tool> -c --strict <manifest>` inside the top directory; the lines it verified."""
    result = subprocess.run(
        [tool, "-c", "--strict", manifest],
        capture_output=True,
        text=True,
        check=False,
        cwd=top,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def members(body: bytes, fmt: str) -> list[str]:
    """Regular files in bundle order, relative to the top directory."""
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            names = [i.filename for i in archive.infolist() if not i.is_dir()]
    else:
        with tarfile.open(fileobj=io.BytesIO(body)) as archive:
            names = [m.name for m in archive.getmembers() if m.isfile()]
    return [name.split("/", 1)[1] for name in names]


def read_member(body: bytes, fmt: str, name: str) -> bytes:
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            return archive.read(name)
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        handle = archive.extractfile(name)
        assert handle is not None
        return handle.read()


# --- manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "tool"), [("tar", "tar"), ("zip", "unzip"), ("zip", "bsdtar")])
def test_manifest_posted_with_the_cart_passes_sha256sum_c(
    service: Service, archive: ArchiveServer, tmp_path: Path, fmt: str, tool: str
) -> None:
    post(service, "m", publish(archive, "m", GOOD), manifest=True)
    assert service.wait_settled("m") == (204, "ready", "")
    body = download(service, "m", filename="m", format=fmt).content
    assert members(body, fmt) == [*GOOD, "MANIFEST.md5", "MANIFEST.sha1", "MANIFEST.sha256"]
    extract(body, fmt, tool, tmp_path / "out")
    top = tmp_path / "out" / "m"
    assert check("sha256sum", "MANIFEST.sha256", top) == [f"{path}: OK" for path in GOOD]
    sha1 = [p for p, (_, kind) in GOOD.items() if kind == "sha1"]
    assert check("sha1sum", "MANIFEST.sha1", top) == [f"{path}: OK" for path in sha1]
    assert check("md5sum", "MANIFEST.md5", top) == ["sub/b.bin: OK"]
    (top / "sub" / "b.bin").write_bytes(b"tampered")
    tampered = subprocess.run(
        ["sha256sum", "-c", "MANIFEST.sha256"], cwd=top, capture_output=True, check=False
    )
    assert tampered.returncode == 1


def test_manifest_lines_are_the_clients_digests(service: Service, archive: ArchiveServer) -> None:
    fileids = publish(archive, "lines", GOOD)
    post(service, "lines", fileids, manifest=True)
    assert service.wait_settled("lines") == (204, "ready", "")
    body = download(service, "lines", filename="l").content
    sha256 = read_member(body, "tar", "l/MANIFEST.sha256").decode()
    assert sha256 == "".join(
        f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, (data, _) in GOOD.items()
    )
    sha1 = read_member(body, "tar", "l/MANIFEST.sha1").decode()
    assert sha1 == "".join(
        f"{e['hashsum']}  {e['path']}\n" for e in fileids if e["hashtype"] == "sha1"
    )


def test_manifest_query_overrides_the_cart_default(
    service: Service, archive: ArchiveServer
) -> None:
    post(service, "plain", publish(archive, "plain", GOOD))
    post(service, "listed", publish(archive, "listed", GOOD), manifest=True)
    for cart in ("plain", "listed"):
        assert service.wait_settled(cart) == (204, "ready", "")
    plain = download(service, "plain", filename="p")
    asked = download(service, "plain", filename="p", manifest="1")
    assert "MANIFEST.sha256" not in members(plain.content, "tar")
    assert members(asked.content, "tar")[-1] == "MANIFEST.sha256"
    assert asked.headers["ETag"] != plain.headers["ETag"]
    declined = download(service, "listed", filename="p", manifest="false", format="zip")
    assert members(declined.content, "zip") == list(GOOD)
    assert_error(service.client.get("/plain", params={"manifest": "maybe"}), 400)


def test_paths_where_generated_files_go_are_refused_or_conflict(
    service: Service, archive: ArchiveServer
) -> None:
    data = b"mine"
    clashes = [
        ({"manifest": True}, "MANIFEST.sha256"),
        ({"manifest": True}, "MANIFEST.md5/inside.txt"),
        ({"allow_partial": True}, "ERRORS.json"),
    ]
    for options, path in clashes:
        body = {"fileids": [entry("x", path, data, "md5")], **options}
        message = assert_error(service.client.post("/clash", json=body), 400)
        assert repr(path) in message, message
    archive.add_file("own", data, mtime=MTIME)
    post(service, "own", [entry("own", "MANIFEST.sha256", data)])  # fine without a manifest
    assert service.wait_settled("own") == (204, "ready", "")
    assert download(service, "own", filename="o").status_code == 200
    message = assert_error(service.client.get("/own", params={"manifest": "1"}), 409)
    assert "MANIFEST.sha256" in message


def test_options_are_part_of_the_cart_identity(service: Service, archive: ArchiveServer) -> None:
    fileids = publish(archive, "same", GOOD)
    post(service, "same", fileids, manifest=True)
    post(service, "same", fileids, manifest=True)  # an identical retry
    for options in ({}, {"allow_partial": True}, {"manifest": True, "allow_partial": True}):
        response = service.client.post("/same", json={"fileids": fileids, **options})
        assert_error(response, 409)


# --- partial carts -----------------------------------------------------------------------------

PARTIAL = {
    "ok/one.txt": (b"one\n", "sha1"),
    "gone.bin": (b"never published", "sha1"),
    "ok/two.bin": (os.urandom(2000), "sha256"),
    "corrupt.txt": (b"served bytes", "md5"),
    "three.txt": (b"three\n", "sha1"),
}
STAGED = ["ok/one.txt", "ok/two.bin", "three.txt"]


def partial_cart(service: Service, archive: ArchiveServer, cart: str, **options: Any) -> None:
    """Two of five files fail: one the archive does not have, one whose checksum is wrong."""
    archive.missing_status = 404
    fileids = publish(archive, cart, PARTIAL)
    archive.remove_file(f"{cart}-1")
    fileids[3]["hashsum"] = hashlib.md5(b"other bytes").hexdigest()
    post(service, cart, fileids, allow_partial=True, **options)


def test_partial_cart_is_ready_and_its_bundles_list_the_missing_files(
    service: Service, archive: ArchiveServer
) -> None:
    partial_cart(service, archive, "part")
    code, state, message = service.wait_settled("part")
    assert (code, state) == (204, "ready")
    status = service.status("part")
    errors = {f["path"]: f["error"] for f in status["files"] if f["state"] == "error"}
    assert list(errors) == ["gone.bin", "corrupt.txt"]
    assert message == f"2 of 5 files failed: gone.bin: {errors['gone.bin']}"
    assert (status["state"], status["files_error"], status["files_staged"]) == ("ready", 2, 3)
    expected = {
        "missing": [
            {"id": "part-1", "path": "gone.bin", "reason": errors["gone.bin"]},
            {"id": "part-3", "path": "corrupt.txt", "reason": errors["corrupt.txt"]},
        ]
    }
    assert "hash" in errors["corrupt.txt"].lower()
    for fmt in ("tar", "zip"):
        body = download(service, "part", filename="p", format=fmt).content
        assert members(body, fmt) == [*STAGED, "ERRORS.json"]
        assert json.loads(read_member(body, fmt, "p/ERRORS.json")) == expected
        for path in STAGED:
            assert read_member(body, fmt, f"p/{path}") == PARTIAL[path][0]


@pytest.mark.parametrize(("fmt", "tool"), [("tar", "tar"), ("zip", "unzip")])
def test_partial_cart_manifest_covers_the_files_it_has(
    service: Service, archive: ArchiveServer, tmp_path: Path, fmt: str, tool: str
) -> None:
    partial_cart(service, archive, "pm", manifest=True)
    assert service.wait_settled("pm")[:2] == (204, "ready")
    body = download(service, "pm", filename="pm", format=fmt).content
    assert members(body, fmt) == [*STAGED, "ERRORS.json", "MANIFEST.sha1", "MANIFEST.sha256"]
    extract(body, fmt, tool, tmp_path / "out")
    top = tmp_path / "out" / "pm"
    assert check("sha256sum", "MANIFEST.sha256", top) == [f"{path}: OK" for path in STAGED]
    assert check("sha1sum", "MANIFEST.sha1", top) == ["ok/one.txt: OK", "three.txt: OK"]


def test_partial_cart_whose_every_file_failed_is_in_error(
    service: Service, archive: ArchiveServer
) -> None:
    archive.missing_status = 404
    fileids = [entry(f"lost{i}", f"lost{i}.txt", b"x") for i in range(3)]
    post(service, "lost", fileids, allow_partial=True)
    code, state, message = service.wait_settled("lost")
    assert (code, state) == (500, "error")
    first = service.status("lost")["files"][0]["error"]
    assert message == f"Failed to pull file({first})"
    assert_error(service.client.get("/lost"), 409)


def test_partial_cart_without_failures_is_plain(service: Service, archive: ArchiveServer) -> None:
    post(service, "fine", publish(archive, "fine", GOOD), allow_partial=True)
    assert service.wait_settled("fine") == (204, "ready", "")
    assert members(download(service, "fine", filename="f").content, "tar") == list(GOOD)


def test_without_allow_partial_the_first_failure_fails_the_cart(
    service: Service, archive: ArchiveServer
) -> None:
    archive.missing_status = 404
    fileids = publish(archive, "strict", PARTIAL)
    archive.remove_file("strict-1")
    post(service, "strict", fileids)
    code, state, message = service.wait_settled("strict")
    assert (code, state) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert_error(service.client.get("/strict"), 409)


def test_fsck_accepts_a_partial_cart_and_repairs_an_unfinished_one(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    first = make_service()
    partial_cart(first, archive, "audit")
    _, state, message = first.wait_settled("audit")
    assert state == "ready"
    first.client.close()
    first.thread.stop()
    env = cartd_env(db_url, first.volume, archive.url)
    clean = run_fsck(env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:  # as if the process died before finishing the cart
            conn.execute(sa.text("UPDATE carts SET state = 'staging', message = ''"))
    finally:
        engine.dispose()
    found = run_fsck(env)
    assert found.returncode == 1
    assert "cart-not-ready" in found.stdout
    assert run_fsck(env, "--repair").returncode == 0, found.stdout
    second = make_service()
    assert second.wait_settled("audit") == (204, "ready", message)


# --- schema 0003 ---------------------------------------------------------------------------

CART_0002 = (
    "INSERT INTO carts (id, uid, active_uid, state, message, fingerprint, file_count,"
    " created_at, updated_at, last_used_at) VALUES (1, 'old', 'old', 'ready', '', 'f', 1, 0, 0, 0)"
)
FILE_0002 = (
    "INSERT INTO cart_files (cart_id, position, archive_id, path, hashtype, hashsum, state,"
    " size, bytes_staged, error, attempts, updated_at)"
    " VALUES (1, 0, 'a', 'a.txt', 'sha1', 'aa', 'staged', 1, 1, '', 1, 0)"
)


def test_schema_0003_upgrades_carts_staged_before_it(db_url: str) -> None:
    """Old carts get no options and NULL checksums (computed at their first zip); and back."""
    with schema_at(db_url, "0002") as (conn, config):
        conn.execute(sa.text(CART_0002))
        conn.execute(sa.text(FILE_0002))
        command.upgrade(config, "0003")
        options = conn.execute(sa.text("SELECT manifest, allow_partial FROM carts")).one()
        sums = conn.execute(sa.text("SELECT crc32, sha256 FROM cart_files")).one()
        assert (tuple(options), tuple(sums)) == ((False, False), (None, None))
        command.downgrade(config, "0002")
        assert conn.execute(sa.text("SELECT path FROM cart_files")).scalar() == "a.txt"
