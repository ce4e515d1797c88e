"""Metrics, health checks, structured logs and the reverse-proxy settings, on real services.

Metrics are parsed with prometheus_client's own parser and compared with what the test
did and with what the archive server saw; logs are read from a real `cartd serve` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import Headers

from archive_server import ArchiveServer
from cartd import health, logs
from cartd.api.access import request_id
from cartd.archive.base import ArchiveFileError, TransientArchiveError
from cartd.archive.metered import outcome_of
from cartd.runtime import Runtime
from cartd.settings import Settings
from cartd_proc import Cartd, cartd_env
from conftest import (
    DATABASES,
    FAST,
    MARIADB,
    MTIME,
    MakeService,
    Service,
    ServiceThread,
    assert_error,
    database,
    entry,
    make_ready,
    wait_for,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every label any cartd series may carry; none of them can hold a cart id.
LABELS = {"state", "verb", "outcome", "reason", "format", "kind", "method", "route", "status"}
LABELS |= {"le", "version"}  # histogram buckets, build info
OPENMETRICS = "application/openmetrics-text"


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a series over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def test_metrics_follow_staging_downloads_and_faults(
    service: Service, archive: ArchiveServer
) -> None:
    before = scrape(service.client)
    files = {"a.txt": b"a" * 1000, "b/c.bin": os.urandom(5000), "d": b"dd"}
    archive.inject("POST", "503")  # one transient fault: one retry
    make_ready(service, archive, "obs-ok", files)
    tar = service.client.get("/obs-ok")
    zipped = service.client.get("/obs-ok", params={"format": "zip"})
    assert (tar.status_code, zipped.status_code) == (200, 200)
    bad = b"bad" * 100
    archive.add_file("obs-bad-0", bad, mtime=MTIME)
    archive.inject("GET", "corrupt", file_id="obs-bad-0", times=2)  # wrong bytes, twice
    assert service.post("obs-bad", [entry("obs-bad-0", "x", bad)]).status_code == 201
    assert service.wait_settled("obs-bad")[1] == "error"
    after = scrape(service.client)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("cartd_files_staged_total") == 3
    assert grew("cartd_staged_bytes_total") == sum(len(data) for data in files.values())
    assert grew("cartd_served_bytes_total", format="tar") == len(tar.content)
    assert grew("cartd_served_bytes_total", format="zip") == len(zipped.content)
    assert grew("cartd_checksum_failures_total") == 2
    assert grew("cartd_archive_retries_total") == 1
    assert grew("cartd_archive_request_errors_total", verb="stage", outcome="transient") == 1
    assert grew("cartd_archive_request_errors_total") == 1
    for verb, http_verb in (("stage", "POST"), ("status", "HEAD"), ("open", "GET")):
        seen = grew("cartd_archive_request_duration_seconds_count", verb=verb)
        assert seen == archive.count(http_verb), verb
    assert total(after, "cartd_carts", state="ready") == 1
    assert total(after, "cartd_carts", state="error") == 1
    assert total(after, "cartd_carts", state="staging") == 0
    assert total(after, "cartd_queue_depth") == 0
    assert total(after, "cartd_fetches_in_flight") == 0
    assert total(after, "cartd_database_up") == 1
    space = {kind: total(after, "cartd_cache_bytes", kind=kind) for kind in ("used", "free")}
    assert 0 < space["used"] + space["free"] <= total(after, "cartd_cache_bytes", kind="total")
    assert total(after, "cartd_cache_bytes", kind="reserved") == 0


def test_state_gauges_show_the_queue_while_files_sit_on_tape(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(fetch_concurrency=1)
    fileids = []
    for index in range(3):
        archive.add_file(f"tape-{index}", b"t", mtime=MTIME, tape_delay=120)
        fileids.append(entry(f"tape-{index}", f"t{index}", b"t"))
    assert service.post("obs-tape", fileids).status_code == 201
    expected = {"cartd_fetches_in_flight": 1, "cartd_queue_depth": 2, "cartd_carts": 1}

    def gauges() -> dict[str, float]:
        samples = scrape(service.client)
        found = {name: total(samples, name) for name in expected}
        found["cartd_carts"] = total(samples, "cartd_carts", state="staging")
        return found

    wait_for(lambda: gauges() == expected, "one fetch polling the tape, two files queued")
    assert service.client.delete("/obs-tape").status_code == 200
    wait_for(lambda: set(gauges().values()) == {0}, "the queue to empty")


def test_expiry_counts_as_an_eviction(make_service: MakeService, archive: ArchiveServer) -> None:
    service = make_service(cart_ttl=0.2, cache_check_interval=0.1)
    archive.add_file("ttl-0", b"ttl", mtime=MTIME)
    assert service.post("obs-ttl", [entry("ttl-0", "f", b"ttl")]).status_code == 201

    def evictions() -> float:
        return total(scrape(service.client), "cartd_evictions_total", reason="expired")

    wait_for(lambda: evictions() == 1, "the cart to expire")
    assert service.state("obs-ttl")[0] == 404


def test_metric_labels_stay_bounded(service: Service, archive: ArchiveServer) -> None:
    """Cart ids, junk paths and invented methods never become label values."""
    make_ready(service, archive, "obs-label-cart", {"f": b"x"})
    for index in range(5):
        service.client.head(f"/no-such-cart-{index}")
        service.client.get(f"/junk/{index}/path")
        service.client.request("PROPFIND", f"/obs-label-{index}")
    samples = scrape(service.client)
    for (name, labels), _ in samples.items():
        assert {key for key, _ in labels} <= LABELS, name
        for _, label_value in labels:
            assert "obs-label" not in label_value
            assert "no-such-cart" not in label_value
            assert "junk" not in label_value
    routes = {dict(ls)["route"] for n, ls in samples if n == "cartd_http_requests_total"}
    assert routes <= {"/{cart_id}", "/{cart_id}/status", "unmatched", "/metrics"}, routes
    assert "/{cart_id}" in routes
    assert "unmatched" in routes
    openmetrics = service.client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert openmetrics.headers["content-type"].startswith(OPENMETRICS)
    assert openmetrics.text.endswith("# EOF\n")
    methods = {dict(ls)["method"] for n, ls in samples if n == "cartd_http_requests_total"}
    assert "other" in methods
    assert "PROPFIND" not in methods


def _runtime(service: Service) -> Runtime:
    runtime: Runtime = service.thread.server.config.app.state.runtime
    return runtime


def _not_ready(service: Service) -> dict[str, Any]:
    response = service.client.get("/readyz")
    assert_error(response, 503)
    body: dict[str, Any] = response.json()
    return body


def test_readyz_names_the_failed_check(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"message": "alive"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "volume": "ok", "worker": "ok"}
    # The volume is not writable: where cart directories go is a file now.
    carts = service.volume / "carts"
    carts.rename(service.volume / "carts.moved")
    carts.write_text("not a directory")
    try:
        body = _not_ready(service)
        assert body["checks"]["volume"].startswith("NotADirectoryError"), body
        assert body["checks"]["database"] == body["checks"]["worker"] == "ok"
        assert "volume: NotADirectoryError" in body["message"]
    finally:
        carts.unlink()
        (service.volume / "carts.moved").rename(carts)
    assert service.client.get("/readyz").status_code == 200
    # The worker dies.
    task = _runtime(service).worker._loop_task
    assert task is not None
    task.get_loop().call_soon_threadsafe(task.cancel)
    wait_for(task.done, "the worker to stop")
    body = _not_ready(service)
    assert body["checks"]["worker"] == "the staging worker is not running"
    assert body["checks"]["database"] == "ok"
    assert service.client.get("/healthz").status_code == 200  # alive all the same


class TcpForwarder:
    """A loopback TCP relay to a server, which the test can cut off and bring back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> TcpForwarder:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """The database is gone: nothing listens, every open connection is cut."""
        assert self._listener is not None
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()


@pytest.mark.parametrize("kind", [kind for kind in DATABASES if kind == "mariadb"])
def test_readyz_says_when_the_database_is_gone(
    kind: str, archive: ArchiveServer, tmp_path: Path
) -> None:
    """SQLite cannot go away under an open connection; a MariaDB server can."""
    forwarder = TcpForwarder((str(MARIADB["host"]), int(MARIADB["port"]))).start()
    with database(kind, tmp_path) as url:
        options = {**FAST, "archive_interface_url": archive.url, "ready_timeout": 1.0}
        settings = Settings(
            database_url=url.replace(":3306/", f":{forwarder.port}/"),
            volume_path=tmp_path / "volume",
            **options,
        )
        thread = ServiceThread(settings).start()
        with httpx.Client(base_url=thread.url, timeout=30) as client:
            service = Service(thread, client, tmp_path / "volume")
            try:
                _database_goes_and_comes_back(service, forwarder)
            finally:
                thread.stop()  # before the schema is dropped


def _database_goes_and_comes_back(service: Service, forwarder: TcpForwarder) -> None:
    assert service.client.get("/readyz").status_code == 200
    forwarder.stop()
    body = _not_ready(service)
    assert body["checks"]["database"] != "ok"
    assert body["checks"]["volume"] == body["checks"]["worker"] == "ok"
    assert "database:" in body["message"]
    assert total(scrape(service.client), "cartd_database_up") == 0
    forwarder.start()  # the database is back, on the same port: ready again
    wait_for(lambda: service.client.get("/readyz").status_code == 200, "ready", 30)


def test_reserved_cart_ids_are_refused(service: Service) -> None:
    for name in ("metrics", "healthz", "readyz"):
        message = assert_error(service.post(name, [entry("f", "f", b"x")]), 400)
        assert "reserved" in message


# --- a real `cartd serve` behind a path prefix, logging JSON ---------------------------------

PREFIX = "/prefix"
PROXY_HEADERS = {
    "Host": "cartd.example.org",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-For": "203.0.113.7",
}


@contextlib.contextmanager
def cartd_process(root: Path, archive: ArchiveServer, **settings: str) -> Iterator[Cartd]:
    with database("sqlite", root) as url:
        env = cartd_env(url, root / "volume", archive.url, log_format="json", **settings)
        service = Cartd(env, root / "cartd.log", log_level="info").wait_up()
        try:
            yield service
        finally:
            service.kill()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cartd, ArchiveServer]]:
    root = tmp_path_factory.mktemp("proxied")
    with (
        ArchiveServer(root / "archive") as archive,
        cartd_process(root, archive, root_path=PREFIX, trusted_proxies="127.0.0.1") as cartd,
    ):
        yield cartd, archive


def log_lines(cartd: Cartd) -> list[dict[str, Any]]:
    """Every line the process wrote, each of which must be one JSON object."""
    return [json.loads(line) for line in cartd.log_text().splitlines() if line.strip()]


def test_log_lines_carry_cart_and_request_ids(proxied: tuple[Cartd, ArchiveServer]) -> None:
    cartd, archive = proxied
    archive.add_file("log-0", b"logged", mtime=MTIME)
    fileids = [entry("log-0", "a.txt", b"logged")]
    created = cartd.client.post(
        "/obs-log", json={"fileids": fileids}, headers={"X-Request-ID": "obs-req-1"}
    )
    assert created.status_code == 201
    assert created.headers["X-Request-ID"] == "obs-req-1"
    assert cartd.wait_settled("obs-log")[1] == "ready"
    archive.add_file("log-bad", b"not what the cart says", mtime=MTIME)
    wrong = [entry("log-bad", "b.txt", b"expected")]  # fails its checksum: a quick error
    assert cartd.client.post("/obs-log-bad", json={"fileids": wrong}).status_code == 201
    assert cartd.wait_settled("obs-log-bad")[1] == "error"
    generated = cartd.client.get("/", headers={"X-Request-ID": "bad id with spaces"})
    assert len(generated.headers["X-Request-ID"]) == 32  # replaced by a fresh id (32 hex digits)
    wait_for(lambda: "obs-log-bad" in cartd.log_text(), "the failure's log line")

    lines = log_lines(cartd)
    access = [line for line in lines if line.get("request_id") == "obs-req-1"]
    assert access, lines[-5:]
    post = next(line for line in access if line["logger"] == "cartd.access")
    assert (post["method"], post["status"], post["cart_id"]) == ("POST", 201, "obs-log")
    assert post["path"] == f"{PREFIX}/obs-log"  # as the client asked for it
    assert {"timestamp", "level", "event", "duration_ms", "bytes"} <= post.keys()
    staged = [line for line in lines if line["logger"] == "cartd.worker"]
    assert any(line.get("cart_id") == "obs-log" for line in staged), staged
    failed = [line for line in staged if line["level"] == "warning"]
    assert any(line.get("cart_id") == "obs-log-bad" for line in failed), staged
    assert all("request_id" not in line for line in staged)  # no request's id leaks in
    ids = {line.get("request_id") for line in lines if line["logger"] == "cartd.access"}
    assert len(ids) > 5  # one per request: every HEAD poll has its own


def test_urls_behind_a_path_prefix_and_trusted_proxy(
    proxied: tuple[Cartd, ArchiveServer],
) -> None:
    cartd, archive = proxied
    archive.add_file("px-0", b"p", mtime=MTIME)
    body = {"fileids": [entry("px-0", "p", b"p")]}
    # The proxy strips the prefix, as nginx's `proxy_pass http://cartd/;` does.
    created = cartd.client.post("/obs-px", json=body, headers=PROXY_HEADERS)
    assert created.status_code == 201
    assert created.headers["Location"] == f"https://cartd.example.org{PREFIX}/obs-px"
    request_id = created.headers["X-Request-ID"]
    document = cartd.client.get("/openapi.json").json()
    assert document["servers"] == [{"url": PREFIX}]
    assert f"{PREFIX}/openapi.json" in cartd.client.get("/docs").text
    wait_for(lambda: request_id in cartd.log_text(), "the access line")
    line = next(x for x in log_lines(cartd) if x.get("request_id") == request_id)
    assert line["client"] == "203.0.113.7"


def test_forwarded_headers_from_untrusted_peers_are_ignored(
    tmp_path: Path, archive: ArchiveServer
) -> None:
    with cartd_process(tmp_path, archive, trusted_proxies="192.0.2.1") as cartd:
        archive.add_file("ux-0", b"u", mtime=MTIME)
        body = {"fileids": [entry("ux-0", "u", b"u")]}
        created = cartd.client.post("/obs-ux", json=body, headers=PROXY_HEADERS)
        assert created.headers["Location"] == "http://cartd.example.org/obs-ux"
        request_id = created.headers["X-Request-ID"]
        wait_for(lambda: request_id in cartd.log_text(), "the access line")
        line = next(x for x in log_lines(cartd) if x.get("request_id") == request_id)
        assert line["client"] == "127.0.0.1"


# --- log formats, without a service ---------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _render(fmt: str, stream: io.StringIO) -> str:
    def emit() -> str:
        logs.bind(cart_id="c-1", request_id="r-1")
        record = logging.LogRecord("cartd.x", logging.WARNING, __file__, 1, "hi %s", ("you",), None)
        return logs.formatter(fmt, stream).format(record)

    return contextvars.copy_context().run(emit)  # the binding stays in that context


def test_log_formats() -> None:
    line = json.loads(_render("json", io.StringIO()))
    assert (line["event"], line["cart_id"], line["request_id"]) == ("hi you", "c-1", "r-1")
    assert (line["level"], line["logger"]) == ("warning", "cartd.x")
    assert json.loads(_render("auto", io.StringIO()))["event"] == "hi you"  # not a terminal
    for console in (_render("console", io.StringIO()), _render("auto", _Terminal())):
        assert not console.startswith("{")
        assert "hi you" in console
        assert "cart_id" in console
        assert "c-1" in console


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (TransientArchiveError("503"), "transient"),
        (ArchiveFileError("gone"), "file_error"),
        (asyncio.CancelledError(), "cancelled"),
        (OSError(28, "No space left on device"), "error"),
    ],
)
def test_archive_outcome_labels(exc: BaseException, outcome: str) -> None:
    """The label a failed archive request is counted under, for each way it can end."""
    assert outcome_of(exc) == outcome


async def test_a_readiness_check_that_hangs_is_reported_as_such() -> None:
    never = asyncio.get_running_loop().create_future()
    hung = await health._bounded("database", never, 0.01)
    assert (hung.ok, hung.problem) == (False, "no answer within 0.01s")
    broken = await health._bounded("volume", asyncio.to_thread(health.probe_volume, Path("/nx")), 5)
    assert not broken.ok
    assert broken.problem is not None
    assert broken.problem.startswith("FileNotFoundError: ")


def test_fresh_request_ids_are_unique_hex_and_differ_in_a_forked_child() -> None:
    ids = [request_id(Headers({})) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(writer, request_id(Headers({})).encode())
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.waitpid(pid, 0)
    os.close(reader)
    parent = request_id(Headers({}))
    assert len(child) == 32
    assert child[:16] != parent[:16]  # its own prefix: the counters may well coincide
