"""Unit tests of the archive-interface client: its parsing on real httpx objects, and its
requests against the test archive."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from archive_server import ArchiveServer
from cartd.archive import ArchiveFileError, Media, TransientArchiveError
from cartd.archive.pacifica import PacificaArchive, _check, parse_mtime, parse_status
from cartd.settings import Settings


def test_float_epoch_and_http_date_mtimes() -> None:
    assert parse_mtime("1444938166.5") == 1444938166.5
    assert parse_mtime("Thu, 15 Oct 2015 19:42:46 GMT") == 1444938166.0
    assert parse_mtime(None) == 0.0


def test_status_headers_of_the_reference_server() -> None:
    headers = httpx.Headers(
        {
            "X-Pacifica-Messsage": "File was found",
            "X-Content-Length": "14",
            "Last-Modified": "1444938166.5",
            "X-Pacifica-File-Storage-Media": "tape",
        }
    )
    info = parse_status(headers, "f")
    assert (info.size, info.mtime, info.media) == (14, 1444938166.5, Media.TAPE)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Content-Length": "1"}, "no storage media"),
        ({"X-Content-Length": "1", "X-Pacifica-File-Storage-Media": "error"}, "media error"),
        ({"X-Pacifica-File-Storage-Media": "disk"}, "no size"),
        ({"X-Content-Length": "1", "X-Pacifica-File-Storage-Media": "cloud"}, "unknown"),
    ],
)
def test_bad_status_headers_are_file_errors(headers: dict[str, str], message: str) -> None:
    with pytest.raises(ArchiveFileError, match=message):
        parse_status(httpx.Headers(headers), "f")


def test_status_codes_are_classified() -> None:
    _check(httpx.Response(204), b"", "f", "HEAD")
    with pytest.raises(ArchiveFileError, match="not found"):
        _check(httpx.Response(404), b"", "f", "GET")
    for code in (500, 503, 429):
        with pytest.raises(TransientArchiveError, match=f"HTTP {code} "):
            _check(httpx.Response(code), b"not json", "f", "GET")


def test_huge_archive_error_message_is_cut_short() -> None:
    response = httpx.Response(403)
    with pytest.raises(ArchiveFileError) as raised:
        _check(response, json.dumps({"message": "x" * 70_000}).encode(), "f", "POST")
    assert len(str(raised.value)) < 1000


async def test_an_archive_that_stops_answering_times_out_and_frees_its_lane(
    tmp_path: Path,
) -> None:
    """Without a read timeout, a hung archive would hold the only lane forever."""
    with ArchiveServer(tmp_path) as archive:
        archive.add_file("f", b"four")
        archive.inject("HEAD", "hang", file_id="f")
        settings = Settings(archive_read_timeout=0.5, archive_concurrency=1)
        client = PacificaArchive(archive.url, settings)
        try:
            with pytest.raises(TransientArchiveError, match="ReadTimeout"):
                await client.status("f")
            assert (await client.status("f")).size == 4
            async with client.open("f") as chunks:
                assert b"".join([chunk async for chunk in chunks]) == b"four"
        finally:
            await client.aclose()
    assert archive.count("HEAD", "f") == 2


async def test_a_request_cancelled_at_any_point_leaves_its_lane_usable(tmp_path: Path) -> None:
    """A cancellation can land anywhere in an exchange, the connect included (with
    httpcore 1.0.9 one there stranded the lane for good, encode/httpcore#1093: a soak
    run's cart stayed staging).  Each step of a fresh lane's first request is cancelled
    in turn, and the lane must answer the next request."""
    with ArchiveServer(tmp_path) as archive:
        archive.add_file("f", b"four")
        settings = Settings(archive_concurrency=1, archive_read_timeout=5.0)
        for steps in range(40):
            client = PacificaArchive(archive.url, settings)
            try:
                doomed = asyncio.create_task(client.stage("f"))
                for _ in range(steps):
                    await asyncio.sleep(0)
                doomed.cancel()
                await asyncio.gather(doomed, return_exceptions=True)
                async with asyncio.timeout(3):
                    await client.stage("f")
            finally:
                await client.aclose()
