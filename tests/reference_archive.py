"""Run the reference archive interface (pacifica-archiveinterface 0.4.2, posix) for tests.

The server lives in its own virtualenv, built with::

    python3.11 -m venv VENV
    VENV/bin/pip install -r requirements/archiveinterface.txt

and ``reference_archive(prefix, venv)`` starts it on a free loopback port and yields its base
URL, ``http://127.0.0.1:PORT/`` (with the trailing slash).

Placing files
-------------
With the default config (``[posix] use_id2filename = false``; this module points
``ARCHIVEINTERFACE_CONFIG`` at an empty file so a stray ``~/.pacifica-archiveinterface``
cannot change that), a file id maps to a path like this: the server percent-decodes the
single URL path segment, strips ONE leading ``/``, and joins the rest onto the prefix. So id
``foo.txt`` is ``PREFIX/foo.txt``, integer id ``1234`` is ``PREFIX/1234``, and id
``1/2/bar.csv`` (sent as ``1%2F2%2Fbar.csv``) is ``PREFIX/1/2/bar.csv``. Percent-encode the id
as one segment (``urllib.parse.quote(str(file_id), safe="")``). A literal ``+`` stays a ``+``.
An unencoded ``/`` does NOT work: ``GET /1/2/bar.csv`` opens ``PREFIX/1`` and gives 500,
and ``HEAD``/``POST`` with several segments give 404.

So tests place files by writing them straight under the prefix (``place_file`` below), which
also lets them choose the mtime. ``PUT`` works too (``curl -T file URL/<encoded id>`` gives 201
``{"message": "File added to archive", "total_bytes": N}`` and a 0444 file), but it ignores
``Last-Modified`` (the mtime becomes the upload time).

Wire behaviour observed (CherryPy 18.10.0 / cheroot 11.1.2)
-----------------------------------------------------------
Every reply carries ``Server: CherryPy/18.10.0``, ``Date`` and
``Allow: DELETE, GET, HEAD, PATCH, POST, PUT``.

``GET /``: 200, ``Content-Type: application/json``, chunked,
``{"message": "Pacifica Archive Interface Up and Running"}``. (``HEAD /`` is 404.)

``POST /<id>``: 200, ``Content-Type: application/json``, ``Content-Length: 49``-ish,
``{"message": "File was staged", "file": "<decoded id>"}``. A POST WITHOUT a
``Content-Length`` header gets **411** ``Length Required`` (``curl -X POST`` with no body
does that); httpx sends ``Content-Length: 0`` and is fine.

``HEAD /<id>``: 204, no ``Content-Length``, and these headers (values are ``str()`` of Python
values)::

    Content-Type: application/json
    X-Pacifica-Messsage: File was found            (sic, three "s")
    X-Pacifica-File: /abs/prefix/path/of/the/file   (absolute server-side path)
    X-Content-Length: 12
    Last-Modified: 1795841564.1163788              (float epoch, os.path.getmtime)
    X-Pacifica-Ctime: 1795841564.116632             (float epoch)
    X-Pacifica-Bytes-Per-Level: (12,)               (Python tuple repr; (0,) when empty)
    X-Pacifica-File-Storage-Media: disk             (posix: always disk)

``GET /<id>``: 200, ``Content-Type: application/octet-stream``,
``Transfer-Encoding: chunked``, no ``Content-Length``; chunks of up to 1 MiB. An empty file
is a 200 with a zero-length chunked body. ``GET /<id>?byte_range=S-E`` returns bytes
``[S, E)`` (200, chunked).

Missing file: ``POST``, ``HEAD`` and ``GET`` all answer **500** (never 404) with
``Content-Type: application/json`` and a body
``{"status": "500 Internal Server Error", "message": "The server encountered an unexpected
condition which prevented it from fulfilling the request.", "traceback": "...Can't open
posix file with error: [Errno 2] No such file or directory: '...'", "version": "18.10.0"}``
(HEAD has the Content-Length of that body but no body). A side effect: the missing file's
parent directories are created under the prefix. An id that is a directory gives 500 too
(``[Errno 21] Is a directory``).

Concurrency: the server shares ONE open-file slot between all requests. Concurrent GETs
(even against different ids) return truncated bodies, bodies cut off mid-chunk
(``incomplete chunked read``), and complete-looking 200 bodies holding the WRONG bytes (0
bytes, or other files' data). Sequential GETs are always correct. Only the size and checksum
checks catch this, so tests that need a clean transfer must let cartd use one connection at
a time against this server; tests with parallel transfers must expect retries.

``DELETE /<id>``: 200. ``..%2F`` in an id escapes the prefix (the reference server does not
guard against it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

__all__ = [
    "ReferenceArchiveError",
    "archive_path",
    "archive_url",
    "place_file",
    "reference_archive",
]

_UP_MESSAGE = "Pacifica Archive Interface Up and Running"
_EXECUTABLE = "pacifica-archiveinterface"
_PORT_ATTEMPTS = 3


class ReferenceArchiveError(RuntimeError):
    """The reference archive could not be started."""


def archive_path(prefix: Path, file_id: str | int) -> Path:
    """Return where the posix backend keeps ``file_id`` under ``prefix``.

    Mirrors the server: one leading ``/`` is stripped and the rest is joined onto the prefix.
    """
    return prefix / str(file_id).removeprefix("/")


def place_file(
    prefix: Path, file_id: str | int, data: bytes, *, mtime: float | None = None
) -> Path:
    """Write ``data`` where the server will find ``file_id``; optionally set its mtime."""
    path = archive_path(prefix, file_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def archive_url(base_url: str, file_id: str | int) -> str:
    """Return the URL of ``file_id``: the id percent-encoded as ONE path segment."""
    return base_url + urllib.parse.quote(str(file_id), safe="")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cherrypy_config(port: int, thread_pool: int | None = None) -> str:
    # Values are Python literals (CherryPy evaluates them). socket_host/socket_port here
    # override the -a/-p command line options.
    pool = "" if thread_pool is None else f"server.thread_pool: {thread_pool}\n"
    return (
        "[global]\n"
        "server.socket_host: '127.0.0.1'\n"
        f"server.socket_port: {port}\n"
        f"{pool}"
        "server.shutdown_timeout: 1\n"
        "engine.autoreload.on: False\n"
        "checker.on: False\n"
        "log.screen: True\n"
        "\n"
        "[/]\n"
        "request.dispatch: cherrypy.dispatch.MethodDispatcher()\n"
    )


def _is_up(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url, timeout=2) as resp:
            body = json.loads(resp.read())
            return bool(resp.status == HTTPStatus.OK and body.get("message") == _UP_MESSAGE)
    except (OSError, ValueError):
        return False


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def reference_archive(
    prefix: Path,
    venv: Path,
    *,
    startup_timeout: float = 30.0,
    stop_grace: float = 5.0,
    thread_pool: int | None = None,
) -> Iterator[str]:
    """Run pacifica-archiveinterface (posix backend, files under ``prefix``).

    Yields the base URL ``http://127.0.0.1:PORT/``. The server is stopped with SIGTERM on
    exit, and SIGKILL after ``stop_grace`` seconds. ``thread_pool=1`` serves one request at a
    time, as sites running it must (see Concurrency above); None keeps CherryPy's default.
    Raises ReferenceArchiveError, with the server's output, if it is not answering
    ``GET /`` within ``startup_timeout`` seconds.
    """
    exe = venv / "bin" / _EXECUTABLE
    if not exe.is_file():
        msg = (
            f"{exe} not found: create the venv and run "
            f"'{venv / 'bin' / 'pip'} install -r requirements/archiveinterface.txt'"
        )
        raise ReferenceArchiveError(msg)
    prefix = prefix.resolve()
    prefix.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="reference-archive-") as tmp:
        tmpdir = Path(tmp)
        ai_config = tmpdir / "config.ini"
        ai_config.write_text("")  # defaults: [posix] use_id2filename = false
        cp_config = tmpdir / "cpconfig.ini"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["ARCHIVEINTERFACE_CONFIG"] = str(ai_config)
        env["ARCHIVEINTERFACE_CPCONFIG"] = str(cp_config)
        env["PYTHONUNBUFFERED"] = "1"

        failures: list[str] = []
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _free_port()
            base_url = f"http://127.0.0.1:{port}/"
            cp_config.write_text(_cherrypy_config(port, thread_pool))
            stdout_path = tmpdir / f"stdout.{attempt}.log"
            stderr_path = tmpdir / f"stderr.{attempt}.log"
            with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
                proc = subprocess.Popen(
                    [str(exe), "-t", "posix", "--prefix", str(prefix)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=tmpdir,
                    start_new_session=True,
                )
            try:
                up = False
                deadline = time.monotonic() + startup_timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    # Ask proc.poll() again: an answer on a port we lost would not be ours.
                    if _is_up(base_url) and proc.poll() is None:
                        up = True
                        break
                    time.sleep(0.1)
                if up:
                    yield base_url
                    return
                code = proc.poll()
                _stop(proc, stop_grace)
                stderr = _tail(stderr_path)
                why = (
                    f"exited with code {code}"
                    if code is not None
                    else f"did not answer GET {base_url} within {startup_timeout:g}s"
                )
                failures.append(
                    f"attempt {attempt} (port {port}): {why}\n"
                    f"--- stderr ---\n{stderr}\n"
                    f"--- stdout ---\n{_tail(stdout_path)}"
                )
                if code is None or "not free" not in stderr:
                    break  # only a lost race for the port is worth another try
            finally:
                _stop(proc, stop_grace)
        msg = "pacifica-archiveinterface did not come up:\n" + "\n".join(failures)
        raise ReferenceArchiveError(msg)
