"""`cartd serve` and `cartd fsck` as real processes, shared by the reliability proofs.

Crash, shutdown and load proofs need a process of their own: SIGKILL and SIGTERM must hit a
real service, and 200 pollers must not share a GIL with the server they measure.  The
bench/ scripts import this module too, so a long run and its CI version drive cartd the
same way.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from conftest import CartClient, free_port

CARTD = Path(sys.executable).parent / "cartd"

# The fast clocks of conftest.FAST, as environment variables for a subprocess.
FAST_ENV = {
    "CARTD_RETRY_INITIAL": "0.02",
    "CARTD_RETRY_MAX": "0.2",
    "CARTD_STATUS_POLL_INITIAL": "0.02",
    "CARTD_STATUS_POLL_MAX": "0.2",
    "CARTD_ARCHIVE_UNREACHABLE_TIMEOUT": "10",
    "CARTD_ARCHIVE_CONNECT_TIMEOUT": "2",
    "CARTD_ARCHIVE_READ_TIMEOUT": "10",
    "CARTD_DATABASE_CONNECT_ATTEMPTS": "3",
    "CARTD_DATABASE_CONNECT_WAIT": "0.5",
}


def cartd_env(db_url: str, volume: Path, archive_url: str, **overrides: str) -> dict[str, str]:
    """A clean environment: nothing CARTD_ leaks in from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    env.update(FAST_ENV)
    env.update(
        {
            "CARTD_DATABASE_URL": db_url,
            "CARTD_VOLUME_PATH": str(volume),
            "CARTD_ARCHIVE_INTERFACE_URL": archive_url,
        }
    )
    env.update({f"CARTD_{k.upper()}": v for k, v in overrides.items()})
    return env


class Cartd(CartClient):
    """One `cartd serve` process; its output goes to a log file kept for diagnosis."""

    def __init__(self, env: dict[str, str], log: Path, log_level: str = "warning") -> None:
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(CARTD), "serve", "--port", str(self.port), "--log-level", log_level]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float = 60.0) -> Cartd:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"cartd exited:\n{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"cartd did not start:\n{self.log_text()[-3000:]}"
            try:
                if self.client.get("/").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no finally block, no cleanup runs."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


def run_fsck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CARTD), "fsck", *args], env=env, capture_output=True, text=True, timeout=120
    )


def tar_digests(content: bytes) -> dict[str, str]:
    """sha256 of every regular member, by path below the bundle's top directory."""
    digests: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                digest = hashlib.sha256(extracted.read()).hexdigest()
                digests[member.name.split("/", 1)[1]] = digest
    return digests
