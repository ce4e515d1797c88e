"""Every error leaves as JSON `{"status", "message"}`; no traceback ever reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


def header_text(message: str) -> str:
    """A header value must be one line of latin-1: a cart id in a message may be anything
    (`/%E2%82%AC` decodes to a euro sign), and an unencodable header is a 500."""
    return " ".join(message.split()).encode("latin-1", "replace").decode("latin-1")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"status": status, "message": message}, status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = "No such resource"
    headers = dict(exc.headers or {})
    if request.method == "HEAD":  # HEAD has no body: pacifica clients read these headers
        headers.update({"X-Pacifica-Status": "error", "X-Pacifica-Message": header_text(message)})
    return error_response(exc.status_code, message, headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
    )
    return error_response(400, f"invalid request: {details}")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    headers = None
    if request.method == "HEAD":  # PROTOCOL.md: both status headers on every code
        headers = {"X-Pacifica-Status": "error", "X-Pacifica-Message": "internal server error"}
    return error_response(500, "internal server error", headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
