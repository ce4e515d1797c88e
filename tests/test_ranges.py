"""Resumable downloads: ETag, Range / 206 / 416, If-Range, If-None-Match, `curl -C -`.

The HTTP tests talk to the real service (SQLite and MariaDB) backed by the loopback archive;
boundaries come from parsing the full tar, so every slice edge lands on a real structure:
inside a header, inside file data, in padding, in the trailer, on the last byte.  The unit
tests at the end drive `bundle.stream_range` directly, including proof that it seeks.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_server import ArchiveServer
from cartd import bundle
from cartd.bundle import StagedFile
from conftest import (
    DATABASES,
    MakeService,
    Service,
    assert_error,
    make_ready,
    standalone_service,
    volume_files,
)

BLOCK = 512
LONG_PATH = "donn\u00e9es/" + "x" * 150 + ".csv"  # needs a PAX extended header
FILES = {
    "a.txt": b"a" * 1000,
    "d/e/exact.bin": bytes(range(256)) * 6,
    LONG_PATH: b"pax member",
    "empty": b"",
    "big.bin": random.Random(7).randbytes(10_000),
    "last.bin": b"tail!",
}
NAME = "ranged.tar"


@dataclass
class Ready:
    """A running service with one ready cart, its full body, ETag and structural offsets."""

    service: Service
    cart: str
    body: bytes
    etag: str
    boundaries: list[int]

    def get(self, headers: dict[str, str] | None = None, name: str = NAME) -> httpx.Response:
        return self.service.client.get(f"/{self.cart}", params={"filename": name}, headers=headers)

    def ranged(self, spec: str, **extra: str) -> httpx.Response:
        return self.get({"Range": spec, **extra})


def boundaries(body: bytes) -> list[int]:
    """Every structural edge of the tar: member starts, data starts and ends, padding,
    trailer start and the last byte."""
    points = {0, len(body) - 1}
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            data_end = member.offset_data + member.size
            points |= {member.offset, member.offset_data - BLOCK, member.offset_data}
            points |= {data_end, -(-data_end // BLOCK) * BLOCK}
    return sorted(p for p in points if 0 <= p < len(body))


@pytest.fixture(scope="module", params=DATABASES)
def ready(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ready]:
    """One service per database with a ready cart; range requests change nothing, so the
    tests share it.  A small transfer size makes ranges cross read-chunk edges too."""
    root = tmp_path_factory.mktemp(f"ranges-{request.param}")
    with standalone_service(request.param, root, transfer_size=4096) as (service, archive):
        make_ready(service, archive, "ranged", FILES)
        full = service.client.get("/ranged", params={"filename": NAME})
        assert full.status_code == 200
        yield Ready(service, "ranged", full.content, full.headers["ETag"], boundaries(full.content))


def check_206(response: httpx.Response, ready: Ready, start: int, end: int) -> bytes:
    total = len(ready.body)
    assert response.status_code == 206, (start, end, response.status_code, response.text[:200])
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{total}"
    assert int(response.headers["Content-Length"]) == end - start + 1
    assert response.headers["Content-Type"] == "application/x-tar"
    assert response.headers["ETag"] == ready.etag
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in response.headers
    assert response.content == ready.body[start : end + 1], (start, end)
    return response.content


def check_full(response: httpx.Response, ready: Ready) -> None:
    assert response.status_code == 200, response.text[:200]
    assert "Content-Range" not in response.headers
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == ready.etag
    assert int(response.headers["Content-Length"]) == len(ready.body)
    assert response.content == ready.body


def check_416(response: httpx.Response, ready: Ready) -> None:
    assert_error(response, 416)
    assert response.headers["Content-Range"] == f"bytes */{len(ready.body)}"


# --- 200 -------------------------------------------------------------------------------------


def test_full_download_advertises_ranges_and_a_strong_etag(ready: Ready) -> None:
    response = ready.get()
    check_full(response, ready)
    etag = response.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{64}"', etag), etag
    with tarfile.open(fileobj=io.BytesIO(ready.body)) as tar:
        handle = tar.extractfile(f"ranged/{LONG_PATH}")
        assert handle is not None
        assert handle.read() == b"pax member"


# --- 206 -------------------------------------------------------------------------------------


def test_the_boundaries_cover_every_structure(ready: Ready) -> None:
    """Guard for the tests below: PAX headers, padding and the trailer all have edges."""
    with tarfile.open(fileobj=io.BytesIO(ready.body)) as tar:
        pax = tar.getmember(f"ranged/{LONG_PATH}")
        padded = tar.getmember("ranged/a.txt")
        last = tar.getmember("ranged/last.bin")
    assert pax.offset_data - pax.offset > BLOCK  # an extended header before the ustar one
    assert {pax.offset, pax.offset_data - BLOCK, pax.offset_data} <= set(ready.boundaries)
    padding_start = padded.offset_data + padded.size
    assert padding_start % BLOCK
    assert padding_start in ready.boundaries
    trailer_start = last.offset_data + BLOCK
    assert trailer_start in ready.boundaries
    assert trailer_start < len(ready.body) - 2 * BLOCK
    assert len(ready.body) - 1 in ready.boundaries


def test_slices_cut_at_every_boundary_concatenate_to_the_full_body(ready: Ready) -> None:
    total = len(ready.body)
    cuts = sorted({p + d for p in ready.boundaries for d in (0, 1) if 0 < p + d < total})
    edges = [0, *cuts, total]
    pieces = []
    for start, stop in itertools.pairwise(edges):
        spec = f"bytes={start}-" if stop == total else f"bytes={start}-{stop - 1}"
        pieces.append(check_206(ready.ranged(spec), ready, start, stop - 1))
    assert len(pieces) > 40
    assert b"".join(pieces) == ready.body


def test_small_windows_around_every_boundary(ready: Ready) -> None:
    total = len(ready.body)
    for point in ready.boundaries:
        start, end = max(point - 1, 0), min(point + 1, total - 1)
        check_206(ready.ranged(f"bytes={start}-{end}"), ready, start, end)
        check_206(ready.ranged(f"bytes={point}-{point}"), ready, point, point)


def test_range_spanning_chunks_and_files(ready: Ready) -> None:
    total = len(ready.body)
    for start, end in [(0, total - 1), (100, total - 100), (3000, 9000), (511, 513)]:
        check_206(ready.ranged(f"bytes={start}-{end}"), ready, start, end)


def test_open_ranges(ready: Ready) -> None:
    total = len(ready.body)
    for start in (0, 1, 2000, total - BLOCK, total - 1):
        check_206(ready.ranged(f"bytes={start}-"), ready, start, total - 1)


def test_suffix_ranges(ready: Ready) -> None:
    total = len(ready.body)
    for length in (1, 2 * BLOCK, 2 * BLOCK + 1, total - 1):
        check_206(ready.ranged(f"bytes=-{length}"), ready, total - length, total - 1)
    for length in (total, total + 1, 10**40):
        check_206(ready.ranged(f"bytes=-{length}"), ready, 0, total - 1)


def test_last_position_past_the_end_is_clamped(ready: Ready) -> None:
    total = len(ready.body)
    for spec in (f"bytes=10-{total}", "bytes=10-99999999999", f"bytes=10-{'9' * 5000}"):
        check_206(ready.ranged(spec), ready, 10, total - 1)


def test_unit_and_whitespace_are_lenient(ready: Ready) -> None:
    check_206(ready.ranged("BYTES=5-9"), ready, 5, 9)
    check_206(ready.ranged("bytes= 5-9"), ready, 5, 9)
    check_206(ready.ranged("bytes=, 5-9 ,,"), ready, 5, 9)  # empty list elements are no range
    check_206(ready.ranged("bytes=0005-0009"), ready, 5, 9)


# --- 416 and ignored headers -------------------------------------------------------------------


def test_unsatisfiable_ranges_are_416(ready: Ready) -> None:
    total = len(ready.body)
    for spec in (
        f"bytes={total}-",
        f"bytes={total}-{total + 10}",
        f"bytes={total + 1}-",
        "bytes=-0",
        f"bytes={'9' * 5000}-",
    ):
        check_416(ready.ranged(spec), ready)


@pytest.mark.parametrize(
    "spec",
    [
        "bytes=9-5",  # last before first: invalid, so ignored
        "bytes=abc",
        "bytes=-",
        "bytes=",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=\u00b9-2",  # a superscript digit is not a DIGIT
        "bytes 0-5",
        "items=0-5",
        "bytes=0-5,10-20",  # several ranges: the full body, as RFC 9110 allows
        "bytes=0-0,-1",
    ],
)
def test_invalid_or_multiple_ranges_get_the_full_body(ready: Ready, spec: str) -> None:
    response = ready.service.client.get(
        f"/{ready.cart}",
        params={"filename": NAME},
        headers=[(b"Range", spec.encode("latin-1"))],
    )
    check_full(response, ready)


# --- validators ------------------------------------------------------------------------------


def test_etag_is_stable_and_depends_on_the_name(ready: Ready) -> None:
    first, second = ready.get(), ready.get()
    assert first.headers["ETag"] == second.headers["ETag"] == ready.etag
    other = ready.get(name="other.tar")
    assert other.status_code == 200
    assert other.headers["ETag"] != ready.etag
    # "ranged" and "ranged.tar" have the same top directory, hence the same bytes, but a
    # different Content-Disposition: a different representation, a different tag.
    same_bytes = ready.get(name="ranged")
    assert same_bytes.content == ready.body
    assert same_bytes.headers["ETag"] != ready.etag


def test_if_range_with_the_current_etag_honours_the_range(ready: Ready) -> None:
    check_206(ready.ranged("bytes=100-199", **{"If-Range": ready.etag}), ready, 100, 199)


@pytest.mark.parametrize(
    "validator",
    ['"stale"', "W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT", "*"],
    ids=["stale", "weak", "date", "star"],
)
def test_if_range_that_does_not_match_sends_the_full_body(ready: Ready, validator: str) -> None:
    if_range = validator.format(etag=ready.etag)
    check_full(ready.ranged("bytes=100-199", **{"If-Range": if_range}), ready)
    # A failed If-Range means the Range is ignored, even one that would be a 416.
    check_full(ready.ranged(f"bytes={len(ready.body)}-", **{"If-Range": if_range}), ready)


def test_if_range_without_range_is_ignored(ready: Ready) -> None:
    check_full(ready.get({"If-Range": ready.etag}), ready)


@pytest.mark.parametrize(
    "validator",
    ["{etag}", "*", '"other", {etag}', "W/{etag}"],
    ids=["exact", "star", "list", "weak"],
)
def test_if_none_match_is_304(ready: Ready, validator: str) -> None:
    response = ready.get({"If-None-Match": validator.format(etag=ready.etag), "Range": "bytes=0-9"})
    assert response.status_code == 304
    assert response.headers["ETag"] == ready.etag
    assert response.content == b""


def test_if_none_match_with_another_tag_gets_the_body(ready: Ready) -> None:
    check_full(ready.get({"If-None-Match": '"other", W/"nope"'}), ready)


# --- curl -C - -------------------------------------------------------------------------------


def test_curl_resumes_a_truncated_download(ready: Ready, tmp_path: Path) -> None:
    url = f"{ready.service.url}/{ready.cart}?filename={NAME}"
    total = len(ready.body)
    with tarfile.open(fileobj=io.BytesIO(ready.body)) as tar:
        inside_data = tar.getmember("ranged/big.bin").offset_data + 4321
    # total: curl gets a 416 for an already complete file and must leave it untouched.
    for kept in (0, 1, 700, inside_data, total - 2 * BLOCK + 5, total - 1, total):
        target = tmp_path / f"resume-{kept}.tar"
        target.write_bytes(ready.body[:kept])
        result = subprocess.run(
            ["curl", "-s", "-S", "-C", "-", "-o", str(target), url],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, (kept, result.stderr)
        assert target.read_bytes() == ready.body, kept
        with tarfile.open(target) as tar:
            assert tar.getnames()[0] == "ranged"


# --- through the service, with state of its own ----------------------------------------------


def test_etag_and_bytes_survive_a_restart(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    first = make_service()
    make_ready(first, archive, "restart", {"a.txt": b"a" * 700, "b/c.bin": b"c" * 3000})
    before = first.client.get("/restart", params={"filename": "r.tar"})
    first.client.close()
    first.thread.stop()
    second = make_service()
    assert second.wait_settled("restart") == (204, "ready", "")
    after = second.client.get("/restart", params={"filename": "r.tar"})
    assert after.status_code == before.status_code == 200
    assert after.headers["ETag"] == before.headers["ETag"]
    assert after.content == before.content
    check = second.client.get(
        "/restart",
        params={"filename": "r.tar"},
        headers={"Range": "bytes=600-", "If-Range": before.headers["ETag"]},
    )
    assert check.status_code == 206
    assert check.content == before.content[600:]


def test_range_after_a_missing_file_never_opens_it(
    service: Service, archive: ArchiveServer
) -> None:
    """Proof through HTTP that a resume skips earlier members: their cache file is gone."""
    make_ready(service, archive, "skip", {"first.bin": b"1" * 3001, "second.bin": b"2" * 2002})
    full = service.client.get("/skip", params={"filename": "s.tar"}).content
    (cached,) = [p for p in volume_files(service.volume) if p.stat().st_size == 3001]
    cached.unlink()
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        first = tar.getmember("s/first.bin")
    padding = first.offset_data + first.size  # the zeros right after first.bin's data
    response = service.client.get(
        "/skip", params={"filename": "s.tar"}, headers={"Range": f"bytes={padding}-"}
    )
    assert response.status_code == 206
    assert response.content == full[padding:]


# --- the range walker itself -----------------------------------------------------------------


def stage(root: Path, path: str, data: bytes) -> StagedFile:
    source = root / "cache" / f"{len(list(root.glob('cache/*')))}.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    return StagedFile(path, len(data), 1444938166.5, source, "sha1:unused")


async def collect(plan: bundle.Plan, start: int, end: int, chunk_size: int = 4096) -> bytes:
    return b"".join([c async for c in bundle.stream_range(plan, start, end, chunk_size)])


@pytest.fixture
def plan(tmp_path: Path) -> bundle.Plan:
    return bundle.plan_tar(
        "w.tar",
        [
            stage(tmp_path, "one.bin", b"1" * 1000),
            stage(tmp_path, "dir/two.bin", random.Random(3).randbytes(5000)),
            stage(tmp_path, LONG_PATH, b""),
            stage(tmp_path, "three.bin", b"3" * BLOCK),
        ],
    )


def walker_points(plan: bundle.Plan) -> list[int]:
    """Each member's edges (header, data, padding) and their neighbours, within the tar."""
    edges = set()
    for member, base in zip(plan.members, plan.offsets, strict=False):
        head = base + len(member.header)
        edges |= {base, head, head + member.size, base + member.length}
    edges.add(plan.offsets[-2])
    near = {e + d for e in edges for d in (-1, 0, 1)}
    return sorted(p for p in near if 0 <= p < plan.size)


async def test_walker_matches_the_full_stream_for_many_ranges(plan: bundle.Plan) -> None:
    full = await collect(plan, 0, plan.size - 1)
    assert full == b"".join([c async for c in bundle.stream(plan, 4096)])
    assert len(full) == plan.size
    points = walker_points(plan)
    for start in points:
        for end in (p for p in points if p >= start):
            assert await collect(plan, start, end) == full[start : end + 1], (start, end)


@pytest.mark.parametrize("chunk_size", [7, 512, 1000])
async def test_walker_chunk_size_does_not_change_the_bytes(
    plan: bundle.Plan, chunk_size: int
) -> None:
    full = await collect(plan, 0, plan.size - 1)
    two = plan.offsets[3] + len(plan.members[3].header)  # where dir/two.bin's data starts
    for start, end in [(0, plan.size - 1), (two + 3, two + 4990), (two - 5, two + 600)]:
        assert await collect(plan, start, end, chunk_size) == full[start : end + 1], (start, end)


async def test_walker_never_yields_empty_chunks(plan: bundle.Plan) -> None:
    for start in walker_points(plan):
        chunks = [c async for c in bundle.stream_range(plan, start, plan.size - 1, 100)]
        assert all(chunks), start


@pytest.mark.parametrize("bounds", [(-1, 5), (5, 4), (0, -1)])
async def test_walker_refuses_ranges_outside_the_tar(
    plan: bundle.Plan, bounds: tuple[int, int]
) -> None:
    with pytest.raises(ValueError, match="outside"):
        await collect(plan, *bounds)


async def test_walker_refuses_a_range_past_the_end(plan: bundle.Plan) -> None:
    with pytest.raises(ValueError, match="outside"):
        await collect(plan, 0, plan.size)


async def test_walker_does_not_open_files_before_the_start(plan: bundle.Plan) -> None:
    full = await collect(plan, 0, plan.size - 1)
    first, second = plan.members[1], plan.members[3]
    assert first.source is not None
    assert second.source is not None
    assert (first.size, second.size) == (1000, 5000)
    first.source.unlink()
    with pytest.raises(FileNotFoundError):
        await collect(plan, 0, plan.size - 1)
    # From the padding after one.bin onwards, and from inside two.bin: its file is never opened.
    padding = plan.offsets[1] + len(first.header) + first.size
    for start in (padding, plan.offsets[2], plan.offsets[3] + len(second.header) + 10):
        assert await collect(plan, start, plan.size - 1) == full[start:]


async def test_walker_does_not_open_files_after_the_end(plan: bundle.Plan) -> None:
    full = await collect(plan, 0, plan.size - 1)
    later = plan.members[3]
    assert later.source is not None
    later.source.unlink()
    end = plan.offsets[3] + len(later.header) - 1  # up to and including two.bin's header
    assert await collect(plan, 0, end) == full[: end + 1]


async def test_walker_seeks_inside_a_file(tmp_path: Path) -> None:
    """A 1 TiB sparse file: reading up to the offset would take minutes; seeking is instant."""
    size = 1 << 40
    source = tmp_path / "huge.bin"
    with source.open("wb") as handle:
        handle.truncate(size)
        handle.seek(size - 10)
        handle.write(b"0123456789")
    plan = bundle.plan_tar("h.tar", [StagedFile("huge.bin", size, 0.0, source)])
    member = plan.members[-1]
    data_end = plan.offsets[-3] + len(member.header) + size
    tail = await asyncio.wait_for(collect(plan, data_end - 10, plan.size - 1), timeout=10)
    assert tail == b"0123456789" + bytes(plan.size - data_end)


# --- the digest behind the ETag -----------------------------------------------------------------


def test_digest_is_deterministic_and_ignores_cache_paths(tmp_path: Path) -> None:
    one = [StagedFile("a/b", 10, 1.0, tmp_path / "x", "sha1:aa")]
    two = [StagedFile("a/b", 10, 1.0, tmp_path / "elsewhere", "sha1:aa")]
    assert bundle.plan_tar("n.tar", one).digest == bundle.plan_tar("n.tar", two).digest


@pytest.mark.parametrize(
    "change",
    [
        {"name": "m.tar"},
        {"path": "a/c"},
        {"size": 11},
        {"mtime": 2.0},
        {"checksum": "sha1:bb"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_digest_changes_with_name_and_content(tmp_path: Path, change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"path": "a/b", "size": 10, "mtime": 1.0, "checksum": "sha1:aa"}
    name = change.pop("name", "n.tar")

    def digest(name: str, fields: dict[str, Any]) -> str:
        staged = StagedFile(
            fields["path"], fields["size"], fields["mtime"], tmp_path, fields["checksum"]
        )
        return bundle.plan_tar(name, [staged]).digest

    assert digest(name, {**base, **change}) != digest("n.tar", base)
