"""The ASGI application: one `create_app()`, whose lifespan owns the background worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cartd import __version__
from cartd.api import carts, errors, events
from cartd.db.session import sqlite_file
from cartd.runtime import running
from cartd.schemas import CartRequest
from cartd.settings import Settings
from cartd.volume_lock import serving


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Recovery and fsck delete what they do not own: SQLite makes this the only
        # cartd on the volume and database; replicas of a server database share it.
        with serving(settings.volume_path, sqlite_file(settings)):
            async with running(settings) as runtime:
                app.state.runtime = runtime
                yield

    app = FastAPI(
        title="cartd",
        version=__version__,
        description="Stages archive files into a cache and serves carts as tar streams "
        "(pacifica-cartd compatible).",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(carts.router)
    app.include_router(events.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the cart body schema, which the POST route parses by hand."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        cart = CartRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(cart.pop("$defs", {}))
        schemas["CartRequest"] = cart
        _drop_422(document)
        app.openapi_schema = document
    return app.openapi_schema


def _drop_422(document: dict[str, Any]) -> None:
    """Invalid requests answer 400 here (pacifica clients expect it), never FastAPI's 422."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
