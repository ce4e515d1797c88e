"""`GET /{cart_id}/events`: the cart's status as Server-Sent Events.  HTTP concerns only.

The stream re-reads the status from the database every CARTD_EVENTS_POLL_INTERVAL seconds
and sends it when it changed, so a browser's EventSource or `curl -N` watches a cart
without polling.  It ends after the event that shows the cart ready or in error, or with
an `event: deleted` when the cart goes away meanwhile.  A quiet stream gets a comment line
every CARTD_EVENTS_HEARTBEAT seconds, so proxies do not time it out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from cartd import carts
from cartd.api.auth import Owner
from cartd.api.carts import BAD_STATUS_QUERY, NO_SUCH_CART, CartId, FilesParam
from cartd.api.dependencies import RuntimeDep
from cartd.api.errors import error_response
from cartd.api.openapi import INTERNAL, header
from cartd.db.models import CartState
from cartd.runtime import Runtime
from cartd.schemas import CartStatus

log = logging.getLogger(__name__)
router = APIRouter()

RECONNECT_MS = 2000  # what a browser's EventSource waits before it reconnects
TERMINAL = (CartState.READY, CartState.ERROR)
# Fields that change without the cart progressing; they ride along but trigger nothing.
_VOLATILE = ("eta_seconds", "last_used_at")


class EventStreamResponse(StreamingResponse):
    """A stream of Server-Sent Events; the class tells the OpenAPI document its type."""

    media_type = "text/event-stream"


def _event(kind: str, number: int, data: dict[str, Any], retry: bool = False) -> bytes:
    """One event in the SSE wire format; compact JSON never spans lines."""
    lines = [f"event: {kind}", f"id: {number}"]
    if retry:
        lines.append(f"retry: {RECONNECT_MS}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def _change_key(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in _VOLATILE}


class _Watch:
    """One client's stream: the last status sent, and when anything was last sent."""

    def __init__(self, runtime: Runtime, owner: str, cart_id: str, files: bool) -> None:
        self.runtime = runtime
        self.owner = owner
        self.cart_id = cart_id
        self.files = files
        self.number = 0
        self.sent_at = time.monotonic()
        self.last: dict[str, Any] | None = None
        self.current: CartStatus | None = None

    def status_event(self, status: CartStatus) -> bytes | None:
        """The event for `status`, or None when nothing but the volatile fields moved."""
        self.current = status
        document = status.document()
        if self.last is not None and _change_key(document) == _change_key(self.last):
            return None
        self.last = document
        self.number += 1
        self.sent_at = time.monotonic()
        return _event("status", self.number, document, retry=self.number == 1)

    def deleted_event(self) -> bytes:
        self.number += 1
        return _event("deleted", self.number, {"cart_id": self.cart_id, "message": carts.GONE})

    def heartbeat(self) -> bytes | None:
        if time.monotonic() - self.sent_at < self.runtime.settings.events_heartbeat:
            return None
        self.sent_at = time.monotonic()
        return b": keepalive\n\n"

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last["state"] in TERMINAL

    async def poll(self) -> CartStatus | None:
        """The current status; None once the cart is gone.  A database blip skips a beat."""
        try:
            return await carts.cart_status(
                self.runtime.readers, self.cart_id, owner=self.owner, files=self.files
            )
        except SQLAlchemyError as exc:
            log.warning("event stream for cart %s could not read its status: %s", self.cart_id, exc)
            return self.current
        except carts.CartNotFound:
            return None


async def _stream(watch: _Watch, first: CartStatus) -> AsyncIterator[bytes]:
    """Send the first status at once, then every change until the cart is terminal.

    The stream also ends, without a final event, when this process stops staging (a
    shutdown): it must not hold the server up, and the client reconnects elsewhere.
    """
    yield watch.status_event(first) or b""
    settings = watch.runtime.settings
    while not watch.finished and watch.runtime.worker.alive:
        await asyncio.sleep(settings.events_poll_interval)
        status = await watch.poll()
        if status is None:
            yield watch.deleted_event()
            return
        chunk = watch.status_event(status) or watch.heartbeat()
        if chunk:
            yield chunk


@router.get(
    "/{cart_id}/events",
    response_class=EventStreamResponse,
    tags=["progress"],
    summary="Live progress as Server-Sent Events, until the cart is ready or in error",
    description="Beyond 0.7.0: for a browser's EventSource or `curl -N`, instead of polling. "
    "An unknown cart is a 404 before the stream starts.",
    responses={
        200: {
            "description": "`event: status` with the same JSON as GET /{cart_id}/status, "
            "sent at once and on every change; `id:` numbers the events of one stream; "
            "`: keepalive` comment lines keep a quiet stream open.  The stream ends after "
            "the status that shows `ready` or `error`, or with `event: deleted` when the "
            "cart is deleted, evicted or expires meanwhile.",
            "headers": {
                "Cache-Control": header("no-cache"),
                "X-Accel-Buffering": header("no: tells nginx not to buffer the stream"),
            },
            "content": {
                "text/event-stream": {
                    # Before OpenAPI 3.2 (itemSchema), `schema` describes each event.
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["status", "deleted"]},
                            "id": {"type": "string"},
                            "retry": {"type": "integer"},
                            "data": {"type": "string", "description": "The status as JSON"},
                        },
                        "required": ["event", "id", "data"],
                    },
                    "example": 'event: status\nid: 1\nretry: 2000\ndata: {"cart_id": '
                    '"my-cart", "state": "staging", "bytes_staged": 1024, ...}\n\n',
                }
            },
        },
        **BAD_STATUS_QUERY,
        **NO_SUCH_CART,
        **INTERNAL,
    },
)
async def cart_events(
    owner: Owner, cart_id: CartId, runtime: RuntimeDep, files: FilesParam = True
) -> Response:
    """404 before the stream starts for an unknown cart, so a client can tell at once."""
    try:
        first = await carts.cart_status(runtime.readers, cart_id, owner=owner, files=files)
    except carts.CartNotFound as exc:
        return error_response(404, str(exc))
    watch = _Watch(runtime, owner, cart_id, files)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(_stream(watch, first), headers=headers)
