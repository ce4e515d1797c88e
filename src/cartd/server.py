"""The HTTP server behind `cartd serve`: uvicorn with a shutdown that puts staging down first.

On SIGTERM uvicorn stops listening, lets responses in flight finish for up to
`CARTD_SHUTDOWN_GRACE` seconds (a tar download can take a while), then runs the lifespan
shutdown.  Left alone, the staging worker would keep claiming new files all through that
grace period, so a long download would hold the old process busy with work that a
replacement process is about to start again.  Stopping the worker first means SIGTERM stops
taking work at once.  Its fetches in flight are cancelled: their `.part` files are removed
and their rows stay `staging`, which the next start-up requeues (or, with replicas, any
replica once the lease lapses), so staging resumes.

Behind a reverse proxy, X-Forwarded-For and X-Forwarded-Proto are believed only from
CARTD_TRUSTED_PROXIES, so the client address in the logs and the scheme of the URLs cartd
builds are the real ones.  The app applies them itself (cartd.api.peer) rather than uvicorn,
because CARTD_AUTH=proxy must judge the real peer before it is rewritten.
CARTD_ROOT_PATH is the prefix the proxy strips, which uvicorn puts
back into every URL cartd builds (Location, the docs page, the OpenAPI `servers`).

Logging is cartd's (logs.py): uvicorn installs no handlers of its own and writes no access
log, since the AccessLog middleware writes one in cartd's format.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from cartd.runtime import Runtime
from cartd.settings import Settings

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.cartd_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        runtime: Runtime | None = getattr(self.cartd_app.state, "runtime", None)
        if runtime is not None:
            await runtime.worker.stop()
            log.info(
                "shutting down: staging stopped (it resumes at the next start); "
                "downloads in flight get %ss to finish",
                self.config.timeout_graceful_shutdown,
            )
        await super().shutdown(sockets)


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2
TRIM_INTERVAL = 1.0  # seconds between malloc_trim calls


def tune_malloc() -> None:
    """Cap glibc's malloc arenas, and give freed heap back every second.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core), and
    each keeps the memory it once held.  Download reads and digests run in worker threads
    with megabyte buffers, so the arenas add up: two of them cut peak RSS by about a tenth
    in `make bench` (8 concurrent downloads, a 100,000-file POST).

    Transfer chunks of 1 MiB also come from the heap (glibc raises its mmap threshold to
    the size of any mapped block freed), between small objects that keep the freed space
    from going back on its own: staging a 1 GiB cart left 57 MiB of free heap resident
    for good.  malloc_trim returns it.  Fixing the mmap threshold would too, but mapping
    and unmapping every chunk halved download throughput.  The trim runs in a thread of
    its own, outside the GIL; it takes well under a millisecond when little is free, and
    about 14 ms to give back 100 MiB.  Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    trimmer = threading.Thread(
        target=_trim_forever, args=(libc.malloc_trim,), name="malloc-trim", daemon=True
    )
    trimmer.start()


def _trim_forever(malloc_trim: Callable[[int], int]) -> None:
    while True:
        time.sleep(TRIM_INTERVAL)
        malloc_trim(0)


def serve(app: FastAPI, settings: Settings, log_level: str) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (see the module docstring)."""
    tune_malloc()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,
        root_path=settings.root_path,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace,
        # The app applies X-Forwarded-* from CARTD_TRUSTED_PROXIES itself (cartd.api.peer),
        # after noting the real peer that CARTD_AUTH=proxy must judge.
        proxy_headers=False,
    )
    GracefulServer(config, app).run()
