"""cartd-client end to end against the real service, through a loopback TCP proxy that can
cut a download part-way or hide /events (as a pacifica-cartd 0.7.0 server would)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archive_server import CHUNK_SIZE, ArchiveServer
from cartd import client
from conftest import MTIME, Service, entry, free_port

EVENTS_404 = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)
METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ")


class Proxy:
    """Forwards loopback TCP to the service and records each request line it sees.

    A chunk from the client that starts with a method is a new request (httpx never
    pipelines).  `cuts` download responses are cut after `cut_after` bytes; with
    `hide_events` a GET of /events gets a 404 and the connection closes.
    """

    def __init__(self, upstream: int, cut_after: int = 0, cuts: int = 0) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = cuts
        self.hide_events = False
        self.requests: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            budget: list[int | None] = [None]  # bytes left before the cut, per connection
            pumps = [
                (self._requests, downstream, upstream, budget),
                (self._responses, upstream, downstream, budget),
            ]
            for target, *args in pumps:
                threading.Thread(target=target, args=args, daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        while data := _recv(src):
            if data.startswith(METHODS):
                line = data.split(b"\r\n", 1)[0].decode()
                self.requests.append(line + "\n" + data.decode(errors="replace"))
                if self.hide_events and "/events" in line:
                    _send(src, EVENTS_404)
                    break
                if line.startswith("GET ") and "filename=" in line and self.cuts:
                    self.cuts -= 1
                    budget[0] = self.cut_after
            if not _send(dst, data):
                break
        _close(src, dst)

    def _responses(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        while data := _recv(src):
            left = budget[0]
            if left is not None and len(data) >= left:
                _send(dst, data[:left])
                break
            if left is not None:
                budget[0] = left - len(data)
            if not _send(dst, data):
                break
        _close(src, dst)

    def lines(self, start: str) -> list[str]:
        return [r.split("\n", 1)[0] for r in self.requests if r.startswith(start)]

    def heads(self, start: str) -> list[str]:
        return [r.split("\n", 1)[1] for r in self.requests if r.startswith(start)]


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    """False once the other pump has closed the connection."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def proxy(service: Service) -> Iterator[Proxy]:
    started = Proxy(service.thread.port)
    yield started
    started.close()


FILES = {
    "top.txt": b"hello\n",
    "a/b/nested.bin": os.urandom(3 * CHUNK_SIZE + 123),
    "a/empty": b"",
    "sp ace/ünï.txt": b"unicode names survive",
}


def publish(archive: ArchiveServer, tmp: Path, files: dict[str, bytes] = FILES) -> Path:
    """Put the files in the archive and write CART.json (with pacifica's leading '/')."""
    fileids: list[dict[str, Any]] = []
    for index, (path, data) in enumerate(files.items()):
        archive.add_file(f"id-{index}", data, mtime=MTIME)
        hashtype = "sha256" if index % 2 else "sha1"
        fileids.append(entry(f"id-{index}", "/" + path if index == 0 else path, data, hashtype))
    cart = tmp / "cart.json"
    cart.write_text(json.dumps({"fileids": fileids}))
    return cart


def extracted(top: Path) -> dict[str, bytes]:
    return {
        p.relative_to(top).as_posix(): p.read_bytes() for p in top.rglob("*") if p.is_file()
    }


def run(cart: Path, out: Path, url: str, *extra: str) -> int:
    return client.main(["get", str(cart), "-o", str(out), "--url", url, "--quiet", *extra])


def test_get_stages_downloads_extracts_and_verifies(
    service: Service, archive: ArchiveServer, proxy: Proxy, tmp_path: Path
) -> None:
    cart = publish(archive, tmp_path)
    out = tmp_path / "out"
    assert run(cart, out, proxy.url, "--cart-id", "mine") == 0
    assert extracted(out / "cart") == FILES
    assert sorted(p.name for p in out.iterdir()) == ["cart"]  # no tar, no .part left
    assert proxy.lines("GET /mine/events?files=0")  # watched the stream ...
    assert not proxy.lines("HEAD ")  # ... and never needed to poll


def test_interrupted_download_resumes_byte_identical(
    service: Service, archive: ArchiveServer, proxy: Proxy, tmp_path: Path
) -> None:
    cart = publish(archive, tmp_path)
    out = tmp_path / "out"
    proxy.cut_after, proxy.cuts = CHUNK_SIZE + 4321, 2  # two cuts: resume twice
    code = run(cart, out, proxy.url, "--cart-id", "c", "--name", "x.tar", "--keep-tar")
    assert code == 0
    whole = service.client.get("/c", params={"filename": "x.tar"})
    assert (out / "x.tar").read_bytes() == whole.content
    assert extracted(out / "x") == FILES
    gets = proxy.heads("GET /c?filename=x.tar")
    assert len(gets) == 3
    assert "range:" not in gets[0].lower()
    for head in gets[1:]:
        assert "range: bytes=" in head.lower()
        assert f"if-range: {whole.headers['etag']}".lower() in head.lower()


def test_rerun_resumes_a_part_left_by_a_failed_run(
    service: Service, archive: ArchiveServer, proxy: Proxy, tmp_path: Path
) -> None:
    """A new run posts a new cart; the same content has the same ETag, so If-Range holds."""
    cart = publish(archive, tmp_path)
    out = tmp_path / "out"
    proxy.cut_after, proxy.cuts = 2 * CHUNK_SIZE, 1
    assert run(cart, out, proxy.url, "--retries", "0", "--cart-id", "one") == 2
    part = out / "cart.tar.part"
    assert 0 < part.stat().st_size <= 2 * CHUNK_SIZE
    assert (out / "cart.tar.part.etag").is_file()

    assert run(cart, out, proxy.url, "--cart-id", "two", "--keep-tar") == 0
    (resumed,) = proxy.heads("GET /two?filename=")
    assert "range: bytes=" in resumed.lower()
    whole = service.client.get("/one", params={"filename": "cart.tar"}).content
    assert (out / "cart.tar").read_bytes() == whole
    assert extracted(out / "cart") == FILES
    assert not part.exists()


def test_falls_back_to_head_polling_without_events(
    service: Service, archive: ArchiveServer, proxy: Proxy, tmp_path: Path
) -> None:
    proxy.hide_events = True
    archive.add_file("slow", b"from tape", tape_delay=1.0)
    cart = tmp_path / "c.json"
    cart.write_text(json.dumps({"fileids": [entry("slow", "s.txt", b"from tape")]}))
    assert run(cart, tmp_path / "out", proxy.url, "--cart-id", "p", "--poll-max", "0.05") == 0
    assert (tmp_path / "out" / "c" / "s.txt").read_bytes() == b"from tape"
    assert proxy.lines("GET /p/events")
    assert len(proxy.lines("HEAD /p ")) >= 2  # polled until it left staging


def test_cart_error_exits_1_with_the_server_message(
    service: Service, archive: ArchiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive.add_file("f", b"bytes")
    cart = tmp_path / "c.json"
    cart.write_text(json.dumps({"fileids": [{**entry("f", "f", b"bytes"), "hashsum": "0" * 40}]}))
    assert run(cart, tmp_path / "out", service.url) == 1
    assert "File hash does not match provided hash" in capsys.readouterr().err

    cart.write_text(json.dumps({"fileids": [entry("f", "../escape", b"bytes")]}))
    assert run(cart, tmp_path / "out", service.url) == 1
    assert "refused" in capsys.readouterr().err


def test_usage_and_io_errors_exit_2(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path / "missing.json", tmp_path / "out", service.url) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert run(tmp_path / "bad.json", tmp_path / "out", service.url) == 2
    cart = tmp_path / "c.json"
    cart.write_text(json.dumps({"fileids": [entry("f", "f", b"x")]}))
    assert run(cart, tmp_path / "out", f"http://127.0.0.1:{free_port()}") == 2
    (tmp_path / "out" / "c").mkdir(parents=True)
    assert run(cart, tmp_path / "out", service.url) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        client.main(["get", str(cart)])  # -o is required
    assert exited.value.code == 2


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "cartd-client"
    result = subprocess.run(
        [str(script), "get", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "--url" in result.stdout


# --- extraction and verification, without a server -----------------------------------------


def _tar(tmp: Path, members: dict[str, bytes]) -> Path:
    path = tmp / "b.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_manifest_is_preferred_and_checked(tmp_path: Path) -> None:
    odd = "we\\ird\nname"
    escaped = odd.replace("\\", "\\\\").replace("\n", "\\n")  # as GNU sha256sum writes it
    manifest = f"# written by cartd\n{_sha256(b'1')}  x/one\n\\{_sha256(b'2')}  {escaped}\n"
    members = {"top/x/one": b"1", f"top/{odd}": b"2", "top/MANIFEST.sha256": manifest.encode()}
    fileids = [entry("a", "x/one", b"1"), entry("b", odd, b"2")]
    assert client.extract_and_verify(_tar(tmp_path, members), tmp_path / "top", fileids) == (
        client.MANIFEST
    )

    bad = {**members, "top/x/one": b"tampered"}
    with pytest.raises(client.CartFailed, match="sha256 does not match"):
        client.extract_and_verify(_tar(tmp_path, bad), tmp_path / "again" / "top", fileids)


def test_cart_json_hashes_checked_without_a_manifest(tmp_path: Path) -> None:
    fileids = [entry("a", "/f.txt", b"right")]
    ok = _tar(tmp_path, {"top/f.txt": b"right"})
    assert client.extract_and_verify(ok, tmp_path / "top", fileids) == "CART.json"
    wrong = _tar(tmp_path, {"top/f.txt": b"wrong"})
    with pytest.raises(client.CartFailed, match="sha1 does not match"):
        client.extract_and_verify(wrong, tmp_path / "2" / "top", fileids)
    with pytest.raises(client.CartFailed, match="missing"):
        client.extract_and_verify(ok, tmp_path / "3" / "top", [entry("b", "g", b"")])


def test_members_escaping_the_directory_are_refused(tmp_path: Path) -> None:
    evil = _tar(tmp_path, {"top/../../evil": b"x"})
    with pytest.raises(client.CartFailed, match="not a valid tar"):
        client.extract_and_verify(evil, tmp_path / "out" / "top", [])
    assert not (tmp_path / "evil").exists()


def test_progress_rendering() -> None:
    line = client.render("download", 5 << 20, 10 << 20, "2/4 files", width=10)
    assert line == "download [#####-----]  50%  5.0 MiB / 10.0 MiB  2/4 files"
    assert client.render("staging", 3 << 20, None) == "staging  3.0 MiB"
    buffer = io.StringIO()
    quiet = client.Bar("x", enabled=False, stream=buffer)
    quiet.update(1, 2, force=True)
    quiet.close()
    assert buffer.getvalue() == ""
    loud = client.Bar("x", enabled=True, stream=buffer)
    loud.update(1, 2, force=True)
    loud.close()
    drawn = buffer.getvalue()
    assert drawn.startswith("\rx ")
    assert drawn.endswith("\n")
