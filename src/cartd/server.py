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

import gc
import logging
import socket

import uvicorn
from fastapi import FastAPI

from cartd import heap
from cartd.runtime import Runtime
from cartd.settings import Settings

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.cartd_app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        freeze_startup_objects()

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


def freeze_startup_objects() -> None:
    """Keep what start-up built (modules, FastAPI, SQLAlchemy, pydantic) out of every GC pass.

    The cyclic collector's full passes walk every object that lives long enough.  While a
    10,000-file cart staged, each pass walked all of start-up's objects too and paused the
    event loop for about 90 ms every few seconds, which was the tail of HEAD's latency; with
    them frozen a full pass took about 8 ms.  Only objects alive now are frozen (garbage is
    collected first); they are still freed when their last reference goes.
    """
    gc.collect()
    gc.freeze()


def serve(app: FastAPI, settings: Settings, log_level: str) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (see the module docstring)."""
    heap.tune()
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
