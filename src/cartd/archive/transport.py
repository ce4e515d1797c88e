"""An httpx transport whose connections are http11.py's: the archive client stays httpx.

PacificaArchive builds `httpx.Request`s, reads `httpx.Response`s and classifies httpx's
exceptions; this transport carries them over `count` lanes of one keep-alive connection
each.  The lanes replace httpcore's pool, which polled every idle connection's socket
for every request it assigned, and h11, which parsed every header in Python: together,
with anyio's cancel scopes, 42% of the GIL-held samples while 1,000 small files staged.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import httpx

from cartd.archive import http11
from cartd.archive.http11 import Connection, Head, HTTPFailure

# The httpx exception for each failure, most specific first (httpx's own transport raises
# the same kinds for the same faults).
_HTTPX_ERRORS: tuple[tuple[type[HTTPFailure], type[httpx.TransportError]], ...] = (
    (http11.ConnectTimeout, httpx.ConnectTimeout),
    (http11.ConnectFailed, httpx.ConnectError),
    (http11.ReadTimeout, httpx.ReadTimeout),
    (http11.ConnectionLost, httpx.ReadError),
    (http11.ProtocolFailure, httpx.RemoteProtocolError),
)


def as_httpx_error(failure: HTTPFailure) -> httpx.TransportError:
    for kind, mapped in _HTTPX_ERRORS:
        if isinstance(failure, kind):
            return mapped(str(failure))
    return httpx.TransportError(str(failure))


class LaneTransport(httpx.AsyncBaseTransport):
    """`count` lanes to one archive; a request takes a free one until its response closes.

    Requests queue here for a lane (the reference server corrupts concurrent GETs, so sites
    running it set 1).  Waiting for a lane is not a fault, so it happens outside the read
    timeout and the worker's retry budget.  The last lane given back is the next taken,
    so a quiet spell keeps few connections warm.
    """

    def __init__(self, base_url: str, count: int, timeouts: tuple[float, float]) -> None:
        url = httpx.URL(base_url)
        tls = ssl.create_default_context() if url.scheme == "https" else None
        port = url.port or (443 if tls else 80)
        connect = partial(http11.connect, url.host, port, tls, timeouts)
        self._all = [_Lane(connect) for _ in range(count)]
        self._free: asyncio.LifoQueue[_Lane] = asyncio.LifoQueue()
        for lane in self._all:
            self._free.put_nowait(lane)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lane = await self._free.get()
        try:
            head = await lane.exchange(request.method, _request_head(request))
        except HTTPFailure as failure:
            self._give_back(lane)
            raise as_httpx_error(failure) from failure
        except BaseException:  # a cancellation: the lane drops its half-used connection
            self._give_back(lane)
            raise
        body = _Body(lane.connection, partial(self._give_back, lane))
        return httpx.Response(
            head.status,
            headers=list(head.headers.items()),
            stream=body,
            request=request,
            extensions={"reason_phrase": head.reason.encode(), "http_version": b"HTTP/1.1"},
        )

    def _give_back(self, lane: _Lane) -> None:
        lane.release()
        self._free.put_nowait(lane)

    async def aclose(self) -> None:
        for lane in self._all:
            lane.drop()


def _request_head(request: httpx.Request) -> bytes:
    """Request line and headers; httpx has set Host (and Content-Length for a POST)."""
    target = request.url.raw_path
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target)]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw]
    return b"".join(lines) + b"\r\n"


class _Lane:
    """Room for one exchange at a time, on a connection made when first needed and again
    after one that cannot be reused (a failure, a cancellation, a body left unread)."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._connect = connect
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        assert self._connection is not None
        return self._connection

    async def exchange(self, method: str, head: bytes) -> Head:
        """Send the request; once more on a new connection if a kept-alive one turns out
        to have been closed by the archive before it saw the request."""
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = await self._connect()
            try:
                return await self._connection.request(method, head)
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


class _Body(httpx.AsyncByteStream):
    """A response's body; closing it (read or not) gives its lane back, once."""

    def __init__(self, connection: Connection, give_back: Callable[[], None]) -> None:
        self._connection = connection
        self._give_back: Callable[[], None] | None = give_back

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._connection.chunks():
                yield chunk
        except HTTPFailure as failure:
            raise as_httpx_error(failure) from failure

    async def aclose(self) -> None:
        if self._give_back is not None:
            give_back, self._give_back = self._give_back, None
            give_back()
