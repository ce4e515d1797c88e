"""HTTP/1.1 connections to the archive, parsed by httptools (llhttp, C).

cartd's archive traffic is three small exchanges per file (POST, HEAD, GET) and, now and
then, a body of many gigabytes.  Under httpx's own transport, that was the largest share
of the service's CPU while small files staged: h11 parses and checks every header in
Python, and httpcore wraps each request in anyio cancel scopes and locks.  Here the
socket's bytes go from an asyncio protocol straight into llhttp, the parser uvicorn
serves with, and a body is handed on in the pieces the socket delivered.  transport.py
puts these connections under httpx's transport interface.

The scope is what PROTOCOL.md section 3 needs and no more: requests without a body;
responses framed by Content-Length, chunks or the connection's end; keep-alive; TLS by
asyncio.  No redirects, cookies, proxies or compression.  Every failure of the exchange
itself (refused, timed out, cut short, not HTTP) is an `HTTPFailure`.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools

READ_SIZE = 64 * 1024  # one socket read (bigger ones measured no cheaper for a 512 MiB body)
HIGH_WATER = 1024 * 1024  # body bytes held before the socket stops being read
NO_BODY_STATUSES = (204, 304)


class HTTPFailure(Exception):
    """The exchange failed below HTTP's status codes: worth asking again later."""


class ConnectFailed(HTTPFailure):
    pass


class ConnectTimeout(ConnectFailed):
    pass


class ReadTimeout(HTTPFailure):
    pass


class ConnectionLost(HTTPFailure):
    pass


class StaleConnection(ConnectionLost):
    """A kept-alive connection was closed by the server before it answered: the request
    never reached it, so sending it again on a new connection is safe."""


class ProtocolFailure(HTTPFailure):
    pass


@dataclass
class Head:
    """A response's status line and headers (names lower-cased; a repeated one keeps its
    last value, which is all the archive's headers need)."""

    status: int
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)


async def connect(
    host: str, port: int, tls: ssl.SSLContext | None, timeouts: tuple[float, float]
) -> Connection:
    """A new connection; `timeouts` is (connect, read) in seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeouts[0]):
            _, connection = await loop.create_connection(
                lambda: Connection(timeouts[1]),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls else None,
            )
    except TimeoutError:
        raise ConnectTimeout(f"no connection to {host}:{port} within {timeouts[0]:g}s") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    return connection


class Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection; one exchange at a time, which its lane guarantees.

    The protocol reads into one buffer of its own and feeds the parser from it, so a
    body's bytes are copied once on their way to the caller (by the parser's callback).
    Body pieces wait in a queue; past HIGH_WATER bytes the socket is not read until the
    caller catches up, so a slow disk never means a growing heap.
    """

    def __init__(self, read_timeout: float) -> None:
        self._read_timeout = read_timeout
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._exchanges = 0  # completed on this connection: a later loss may be staleness
        self._start("")

    def _start(self, method: str) -> None:
        self._method = method
        self._parser = httptools.HttpResponseParser(self)
        self._head = Head(0)
        self._head_done = self._complete = self._received = False
        self._close_delimited = self._paused = False
        self._body: deque[bytes] = deque()
        self._queued = 0
        self._failure: HTTPFailure | None = None

    @property
    def reusable(self) -> bool:
        """The last exchange ended cleanly and both sides keep the connection open."""
        return (
            self._complete
            and self._failure is None
            and not self._close_delimited
            and self._keeps_alive()
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def _keeps_alive(self) -> bool:
        token = self._head.headers.get("connection", "").lower()
        if self._parser.get_http_version() == "1.0":
            return "keep-alive" in token
        return "close" not in token

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def request(self, method: str, head: bytes) -> Head:
        """Send a request without a body (`head`: its request line and headers, ending in
        a blank line); return once the answer's status line and headers are in."""
        if self._transport is None or self._transport.is_closing():
            raise StaleConnection("the archive closed this connection while it was idle")
        self._start(method)
        self._transport.write(head)
        while not self._head_done:
            if self._failure is not None:
                raise self._failure
            await self._wait()
        return self._head

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, in the pieces the socket delivered; a failure after the last piece."""
        while True:
            while self._body:
                data = self._body.popleft()
                self._queued -= len(data)
                if self._paused and self._queued < HIGH_WATER // 2:
                    self._paused = False
                    assert self._transport is not None
                    self._transport.resume_reading()
                yield data
            if self._complete:
                return
            if self._failure is not None:
                raise self._failure
            await self._wait()

    async def _wait(self) -> None:
        """Until the protocol has news (bytes, the end, a failure), within the read timeout."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self._read_timeout):
                await self._waiter
        except TimeoutError:
            raise ReadTimeout(f"the archive sent nothing for {self._read_timeout:g}s") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, failure: HTTPFailure) -> None:
        if self._failure is None and not self._complete:
            self._failure = failure
        self._wake()

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods but not its class.
        self._transport = typing.cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self._transport is not None
        if not self._method or self._complete:
            self._transport.close()  # bytes nobody asked for: the connection is confused
            return
        self._received = True
        try:
            self._parser.feed_data(self._buffer[:nbytes])
        except HTTPFailure as exc:
            self._fail(exc)
            self._transport.close()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolFailure(f"the archive's answer is not valid HTTP: {exc!r}"))
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close: a half-closed connection is of no use to a client

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._method or self._complete:
            return
        if exc is None and self._close_delimited and self._head_done:
            self._finish()  # the connection's end was the body's
        elif not self._received and self._exchanges:
            self._fail(StaleConnection("the archive closed the kept-alive connection"))
        else:
            reason = f": {exc}" if exc is not None else ""
            self._fail(ConnectionLost(f"the archive closed the connection mid-answer{reason}"))

    # the parser's side

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request: the parser raises, we close
            raise ProtocolFailure("the archive answered one request twice")

    def on_status(self, reason: bytes) -> None:
        self._head.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # informational: the real answer follows
            self._head = Head(0)
            return
        self._head.status = status
        self._head_done = True
        headers = self._head.headers
        if self._method == "HEAD" or status in NO_BODY_STATUSES:
            self._finish()  # the parser cannot be told a HEAD's Content-Length has no body
        else:
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            self._close_delimited = not chunked and "content-length" not in headers
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self._complete:  # a body to a HEAD, or a 204: the parser raises, we close
            raise ProtocolFailure("the archive sent a body where none belongs")
        self._body.append(data)
        self._queued += len(data)
        if self._queued >= HIGH_WATER and not self._paused:
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head_done:  # an informational answer ends a message too
            self._finish()

    def _finish(self) -> None:
        if not self._complete:
            self._complete = True
            self._exchanges += 1
            self._wake()
