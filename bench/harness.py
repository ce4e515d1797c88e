"""What every benchmark of the suite shares: the processes it measures and how it times them.

Each process under test runs on its own (cartd, the archive, nginx), so the driver's GIL
never slows the thing it measures.  cartd and the databases come from the test fixtures
(tests/cartd_proc.py, tests/conftest.py), so the suite drives cartd the way the tests do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cartd_proc import Cartd, cartd_env  # noqa: E402
from conftest import database, free_port  # noqa: E402
from reference_archive import reference_archive  # noqa: E402

__all__ = ["Cartd", "free_port"]

MiB = 1 << 20
GiB = 1 << 30
FileIds = list[dict[str, str]]


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare this report with another machine's."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]),
    }


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def write_files(root: Path, prefix: str, count: int, size: int) -> FileIds:
    """Random files `prefix0..` under `root`, and the cart entries (sha1) that name them."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    block = 16 * MiB
    for number in range(count):
        name = f"{prefix}{number}"
        digest = hashlib.sha1()
        with open(root / name, "wb") as handle:
            left = size
            while left:
                data = os.urandom(min(block, left))
                digest.update(data)
                handle.write(data)
                left -= len(data)
        entries.append(
            {
                "id": name,
                "path": f"d{number % 100}/{name}",
                "hashtype": "sha1",
                "hashsum": digest.hexdigest(),
            }
        )
    return entries


@contextlib.contextmanager
def test_archive(root: Path) -> Iterator[str]:
    """tests/archive_server.py as its own process: a threaded stdlib server."""
    port = free_port()
    script = REPO / "tests" / "archive_server.py"
    argv = [sys.executable, str(script), "--root", str(root), "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def archive(kind: str, root: Path) -> Iterator[str]:
    """`test`: our stand-in; `reference`: pacifica-archiveinterface 0.4.2, thread pool 1."""
    if kind == "test":
        with test_archive(root) as url:
            yield url
        return
    with reference_archive(root, REPO / ".venv-archive", thread_pool=1) as url:
        yield url


@contextlib.contextmanager
def cartd(db_url: str, work: Path, archive_url: str, **overrides: str) -> Iterator[Cartd]:
    volume = work / f"volume-{time.monotonic_ns()}"
    env = cartd_env(db_url, volume, archive_url, **overrides)
    paths = []
    if baseline := os.environ.get("BENCH_CARTD_SRC"):
        paths.append(baseline)  # another checkout's src/: before/after comparisons
    if os.environ.get("BENCH_LOOPWATCH"):
        paths.append(str(Path(__file__).parent / "loopwatch"))  # its sitecustomize.py
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    service = Cartd(env, work / "cartd.log").wait_up()
    profiler = _profile(service.proc.pid)
    try:
        yield service
    finally:
        service.terminate()  # graceful shutdown is not measured: give it a little while only
        try:
            service.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(volume, ignore_errors=True)
        if profiler is not None:
            profiler.wait(timeout=60)


def _profile(pid: int) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE=DIR, py-spy samples each cartd until it exits (collapsed stacks)."""
    if not (where := os.environ.get("BENCH_PROFILE")):
        return None
    out = Path(where) / f"cartd-{pid}.txt"
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--nonblocking", "-o"]
    return subprocess.Popen([*argv, str(out)], stdout=subprocess.DEVNULL)


def post_cart(service: Cartd, cart_id: str, fileids: FileIds) -> None:
    service.client.post(f"/{cart_id}", json={"fileids": fileids}, timeout=300).raise_for_status()


@contextlib.contextmanager
def fresh_database(kind: str, work: Path) -> Iterator[str]:
    """A database of its own for each service: no benchmark sees another's carts."""
    place = work / f"db-{time.monotonic_ns()}"
    place.mkdir()
    with database(kind, place) as url:
        yield url


def wait_ready(service: Cartd, cart_id: str, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while (state := service.client.head(f"/{cart_id}").headers["X-Pacifica-Status"]) == "staging":
        if time.monotonic() > deadline:
            raise TimeoutError(f"cart {cart_id} still staging after {timeout}s")
        time.sleep(0.05)
    if state != "ready":
        raise RuntimeError(f"cart {cart_id} ended {state}")


def stage(service: Cartd, cart_id: str, fileids: FileIds) -> float:
    """Seconds from the POST until HEAD says ready."""
    started = time.perf_counter()
    post_cart(service, cart_id, fileids)
    wait_ready(service, cart_id)
    return time.perf_counter() - started


def curl(urls: list[str]) -> tuple[float, int]:
    """Wall seconds for `curl -o /dev/null` of every url at once, and the bytes received."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["curl", "-sSf", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    sizes = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"curl failed with {proc.returncode}")
        sizes.append(int(out))
    return time.perf_counter() - started, sum(sizes)


def best_rate(urls: list[str], repeat: int) -> float:
    """Best of `repeat` runs, in GB/s (10^9): the least disturbed by the shared machine."""
    rates = []
    for _ in range(repeat):
        seconds, size = curl(urls)
        rates.append(size / seconds / 1e9)
    return round(max(rates), 3)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work};
    proxy_temp_path {work};
    fastcgi_temp_path {work};
    uwsgi_temp_path {work};
    scgi_temp_path {work};
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str]:
    """The Debian nginx, one worker process, serving `root` with sendfile."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=tmp, port=port, root=root))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", tmp])
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_http(url)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


@dataclass
class RssSampler:
    """Samples a process's resident set every `interval` seconds in a thread."""

    pid: int
    interval: float = 0.02
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        process = psutil.Process(self.pid)
        started = time.perf_counter()

        def sample() -> None:
            while not self._stop.is_set():
                rss = process.memory_info().rss
                self.samples.append((time.perf_counter() - started, rss))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(max(rss for _t, rss in self.samples) / MiB, 1)


def wrk(url: str, connections: int, seconds: float, rate: float = 0) -> dict[str, Any]:
    """HEAD with wrk (bench/head.lua); with `rate`, Poisson arrivals at about that rate."""
    env = {**os.environ, "WRK_RATE": str(rate), "WRK_CONNECTIONS": str(connections)}
    argv = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(REPO / "bench" / "head.lua"),
        url,
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> dict[str, Any]:
    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return round(float(number) * _UNITS[unit], 2)

    latency = {
        f"p{p}_ms": ms(v) for p, v in re.findall(r"^\s+(50|90|99)(?:\.000)?%\s+(\S+)", out, re.M)
    }
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": round(rps, 1),
        **latency,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }
