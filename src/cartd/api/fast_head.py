"""HEAD /{cart_id} answered from a kept answer (cartd.status_cache) before FastAPI routes it.

Once the answer is kept, what is left of a poll is FastAPI's routing, dependency solving
and exception layers, which cost more than the rest of the request together (py-spy, the
polling benchmark).  This pure ASGI layer sits inside the access log, so the request id,
the log line and the HTTP metrics are the same, and sends the very response that
`head_cart` builds.  It answers only what it can answer exactly as the route would: a
valid cart id whose answer is kept for the identity the request proves.  Anything else
(no kept answer, a refused identity, another path or method) goes to the app unchanged,
which then answers, errors included, and keeps the answer for the next poll.
"""

from __future__ import annotations

from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cartd import carts, logs
from cartd.api import carts as cart_routes
from cartd.schemas import valid_cart_id

# What the router would put in the scope: the access log labels the metrics by its path.
HEAD_ROUTE = next(r for r in cart_routes.router.routes if getattr(r, "name", "") == "head_cart")


class KeptHead:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            response = self._kept(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _kept(self, scope: Scope) -> Response | None:
        cart_id = get_route_path(scope)[1:]
        if "/" in cart_id or not valid_cart_id(cart_id):
            return None
        app = scope["app"]
        runtime = getattr(app.state, "runtime", None)
        if runtime is None or runtime.answers.ttl <= 0:
            return None  # nothing can be kept: do not identify the caller twice
        try:
            owner = app.state.authenticator.identify(Request(scope))
        except HTTPException:
            return None  # the route refuses it, with its own headers
        try:
            kept = carts.kept_head_status(runtime.answers, cart_id, owner=owner)
        except carts.CartNotFound as exc:
            response = cart_routes.head_not_found(exc)
        else:
            if kept is None:
                return None
            response = cart_routes.head_response(*kept)
        logs.bind(cart_id=cart_id)
        scope["route"] = HEAD_ROUTE
        return response
