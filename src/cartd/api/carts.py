"""The pacifica-cartd verbs on `/{cart_id}` plus `/status`.  HTTP concerns only."""

from __future__ import annotations

import asyncio
import mmap
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cartd import bundle, carts, downloads, logs
from cartd.api import examples, formats, openapi, ranges
from cartd.api.auth import Owner
from cartd.api.dependencies import RuntimeDep
from cartd.api.errors import error_response, header_text
from cartd.api.openapi import INTERNAL, error, head_error, header
from cartd.api.ops import RESERVED_CART_IDS
from cartd.db.deadlock import retry_deadlocks
from cartd.db.models import CartState
from cartd.db.store import CartBrief
from cartd.runtime import Runtime
from cartd.schemas import (
    CART_ID_PATTERN,
    CartRequest,
    CartStatus,
    Message,
    valid_cart_id,
)
from cartd.volume import Hold

router = APIRouter()


# A coroutine, like every dependency here: a plain function would run in a worker thread.
async def _cart_id(
    cart_id: Annotated[
        str,
        PathParam(
            description=f"Client-chosen id matching {CART_ID_PATTERN}, not '.' or '..'.",
            # Documented, not enforced here: _cart_id answers 400 with pacifica's headers.
            json_schema_extra={"pattern": CART_ID_PATTERN},
            openapi_examples={
                "uuid": {"value": "0b7e2c5e-3f4a-4d8e-9d51-6a1f5b2c9e01"},
                "name": {"value": "my-cart"},
            },
        ),
    ],
) -> str:
    if not valid_cart_id(cart_id):
        raise HTTPException(
            400,
            f"invalid cart id {cart_id[:140]!r}: use 1-128 characters "
            "from [A-Za-z0-9._~-], not '.' or '..'",
        )
    logs.bind(cart_id=cart_id)  # async, so it binds in the request's own context
    return cart_id


CartId = Annotated[str, Depends(_cart_id)]
FilesParam = Annotated[
    bool,
    Query(
        description="Include the per-file list (files=0 leaves it out, for big carts).",
        openapi_examples={"with_files": {"value": True}, "totals_only": {"value": False}},
    ),
]
BAD_CART_ID = error(400, "Invalid cart id", {"cart_id": examples.INVALID_CART_ID})
NO_SUCH_CART = error(404, "No such cart, or it was deleted", {"not_found": examples.NOT_FOUND})
BAD_STATUS_QUERY = error(
    400,
    "Invalid cart id or files value",
    {"cart_id": examples.INVALID_CART_ID, "files": examples.BAD_FILES},
)
GONE = error(404, "No such cart, or it was already deleted", {"not_found": examples.GONE})

CART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Parsed as JSON whatever the Content-Type (curl --upload-file sends none).",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/CartRequest"},
                "examples": examples.CART_BODIES,
            }
        },
    }
}


@router.get(
    "/",
    response_model=Message,
    tags=["service"],
    summary="Liveness message (pacifica-cartd compatible)",
    description="Answers as long as the process serves HTTP; it checks nothing else.",
    responses={200: openapi.message("Up", "Pacifica Cartd Interface Up and Running")},
)
async def root() -> Message:
    return Message(message="Pacifica Cartd Interface Up and Running")


async def _read_body(request: Request, limit: int) -> carts.Body:
    """The body as one buffer, not copied again into bytes (a 100,000-file cart is ~11 MB)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        if int(declared) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        if int(declared) > 0:
            return await _read_declared(request, int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
    return body


async def _read_declared(request: Request, size: int) -> carts.Body:
    """A body of known size, into an anonymous mapping of that size.

    Grown a chunk at a time, a bytearray is copied again and again, and the copies it
    leaves in the heap stayed resident until the next trim: the 11 MB body of a
    100,000-file cart briefly cost about 30 MB.  The mapping's pages become resident
    only as the body arrives (a client that declares much and sends little costs little),
    and go back to the system as soon as the body is dropped.
    """
    body = mmap.mmap(-1, size)
    received = 0
    async for chunk in request.stream():
        if received + len(chunk) > size:  # the server frames the body by its length
            raise HTTPException(400, "request body longer than its Content-Length")
        body[received : received + len(chunk)] = chunk
        received += len(chunk)
    return body if received == size else body[:received]


@router.post(
    "/{cart_id}",
    status_code=201,
    response_model=Message,
    openapi_extra=CART_BODY,
    tags=["carts"],
    summary="Create a cart and start staging it",
    description="Staging starts in the background; poll with HEAD, GET /{cart_id}/status or "
    "GET /{cart_id}/events.  POSTing the same id again with the same files is a safe retry "
    "(201, nothing is staged twice); with different files it is a 409.  A deleted cart's "
    "id may be used again.",
    responses={
        201: {
            **openapi.message("Created, or the same cart again", "Cart Processing has begun"),
            "headers": {"Location": header("Where to download the cart: GET /{cart_id}")},
        },
        **error(
            400,
            "Invalid cart id, malformed JSON, or a cart that breaks the rules",
            {"cart_id": examples.INVALID_CART_ID, **examples.INVALID_BODY},
        ),
        **error(
            409,
            "The id is taken by a cart with other files or options",
            {"conflict": examples.CONFLICT},
        ),
        **error(413, "The body is over CARTD_MAX_REQUEST_BYTES", {"too_large": examples.TOO_LARGE}),
        **INTERNAL,
    },
)
async def create_cart(
    owner: Owner, cart_id: CartId, request: Request, runtime: RuntimeDep
) -> Response:
    if cart_id in RESERVED_CART_IDS:
        return error_response(400, f"cart id {cart_id!r} is reserved for GET /{cart_id}")
    settings = runtime.settings
    body = await _read_body(request, settings.max_request_bytes)
    try:
        # Parsing a 100,000-file cart takes about a second of CPU: keep it off the loop.
        cart = await asyncio.to_thread(carts.parse_cart, body, settings.max_files_per_cart)
        del body  # tens of MB for a big cart: free it before the rows are built
        ttl = carts.time_to_live(cart.ttl, settings.cart_ttl, settings.cart_ttl_max)
        created = await retry_deadlocks(
            lambda: carts.create_cart(
                runtime.sessions, cart_id, cart, ttl, owner=owner, answers=runtime.answers
            )
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


@router.head(
    "/{cart_id}",
    status_code=204,
    tags=["carts"],
    summary="Cart status in X-Pacifica-Status / X-Pacifica-Message",
    description="The poll pacifica-downloader uses: both headers on every status code, no "
    "body.  Every unfinished phase reads `staging`; finer phases are in GET "
    "/{cart_id}/status.",
    responses={
        204: {
            "description": "The cart exists and is not in error",
            "headers": {
                **openapi.PACIFICA_HEADERS,
                "Retry-After": header(
                    "While staging: seconds to wait before polling again "
                    "(the ETA within 1-30, or 5 when unknown)",
                    required=False,
                    kind="integer",
                ),
            },
        },
        **head_error(400, "Invalid cart id (X-Pacifica-Status: error)"),
        **head_error(404, "No such cart (X-Pacifica-Message: No cart with uid ID found)"),
        **head_error(500, "The cart is in error, or an unexpected failure"),
    },
)
async def head_cart(owner: Owner, cart_id: CartId, runtime: RuntimeDep) -> Response:
    try:
        cart, retry_after = await retry_deadlocks(
            lambda: carts.head_status(runtime.readers, runtime.answers, cart_id, owner=owner)
        )
    except carts.CartNotFound as exc:
        return head_not_found(exc)
    return head_response(cart, retry_after)


def head_not_found(exc: carts.CartNotFound) -> Response:
    return Response(status_code=404, headers=_status_headers("error", str(exc)))


def head_response(cart: CartBrief, retry_after: int) -> Response:
    """HEAD's answer for a cart (api.fast_head sends the same for a kept answer)."""
    code = 500 if cart.state == CartState.ERROR else 204
    headers = _status_headers(cart.state, cart.message)
    if headers["X-Pacifica-Status"] == "staging":
        headers["Retry-After"] = str(retry_after)
    return Response(status_code=code, headers=headers)


@router.get(
    "/{cart_id}/status",
    response_model=CartStatus,
    tags=["progress"],
    summary="Progress: cart state, counts, bytes, ETA and per-file detail",
    description="Beyond 0.7.0, for progress bars and humans.  `?files=0` leaves out the "
    "per-file list, which for a 100,000-file cart is most of the answer.",
    responses={
        200: {"content": {"application/json": {"example": examples.STATUS}}},
        **BAD_STATUS_QUERY,
        **NO_SUCH_CART,
        **INTERNAL,
    },
)
async def cart_status(
    owner: Owner, cart_id: CartId, runtime: RuntimeDep, files: FilesParam = True
) -> CartStatus | Response:
    try:
        status = await retry_deadlocks(
            lambda: carts.cart_status(runtime.readers, cart_id, owner=owner, files=files)
        )
    except carts.CartNotFound as exc:
        return error_response(404, str(exc))
    return JSONResponse(status.document())


_ETAG = header('Strong validator of these bytes, e.g. "5d41402abc4b2a76b9719d911017c592"')
_VARY = header("Accept, when no format was given", required=False)
_BUNDLE_HEADERS = {
    "ETag": _ETAG,
    "Accept-Ranges": header("Always bytes"),
    "Content-Disposition": header(
        'attachment; filename="NAME", plus an RFC 6266 filename* for a non-ASCII NAME'
    ),
    "Content-Length": header("Exact size of the body, known before the first byte", kind="integer"),
    "Vary": _VARY,
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_BUNDLE_TYPES: dict[str, Any] = {fmt.media_type: _BINARY for fmt in bundle.Format}
FormatParam = Annotated[
    bundle.Format | None,
    Query(
        alias="format",
        description="tar (default) or zip (stored, Zip64 where needed).  Without it, "
        "`Accept: application/zip` preferred over application/x-tar gets zip.",
        openapi_examples={"tar": {"value": "tar"}, "zip": {"value": "zip"}},
    ),
]
ManifestParam = Annotated[
    bool | None,
    Query(
        description="Add MANIFEST.sha256 (sha256sum -c format) and MANIFEST.<hashtype> as "
        "the last members; default: as posted with the cart (`manifest`).",
        openapi_examples={"manifest": {"value": True}},
    ),
]
FilenameParam = Annotated[
    str | None,
    Query(
        description="Bundle name, also the top directory without its .tar/.zip; default "
        "data_YYYY_MM_DD_HH_MM_SS.tar (or .zip).  No '/', '\\' or control characters.",
        openapi_examples={"name": {"value": "my_cart.tar"}},
    ),
]


class BundleResponse(StreamingResponse):
    """A tar (or zip) stream; the class tells the OpenAPI document the route's media type."""

    media_type = bundle.Format.TAR.media_type


@dataclass(frozen=True)
class Conditions:
    """The request headers that make a download conditional or partial (RFC 9110)."""

    range: str | None
    if_range: str | None
    if_none_match: str | None


def _conditions(
    range_header: Annotated[
        str | None,
        Header(
            alias="Range",
            description="One byte range (bytes=a-b, bytes=a- or bytes=-n) for a 206; anything "
            "else is ignored and the whole bundle is sent",
            openapi_examples={"resume": {"value": "bytes=1048576-"}},
        ),
    ] = None,
    if_range: Annotated[
        str | None,
        Header(
            alias="If-Range",
            description="Honour Range only while the ETag is still this one (curl -C -)",
            openapi_examples={"etag": {"value": '"5d41402abc4b2a76b9719d911017c592"'}},
        ),
    ] = None,
    if_none_match: Annotated[
        str | None,
        Header(
            alias="If-None-Match",
            description="304 with no body when the bundle's ETag is listed, or for *",
            openapi_examples={"etag": {"value": '"5d41402abc4b2a76b9719d911017c592"'}},
        ),
    ] = None,
) -> Conditions:
    return Conditions(range_header, if_range, if_none_match)


ConditionsDep = Annotated[Conditions, Depends(_conditions)]


@router.get(
    "/{cart_id}",
    name="download_cart",
    response_class=BundleResponse,
    tags=["carts"],
    summary="Download a ready cart as a tar or zip stream (resumable with Range / If-Range)",
    description="A plain PAX tar (never Content-Encoding), every member under one top "
    "directory named after the bundle.  The same cart gives the same bytes for the same "
    "name, so `curl -C -` resumes.  Without `format`, `Accept: application/zip` rated above "
    "application/x-tar gets a zip.",
    responses={
        200: {
            "content": _BUNDLE_TYPES,
            "description": "The bundle: a PAX tar, or a stored zip with format=zip.",
            "headers": _BUNDLE_HEADERS,
        },
        202: openapi.message("Still staging", "The cart is not ready for download."),
        206: {
            "content": _BUNDLE_TYPES,
            "description": "The byte range asked for.",
            "headers": {
                **_BUNDLE_HEADERS,
                "Content-Range": header("bytes a-b/size of the whole bundle"),
            },
        },
        304: {
            "description": "If-None-Match matched the ETag: the client's copy is current.",
            "headers": {"ETag": _ETAG, "Vary": _VARY},
        },
        **error(
            400,
            "Invalid cart id, filename, format or manifest value",
            {
                "cart_id": examples.INVALID_CART_ID,
                "filename": examples.BAD_FILENAME,
                "format": examples.BAD_FORMAT,
            },
        ),
        **GONE,
        **error(
            409,
            "The cart is in error, or a manifest would overwrite a cart path",
            {"failed": examples.FAILED, "manifest": examples.MANIFEST_CLASH},
        ),
        **error(
            416,
            "The range lies wholly outside the bundle",
            {"past_end": examples.PAST_END},
            **{
                "Content-Range": header("bytes */size of the whole bundle"),
                "Accept-Ranges": header("Always bytes"),
            },
        ),
        **INTERNAL,
    },
)
async def download_cart(
    owner: Owner,
    cart_id: CartId,
    request: Request,
    runtime: RuntimeDep,
    conditions: ConditionsDep,
    filename: FilenameParam = None,
    bundle_format: FormatParam = None,
    manifest: ManifestParam = None,
) -> Response:
    fmt = bundle_format or formats.from_accept(request.headers.get("accept"))
    try:
        name = bundle.check_name(filename or bundle.default_name(fmt=fmt), fmt)
        hold_for = runtime.worker.lease if runtime.volume.shared else None
        cart, files = await retry_deadlocks(
            lambda: carts.ready_files(runtime.sessions, cart_id, owner=owner, hold=hold_for)
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
        return _bundle_response(conditions, runtime, hold, plan, vary)
    except downloads.Refused as exc:
        hold.release()
        return error_response(409, str(exc))
    except BaseException:
        hold.release()
        raise


def _bundle_response(
    conditions: Conditions, runtime: Runtime, hold: Hold, plan: bundle.Plan, vary: dict[str, str]
) -> Response:
    """Evaluate the preconditions in RFC 9110 order: If-None-Match, then If-Range/Range."""
    etag = ranges.strong_etag(plan.digest)
    if ranges.none_match(conditions.if_none_match, etag):
        hold.release()
        return Response(status_code=304, headers={"ETag": etag, **vary})
    headers = {
        **vary,
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": bundle.content_disposition(plan.name),
    }
    try:
        wanted = ranges.selected_range(conditions.range, conditions.if_range, etag, plan.size)
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
    return BundleResponse(body, status_code=status, media_type=plan.media_type, headers=headers)


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
    tags=["carts"],
    summary="Delete a cart, cancelling its staging and freeing its files",
    description="A download already streaming may finish; the id may then be used again.",
    responses={
        200: openapi.message("Deleted", "Cart Deleted Successfully"),
        **BAD_CART_ID,
        **GONE,
        **INTERNAL,
    },
)
async def delete_cart(owner: Owner, cart_id: CartId, runtime: RuntimeDep) -> Response:
    try:
        await retry_deadlocks(
            lambda: carts.delete_cart(
                runtime.sessions,
                runtime.worker,
                runtime.volume,
                cart_id,
                owner=owner,
                answers=runtime.answers,
            )
        )
    except carts.CartNotFound as exc:
        return error_response(404, str(exc))
    return JSONResponse({"message": "Cart Deleted Successfully"})


__all__ = ["CartRequest", "router"]
