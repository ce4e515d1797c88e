"""HTTP client for the Pacifica archive interface (PROTOCOL.md section 3).

Classifies every answer into success, transient or file error; the retry loops live in
staging.py (with retry.py), which knows the deadlines.
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import quote

import httpx

from cartd import __version__
from cartd.archive.asyncio_transport import AsyncioTransport
from cartd.archive.base import ArchiveFileError, FileInfo, Media, TransientArchiveError
from cartd.settings import Settings

_MEDIA_HEADER = "X-Pacifica-File-Storage-Media"
# No Accept-Encoding: archived science data rarely compresses, and the checksums are of
# the file's own bytes.
_HEADERS = {"User-Agent": f"cartd/{__version__}"}


def _error_text(response: httpx.Response) -> str:
    """The archive's JSON `message` when it sent one (cut short), else the status line."""
    try:
        message = response.json().get("message")
    except Exception:
        message = None
    if not message:
        return f"HTTP {response.status_code} {response.reason_phrase}"
    return str(message)[:500]


def _check(response: httpx.Response, file_id: str, verb: str) -> None:
    """Map an archive status code onto our two error kinds; 2xx passes."""
    code = response.status_code
    if 200 <= code < 300:
        return
    if code == 404:
        raise ArchiveFileError(f"file {file_id!r} not found in archive")
    if code >= 500 or code in (408, 429):
        raise TransientArchiveError(f"archive {verb} {file_id!r}: {_error_text(response)}")
    raise ArchiveFileError(f"archive {verb} {file_id!r}: {_error_text(response)}")


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
        timeout = httpx.Timeout(
            settings.archive_read_timeout, connect=settings.archive_connect_timeout, pool=None
        )
        self._extensions = {"timeout": timeout.as_dict()}
        self._lanes = _Lanes(settings.archive_concurrency, self.base_url)

    def _build(self, verb: str, file_id: str) -> httpx.Request:
        url = self.base_url + quote(file_id, safe="")
        return httpx.Request(verb, url, headers=_HEADERS, extensions=self._extensions)

    async def _request(self, verb: str, file_id: str) -> httpx.Response:
        try:
            async with self._lanes.take() as lane:
                response = await lane.handle_async_request(self._build(verb, file_id))
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            raise TransientArchiveError(f"archive unreachable: {exc!r}") from exc
        _check(response, file_id, verb)
        return response

    async def stage(self, file_id: str) -> None:
        await self._request("POST", file_id)

    async def status(self, file_id: str) -> FileInfo:
        response = await self._request("HEAD", file_id)
        return parse_status(response.headers, file_id)

    @asynccontextmanager
    async def open(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._lanes.take() as lane, self._get(lane, file_id) as chunks:
            yield chunks

    @asynccontextmanager
    async def _get(
        self, lane: httpx.AsyncBaseTransport, file_id: str
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        try:
            response = await lane.handle_async_request(self._build("GET", file_id))
        except httpx.TransportError as exc:
            raise TransientArchiveError(f"archive unreachable: {exc!r}") from exc
        try:
            if response.is_error:
                try:
                    await response.aread()
                except httpx.TransportError as exc:
                    raise TransientArchiveError(f"archive connection lost: {exc!r}") from exc
            _check(response, file_id, "GET")
            yield self._chunks(response)
        finally:
            await response.aclose()

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            # As the socket delivers: re-chunking here would copy every byte once more,
            # and staging gathers the pieces into batches without joining them.
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise TransientArchiveError(f"archive connection lost mid-file: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._lanes.aclose()


class _Lanes:
    """`archive_concurrency` httpx transports of one connection each; a request takes a
    free one.

    Requests queue here for a lane (the reference server corrupts concurrent GETs, so sites
    running it set 1).  Waiting for a lane is not a fault, so it happens outside httpx's
    pool timeout and the worker's retry budget.  One client with a pool of that many
    connections did the same, but httpcore's pool checks every one of its connections for
    every request it assigns (a socket poll each): with 8 connections, that was a quarter
    of the client's CPU for small files.  A lane's pool has one connection and one request.
    Requests go to the transport, not through an `httpx.AsyncClient`: cartd uses none of
    the client's cookies, auth, redirects or default headers, and skipping that layer cut
    another fifth of the HTTP CPU per small file.  The last lane given back is the next
    taken, so a quiet spell keeps few connections warm.
    """

    def __init__(self, count: int, base_url: str) -> None:
        self._new = partial(_transport, base_url, httpx.Limits(max_connections=1))
        self._free: asyncio.LifoQueue[httpx.AsyncBaseTransport] = asyncio.LifoQueue()
        for _ in range(count):
            self._free.put_nowait(self._new())
        self._closing: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def take(self) -> AsyncIterator[httpx.AsyncBaseTransport]:
        """A free lane; one whose request failed or was cancelled is replaced.

        httpcore 1.0.9 can strand a pool's connection for good when a request is cancelled
        while that connection is being set up (encode/httpcore#1093): with one connection
        per lane, every later request on the lane would wait forever.  Cancellations (a
        DELETE, a failed sibling) and failures are rare; a fresh lane costs a connect.
        """
        lane = await self._free.get()
        try:
            yield lane
        except BaseException:
            self._retire(lane)
            lane = self._new()
            raise
        finally:
            self._free.put_nowait(lane)

    def _retire(self, lane: httpx.AsyncBaseTransport) -> None:
        closing = asyncio.get_running_loop().create_task(lane.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        while not self._free.empty():
            await self._free.get_nowait().aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)


def _transport(base_url: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """Bare asyncio sockets for a plain-http archive (a large file costs a third less CPU,
    asyncio_transport.py); httpx's own transport does TLS.  Neither goes through a proxy:
    the archive interface is reached directly."""
    if httpx.URL(base_url).scheme == "http":
        return AsyncioTransport(limits)
    return httpx.AsyncHTTPTransport(limits=limits)
