"""An httpx transport for plain-HTTP archives whose connections are bare asyncio sockets.

httpx's own async transport reaches the socket through anyio: every 64 KiB read pays for
a cancel scope and a timer (`fail_after`), a checkpoint, and a transport that is resumed
and paused around it, and big reads are split by copying.  On the archive's byte stream
that was the event loop's largest cost, and the loop is what a large file waits for.  With
these sockets, staging a 2 GiB file takes the loop thread half the CPU seconds, and
cartd as a whole about a third less (interleaved A/B; small files: no change measured).

A read here is first tried straight on the non-blocking socket; only when the kernel has
nothing yet does it wait for the loop, under an `asyncio.timeout`.  Everything above the
socket stays httpx and httpcore (HTTP/1.1 parsing, pooling, keep-alive checks), and
httpcore's errors become the same httpx exceptions as with httpx's transport, which is
what PacificaArchive classifies as transient.  TLS is not done here: the archive client
keeps httpx's transport for https archives.
"""

from __future__ import annotations

import asyncio
import socket
import typing
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager

import httpcore
import httpx

# A stream whose bytes are always ready would never let another task run (nor a
# cancellation arrive); anyio yielded on every read, this yields after this many bytes.
YIELD_EVERY = 1 << 20


class AsyncioTransport(httpx.AsyncBaseTransport):
    """httpx.AsyncHTTPTransport's request path, on a pool that uses `AsyncioBackend`."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{request.url.scheme!r} needs httpx's transport")
        assert isinstance(request.stream, httpx.AsyncByteStream)
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


# The httpx exception for each httpcore one (httpx's transport maps the same pairs).
_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
}


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for kind in type(exc).__mro__:  # the most specific class first
            if (mapped := _HTTPX_ERRORS.get(kind)) is not None:
                raise mapped(str(exc)) from exc
        raise


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on non-blocking sockets and the running asyncio loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                sock = await _connect_first(loop, addresses, local_address)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio and anyio do
        for option in socket_options or ():
            sock.setsockopt(*option)
        return SocketStream(sock)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


_Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[typing.Any, ...]]


async def _connect_first(
    loop: asyncio.AbstractEventLoop, addresses: Sequence[_Address], local_address: str | None
) -> socket.socket:
    """The first address that accepts, in the resolver's order; else the last error."""
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, _name, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local_address is not None:
                sock.bind((local_address, 0))
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


class SocketStream(httpcore.AsyncNetworkStream):
    """One connection; httpcore never reads or writes it from two tasks at once."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._unyielded = 0  # bytes read since this stream last let other tasks run

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            data = self._sock.recv(max_bytes)
        except BlockingIOError:
            self._unyielded = 0
            try:
                async with asyncio.timeout(timeout):
                    return await self._loop.sock_recv(self._sock, max_bytes)
            except TimeoutError as exc:
                raise httpcore.ReadTimeout(str(exc)) from exc
            except OSError as exc:
                raise httpcore.ReadError(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc
        self._unyielded += len(data)
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await asyncio.sleep(0)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        try:
            sent = self._send_now(buffer)
            if sent < len(buffer):
                async with asyncio.timeout(timeout):
                    await self._loop.sock_sendall(self._sock, memoryview(buffer)[sent:])
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def _send_now(self, buffer: bytes) -> int:
        try:
            return self._sock.send(buffer)
        except BlockingIOError:
            return 0

    async def aclose(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":  # on a kept-alive connection: the server closed it
            return self._readable()
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        return None

    def _readable(self) -> bool:
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True  # a reset: readable, in that reading would tell
        return True
