"""The archive's HTTP/1.1 connections (cartd.archive.http11, under httpx by
cartd.archive.transport) meet network faults.

Each fault comes from a scripted server socket and must reach staging as a transient
archive error caused by the httpx exception httpx's own transport raises for it, and leave
the lane usable for the next request.  Every test runs on asyncio's loop and on uvloop,
which `cartd serve` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from cartd.archive import ArchiveFileError, TransientArchiveError, http11
from cartd.archive.pacifica import PacificaArchive
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

    def __init__(self, *scripts: Script, tls: ssl.SSLContext | None = None) -> None:
        self.scripts = scripts
        self.tls = tls
        self.connections = 0
        self.done = threading.Event()  # set at the end of the test: stalled scripts return
        self.listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://localhost:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                script = self.scripts[min(self.connections, len(self.scripts) - 1)]
                self.connections += 1
                threading.Thread(target=self._one, args=(conn, script), daemon=True).start()

    def _one(self, conn: socket.socket, script: Script) -> None:
        with contextlib.suppress(OSError):
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                script(conn)

    def stall(self) -> None:
        self.done.wait(10)


@contextlib.contextmanager
def scripted(*scripts: Script, tls: ssl.SSLContext | None = None) -> Iterator[ScriptedServer]:
    server = ScriptedServer(*scripts, tls=tls)
    server.thread.start()
    try:
        yield server
    finally:
        server.done.set()
        server.listener.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        if not (more := conn.recv(65536)):
            raise ConnectionError("client went away")
        data += more
    return data


def head(length: int, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 %s\r\nContent-Length: %d\r\nX-Content-Length: %d\r\n" % (status, length, length)
        + b"X-Pacifica-File-Storage-Media: disk\r\n\r\n"
    )


def answer(conn: socket.socket, requests: int = 100) -> None:
    """A well-behaved archive: the body for every request on the connection (none for a
    HEAD, though its Content-Length says how long the body would be)."""
    for _ in range(requests):
        request = read_request(conn)
        conn.sendall(head(len(BODY)) + (b"" if request.startswith(b"HEAD") else BODY))


def archive_at(url: str) -> PacificaArchive:
    settings = Settings(
        archive_read_timeout=TIMEOUT, archive_connect_timeout=TIMEOUT, archive_concurrency=1
    )
    return PacificaArchive(url, settings)


async def read_file(archive: PacificaArchive) -> bytes:
    async with archive.open("f") as chunks:
        return b"".join([chunk async for chunk in chunks])


async def read_twice(archive: PacificaArchive) -> list[bytes]:
    return [await read_file(archive), await read_file(archive)]


async def failure(call: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[BaseException, float]:
    """The transient error `call` raised, its httpx cause, and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(TransientArchiveError) as caught:
        await call()
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    return caught.value.__cause__, time.monotonic() - started


def using(url: str, steps: Callable[[PacificaArchive], Coroutine[Any, Any, Any]]) -> Any:
    async def go() -> Any:
        archive = archive_at(url)
        try:
            return await steps(archive)
        finally:
            await archive.aclose()

    return go()


def test_files_and_keep_alive(run: Run) -> None:
    async def steps(archive: PacificaArchive) -> list[Any]:
        await archive.stage("f")
        info = await archive.status("f")
        return [info.size] + [await read_file(archive) for _ in range(3)]

    with scripted(answer) as server:
        assert run(using(server.url, steps)) == [len(BODY), BODY, BODY, BODY]
        assert server.connections == 1


def test_the_request_names_the_host_and_gives_a_post_an_empty_body(run: Run) -> None:
    seen: list[bytes] = []

    def record(conn: socket.socket) -> None:
        seen.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    with scripted(record) as server:
        run(using(server.url + "files/", lambda archive: archive.stage("a b/c")))
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == "POST /files/a%20b%2Fc HTTP/1.1"
    port = server.url.rsplit(":", 1)[1].strip("/")
    assert f"Host: localhost:{port}" in lines
    assert "Content-Length: 0" in lines


def test_an_error_answer_keeps_its_connection(run: Run) -> None:
    """A 404 or a 500 is an answer like any other: its body is read (for the message),
    and the connection serves the next request."""

    def errors_then_file(conn: socket.socket) -> None:
        message = json.dumps({"message": "tape library offline"}).encode()
        read_request(conn)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        read_request(conn)
        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n" % len(message) + message)
        answer(conn)

    async def steps(archive: PacificaArchive) -> tuple[str, str, bytes]:
        with pytest.raises(ArchiveFileError) as missing:
            await read_file(archive)
        with pytest.raises(TransientArchiveError) as busy:
            await archive.stage("f")
        return str(missing.value), str(busy.value), await read_file(archive)

    with scripted(errors_then_file) as server:
        missing, busy, body = run(using(server.url, steps))
        assert server.connections == 1
    assert "not found" in missing
    assert "tape library offline" in busy
    assert body == BODY


def test_a_long_error_answer_is_read_only_as_far_as_its_message(run: Run) -> None:
    """Only the first 64 KiB of an error's body are read (an archive once sent far more
    than a message); the rest stays unread, so that connection is not reused."""
    message = json.dumps({"message": "offline", "trace": "x" * (1 << 20)}).encode()

    def long_error(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n" % len(message))
        conn.sendall(message)

    async def steps(archive: PacificaArchive) -> tuple[str, bytes]:
        with pytest.raises(TransientArchiveError) as busy:
            await archive.stage("f")
        return str(busy.value), await read_file(archive)

    with scripted(long_error, answer) as server:
        text, body = run(using(server.url, steps))
        assert server.connections == 2
    assert text.endswith("HTTP 503 Busy")  # the cut JSON is no message: the status line is
    assert body == BODY


def test_a_connection_the_archive_closed_while_idle_is_not_reused(run: Run) -> None:
    async def steps(archive: PacificaArchive) -> list[bytes]:
        first = await read_file(archive)
        await asyncio.sleep(0.1)  # the server's close reaches us
        return [first, await read_file(archive)]

    with scripted(lambda conn: answer(conn, requests=1)) as server:
        assert run(using(server.url, read_twice)) == [BODY, BODY]
        assert server.connections == 2


def test_a_kept_alive_connection_closed_under_a_request_is_retried_on_a_new_one(
    run: Run,
) -> None:
    """The archive may close an idle connection just as the next request goes out; that
    request never reached it, so it is sent again rather than failed."""

    def one_then_close(conn: socket.socket) -> None:
        answer(conn, requests=1)
        read_request(conn)  # and close without a word

    with scripted(one_then_close, answer) as server:
        assert run(using(server.url, read_twice)) == [BODY, BODY]
        assert server.connections == 2


def test_an_archive_that_never_answers_is_a_read_timeout(run: Run) -> None:
    def silent(conn: socket.socket) -> None:
        read_request(conn)
        server.stall()

    with scripted(silent) as server:
        cause, took = run(using(server.url, lambda a: failure(lambda: a.status("f"))))
    assert isinstance(cause, httpx.ReadTimeout)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2


def test_a_body_that_stops_midway_is_a_read_timeout(run: Run) -> None:
    def stalls(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(head(len(BODY)) + BODY[:1000])
        server.stall()

    with scripted(stalls) as server:
        cause, took = run(using(server.url, lambda a: failure(lambda: read_file(a))))
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


def not_http(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


def answered_twice(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(head(len(BODY)) + BODY + head(len(BODY)) + BODY)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (reset_after(head(len(BODY)) + BODY[:1000]), httpx.ReadError),
        (reset_after(b""), httpx.ReadError),
        (truncated, httpx.ReadError),
        (read_request, httpx.ReadError),
        (not_http, httpx.RemoteProtocolError),
    ],
    ids=[
        "reset-mid-body",
        "reset-before-answer",
        "truncated-body",
        "closed-before-answer",
        "not-http",
    ],
)
def test_broken_answers_fail_and_the_next_request_starts_afresh(
    run: Run, script: Script, expected: type[Exception]
) -> None:
    async def steps(archive: PacificaArchive) -> BaseException:
        cause, _ = await failure(lambda: read_file(archive))
        assert await read_file(archive) == BODY
        return cause

    with scripted(script, answer) as server:
        assert isinstance(run(using(server.url, steps)), expected)
        assert server.connections == 2


def test_a_second_answer_to_one_request_retires_the_connection(run: Run) -> None:
    with scripted(answered_twice, answer) as server:
        assert run(using(server.url, read_twice)) == [BODY, BODY]
        assert server.connections == 2


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-write", "two-writes"])
def test_bytes_after_a_head_answer_retire_the_connection(run: Run, pause: float) -> None:
    """A HEAD's answer has no body whatever its Content-Length says; bytes that follow it
    anyway would be read as the next answer's start, so the connection is not reused."""

    def head_with_a_body(conn: socket.socket) -> None:
        read_request(conn)
        if pause:
            conn.sendall(head(len(BODY)))
            time.sleep(pause)  # the answer's head arrives on its own
            conn.sendall(BODY)
        else:
            conn.sendall(head(len(BODY)) + BODY)
        server.stall()

    async def steps(archive: PacificaArchive) -> list[Any]:
        size = (await archive.status("f")).size
        await asyncio.sleep(0.1)  # the stray body reaches us
        return [size, await read_file(archive)]

    with scripted(head_with_a_body, answer) as server:
        assert run(using(server.url, steps)) == [len(BODY), BODY]
        assert server.connections == 2


def test_a_body_that_ends_with_the_connection_is_whole(run: Run) -> None:
    """Neither Content-Length nor chunks: the connection's end is the body's end."""

    def close_delimited(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY)

    with scripted(close_delimited) as server:
        assert run(using(server.url, read_twice)) == [BODY, BODY]
        assert server.connections == 2


def test_chunks_and_an_informational_answer_first(run: Run) -> None:
    def chunked(conn: socket.socket) -> None:
        for _ in range(2):
            read_request(conn)
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(BODY), 5000):
                piece = BODY[start : start + 5000]
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")

    with scripted(chunked) as server:
        assert run(using(server.url, read_twice)) == [BODY, BODY]
        assert server.connections == 1


def test_a_refused_connection_is_a_connect_error(run: Run) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    cause, _ = run(using(url, lambda a: failure(lambda: a.status("f"))))
    assert type(cause) is httpx.ConnectError


def test_a_connection_that_is_never_accepted_is_a_connect_timeout(run: Run) -> None:
    # Linux drops the SYNs beyond a full backlog: the connect hangs until the timeout.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            url = f"http://127.0.0.1:{port}/"
            cause, took = run(using(url, lambda a: failure(lambda: a.status("f"))))
    assert isinstance(cause, httpx.ConnectTimeout)
    assert "within" in str(cause)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2


def test_a_cancelled_download_leaves_the_lane_usable(run: Run) -> None:
    def slow_then_fine(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(head(len(BODY)) + BODY[:1000])
        server.stall()

    async def steps(archive: PacificaArchive) -> bytes:
        download = asyncio.ensure_future(read_file(archive))
        await asyncio.sleep(TIMEOUT / 3)
        download.cancel()
        with pytest.raises(asyncio.CancelledError):
            await download
        return await read_file(archive)

    with scripted(slow_then_fine, answer) as server:
        assert run(using(server.url, steps)) == BODY
        assert server.connections == 2


BIG = bytes(range(256)) * 4096 * 16  # 16 MiB


def big_answer(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(head(len(BIG)) + BIG)


def test_a_slow_reader_holds_at_most_the_high_water_mark(run: Run) -> None:
    """The socket is not read while the caller is behind: memory stays bounded however
    fast the archive sends and however slow the disk writes."""

    async def go(url: str) -> tuple[int, bytes]:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        connection = await http11.connect("127.0.0.1", port, None, (TIMEOUT, 5.0))
        try:
            await connection.request("GET", b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
            chunks = connection.chunks()
            pieces = [await anext(chunks)]
            await asyncio.sleep(0.3)  # room for the loop to read all 16 MiB, were it let
            held = connection._queued
            pieces += [piece async for piece in chunks]
            return held, b"".join(pieces)
        finally:
            connection.close()

    with scripted(big_answer) as server:
        held, body = run(go(server.url))
    assert held <= http11.HIGH_WATER + http11.READ_SIZE
    assert body == BIG


def test_a_body_that_is_always_ready_still_lets_other_tasks_run(run: Run) -> None:
    """Without a pause, a reader of a fast archive would starve the loop (and a DELETE)."""

    async def go(url: str) -> tuple[int, int]:
        archive = archive_at(url)
        received, when_other_ran = 0, -1

        def other() -> None:
            nonlocal when_other_ran
            when_other_ran = received

        try:
            async with archive.open("f") as chunks:
                asyncio.get_running_loop().call_soon(other)
                async for chunk in chunks:
                    received += len(chunk)
        finally:
            await archive.aclose()
        return received, when_other_ran

    with scripted(big_answer) as server:
        received, when_other_ran = run(go(server.url))
    assert received == len(BIG)
    assert 0 <= when_other_ran <= http11.HIGH_WATER + http11.READ_SIZE


def test_an_https_archive(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS by asyncio, verified against the CA bundle OpenSSL is pointed at."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1"
    names = "-subj /CN=localhost -addext subjectAltName=DNS:localhost"
    argv = ["openssl", *request.split(), *names.split(), "-keyout", str(key), "-out", str(cert)]
    subprocess.run(argv, check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with scripted(answer, tls=tls) as server:
        cause, _ = run(using(server.url, lambda a: failure(lambda: a.status("f"))))
        assert type(cause) is httpx.ConnectError  # not trusted yet
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert run(using(server.url, read_file)) == BODY
