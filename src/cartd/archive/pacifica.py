"""Client of the Pacifica archive interface (PROTOCOL.md section 3) over http11.py.

Classifies every answer into success, transient or file error; the retry loops live in
staging.py (with retry.py), which knows the deadlines.  Any failure of the exchange itself
(no connection, a timeout, a connection cut, broken HTTP) is transient.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import quote, urlsplit

from cartd import __version__
from cartd.archive import http11
from cartd.archive.base import ArchiveFileError, FileInfo, Media, TransientArchiveError
from cartd.archive.http11 import Connection, Head, HTTPFailure
from cartd.settings import Settings

_MEDIA_HEADER = "x-pacifica-file-storage-media"
# No Accept-Encoding: archived science data rarely compresses, and the checksums are of
# the file's own bytes.
_USER_AGENT = f"cartd/{__version__}"
ERROR_TEXT_BYTES = 64 * 1024  # of an error answer's body, for its message


def _error_text(head: Head, body: bytes) -> str:
    """The archive's JSON `message` when it sent one (cut short), else the status line."""
    try:
        message = json.loads(body).get("message")
    except Exception:
        message = None
    if not message:
        return f"HTTP {head.status} {head.reason}".rstrip()
    return str(message)[:500]


def _check(head: Head, body: bytes, file_id: str, verb: str) -> None:
    """Map an archive status code onto our two error kinds; 2xx passes."""
    code = head.status
    if 200 <= code < 300:
        return
    if code == 404:
        raise ArchiveFileError(f"file {file_id!r} not found in archive")
    if code >= 500 or code in (408, 429):
        raise TransientArchiveError(f"archive {verb} {file_id!r}: {_error_text(head, body)}")
    raise ArchiveFileError(f"archive {verb} {file_id!r}: {_error_text(head, body)}")


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


def parse_status(headers: Mapping[str, str], file_id: str) -> FileInfo:
    """From a HEAD's headers, names lower-cased."""
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
        message = headers.get("x-pacifica-messsage") or headers.get("x-pacifica-message") or ""
        raise ArchiveFileError(
            f"archive reported a media error for file {file_id!r} {message}".strip()
        )
    try:
        size = int(headers.get("x-content-length", ""))
    except ValueError:
        raise ArchiveFileError(f"archive reported no size for file {file_id!r}") from None
    return FileInfo(size=size, mtime=parse_mtime(headers.get("last-modified")), media=media)


class PacificaArchive:
    def __init__(self, base_url: str, settings: Settings) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) archive URL: {base_url!r}")
        self._path = url.path
        authority = url.netloc.rpartition("@")[2]
        self._headers = f"Host: {authority}\r\nUser-Agent: {_USER_AGENT}\r\n".encode()
        tls = ssl.create_default_context() if url.scheme == "https" else None
        port = url.port or (443 if tls else 80)
        timeouts = (settings.archive_connect_timeout, settings.archive_read_timeout)
        connect = partial(http11.connect, url.hostname, port, tls, timeouts)
        self._lanes = _Lanes(settings.archive_concurrency, connect)

    async def _send(self, lane: _Lane, verb: str, file_id: str) -> tuple[Connection, Head]:
        target = self._path + quote(file_id, safe="")
        try:
            return await lane.exchange(verb, target, self._headers)
        except HTTPFailure as exc:
            raise TransientArchiveError(f"archive unreachable: {exc!r}") from exc

    async def _request(self, verb: str, file_id: str) -> Head:
        async with self._lanes.take() as lane:
            connection, head = await self._send(lane, verb, file_id)
            body = await _read_body(connection)
        _check(head, body, file_id, verb)
        return head

    async def stage(self, file_id: str) -> None:
        await self._request("POST", file_id)

    async def status(self, file_id: str) -> FileInfo:
        head = await self._request("HEAD", file_id)
        return parse_status(head.headers, file_id)

    @asynccontextmanager
    async def open(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._lanes.take() as lane:
            connection, head = await self._send(lane, "GET", file_id)
            if not 200 <= head.status < 300:
                _check(head, await _read_body(connection), file_id, "GET")
            yield _chunks(connection)

    async def aclose(self) -> None:
        self._lanes.close()


async def _read_body(connection: Connection) -> bytes:
    try:
        return await connection.read(ERROR_TEXT_BYTES)
    except HTTPFailure as exc:
        raise TransientArchiveError(f"archive connection lost: {exc!r}") from exc


async def _chunks(connection: Connection) -> AsyncIterator[bytes]:
    try:
        async for chunk in connection.chunks():
            yield chunk
    except HTTPFailure as exc:
        raise TransientArchiveError(f"archive connection lost mid-file: {exc!r}") from exc


class _Lane:
    """Room for one request at a time, on a connection made when first needed and again
    after one that cannot be reused (a failure, a cancellation, a body left unread)."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._connect = connect
        self._connection: Connection | None = None

    async def exchange(self, verb: str, target: str, headers: bytes) -> tuple[Connection, Head]:
        """Send the request; once more on a new connection if a kept-alive one turns out
        to have been closed by the archive before it saw the request."""
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = await self._connect()
            try:
                return self._connection, await self._connection.request(verb, target, headers)
            except http11.StaleConnection:
                self.drop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def release(self) -> None:
        if self._connection is not None and not self._connection.reusable:
            self.drop()


class _Lanes:
    """`archive_concurrency` lanes; a request takes a free one.

    Requests queue here for a lane (the reference server corrupts concurrent GETs, so sites
    running it set 1).  Waiting for a lane is not a fault, so it happens outside the read
    timeout and the worker's retry budget.  The last lane given back is the next taken,
    so a quiet spell keeps few connections warm.
    """

    def __init__(self, count: int, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._all = [_Lane(connect) for _ in range(count)]
        self._free: asyncio.LifoQueue[_Lane] = asyncio.LifoQueue()
        for lane in self._all:
            self._free.put_nowait(lane)

    @asynccontextmanager
    async def take(self) -> AsyncIterator[_Lane]:
        """A free lane; given back with its connection only if that is reusable (an
        exchange that failed or was cancelled midway leaves it in an unknown state)."""
        lane = await self._free.get()
        try:
            yield lane
        finally:
            lane.release()
            self._free.put_nowait(lane)

    def close(self) -> None:
        for lane in self._all:
            lane.drop()
