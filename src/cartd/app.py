"""The ASGI application: one `create_app()`, whose lifespan owns the background worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cartd import __version__
from cartd.api import carts, errors, events, openapi, ops
from cartd.api.access import AccessLog
from cartd.api.auth import authenticator
from cartd.api.fast_head import KeptHead
from cartd.api.peer import RealPeer
from cartd.db.session import is_shared, sqlite_file
from cartd.metrics import Metrics
from cartd.runtime import running
from cartd.settings import Settings
from cartd.volume_lock import serving


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()  # this app's own registry: apps in one process never share counts

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Recovery and fsck delete what they do not own: SQLite makes this the only
        # cartd on the volume and database; replicas of a server database share it.
        sole = not is_shared(settings)  # as runtime.running recovers the volume
        with serving(settings.volume_path, sole=sole, sqlite_file=sqlite_file(settings)):
            async with running(settings, metrics) as runtime:
                app.state.runtime = runtime
                yield

    app = FastAPI(
        title="cartd",
        version=__version__,
        description=openapi.DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=openapi.TAGS,
        generate_unique_id_function=openapi.operation_id,
    )
    errors.install(app)
    # Before serving anything: a bad token file or proxy list must stop start-up.
    app.state.authenticator = authenticator(settings)
    app.add_middleware(KeptHead)  # innermost: logged and measured like any request
    app.add_middleware(AccessLog, metrics=metrics)
    # Outermost, so the access log and everything inside see the forwarded client.
    app.add_middleware(RealPeer, trusted_proxies=settings.trusted_proxies)
    app.include_router(ops.router)  # before the carts: GET /metrics is not a cart download
    app.include_router(carts.router)
    app.include_router(events.router)
    app.openapi = lambda: openapi.document(app)  # type: ignore[method-assign]
    return app
