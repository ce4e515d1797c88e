"""HTTP client for the Pacifica archive interface (PROTOCOL.md section 3).

Classifies every answer into success, transient or file error; the retry loops live in
staging.py (with retry.py), which knows the deadlines.  Requests are httpx's, carried by
transport.py's lanes.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import httpx

from cartd import __version__
from cartd.archive.base import ArchiveFileError, FileInfo, Media, TransientArchiveError
from cartd.archive.transport import LaneTransport
from cartd.settings import Settings

_MEDIA_HEADER = "X-Pacifica-File-Storage-Media"
# No Accept-Encoding: archived science data rarely compresses, and the checksums are of
# the file's own bytes.
_HEADERS = {"User-Agent": f"cartd/{__version__}"}
ERROR_TEXT_BYTES = 64 * 1024  # of an answer's body, for an error's message; no more is read


def _error_text(response: httpx.Response, body: bytes) -> str:
    """The archive's JSON `message` when it sent one (cut short), else the status line."""
    try:
        message = json.loads(body).get("message")
    except Exception:
        message = None
    if not message:
        return f"HTTP {response.status_code} {response.reason_phrase}"
    return str(message)[:500]


def _check(response: httpx.Response, body: bytes, file_id: str, verb: str) -> None:
    """Map an archive status code onto our two error kinds; 2xx passes."""
    code = response.status_code
    if 200 <= code < 300:
        return
    if code == 404:
        raise ArchiveFileError(f"file {file_id!r} not found in archive")
    if code >= 500 or code in (408, 429):
        raise TransientArchiveError(f"archive {verb} {file_id!r}: {_error_text(response, body)}")
    raise ArchiveFileError(f"archive {verb} {file_id!r}: {_error_text(response, body)}")


def parse_mtime(value: str | None) -> float:
    """The reference server sends a float epoch; a standards-minded one an HTTP date."""
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0


def parse_status(headers: httpx.Headers, file_id: str) -> FileInfo:
    media_text = headers.get(_MEDIA_HEADER)
    if media_text is None:
        raise ArchiveFileError(f"archive reported no storage media for file {file_id!r}")
    try:
        media = Media(media_text.strip().lower())
    except ValueError:
        raise ArchiveFileError(
            f"archive reported unknown storage media {media_text!r} for file {file_id!r}"
        ) from None
    if media is Media.ERROR:
        message = headers.get("X-Pacifica-Messsage") or headers.get("X-Pacifica-Message") or ""
        raise ArchiveFileError(
            f"archive reported a media error for file {file_id!r} {message}".strip()
        )
    try:
        size = int(headers.get("X-Content-Length", ""))
    except ValueError:
        raise ArchiveFileError(f"archive reported no size for file {file_id!r}") from None
    return FileInfo(size=size, mtime=parse_mtime(headers.get("Last-Modified")), media=media)


class PacificaArchive:
    def __init__(self, base_url: str, settings: Settings) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        timeouts = (settings.archive_connect_timeout, settings.archive_read_timeout)
        self._transport = LaneTransport(self.base_url, settings.archive_concurrency, timeouts)

    async def _send(self, verb: str, file_id: str) -> httpx.Response:
        """Requests go to the transport, not through an `httpx.AsyncClient`: cartd uses
        none of the client's cookies, auth, redirects or default headers, and skipping
        that layer cut a fifth of the HTTP CPU per small file."""
        url = self.base_url + quote(file_id, safe="")
        request = httpx.Request(verb, url, headers=_HEADERS)
        try:
            return await self._transport.handle_async_request(request)
        except httpx.TransportError as exc:
            raise TransientArchiveError(f"archive unreachable: {exc!r}") from exc

    async def _request(self, verb: str, file_id: str) -> httpx.Response:
        response = await self._send(verb, file_id)
        try:
            body = await _read_some(response)
        finally:
            await response.aclose()
        _check(response, body, file_id, verb)
        return response

    async def stage(self, file_id: str) -> None:
        await self._request("POST", file_id)

    async def status(self, file_id: str) -> FileInfo:
        response = await self._request("HEAD", file_id)
        return parse_status(response.headers, file_id)

    @asynccontextmanager
    async def open(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        response = await self._send("GET", file_id)
        try:
            if response.is_error:
                _check(response, await _read_some(response), file_id, "GET")
            yield _chunks(response)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


async def _read_some(response: httpx.Response) -> bytes:
    """The start of a body, for an error's message; a longer body is left unread (and
    its connection is then not reused)."""
    pieces: list[bytes] = []
    size = 0
    try:
        async for piece in response.aiter_raw():
            pieces.append(piece)
            size += len(piece)
            if size >= ERROR_TEXT_BYTES:
                break
    except httpx.TransportError as exc:
        raise TransientArchiveError(f"archive connection lost: {exc!r}") from exc
    return b"".join(pieces)[:ERROR_TEXT_BYTES]


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        # As the socket delivers: re-chunking here would copy every byte once more,
        # and staging gathers the pieces into batches without joining them.
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        raise TransientArchiveError(f"archive connection lost mid-file: {exc!r}") from exc
