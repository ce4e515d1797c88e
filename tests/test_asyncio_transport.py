"""The archive client on asyncio sockets (cartd.archive.asyncio_transport) meets network faults.

Each fault comes from a scripted server socket, and each must reach PacificaArchive as the
httpx exception that httpx's own transport raises, so that staging still sees a transient
fault.  Every test runs on asyncio's loop and on uvloop, which `cartd serve` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import httpcore
import httpx
import pytest
import uvloop

from cartd.archive import TransientArchiveError, asyncio_transport
from cartd.archive.asyncio_transport import AsyncioTransport, SocketStream
from cartd.archive.pacifica import PacificaArchive, _transport
from cartd.settings import Settings

TIMEOUT = 0.3
BODY = bytes(range(256)) * 64  # 16 KiB
Script = Callable[[socket.socket], None]
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    return asyncio.run if request.param == "asyncio" else uvloop.run


class ScriptedServer:
    """Answers the n-th connection with the n-th script (the last one repeats)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.connections = 0
        self.done = threading.Event()  # set at the end of the test: stalled scripts return
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                script = self.scripts[min(self.connections, len(self.scripts) - 1)]
                self.connections += 1
                threading.Thread(target=self._one, args=(conn, script), daemon=True).start()

    def _one(self, conn: socket.socket, script: Script) -> None:
        with conn, contextlib.suppress(OSError):
            script(conn)

    def stall(self) -> None:
        self.done.wait(10)


@contextlib.contextmanager
def scripted(*scripts: Script) -> Iterator[ScriptedServer]:
    server = ScriptedServer(*scripts)
    server.thread.start()
    try:
        yield server
    finally:
        server.done.set()
        server.listener.close()


def read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        if not (more := conn.recv(65536)):
            raise ConnectionError("client went away")
        data += more


def head(length: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Content-Length: %d\r\n"
        % (
            length,
            length,
        )
        + b"X-Pacifica-File-Storage-Media: disk\r\n\r\n"
    )


def answer(conn: socket.socket, requests: int = 100) -> None:
    """A well-behaved archive: the body for every request on the connection."""
    for _ in range(requests):
        read_request(conn)
        conn.sendall(head(len(BODY)) + BODY)


def archive_at(url: str) -> PacificaArchive:
    settings = Settings(
        archive_read_timeout=TIMEOUT, archive_connect_timeout=TIMEOUT, archive_concurrency=1
    )
    return PacificaArchive(url, settings)


async def read_file(archive: PacificaArchive) -> bytes:
    async with archive.open("f") as chunks:
        return b"".join([chunk async for chunk in chunks])


async def failure(call: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[BaseException, float]:
    """The transient error `call` raised, its httpx cause, and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(TransientArchiveError) as caught:
        await call()
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    return caught.value.__cause__, time.monotonic() - started


def test_plain_http_archives_get_the_asyncio_transport_and_https_httpx_s() -> None:
    limits = httpx.Limits(max_connections=1)
    assert isinstance(_transport("http://archive:8080/", limits), AsyncioTransport)
    secure = _transport("https://archive/", limits)
    assert isinstance(secure, httpx.AsyncHTTPTransport)


def test_files_and_keep_alive(run: Run) -> None:
    async def go(url: str) -> list[bytes]:
        archive = archive_at(url)
        try:
            return [await read_file(archive) for _ in range(3)]
        finally:
            await archive.aclose()

    with scripted(answer) as server:
        assert run(go(server.url)) == [BODY] * 3
        assert server.connections == 1


def test_a_connection_the_archive_closed_while_idle_is_not_reused(run: Run) -> None:
    async def go(url: str) -> list[bytes]:
        archive = archive_at(url)
        try:
            first = await read_file(archive)
            await asyncio.sleep(0.1)  # the server's close reaches us
            return [first, await read_file(archive)]
        finally:
            await archive.aclose()

    with scripted(lambda conn: answer(conn, requests=1)) as server:
        assert run(go(server.url)) == [BODY, BODY]
        assert server.connections == 2


def test_an_archive_that_never_answers_is_a_read_timeout(run: Run) -> None:
    def silent(conn: socket.socket) -> None:
        read_request(conn)
        server.stall()

    async def go(url: str) -> tuple[BaseException, float]:
        archive = archive_at(url)
        try:
            return await failure(lambda: archive.status("f"))
        finally:
            await archive.aclose()

    with scripted(silent) as server:
        cause, took = run(go(server.url))
    assert isinstance(cause, httpx.ReadTimeout)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2


def test_a_body_that_stops_midway_is_a_read_timeout(run: Run) -> None:
    def stalls(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(head(len(BODY)) + BODY[:1000])
        server.stall()

    async def go(url: str) -> tuple[BaseException, float]:
        archive = archive_at(url)
        try:
            return await failure(lambda: read_file(archive))
        finally:
            await archive.aclose()

    with scripted(stalls) as server:
        cause, took = run(go(server.url))
    assert isinstance(cause, httpx.ReadTimeout)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2


def reset_after(part: bytes) -> Script:
    def resets(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(part)
        time.sleep(0.05)  # the bytes before the reset arrive first
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return resets


def truncated(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(head(len(BODY)) + BODY[:1000])


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (reset_after(head(len(BODY)) + BODY[:1000]), httpx.ReadError),
        (reset_after(b""), httpx.ReadError),
        (truncated, httpx.RemoteProtocolError),
        (read_request, httpx.RemoteProtocolError),
    ],
    ids=["reset-mid-body", "reset-before-answer", "truncated-body", "closed-before-answer"],
)
def test_lost_connections_are_the_errors_httpx_raises(
    run: Run, script: Script, expected: type[Exception]
) -> None:
    async def go(url: str) -> BaseException:
        archive = archive_at(url)
        try:
            cause, _ = await failure(lambda: read_file(archive))
            assert await read_file(archive) == BODY  # and the next request starts afresh
            return cause
        finally:
            await archive.aclose()

    with scripted(script, answer) as server:
        assert isinstance(run(go(server.url)), expected)


def test_a_refused_connection_is_a_connect_error(run: Run) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    archive = archive_at(url)
    cause, _ = run(failure(lambda: archive.status("f")))
    assert isinstance(cause, httpx.ConnectError)
    run(archive.aclose())


def test_a_connection_that_is_never_accepted_is_a_connect_timeout(run: Run) -> None:
    # Linux drops the SYNs beyond a full backlog: the connect hangs until the timeout.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            archive = archive_at(f"http://127.0.0.1:{port}/")
            cause, took = run(failure(lambda: archive.status("f")))
    assert isinstance(cause, httpx.ConnectTimeout)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2


def test_a_cancelled_download_leaves_the_lane_usable(run: Run) -> None:
    def slow_then_fine(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(head(len(BODY)) + BODY[:1000])
        server.stall()

    async def go(url: str) -> bytes:
        archive = archive_at(url)
        try:
            download = asyncio.ensure_future(read_file(archive))
            await asyncio.sleep(TIMEOUT / 3)
            download.cancel()
            with pytest.raises(asyncio.CancelledError):
                await download
            return await read_file(archive)
        finally:
            await archive.aclose()

    with scripted(slow_then_fine, answer) as server:
        assert run(go(server.url)) == BODY
        assert server.connections == 2


def test_a_stream_that_is_always_ready_still_lets_other_tasks_run(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a yield, a reader of a fast archive would starve the loop (and a DELETE)."""
    monkeypatch.setattr(asyncio_transport, "YIELD_EVERY", 16 * 1024)
    total = 128 * 1024

    async def go(ours: socket.socket) -> int:
        ours.setblocking(False)
        stream = SocketStream(ours)
        other_ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(other_ran.set)
        received = 0
        while received < total and not other_ran.is_set():
            received += len(await stream.read(4096))
        return received

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * total)
        theirs.settimeout(5)
        theirs.sendall(bytes(total))  # all of it is ready before the first read
        assert run(go(ours)) <= 16 * 1024


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpcore.ConnectTimeout, httpx.ConnectTimeout),
        (httpcore.ReadTimeout, httpx.ReadTimeout),
        (httpcore.WriteTimeout, httpx.WriteTimeout),
        (httpcore.PoolTimeout, httpx.PoolTimeout),
        (httpcore.ConnectError, httpx.ConnectError),
        (httpcore.ReadError, httpx.ReadError),
        (httpcore.WriteError, httpx.WriteError),
        (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
        (httpcore.LocalProtocolError, httpx.LocalProtocolError),
        (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    ],
)
def test_httpcore_errors_become_the_same_httpx_errors(
    raised: type[Exception], expected: type[Exception]
) -> None:
    with pytest.raises(httpx.TransportError) as caught, asyncio_transport._as_httpx_errors():
        raise raised("boom")
    assert type(caught.value) is expected
    assert str(caught.value) == "boom"


@contextlib.contextmanager
def reset_connection() -> Iterator[socket.socket]:
    """Our end of a TCP connection whose peer's reset has already arrived."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    with ours:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()
        poller = select.poll()
        poller.register(ours, select.POLLERR)
        assert poller.poll(5000), "the reset did not arrive"
        ours.setblocking(False)
        yield ours


def test_a_reset_that_arrived_before_the_read_is_a_read_error(run: Run) -> None:
    async def go(ours: socket.socket) -> bytes:
        return await SocketStream(ours).read(4096, timeout=TIMEOUT)

    with reset_connection() as ours, pytest.raises(httpcore.ReadError):
        run(go(ours))


def test_a_reset_that_arrived_before_the_write_is_a_write_error(run: Run) -> None:
    async def go(ours: socket.socket) -> None:
        await SocketStream(ours).write(b"GET / HTTP/1.1\r\n\r\n", timeout=TIMEOUT)

    with reset_connection() as ours, pytest.raises(httpcore.WriteError):
        run(go(ours))
