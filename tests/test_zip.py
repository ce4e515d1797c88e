"""Zip bundles: the planner's records checked by Python's zipfile, Info-ZIP unzip and bsdtar,
Zip64 on a sparse 4 GiB file and on 70,000 entries, then the real service (SQLite and
MariaDB): format selection, exact length, ETag, ranges (property-tested against the full
body, for tar too), `curl -C -`, extraction, and CRCs computed late for old rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from archive_server import ArchiveServer
from cartd import bundle, zipbundle
from cartd.app import create_app
from cartd.bundle import Format, Generated, StagedFile
from cartd.checksums import Hasher, file_extras
from cartd.db import store
from cartd.digests import DigestBackfill
from cartd.volume import Volume
from conftest import (
    DATABASES,
    MTIME,
    MakeService,
    Service,
    assert_error,
    make_ready,
    standalone_service,
    store_sessions,
    sync_url,
    wait_for,
)

LATER = MTIME + 10


def stage(root: Path, path: str, data: bytes, mtime: float = MTIME) -> StagedFile:
    """A cache file described as the download route describes it, CRC and SHA-256 included."""
    source = root / "cache" / f"{len(list(root.glob('cache/*')))}.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    sha256 = hashlib.sha256(data).hexdigest()
    return StagedFile(path, len(data), mtime, source, f"sha1:{sha1}", zlib.crc32(data), sha256)


SAMPLE = {
    "top.txt": b"top level",
    "1/2/3/foo.txt": b"f" * 1000,
    "1/2/bar.bin": bytes(range(256)) * 9,
    "empty": b"",
    "x/exact.bin": b"e" * 512,
}
NAMES = [
    "my_cart/",
    "my_cart/top.txt",
    "my_cart/1/",
    "my_cart/1/2/",
    "my_cart/1/2/3/",
    "my_cart/1/2/3/foo.txt",
    "my_cart/1/2/bar.bin",
    "my_cart/empty",
    "my_cart/x/",
    "my_cart/x/exact.bin",
]


def sample(root: Path) -> list[StagedFile]:
    return [
        stage(root, path, data, LATER if path.endswith("foo.txt") else MTIME)
        for path, data in SAMPLE.items()
    ]


async def render(plan: bundle.Plan, chunk_size: int = 4096) -> bytes:
    return b"".join([chunk async for chunk in bundle.stream(plan, chunk_size)])


async def build(root: Path, name: str = "my_cart.zip", **kwargs: Any) -> Path:
    """Plan and stream the sample to `root/name`, for the external tools."""
    plan = zipbundle.plan_zip(name, sample(root), **kwargs)
    target = root / name
    target.write_bytes(await render(plan))
    return target


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}  # UTF-8 names on the command line and disk
    return subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=120
    )


def tree(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """(kind, permission bits, mtime of files, bytes) of everything under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        data = path.read_bytes() if kind == "file" else b""
        mtime = int(info.st_mtime) if kind == "file" else 0  # extractors touch directories
        found[path.relative_to(root).as_posix()] = (kind, stat.S_IMODE(info.st_mode), mtime, data)
    return found


def expected_tree(top: str, files: dict[str, bytes]) -> dict[str, tuple[str, int, int, bytes]]:
    expected = {top: ("dir", 0o755, 0, b"")}
    for path, data in files.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            expected[f"{top}/{'/'.join(parts[:depth])}"] = ("dir", 0o755, 0, b"")
        mtime = int(LATER if path.endswith("foo.txt") else MTIME)
        expected[f"{top}/{path}"] = ("file", 0o644, mtime, data)
    return expected


# --- the planner, read back by zipfile -------------------------------------------------------


async def test_zipfile_reads_names_bytes_and_crcs(tmp_path: Path) -> None:
    with zipfile.ZipFile(await build(tmp_path)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == NAMES
        for path, data in SAMPLE.items():
            assert archive.read(f"my_cart/{path}") == data


async def test_records_are_stored_utf8_without_descriptors(tmp_path: Path) -> None:
    with zipfile.ZipFile(await build(tmp_path)) as archive:
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            assert info.compress_size == info.file_size
            assert info.flag_bits == 0x800, info.filename  # UTF-8, and no data descriptor
            assert info.create_system == 3  # Unix: external attributes carry modes
            mode = info.external_attr >> 16
            if info.is_dir():
                assert mode == stat.S_IFDIR | 0o755
                assert info.external_attr & 0x10
            else:
                assert mode == stat.S_IFREG | 0o644


async def test_mtimes_in_dos_fields_and_extended_timestamps(tmp_path: Path) -> None:
    with zipfile.ZipFile(await build(tmp_path)) as archive:
        for info in archive.infolist():
            mtime = int(LATER) if info.filename.endswith(("foo.txt", "/")) else int(MTIME)
            local = time.localtime(mtime)
            assert info.date_time == (*local[:5], local.tm_sec // 2 * 2), info.filename
            assert struct.pack("<HHBi", 0x5455, 5, 1, mtime) in info.extra, info.filename


async def test_plan_size_equals_streamed_length(tmp_path: Path) -> None:
    for size in (0, 1, 65_535, 65_536, 100_001):
        plan = zipbundle.plan_zip("s.zip", [stage(tmp_path, f"d/{size}.bin", b"z" * size)])
        body = await render(plan, 7919)
        assert len(body) == plan.size
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert archive.testzip() is None


async def test_generated_files_come_last_with_their_own_crc(tmp_path: Path) -> None:
    extra = [Generated("ERRORS.json", b'{"missing": []}\n'), Generated("MANIFEST.sha256", b"")]
    with zipfile.ZipFile(await build(tmp_path, extra=extra)) as archive:
        assert archive.testzip() is None
        assert archive.namelist()[-2:] == ["my_cart/ERRORS.json", "my_cart/MANIFEST.sha256"]
        assert archive.read("my_cart/ERRORS.json") == b'{"missing": []}\n'


def test_a_file_without_a_crc_cannot_be_planned(tmp_path: Path) -> None:
    staged = StagedFile("a.bin", 1, MTIME, tmp_path / "a", "sha1:x")
    with pytest.raises(zipbundle.MissingCrc, match=r"a\.bin"):
        zipbundle.plan_zip("a.zip", [staged])


def test_dos_times_are_clamped_to_what_the_fields_hold() -> None:
    assert zipbundle.dos_datetime(0) == (0, (1 << 5) | 1)  # 1970 -> 1980-01-01 00:00
    latest = zipbundle.dos_datetime(1 << 40)  # far future -> 2107-12-31 23:59:58
    assert latest == ((23 << 11) | (59 << 5) | 29, (127 << 9) | (12 << 5) | 31)


def test_top_directory_and_default_name_use_the_zip_suffix() -> None:
    assert bundle.top_directory("my_cart.zip", Format.ZIP) == "my_cart"
    assert bundle.top_directory("my_cart.tar", Format.ZIP) == "my_cart.tar"
    assert bundle.default_name(0, Format.ZIP).endswith(".zip")
    with pytest.raises(bundle.InvalidBundleName):
        bundle.check_name("..zip", Format.ZIP)


def test_tar_and_zip_of_one_name_have_different_digests(tmp_path: Path) -> None:
    files = sample(tmp_path)
    zipped = zipbundle.plan_zip("n.zip", files)
    assert zipped.digest == zipbundle.plan_zip("n.zip", files).digest
    assert zipped.digest != bundle.plan_tar("n.zip", files).digest


# --- the planner, read back by unzip and bsdtar ------------------------------------------------


async def test_unzip_tests_and_extracts_with_modes_and_mtimes(tmp_path: Path) -> None:
    archive = await build(tmp_path)
    result = run("unzip", "-t", str(archive))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout
    out = tmp_path / "unzipped"
    result = run("unzip", "-q", str(archive), "-d", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(out) == expected_tree("my_cart", SAMPLE)


async def test_bsdtar_lists_and_extracts_with_modes_and_mtimes(tmp_path: Path) -> None:
    archive = await build(tmp_path)
    listed = run("bsdtar", "-tf", str(archive))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == NAMES
    out = tmp_path / "bsdtar"
    out.mkdir()
    result = run("bsdtar", "-xpf", str(archive), "-C", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert tree(out) == expected_tree("my_cart", SAMPLE)


NON_ASCII = "donn\u00e9es/\u6570\u636e/\u00fcber \u2603.csv"


async def test_non_ascii_names_round_trip(tmp_path: Path) -> None:
    plan = zipbundle.plan_zip("\u00e9t\u00e9.zip", [stage(tmp_path, NON_ASCII, b"utf8")])
    archive = tmp_path / "u.zip"
    archive.write_bytes(await render(plan))
    with zipfile.ZipFile(archive) as opened:
        assert opened.read(f"\u00e9t\u00e9/{NON_ASCII}") == b"utf8"
    for command in (["unzip", "-q", str(archive), "-d"], ["bsdtar", "-xf", str(archive), "-C"]):
        out = tmp_path / command[0]
        out.mkdir()
        result = run(*command, str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        assert (out / "\u00e9t\u00e9" / NON_ASCII).read_bytes() == b"utf8"


# --- Zip64 -------------------------------------------------------------------------------------


async def sparse_copy(plan: bundle.Plan, target: Path, holes: list[tuple[int, int]]) -> None:
    """Write the zip as a sparse file: every byte from the walker, except the given
    [start, end) runs, which are known zeros and left as holes."""
    with target.open("wb") as handle:
        position = 0
        for start, end in [*holes, (plan.size, plan.size)]:
            if position < start:
                handle.seek(position)
                async for chunk in bundle.stream_range(plan, position, start - 1, 1 << 20):
                    handle.write(chunk)
            position = end
        handle.truncate(plan.size)


async def test_zip64_for_a_file_over_4_gib(tmp_path: Path) -> None:
    """A sparse 4 GiB + 4 file, then a small one whose local header lies past 4 GiB.

    Framing only: the big member's bytes are never read in full (that takes minutes), so
    its CRC is a stand-in; real CRCs are checked on every other test's members.  The small
    member is checked end to end, through the Zip64 offsets, by all three tools.
    """
    size = (1 << 32) + 4
    big = tmp_path / "big"
    with big.open("wb") as handle:
        handle.truncate(size - 4)
        handle.seek(size - 4)
        handle.write(b"tail")
    files = [
        StagedFile("big.bin", size, MTIME, big, "", 0x12345678),
        stage(tmp_path, "after/small.txt", b"after the big one"),
    ]
    plan = zipbundle.plan_zip("z64.zip", files)
    data_start = plan.offsets[1] + len(plan.members[1].header)
    archive = tmp_path / "z64.zip"
    await asyncio.wait_for(sparse_copy(plan, archive, [(data_start, data_start + size - 4)]), 60)
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("z64/big.bin")
        assert (info.file_size, info.compress_size, info.CRC) == (size, size, 0x12345678)
        small = opened.getinfo("z64/after/small.txt")
        assert small.header_offset > 1 << 32
        assert opened.read(small) == b"after the big one"
        with archive.open("rb") as raw:  # the local header, as the stdlib defines it
            raw.seek(info.header_offset)
            fields = struct.unpack(zipfile.structFileHeader, raw.read(zipfile.sizeFileHeader))
            skip = fields[zipfile._FH_FILENAME_LENGTH] + fields[zipfile._FH_EXTRA_FIELD_LENGTH]
            raw.seek(skip + size - 4, io.SEEK_CUR)
            assert raw.read(4) == b"tail"
    unzipped = run("unzip", "-p", str(archive), "z64/after/small.txt")
    assert unzipped.returncode == 0, unzipped.stderr
    assert unzipped.stdout == "after the big one"
    listed = run("bsdtar", "-tvf", str(archive))
    assert listed.returncode == 0, listed.stderr
    assert str(size) in listed.stdout
    extracted = run("bsdtar", "-xOf", str(archive), "z64/after/small.txt")
    assert extracted.stdout == "after the big one"


async def test_zip64_end_records_for_more_than_65535_entries(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    files = [StagedFile(f"f{i:05}", 0, MTIME, empty, "", 0) for i in range(70_000)]
    plan = zipbundle.plan_zip("many.zip", files)
    assert struct.pack("<I", zipbundle.ZIP64_END_SIGNATURE) in plan.trailer
    archive = tmp_path / "many.zip"
    archive.write_bytes(await render(plan, 1 << 20))
    with zipfile.ZipFile(archive) as opened:
        assert len(opened.infolist()) == 70_001
        assert opened.namelist()[-1] == "many/f69999"
    result = run("unzip", "-tq", str(archive))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("count", "start", "size", "zip64"),
    [
        (0xFFFE, 0, 0, False),
        (0xFFFF, 0, 0, True),  # the maximum is also the "see the Zip64 record" marker
        (1, 0xFFFFFFFE, 1, False),
        (1, 0xFFFFFFFF, 1, True),
        (1, 0, 0xFFFFFFFF, True),
    ],
)
def test_zip64_end_records_only_where_a_field_overflows(
    count: int, start: int, size: int, zip64: bool
) -> None:
    records = zipbundle._end_records(count, start, size)
    assert (len(records) == 22 + 56 + 20) is zip64
    assert records[-22:-18] == struct.pack("<I", zipbundle.END_SIGNATURE)


# --- any range equals the same slice of the whole (planner) -------------------------------------


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bundle.Plan, bytes]]:
    root = tmp_path_factory.mktemp("plans")
    files = [*sample(root), stage(root, "big.bin", os.urandom(20_000))]
    extra = [Generated("ERRORS.json", b"[]\n")]
    found = {}
    for plan in (bundle.plan_tar("p.tar", files, extra), zipbundle.plan_zip("p.zip", files, extra)):
        found[plan.media_type] = (plan, asyncio.run(render(plan)))
    return found


@settings(max_examples=200, deadline=None)
@given(data=st.data(), media_type=st.sampled_from(["application/x-tar", "application/zip"]))
def test_any_range_of_a_plan_is_the_same_slice_of_the_whole(
    plans: dict[str, tuple[bundle.Plan, bytes]], data: st.DataObject, media_type: str
) -> None:
    plan, body = plans[media_type]
    start = data.draw(st.integers(0, plan.size - 1))
    end = data.draw(st.integers(start, plan.size - 1))
    chunk = data.draw(st.sampled_from([509, 4096, 1 << 20]))

    async def collect() -> bytes:
        return b"".join([c async for c in bundle.stream_range(plan, start, end, chunk)])

    assert asyncio.run(collect()) == body[start : end + 1]


# --- through the service ----------------------------------------------------------------------

FILES = {
    "a.txt": b"a" * 1000,
    "d/e/exact.bin": bytes(range(256)) * 6,
    "empty": b"",
    "big.bin": os.urandom(30_000),
    "last.bin": b"tail!",
}


@dataclass
class Ready:
    service: Service
    tar: bytes
    zip: bytes

    def get(self, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
        return self.service.client.get("/zipped", params=params, headers=headers)


@pytest.fixture(scope="module", params=DATABASES)
def ready(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ready]:
    root = tmp_path_factory.mktemp(f"zip-{request.param}")
    with standalone_service(request.param, root, transfer_size=4096) as (service, archive):
        make_ready(service, archive, "zipped", FILES)
        tar = service.client.get("/zipped", params={"filename": "z"})
        zipped = service.client.get("/zipped", params={"filename": "z", "format": "zip"})
        assert tar.status_code == zipped.status_code == 200
        yield Ready(service, tar.content, zipped.content)


def test_format_zip_is_a_stored_zip_with_exact_length(ready: Ready) -> None:
    response = ready.get(filename="z", format="zip")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert int(response.headers["Content-Length"]) == len(response.content) == len(ready.zip)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Disposition"] == 'attachment; filename="z"'
    assert "Vary" not in response.headers
    assert "Content-Encoding" not in response.headers
    assert response.content == ready.zip
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(f"z/{name}") for name in FILES} == FILES


def test_zip_etag_is_strong_stable_and_not_the_tars(ready: Ready) -> None:
    zip_tag = ready.get(filename="z", format="zip").headers["ETag"]
    tar_tag = ready.get(filename="z").headers["ETag"]
    assert zip_tag == ready.get(filename="z", format="zip").headers["ETag"]
    assert zip_tag.startswith('"')
    assert zip_tag != tar_tag
    assert ready.get(filename="other", format="zip").headers["ETag"] != zip_tag


def test_default_zip_name_and_top_directory(ready: Ready) -> None:
    response = ready.get(format="zip")
    disposition = response.headers["Content-Disposition"]
    name = disposition.split('filename="')[1].rstrip('"')
    assert name.startswith("data_")
    assert name.endswith(".zip")
    assert bundle.check_name(name, Format.ZIP) == name
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.namelist()[0] == name.removesuffix(".zip") + "/"


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("application/zip", "application/zip"),
        ("application/x-tar;q=0.9, application/zip", "application/zip"),
        ("application/zip, */*;q=0.1", "application/zip"),
        ("*/*", "application/x-tar"),
        ("application/*", "application/x-tar"),
        ("application/zip;q=0.5, application/x-tar", "application/x-tar"),
        ("application/zip, application/x-tar", "application/x-tar"),
        ("application/zip;q=0", "application/x-tar"),
        ("application/zip;q=banana", "application/x-tar"),
    ],
)
def test_accept_chooses_zip_only_when_preferred(ready: Ready, accept: str, media_type: str) -> None:
    response = ready.get({"Accept": accept}, filename="z")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Vary"] == "Accept"
    assert response.content == (ready.zip if media_type == "application/zip" else ready.tar)


def test_format_beats_accept(ready: Ready) -> None:
    response = ready.get({"Accept": "application/zip"}, filename="z", format="tar")
    assert response.headers["Content-Type"] == "application/x-tar"
    assert response.content == ready.tar


def test_unknown_format_is_400(ready: Ready) -> None:
    message = assert_error(ready.get(filename="z", format="rar"), 400)
    assert "format" in message


def test_zip_ranges_and_validators(ready: Ready) -> None:
    total = len(ready.zip)
    etag = ready.get(filename="z", format="zip").headers["ETag"]
    part = ready.get({"Range": "bytes=100-4999", "If-Range": etag}, filename="z", format="zip")
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 100-4999/{total}"
    assert part.headers["Content-Type"] == "application/zip"
    assert part.content == ready.zip[100:5000]
    tail = ready.get({"Range": "bytes=-22"}, filename="z", format="zip")  # the end record
    assert tail.content == ready.zip[-22:]
    stale = ready.get({"Range": "bytes=0-9", "If-Range": '"stale"'}, filename="z", format="zip")
    assert stale.status_code == 200
    assert stale.content == ready.zip
    assert ready.get({"If-None-Match": etag}, filename="z", format="zip").status_code == 304
    too_far = ready.get({"Range": f"bytes={total}-"}, filename="z", format="zip")
    assert_error(too_far, 416)
    assert too_far.headers["Content-Range"] == f"bytes */{total}"


@settings(max_examples=40, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["tar", "zip"]))
def test_any_range_is_the_same_slice_of_the_full_body(
    ready: Ready, data: st.DataObject, fmt: str
) -> None:
    body = ready.zip if fmt == "zip" else ready.tar
    start = data.draw(st.integers(0, len(body) - 1))
    end = data.draw(st.integers(start, len(body) + 100))  # past the end is clamped
    response = ready.get({"Range": f"bytes={start}-{end}"}, filename="z", format=fmt)
    assert response.status_code == 206
    last = min(end, len(body) - 1)
    assert response.headers["Content-Range"] == f"bytes {start}-{last}/{len(body)}"
    assert response.content == body[start : last + 1]


def test_curl_resumes_a_truncated_zip(ready: Ready, tmp_path: Path) -> None:
    url = f"{ready.service.url}/zipped?filename=z&format=zip"
    for kept in (1, 5000, len(ready.zip) - 30):
        target = tmp_path / f"resume-{kept}.zip"
        target.write_bytes(ready.zip[:kept])
        result = run("curl", "-s", "-S", "-C", "-", "-o", str(target), url)
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == ready.zip, kept


def test_served_zip_extracts_like_the_tar(ready: Ready, tmp_path: Path) -> None:
    (tmp_path / "z.zip").write_bytes(ready.zip)
    (tmp_path / "z.tar").write_bytes(ready.tar)
    assert run("unzip", "-t", str(tmp_path / "z.zip")).returncode == 0
    trees = []
    for command in (
        ("tar", "-xpf", str(tmp_path / "z.tar"), "-C"),
        ("unzip", "-q", str(tmp_path / "z.zip"), "-d"),
        ("bsdtar", "-xpf", str(tmp_path / "z.zip"), "-C"),
    ):
        out = tmp_path / command[0]
        out.mkdir()
        result = run(*command, str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        trees.append(tree(out))
    assert trees[0] == trees[1] == trees[2]
    assert trees[0]["z/big.bin"] == ("file", 0o644, int(MTIME), FILES["big.bin"])


# --- checksums recorded while staging, or computed late for old rows -----------------------------


def checksum_rows(db_url: str) -> dict[str, tuple[int | None, str | None]]:
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT path, crc32, sha256 FROM cart_files"))
            return {row[0]: (row[1], row[2]) for row in rows}
    finally:
        engine.dispose()


def forget_checksums(db_url: str) -> None:
    """What a row staged before schema 0003 looks like."""
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE cart_files SET crc32 = NULL, sha256 = NULL"))
    finally:
        engine.dispose()


def test_staging_records_crc32_and_sha256(
    service: Service, archive: ArchiveServer, db_url: str
) -> None:
    files = {"a.txt": b"alpha" * 999, "b/empty": b""}
    make_ready(service, archive, "sums", files)
    assert checksum_rows(db_url) == {
        path: (zlib.crc32(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()
    }


def test_big_files_get_crc32_and_sha256_after_staging(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    """A file over one transfer is staged on the client's digest alone; the others follow."""
    service = make_service(transfer_size=4096)
    files = {"big.bin": os.urandom(50_000), "small.txt": b"tiny", "sha.bin": os.urandom(9000)}
    make_ready(service, archive, "later", files)
    expected = {
        path: (zlib.crc32(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()
    }
    wait_for(lambda: checksum_rows(db_url) == expected, "the late digests")
    zipped = service.client.get("/later", params={"filename": "l", "format": "zip"})
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as bundle_zip:
        assert bundle_zip.testzip() is None


def test_a_big_file_is_hashed_once_while_staging() -> None:
    """Only the client's digest (which may itself be the SHA-256) when extras wait."""
    data = os.urandom(3000)
    for hashtype, sha256 in (("sha1", None), ("sha256", hashlib.sha256(data).hexdigest())):
        hasher = Hasher(hashtype, extras=False)
        assert len(hasher.parts()) == 1
        hasher.update(data)
        sums = hasher.result()
        assert sums.requested == hashlib.new(hashtype, data).hexdigest()
        assert (sums.sha256, sums.crc32) == (sha256, None)


def test_late_extras_reuse_a_known_sha256(tmp_path: Path) -> None:
    """A client's sha256 digest is taken as it is: only the CRC-32 is computed."""
    data = os.urandom(5000)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_extras(path) == (zlib.crc32(data), hashlib.sha256(data).hexdigest())
    assert file_extras(path, "given") == (zlib.crc32(data), "given")


async def test_late_checksums_skip_rows_deleted_meanwhile(db_url: str) -> None:
    """A cart deleted while its files were being hashed must not cost the others theirs."""
    async with store_sessions(db_url) as sessions:
        rows = [(f"f{i}", f"f{i}", "sha1", "0" * 40) for i in range(2)]
        async with sessions.begin() as session:
            cart = await store.insert_cart(session, "c", "fingerprint", rows)
            kept = (await store.cart_files(session, cart.id))[0].id
        async with sessions.begin() as session:
            await store.record_checksums(session, {kept + 1000: (1, "a" * 64), kept: (7, "b" * 64)})
        async with sessions.begin() as session:
            first = (await store.cart_files(session, cart.id))[0]
        assert (first.crc32, first.sha256) == (7, "b" * 64)


async def test_the_late_pass_skips_files_a_zip_hashed_first(db_url: str, tmp_path: Path) -> None:
    """A zip asked for right after staging computes a big file's digests itself; the
    background pass must then not read the whole file again for the same answer."""
    async with store_sessions(db_url) as sessions:
        async with sessions.begin() as session:
            cart = await store.insert_cart(session, "c", "fingerprint", [("f", "f", "sha1", "0")])
            file_id = (await store.cart_files(session, cart.id))[0].id
            await store.record_checksums(session, {file_id: (7, "b" * 64)})  # the zip's
        volume = Volume(tmp_path)
        path = volume.file_path(cart.id, file_id)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"other bytes than the zip saw")
        await DigestBackfill(sessions, volume).fill(cart.id, file_id, None)
        async with sessions() as session:
            row = (await store.cart_files(session, cart.id))[0]
        assert (row.crc32, row.sha256) == (7, "b" * 64)


def test_rows_without_checksums_get_them_at_the_first_zip(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service()
    make_ready(service, archive, "old", {"a.txt": b"alpha" * 999, "b/c.bin": os.urandom(5000)})
    params = {"filename": "o", "format": "zip", "manifest": "1"}
    before = service.client.get("/old", params=params)
    recorded = checksum_rows(db_url)
    forget_checksums(db_url)
    after = service.client.get("/old", params=params)
    assert after.status_code == 200
    assert after.headers["ETag"] == before.headers["ETag"]
    assert after.content == before.content
    assert checksum_rows(db_url) == recorded  # saved, so the next download reads nothing
    shutil.rmtree(service.volume / "carts")  # proof: the next plan reads no file at all
    etag = before.headers["ETag"]
    planned = service.client.get("/old", params=params, headers={"If-None-Match": etag})
    assert planned.status_code == 304
    assert planned.headers["ETag"] == etag


def test_openapi_documents_formats_manifest_and_cart_options() -> None:
    document = create_app().openapi()
    download = document["paths"]["/{cart_id}"]["get"]
    params = {param["name"]: param for param in download["parameters"]}
    assert {"filename", "format", "manifest"} <= set(params)
    assert document["components"]["schemas"]["Format"]["enum"] == ["tar", "zip"]
    for code in ("200", "206"):
        assert {"application/x-tar", "application/zip"} <= set(
            download["responses"][code]["content"]
        )
    cart = document["components"]["schemas"]["CartRequest"]["properties"]
    assert cart["manifest"]["type"] == cart["allow_partial"]["type"] == "boolean"
