"""A stand-in for the Pacifica archive interface, with tape latency and faults.

cartd has to work against ``pacifica-archiveinterface`` 0.4.2, whose wire format
is odd (a float ``Last-Modified``, the ``X-Pacifica-Messsage`` typo, a missing
file reported as 500, JSON error bodies whose ``status`` is a string), and whose
posix backend never shows tape or misbehaves on demand.  This server mimics that
wire format byte for byte where cartd can see it, and adds the latency and
failures the tests need, using the standard library only so that it runs
anywhere the tests do.

Run it by hand with ``python tests/archive_server.py --root DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

CHUNK_SIZE = 1 << 20
CHERRYPY_VERSION = "18.10.0"
ALLOW = "DELETE, GET, HEAD, PATCH, POST, PUT"
UP_MESSAGE = "Pacifica Archive Interface Up and Running"
NO_ANSWER = 0
RESET_GRACE = 0.1
STORE_DIR_NAME = ".archive-server-store"

_ANY_VERB = frozenset({"POST", "HEAD", "GET"})
FAULT_VERBS: dict[str, frozenset[str]] = {
    "500": _ANY_VERB,
    "503": _ANY_VERB,
    "drop": _ANY_VERB,
    "hang": _ANY_VERB,
    "truncate": frozenset({"GET"}),
    "reset": frozenset({"GET"}),
    "corrupt": frozenset({"GET"}),
    "media_error": frozenset({"HEAD"}),
    "no_media": frozenset({"HEAD"}),
}
_NEEDS_FILE = frozenset({"truncate", "reset", "corrupt", "media_error", "no_media"})
# Faults that a retry cures: cartd must never fail a cart because of these alone.
TRANSIENT_KINDS = ("500", "503", "drop", "truncate", "reset")
# CherryPy replaces the stdlib's wording for these two (cherrypy/lib/httputil.py).
_CHERRYPY_DESCRIPTIONS = {
    500: "The server encountered an unexpected condition which prevented it from fulfilling"
    " the request.",
    503: "The server is currently unable to handle the request due to a temporary overloading"
    " or maintenance of the server.",
}


class _RouteError(Exception):
    """Raised so that every bad-request path answers the way CherryPy does."""

    def __init__(self, code: int, message: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


@dataclass
class _Entry:
    """In-memory metadata, so that tests can fake mtimes and tape state freely."""

    path: Path
    mtime: float
    tape_delay: float
    owned: bool
    staged_at: float | None = None

    def media(self, now: float) -> str:
        """Tape until the recall, started by the first POST, has had time to finish."""
        if self.tape_delay <= 0:
            return "disk"
        if self.staged_at is None or math.isinf(self.tape_delay):
            return "tape"
        return "disk" if now - self.staged_at >= self.tape_delay else "tape"


@dataclass
class _Fault:
    """A queued failure; counted down so tests can script 'fail twice, then work'."""

    verb: str
    kind: str
    file_id: str | None
    remaining: int

    def matches(self, verb: str, file_id: str, exists: bool) -> bool:
        """Body and media faults need a real file, so they wait for one."""
        if self.verb != verb or self.file_id not in (None, file_id):
            return False
        return exists or self.kind not in _NEEDS_FILE


@dataclass
class _Chaos:
    """Random faults: each request fails with probability `rate`, with a kind that fits it."""

    rate: float
    rng: random.Random
    kinds: tuple[str, ...]

    def draw(self, verb: str, exists: bool) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        usable = [
            kind
            for kind in self.kinds
            if verb in FAULT_VERBS[kind] and (exists or kind not in _NEEDS_FILE)
        ]
        return self.rng.choice(usable) if usable else None


def _check_delay(tape_delay: float) -> None:
    """Reject delays that would make the tape state meaningless."""
    if math.isnan(tape_delay) or tape_delay < 0:
        raise ValueError(f"tape_delay must be >= 0, got {tape_delay!r}")


def _levels(media: str, size: int) -> str:
    """Render bytes-per-level the way the posix, HSM and HPSS backends do."""
    if media == "tape":
        return f"(0, {size})"
    if media == "error":
        return f"(0, 0, 0, {size})"
    return f"({size},)"


def _error_body(code: int, message: str | None, detail: str) -> bytes:
    """Match CherryPy's error page: the status is a string, with a traceback."""
    status = HTTPStatus(code)
    return json.dumps(
        {
            "status": f"{code} {status.phrase}",
            "message": message or _CHERRYPY_DESCRIPTIONS.get(code, status.description),
            "traceback": "Traceback (most recent call last):\n"
            '  File "tests/archive_server.py", emulated\n'
            f"{detail}\n",
            "version": CHERRYPY_VERSION,
        }
    ).encode()


def _read_chunks(fh: io.BufferedIOBase, limit: int) -> Iterator[bytes]:
    """Stream from disk so that multi-gigabyte files never sit in memory."""
    while limit > 0:
        data = fh.read(min(CHUNK_SIZE, limit))
        if not data:
            return
        limit -= len(data)
        yield data


def _flip(data: bytes) -> bytes:
    """Change one byte mid-chunk: the size stays right, only a hash can tell."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@dataclass
class GetStream:
    """One GET body as the archive saw it: when it started and ended, and whether the
    whole body went out (a client that hangs up mid-way shows as `whole=False`)."""

    file_id: str
    started: float
    ended: float | None = None
    whole: bool = False


class _HTTPServer(ThreadingHTTPServer):
    """Knows its open sockets so that stop() can cut hanging requests loose."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], archive: ArchiveServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.archive = archive
        self.stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        self._cut = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Skip HTTPServer's getfqdn(), a reverse DNS lookup that can stall for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def track(self, sock: socket.socket) -> None:
        """Register a connection, or cut it at once if we are shutting down."""
        with self._sockets_lock:
            self._sockets.add(sock)
            if self._cut:
                _shutdown(sock)

    def untrack(self, sock: socket.socket) -> None:
        """Forget a connection whose handler has finished."""
        with self._sockets_lock:
            self._sockets.discard(sock)

    def cut_all(self) -> None:
        """Cut every connection, then wake sleeping handlers.

        In that order: a handler woken first could flush the rest of a slow GET
        into the socket buffer before the cut, and the client would see a whole body.
        """
        with self._sockets_lock:
            self._cut = True
            for sock in self._sockets:
                _shutdown(sock)
        self.stopping.set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients vanishing mid-reply is the point of these tests, not news."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _shutdown(sock: socket.socket) -> None:
    """Shut a socket down, ignoring ones the peer already closed."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Speaks the archive-interface protocol on one connection."""

    protocol_version = "HTTP/1.1"
    server_version = f"CherryPy/{CHERRYPY_VERSION}"
    disable_nagle_algorithm = True  # chunk framing is written in small pieces
    server: _HTTPServer
    verb = ""
    file_id = ""

    def setup(self) -> None:
        """Track the socket so stop() can reach it; no Nagle delay on small replies."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        """Untrack the socket whatever happened on it."""
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, fmt: str, *args: Any) -> None:
        """Keep test output clean: the request log lives in ArchiveServer.requests."""

    def version_string(self) -> str:
        """CherryPy sends no Python version, so neither do we."""
        return self.server_version

    def do_GET(self) -> None:
        """Entry point for GET."""
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        """Entry point for HEAD."""
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        """Entry point for POST."""
        self._dispatch("POST")

    def do_PUT(self) -> None:
        """Entry point for PUT."""
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        """Entry point for DELETE."""
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        """The reference moves files on PATCH; cartd never does, so refuse it."""
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        """CherryPy's MethodDispatcher answers 405 to verbs it lacks."""
        self._dispatch("OPTIONS")

    @property
    def archive(self) -> ArchiveServer:
        """The ArchiveServer whose state this connection serves."""
        return self.server.archive

    def _dispatch(self, verb: str) -> None:
        """Route one request, turning routing failures into CherryPy errors."""
        self.verb = verb
        raw, _, query = self.path.partition("?")
        self.file_id = unquote(raw[1:] if raw.startswith("/") else raw)
        if self.archive.is_down():
            self._no_answer()
            return
        with self.archive.answering():
            try:
                self._route(verb, raw, query)
            except _RouteError as err:
                self._error(err.code, err.message, err.detail)

    def _route(self, verb: str, raw: str, query: str) -> None:
        """Validate like CherryPy does, then apply any fault, then serve."""
        if verb != "PUT":
            self._drain_body()
        params = self._check_route(verb, raw, query)
        if not self.file_id:
            self._send_chunked(
                200, "application/json", json.dumps({"message": UP_MESSAGE}).encode()
            )
            return
        entry = self.archive.lookup(self.file_id)
        fault = self.archive.take_fault(verb, self.file_id, entry is not None)
        if fault is not None and self._apply_fault(fault):
            return
        self._serve(verb, entry, fault, params)

    def _check_route(self, verb: str, raw: str, query: str) -> dict[str, list[str]]:
        """Reproduce the 4xx answers of CherryPy's MethodDispatcher."""
        if verb in ("PATCH", "OPTIONS"):
            raise _RouteError(405)
        if verb in ("POST", "PUT") and not self._has_body_framing():
            raise _RouteError(411)
        if "/" in raw.lstrip("/"):
            raise _RouteError(404)
        if not self.file_id and verb != "GET":
            raise _RouteError(404, "Missing parameters: filepath")
        params = parse_qs(query, keep_blank_values=True)
        unexpected = sorted(set(params) - ({"byte_range"} if verb == "GET" else set()))
        if unexpected:
            raise _RouteError(404, "Unexpected query string parameters: " + ", ".join(unexpected))
        return params

    def _has_body_framing(self) -> bool:
        """CherryPy answers 411 to a POST or PUT that frames no body at all."""
        return "Content-Length" in self.headers or "Transfer-Encoding" in self.headers

    def _drain_body(self) -> None:
        """Consume a body nobody needs, so the keep-alive connection stays in sync."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return
        try:
            remaining = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            remaining = 0
            self.close_connection = True
        while remaining > 0:
            data = self.rfile.read(min(CHUNK_SIZE, remaining))
            if not data:
                break
            remaining -= len(data)

    def _apply_fault(self, kind: str) -> bool:
        """Answer with the fault, or return False when it only alters the reply."""
        if kind in ("500", "503"):
            self._error(int(kind))
        elif kind == "drop":
            self._no_answer()
        elif kind == "hang":
            self._no_answer()  # logged now, so count() sees requests still hanging
            self.server.stopping.wait()
        else:
            return False
        return True

    def _serve(
        self, verb: str, entry: _Entry | None, fault: str | None, params: dict[str, list[str]]
    ) -> None:
        """Run the verb's handler, or report the file missing as the reference does."""
        if verb == "PUT":
            self._put()
        elif entry is None or not entry.path.is_file():
            self._missing()
        elif verb == "HEAD":
            self._head(entry, fault)
        elif verb == "POST":
            self.archive.stage(self.file_id)
            self._json(200, {"message": "File was staged", "file": self.file_id})
        elif verb == "GET":
            self._get(entry, fault, params)
        else:
            self.archive.remove_file(self.file_id)
            self._reply(200, "text/html;charset=utf-8", b"")

    def _missing(self) -> None:
        """The posix backend fails open() with ENOENT, which CherryPy turns into 500."""
        path = self.archive.blob_path(self.file_id)
        detail = (
            "pacifica.archiveinterface.exception.ArchiveInterfaceError: Can't open posix file"
            f" with error: [Errno 2] No such file or directory: '{path}'"
        )
        status = self.archive.missing_status
        message = (
            None if status == 500 else "Can't open posix file with error: No such file or directory"
        )
        self._error(status, message, detail)

    def _head(self, entry: _Entry, fault: str | None) -> None:
        """Status headers exactly as archive_utils.file_status writes them."""
        stat = entry.path.stat()
        media = entry.media(time.monotonic())
        if fault == "media_error":
            media = "error"
        headers = [
            ("X-Pacifica-Messsage", "File was found"),
            ("X-Pacifica-File", str(entry.path)),
            ("X-Content-Length", str(stat.st_size)),
            ("Last-Modified", str(float(entry.mtime))),
            ("X-Pacifica-Ctime", str(stat.st_ctime)),
            ("X-Pacifica-Bytes-Per-Level", _levels(media, stat.st_size)),
            ("X-Pacifica-File-Storage-Media", media),
        ]
        if fault == "no_media":
            headers.pop()
        self._reply(204, "application/json", b"", headers)

    def _get(self, entry: _Entry, fault: str | None, params: dict[str, list[str]]) -> None:
        """Stream the file, or the reference's exclusive-end byte_range slice of it."""
        size = entry.path.stat().st_size
        start, end = 0, size
        if "byte_range" in params:
            start, end = self._byte_range(params["byte_range"][-1])
        self._start_stream(200, "application/octet-stream")
        limit = max(end - start, 0)
        if fault in ("truncate", "reset"):
            limit //= 2
        stream = self.archive.open_stream(self.file_id)
        try:
            with entry.path.open("rb") as fh:
                fh.seek(start)
                for data in _read_chunks(fh, limit):
                    self._write_chunk(_flip(data) if fault == "corrupt" else data)
                    if self.archive.get_chunk_delay > 0:
                        self.server.stopping.wait(self.archive.get_chunk_delay)
                    self._wait_for_gate()
            if fault == "reset":
                self._reset()
            else:
                self._end_stream()
                self.wfile.flush()
                stream.whole = fault is None
        finally:
            stream.ended = time.monotonic()

    def _wait_for_gate(self) -> None:
        """Hold the stream after each chunk while the test keeps the gate closed."""
        gate = self.archive.get_gate
        while gate is not None and not gate.wait(0.05) and not self.server.stopping.is_set():
            pass

    @staticmethod
    def _byte_range(value: str) -> tuple[int, int]:
        """Parse the reference's ``?byte_range=start-end`` (end exclusive)."""
        try:
            start_text, end_text = value.split("-")
            return int(start_text), int(end_text)
        except ValueError:
            detail = (
                "pacifica.archiveinterface.exception.ArchiveInterfaceError:"
                f" Invalid byte range format (int-int) given {value}"
            )
            raise _RouteError(500, None, detail) from None

    def _put(self) -> None:
        """Store an upload the way the reference does, answering 201 with its size."""
        if "Content-Length" not in self.headers:
            self.close_connection = True
            detail = (
                "pacifica.archiveinterface.exception.ArchiveInterfaceError: Can't get file"
                " content length with error: int() argument must be a string, a bytes-like"
                " object or a real number, not 'NoneType'"
            )
            raise _RouteError(500, None, detail)
        length = self._content_length()
        if not self.archive.store_upload(self.file_id, self.rfile, length):
            self._no_answer()
            return
        self._json(201, {"message": "File added to archive", "total_bytes": length})

    def _content_length(self) -> int:
        """A garbled length cannot be honoured; say so instead of crashing the thread."""
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _RouteError(400, "Invalid Content-Length")
        return length

    def _json(self, code: int, payload: dict[str, Any]) -> None:
        """JSON replies are built by CherryPy's json_out with ensure_ascii on."""
        self._reply(code, "application/json", json.dumps(payload).encode())

    def _error(self, code: int, message: str | None = None, detail: str = "") -> None:
        """Every archive error is CherryPy's JSON error page."""
        detail = detail or f"cherrypy._cperror.HTTPError: ({code}, None)"
        self._reply(code, "application/json", _error_body(code, message, detail))

    def _reply(
        self,
        code: int,
        content_type: str,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Send a sized reply; HEAD gets the would-be Content-Length, as CherryPy does."""
        self._send_status(code, content_type)
        for name, value in headers or []:
            self.send_header(name, value)
        if code != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.archive.record(self.verb, self.file_id, code)
        if self.verb != "HEAD":
            self.wfile.write(body)

    def _send_status(self, code: int, content_type: str) -> None:
        """Status line and the headers CherryPy puts on every reply, in its order."""
        self.send_response_only(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())
        self.send_header("Allow", ALLOW)
        if self.headers.get("Connection", "").lower() == "close":
            self.send_header("Connection", "close")

    def _send_chunked(self, code: int, content_type: str, body: bytes) -> None:
        """CherryPy streams GET replies, so even the banner comes chunked."""
        self._start_stream(code, content_type)
        self._write_chunk(body)
        self._end_stream()

    def _chunked(self) -> bool:
        """HTTP/1.0 clients cannot take chunks; they get the bytes and a close."""
        return self.request_version != "HTTP/1.0"

    def _start_stream(self, code: int, content_type: str) -> None:
        """Send streamed headers: no Content-Length, like the reference."""
        self._send_status(code, content_type)
        if self._chunked():
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        self.archive.record(self.verb, self.file_id, code)

    def _write_chunk(self, data: bytes) -> None:
        """Write one chunk, framed only when the client speaks HTTP/1.1."""
        if not data or self.verb == "HEAD":
            return
        if self._chunked():
            self.wfile.write(b"%x\r\n" % len(data))
            self.wfile.write(data)
            self.wfile.write(b"\r\n")
        else:
            self.wfile.write(data)

    def _end_stream(self) -> None:
        """Close the chunked body cleanly, so a short body looks like a whole one."""
        if self._chunked() and self.verb != "HEAD":
            self.wfile.write(b"0\r\n\r\n")

    def _no_answer(self) -> None:
        """Close without a status line, like a dead or crashed archive."""
        self.archive.record(self.verb, self.file_id, NO_ANSWER)
        self.close_connection = True

    def _reset(self) -> None:
        """Abort with a TCP RST after giving the client a moment to read the start."""
        self.close_connection = True
        self.server.stopping.wait(RESET_GRACE)
        linger = struct.pack("ii", 1, 0)
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()
        except OSError:
            pass


class ArchiveServer:
    """An in-process archive interface for tests and benchmarks.

    File bytes live on disk under ``root`` so that large files cost no memory;
    metadata (mtime, tape state) lives in memory so tests can fake it freely.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        missing_status: int = 500,
    ) -> None:
        """Configure only; nothing listens until start()."""
        self.root = Path(root)
        self.host = host
        self.port = port
        self.missing_status = missing_status
        self.requests: list[tuple[str, str, int]] = []
        self.streams: list[GetStream] = []
        self.get_chunk_delay: float = 0.0
        # While set to an unset Event, every GET stops after each chunk until it is set.
        self.get_gate: threading.Event | None = None
        self.put_tape_delay: float = 0.0
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._faults: list[_Fault] = []
        self._down = False
        self._chaos: _Chaos | None = None
        self.injected: Counter[tuple[str, str]] = Counter()
        self.peak_in_flight = 0  # the most requests it was answering at once
        self._in_flight = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL with a trailing slash; it stays the same across restarts."""
        if self.port == 0:
            raise RuntimeError("ArchiveServer has not been started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ArchiveServer:
        """Listen in a background thread; a restart reuses the first port."""
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self.port), self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"archive-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly, cutting hanging and idle keep-alive connections."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = None
        self._thread = None
        httpd.cut_all()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Count a request while it is answered, for `peak_in_flight`."""
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def __enter__(self) -> ArchiveServer:
        """Start on entry so ``with ArchiveServer(tmp) as archive`` just works."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop on exit, even when the test failed."""
        self.stop()

    def add_file(
        self,
        file_id: str,
        data: bytes,
        *,
        mtime: float | None = None,
        tape_delay: float = 0.0,
    ) -> None:
        """Write the bytes under root, atomically so a GET in flight keeps the old ones."""
        _check_delay(tape_delay)
        path, tmp = self._new_blob(file_id)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._register(file_id, _Entry(path, self._mtime(path, mtime), tape_delay, owned=True))

    def add_path(
        self,
        file_id: str,
        path: Path,
        *,
        mtime: float | None = None,
        tape_delay: float = 0.0,
    ) -> None:
        """Serve an existing file in place, so benchmarks need not copy gigabytes."""
        _check_delay(tape_delay)
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"not a regular file: {path}")
        self._register(file_id, _Entry(path, self._mtime(path, mtime), tape_delay, owned=False))

    def remove_file(self, file_id: str) -> None:
        """Forget a file (idempotent); later requests for it see a missing file."""
        with self._lock:
            entry = self._entries.pop(file_id, None)
        if entry is not None and entry.owned:
            entry.path.unlink(missing_ok=True)

    def inject(self, verb: str, kind: str, *, file_id: str | None = None, times: int = 1) -> None:
        """Queue a fault for the next ``times`` matching requests, oldest first."""
        verb = verb.upper()
        if kind not in FAULT_VERBS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_VERBS)}")
        if verb not in FAULT_VERBS[kind]:
            raise ValueError(f"fault {kind!r} does not apply to {verb}")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(_Fault(verb, kind, file_id, times))

    def set_down(self, down: bool) -> None:
        """While down, every connection is closed unanswered, like a dead archive."""
        self._down = down

    def open_stream(self, file_id: str) -> GetStream:
        """Log a GET body starting now; its handler fills in how it ended."""
        stream = GetStream(file_id, time.monotonic())
        with self._lock:
            self.streams.append(stream)
        return stream

    def count(self, verb: str, file_id: str | None = None) -> int:
        """Count received requests, including the unanswered ones."""
        verb = verb.upper()
        with self._lock:
            return sum(1 for v, f, _ in self.requests if v == verb and file_id in (None, f))

    def is_down(self) -> bool:
        """Whether set_down(True) is in force."""
        return self._down

    def lookup(self, file_id: str) -> _Entry | None:
        """The entry for an id, or None when the archive lacks it."""
        with self._lock:
            return self._entries.get(file_id)

    def chaos(self, rate: float, seed: int, kinds: Sequence[str] = TRANSIENT_KINDS) -> None:
        """Fail about `rate` of all requests with a random fault from `kinds` (0 turns it off).

        Seeded, so a soak run's faults come from a reproducible stream; which request
        draws which fault still depends on the order requests arrive in.
        """
        for kind in kinds:
            if kind not in FAULT_VERBS:
                raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._chaos = _Chaos(rate, random.Random(seed), tuple(kinds)) if rate > 0 else None

    def take_fault(self, verb: str, file_id: str, exists: bool) -> str | None:
        """Consume one use of the oldest fault that matches this request, else maybe chaos."""
        with self._lock:
            kind = None
            for fault in self._faults:
                if fault.matches(verb, file_id, exists):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    kind = fault.kind
                    break
            if kind is None and self._chaos is not None:
                kind = self._chaos.draw(verb, exists)
            if kind is not None:
                self.injected[(verb, kind)] += 1
            return kind

    def stage(self, file_id: str) -> None:
        """Start the emulated tape recall; later POSTs do not restart it."""
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None and entry.staged_at is None:
                entry.staged_at = time.monotonic()

    def record(self, verb: str, file_id: str, status: int) -> None:
        """Log a request; status 0 means no answer was sent."""
        with self._lock:
            self.requests.append((verb, file_id, status))

    def blob_path(self, file_id: str) -> Path:
        """Hash ids into flat names: ids may hold '/', '..' or be very long."""
        digest = hashlib.sha256(file_id.encode("utf-8", "surrogatepass")).hexdigest()
        return self.root / digest

    def _new_blob(self, file_id: str) -> tuple[Path, Path]:
        """Pick the final and a unique temporary path, so writes can be atomic."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.blob_path(file_id)
        return path, path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")

    def store_upload(self, file_id: str, body: io.BufferedIOBase, length: int) -> bool:
        """Stream a PUT body to disk; False when the client hung up part way."""
        path, tmp = self._new_blob(file_id)
        with tmp.open("wb") as fh:
            remaining = length
            while remaining > 0:
                data = body.read(min(CHUNK_SIZE, remaining))
                if not data:
                    break
                fh.write(data)
                remaining -= len(data)
        if remaining > 0:
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, path)
        entry = _Entry(path, time.time(), self.put_tape_delay, owned=True)
        self._register(file_id, entry)
        return True

    def _register(self, file_id: str, entry: _Entry) -> None:
        """Replace any previous entry, deleting its bytes unless another id uses them."""
        with self._lock:
            old = self._entries.get(file_id)
            self._entries[file_id] = entry
        if old is not None and old.owned and old.path != entry.path:
            old.path.unlink(missing_ok=True)

    @staticmethod
    def _mtime(path: Path, mtime: float | None) -> float:
        """A fake mtime wins; the file's own is the fallback."""
        return path.stat().st_mtime if mtime is None else float(mtime)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options for serving a directory by hand."""
    parser = argparse.ArgumentParser(description="Serve DIR as a Pacifica archive interface.")
    parser.add_argument("--root", required=True, type=Path, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tape-delay", type=float, default=0.0, help="seconds from POST to disk")
    parser.add_argument("--missing-status", type=int, default=500)
    return parser.parse_args(argv)


def serve_directory(server: ArchiveServer, root: Path, tape_delay: float) -> int:
    """Publish every regular file under root by its relative path, skipping PUT storage."""
    count = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if STORE_DIR_NAME in relative.parts or not path.is_file():
            continue
        server.add_path(relative.as_posix(), path, tape_delay=tape_delay)
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    """Serve a directory until interrupted."""
    args = _parse_args(argv)
    root = args.root.resolve()
    server = ArchiveServer(root / STORE_DIR_NAME, args.host, args.port, args.missing_status)
    server.put_tape_delay = args.tape_delay
    count = serve_directory(server, root, args.tape_delay)
    server.start()
    print(f"serving {count} files from {root} at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
