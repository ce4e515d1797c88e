"""The pacifica-cartd verbs on `/{cart_id}` plus `/status`.  HTTP concerns only."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cartd import bundle, carts, downloads
from cartd.api import formats, ranges
from cartd.api.errors import error_response, header_text
from cartd.db.deadlock import retry_deadlocks
from cartd.db.models import CartState
from cartd.runtime import Runtime
from cartd.schemas import (
    CART_ID_PATTERN,
    CartRequest,
    CartStatus,
    ErrorBody,
    Message,
    valid_cart_id,
)
from cartd.volume import Hold

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _cart_id(
    cart_id: Annotated[
        str,
        PathParam(
            description=f"Client-chosen id matching {CART_ID_PATTERN}, not '.' or '..'.",
            # Documented, not enforced here: _cart_id answers 400 with pacifica's headers.
            json_schema_extra={"pattern": CART_ID_PATTERN},
        ),
    ],
) -> str:
    if not valid_cart_id(cart_id):
        raise HTTPException(
            400,
            f"invalid cart id {cart_id[:140]!r}: use 1-128 characters "
            "from [A-Za-z0-9._~-], not '.' or '..'",
        )
    return cart_id


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
CartId = Annotated[str, Depends(_cart_id)]
FilesParam = Annotated[
    bool, Query(description="Include the per-file list (files=0 leaves it out, for big carts).")
]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


CART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Parsed as JSON whatever the Content-Type (curl --upload-file sends none).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CartRequest"}}},
    }
}


@router.get("/", response_model=Message, summary="Liveness message (pacifica-cartd compatible)")
async def root() -> Message:
    return Message(message="Pacifica Cartd Interface Up and Running")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
    return bytes(body)


@router.post(
    "/{cart_id}",
    status_code=201,
    response_model=Message,
    openapi_extra=CART_BODY,
    responses=_errors(400, 409, 413),
    summary="Create a cart and start staging it",
)
async def create_cart(cart_id: CartId, request: Request, runtime: RuntimeDep) -> Response:
    body = await _read_body(request, runtime.settings.max_request_bytes)
    try:
        settings = runtime.settings
        # Parsing a 100,000-file cart takes about a second of CPU: keep it off the loop.
        cart = await asyncio.to_thread(carts.parse_cart, body, settings.max_files_per_cart)
        ttl = carts.time_to_live(cart.ttl, settings.cart_ttl, settings.cart_ttl_max)
        created = await retry_deadlocks(
            lambda: carts.create_cart(runtime.sessions, cart_id, cart, ttl)
        )
    except carts.InvalidCart as exc:
        return error_response(400, str(exc))
    except carts.CartConflict as exc:
        return error_response(409, str(exc))
    if created.new:
        runtime.worker.wake()
    location = str(request.url_for("download_cart", cart_id=cart_id))
    return JSONResponse(
        {"message": "Cart Processing has begun"}, 201, headers={"Location": location}
    )


def _status_headers(state: str, message: str) -> dict[str, str]:
    public = state if state in (CartState.READY, CartState.ERROR) else "staging"
    # The JSON status has the full text; the header gets a latin-1, single-line version.
    return {"X-Pacifica-Status": public, "X-Pacifica-Message": header_text(message)}


_STATUS_HEADERS = {
    "X-Pacifica-Status": {
        "description": "staging | ready | error (every unfinished phase reads staging)",
        "schema": {"type": "string", "enum": ["staging", "ready", "error"]},
    },
    "X-Pacifica-Message": {
        "description": "Empty, or the error text",
        "schema": {"type": "string"},
    },
}


@router.head(
    "/{cart_id}",
    status_code=204,
    summary="Cart status in X-Pacifica-Status / X-Pacifica-Message",
    responses={
        204: {
            "description": "The cart exists and is not in error",
            "headers": {
                **_STATUS_HEADERS,
                "Retry-After": {
                    "description": "While staging: seconds to wait before polling again "
                    "(the ETA within 1-30, or 5 when unknown)",
                    "schema": {"type": "integer"},
                },
            },
        },
        400: {"description": "Invalid cart id", "headers": _STATUS_HEADERS},
        404: {"description": "No such cart", "headers": _STATUS_HEADERS},
        500: {"description": "The cart is in error", "headers": _STATUS_HEADERS},
    },
)
async def head_cart(cart_id: CartId, runtime: RuntimeDep) -> Response:
    try:
        cart = await retry_deadlocks(lambda: carts.find_cart(runtime.sessions, cart_id, touch=True))
    except carts.CartNotFound as exc:
        return Response(status_code=404, headers=_status_headers("error", str(exc)))
    code = 500 if cart.state == CartState.ERROR else 204
    headers = _status_headers(cart.state, cart.message)
    if headers["X-Pacifica-Status"] == "staging":
        headers["Retry-After"] = str(await carts.retry_after(runtime.sessions, cart))
    return Response(status_code=code, headers=headers)


@router.get(
    "/{cart_id}/status",
    response_model=CartStatus,
    responses=_errors(400, 404),
    summary="Progress: cart state, counts, bytes, ETA and per-file detail",
)
async def cart_status(
    cart_id: CartId, runtime: RuntimeDep, files: FilesParam = True
) -> CartStatus | Response:
    try:
        status = await retry_deadlocks(
            lambda: carts.cart_status(runtime.sessions, cart_id, files=files)
        )
    except carts.CartNotFound as exc:
        return error_response(404, str(exc))
    return JSONResponse(status.document())


_DOWNLOAD_HEADERS = {
    "ETag": {"description": "Strong validator of these bytes", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "Always bytes", "schema": {"type": "string"}},
    "Vary": {"description": "Accept, when no format was given", "schema": {"type": "string"}},
}
_BUNDLE_TYPES: dict[str, Any] = {bundle.Format.TAR.media_type: {}, bundle.Format.ZIP.media_type: {}}
FormatParam = Annotated[
    bundle.Format | None,
    Query(
        alias="format",
        description="tar (default) or zip (stored, Zip64 where needed).  Without it, "
        "`Accept: application/zip` preferred over application/x-tar gets zip.",
    ),
]
ManifestParam = Annotated[
    bool | None,
    Query(
        description="Add MANIFEST.sha256 (sha256sum -c format) and MANIFEST.<hashtype> as "
        "the last members; default: as posted with the cart (`manifest`).",
    ),
]


@router.get(
    "/{cart_id}",
    name="download_cart",
    summary="Download a ready cart as a tar or zip stream (resumable with Range / If-Range)",
    responses={
        200: {
            "content": _BUNDLE_TYPES,
            "description": "The bundle: a PAX tar, or a stored zip with format=zip.",
            "headers": _DOWNLOAD_HEADERS,
        },
        202: {"model": Message, "description": "Still staging."},
        206: {"content": _BUNDLE_TYPES, "description": "One byte range."},
        304: {"description": "If-None-Match matched the ETag."},
        409: {
            "model": ErrorBody,
            "description": "The cart is in error, or a manifest would overwrite a cart path.",
        },
        **_errors(400, 404, 416),
    },
)
async def download_cart(
    cart_id: CartId,
    request: Request,
    runtime: RuntimeDep,
    filename: Annotated[
        str | None, Query(description="Bundle name; default data_<time>.tar (or .zip)")
    ] = None,
    bundle_format: FormatParam = None,
    manifest: ManifestParam = None,
) -> Response:
    fmt = bundle_format or formats.from_accept(request.headers.get("accept"))
    try:
        name = bundle.check_name(filename or bundle.default_name(fmt=fmt), fmt)
        hold_for = runtime.worker.lease if runtime.volume.shared else None
        cart, files = await retry_deadlocks(
            lambda: carts.ready_files(runtime.sessions, cart_id, hold_for)
        )
    except bundle.InvalidBundleName as exc:
        return error_response(400, str(exc))
    except carts.CartNotFound as exc:
        return error_response(404, str(exc))
    if cart.state == CartState.ERROR:
        return error_response(409, cart.message or "The cart is in error")
    if cart.state != CartState.READY:
        return JSONResponse({"message": "The cart is not ready for download."}, 202)
    hold = runtime.volume.hold(cart.id)  # before the first await: a DELETE now waits for us
    wanted = downloads.Wanted(fmt, name, manifest)
    vary = {} if bundle_format else {"Vary": "Accept"}
    try:
        plan = await downloads.plan(runtime.sessions, runtime.volume, cart, files, wanted)
        return _bundle_response(request, runtime, hold, plan, vary)
    except downloads.Refused as exc:
        hold.release()
        return error_response(409, str(exc))
    except BaseException:
        hold.release()
        raise


def _bundle_response(
    request: Request, runtime: Runtime, hold: Hold, plan: bundle.Plan, vary: dict[str, str]
) -> Response:
    """Evaluate the preconditions in RFC 9110 order: If-None-Match, then If-Range/Range."""
    etag = ranges.strong_etag(plan.digest)
    if ranges.none_match(request.headers.get("if-none-match"), etag):
        hold.release()
        return Response(status_code=304, headers={"ETag": etag, **vary})
    headers = {
        **vary,
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": bundle.content_disposition(plan.name),
    }
    try:
        wanted = ranges.selected_range(
            request.headers.get("range"), request.headers.get("if-range"), etag, plan.size
        )
    except ranges.Unsatisfiable as exc:
        unsatisfiable = {"Content-Range": f"bytes */{plan.size}", "Accept-Ranges": "bytes"}
        hold.release()
        return error_response(416, str(exc), unsatisfiable)
    status, part = 200, ranges.ByteRange(0, plan.size - 1)
    if wanted is not None:
        status, part = 206, wanted
        headers["Content-Range"] = part.content_range(plan.size)
    headers["Content-Length"] = str(part.length)
    body = _stream_held(hold, plan, part, runtime.settings.transfer_size)
    weakref.finalize(body, hold.release)  # a client gone before the first byte never starts it
    return StreamingResponse(body, status_code=status, media_type=plan.media_type, headers=headers)


async def _stream_held(
    hold: Hold, plan: bundle.Plan, part: ranges.ByteRange, chunk_size: int
) -> AsyncIterator[bytes]:
    try:
        async for chunk in bundle.stream_range(plan, part.start, part.end, chunk_size):
            yield chunk
    finally:
        hold.release()


@router.delete(
    "/{cart_id}",
    response_model=Message,
    responses=_errors(400, 404),
    summary="Delete a cart, cancelling its staging and freeing its files",
)
async def delete_cart(cart_id: CartId, runtime: RuntimeDep) -> Response:
    try:
        await retry_deadlocks(
            lambda: carts.delete_cart(runtime.sessions, runtime.worker, runtime.volume, cart_id)
        )
    except carts.CartNotFound:
        return error_response(404, "The cart does not exist or has already been deleted")
    return JSONResponse({"message": "Cart Deleted Successfully"})


__all__ = ["CartRequest", "router"]
