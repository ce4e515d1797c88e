"""Shared fixtures: a real database (SQLite file or a throwaway MariaDB schema), a real
archive server on loopback, and the real service listening on a loopback port.

Service tests run once per database (`db_url` is parametrised).  Set
CARTD_TEST_DATABASES=sqlite to run without MariaDB locally; CI runs both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pymysql
import pytest
import sqlalchemy as sa
import uvicorn
from alembic import command
from alembic.config import Config

from archive_server import ArchiveServer
from cartd.app import create_app
from cartd.db import migrate
from cartd.db.session import SessionFactory, create_engine, create_session_factory
from cartd.runtime import Runtime
from cartd.settings import Settings

MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
DATABASES = os.environ.get("CARTD_TEST_DATABASES", "sqlite,mariadb").split(",")

# Fast clocks: the behaviour under test is the same, only the waits are shorter.
FAST = {
    "retry_initial": 0.02,
    "retry_max": 0.2,
    "status_poll_initial": 0.02,
    "status_poll_max": 0.2,
    "archive_unreachable_timeout": 3.0,
    "stage_timeout": 30.0,
    "archive_connect_timeout": 2.0,
    "archive_read_timeout": 10.0,
    "database_connect_attempts": 3,
    "database_connect_wait": 0.5,
}


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh SQLite file under `root`, or a throwaway MariaDB schema dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{root / 'cartd.db'}"
        return
    name = f"cartd_test_{uuid.uuid4().hex[:12]}"
    admin = pymysql.connect(**MARIADB, autocommit=True)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield f"mysql+aiomysql://root@127.0.0.1:3306/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@contextlib.asynccontextmanager
async def store_sessions(db_url: str) -> AsyncIterator[SessionFactory]:
    """Sessions on a migrated database, for tests that call db.store directly.

    Opened inside the test: an async fixture would run on another event loop.
    """
    engine = create_engine(Settings(database_url=db_url))
    try:
        await migrate.upgrade(engine)
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


def sync_url(db_url: str) -> str:
    """The same database through a blocking driver, for tests that set rows up directly."""
    return db_url.replace("+aiosqlite", "").replace("+aiomysql", "+pymysql")


@contextlib.contextmanager
def schema_at(db_url: str, revision: str) -> Iterator[tuple[sa.Connection, Config]]:
    """A connection to the database migrated to `revision`, and the Alembic config to move
    it on: for migration tests that put old-shaped rows in first."""
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            config = migrate.alembic_config(conn)
            command.upgrade(config, revision)
            yield conn, config
    finally:
        engine.dispose()


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def wait_for(condition: Callable[[], bool], what: str = "condition", timeout: float = 10.0) -> None:
    """Poll a condition with a deadline: waits for a state, never for a guessed duration."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def volume_files(volume: Path) -> list[Path]:
    """Every file under the volume's carts/ (os.walk shrugs off entries vanishing meanwhile)."""
    walk = os.walk(volume / "carts")
    return sorted(Path(top, name) for top, _, names in walk for name in names)


def part_files(volume: Path) -> list[Path]:
    return [p for p in volume_files(volume) if p.name.endswith(".part")]


def size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[ArchiveServer]:
    with ArchiveServer(tmp_path / "archive-store") as server:
        yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceThread:
    """The real ASGI app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Bind here and hand uvicorn the socket: picking a free port and binding it later
        # races every other process on the machine for that port.
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        # As `cartd serve`: forwarded headers are the app's business (cartd.api.peer).
        config = uvicorn.Config(
            create_app(settings), log_level="warning", lifespan="on", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("cartd did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


class CartClient:
    """The cart API as tests speak it, over `self.client`, for in-thread and process services."""

    client: httpx.Client

    def post(self, cart_id: str, fileids: list[dict[str, Any]]) -> httpx.Response:
        return self.client.post(f"/{cart_id}", json={"fileids": fileids})

    def state(self, cart_id: str) -> tuple[int, str, str]:
        response = self.client.head(f"/{cart_id}")
        return (
            response.status_code,
            response.headers["X-Pacifica-Status"],
            response.headers["X-Pacifica-Message"],
        )

    def wait_settled(self, cart_id: str, timeout: float = 60) -> tuple[int, str, str]:
        """Poll HEAD like pacifica-downloader does, until the cart leaves `staging`."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(cart_id)
            if state[1] != "staging" or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def status(self, cart_id: str) -> dict[str, Any]:
        response = self.client.get(f"/{cart_id}/status")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


@dataclass
class Service(CartClient):
    """A running cartd plus a client, with the helpers most tests need."""

    thread: ServiceThread
    client: httpx.Client
    volume: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def runtime(self) -> Runtime:
        """The in-thread service's own state, for what HTTP cannot show (unwritten uses)."""
        runtime: Runtime = self.thread.server.config.app.state.runtime
        return runtime

    def wait_uses_written(self) -> None:
        """Until the HEAD uses the service noted in memory are in the database."""
        wait_for(lambda: not self.runtime.answers.unwritten, "HEAD uses written")


@contextlib.contextmanager
def standalone_service(
    kind: str, root: Path, *, keepalive: bool = True, **overrides: Any
) -> Iterator[tuple[Service, ArchiveServer]]:
    """A service with a database and archive of its own, for module-scoped fixtures."""
    with database(kind, root) as url, ArchiveServer(root / "archive") as archive:
        options = {
            "database_url": url,
            "volume_path": root / "volume",
            "archive_interface_url": archive.url,
            **FAST,
            **overrides,
        }
        thread = ServiceThread(Settings(**options)).start()
        limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
        try:
            with httpx.Client(base_url=thread.url, timeout=30, limits=limits) as client:
                yield Service(thread, client, root / "volume"), archive
        finally:
            thread.stop()


@pytest.fixture
def make_service(db_url: str, archive: ArchiveServer, tmp_path: Path) -> Iterator[Any]:
    """Factory: start cartd with overrides; everything started is stopped at teardown."""
    started: list[Service] = []

    def start(**overrides: Any) -> Service:
        options = {
            "database_url": db_url,
            "volume_path": tmp_path / "volume",
            "archive_interface_url": archive.url,
            **FAST,
            **overrides,
        }
        thread = ServiceThread(Settings(**options)).start()
        client = httpx.Client(base_url=thread.url, timeout=30)
        service = Service(thread, client, Path(options["volume_path"]))
        started.append(service)
        return service

    yield start
    for service in started:
        service.client.close()
        service.thread.stop()


@pytest.fixture
def service(make_service: Any) -> Service:
    started: Service = make_service()
    return started


MakeService = Callable[..., Service]
MTIME = 1444938166.5


def assert_error(response: httpx.Response, status: int) -> str:
    """The contract for every error: JSON with integer `status` and string `message`."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert isinstance(body, dict), body
    assert type(body["status"]) is int
    assert body["status"] == status
    assert isinstance(body["message"], str)
    assert body["message"]
    return body["message"]


def make_ready(
    service: Service, archive: ArchiveServer, cart_id: str, files: dict[str, bytes]
) -> list[dict[str, Any]]:
    """Publish the files, POST them as a cart and wait until it is ready."""
    fileids = []
    for index, (path, data) in enumerate(files.items()):
        file_id = f"{cart_id}-{index}"
        archive.add_file(file_id, data, mtime=MTIME)
        fileids.append(entry(file_id, path, data))
    response = service.post(cart_id, fileids)
    assert response.status_code == 201, response.text
    assert service.wait_settled(cart_id) == (204, "ready", "")
    return fileids


def entry(file_id: str | int, path: str, data: bytes, hashtype: str = "sha1") -> dict[str, Any]:
    return {
        "id": file_id,
        "path": path,
        "hashtype": hashtype,
        "hashsum": hashlib.new(hashtype, data).hexdigest(),
    }


def run_cartd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`cartd ARGV` in this process: (exit status, stdout, stderr).  A command as a process
    costs ~1.5 s of imports; tests that need the real process (signals, exec) start one."""
    from cartd.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err
