"""Per request: a request id, an access log line, HTTP metrics and the bytes of bundles served.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: it runs the app in the
request's own task, so the context that the request id starts (and the cart id that the
route binds) is the one every line of the request is logged with, and a streamed download
passes through untouched, counted chunk by chunk as it leaves.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import Counter
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cartd import logs
from cartd.metrics import Metrics

log = logging.getLogger("cartd.access")

REQUEST_ID = "X-Request-ID"
# A caller's id is kept if it is one short token of visible ASCII; anything else (spaces,
# control characters, a megabyte) could forge or flood log lines, so it gets a fresh id.
_GOOD_ID = re.compile(r"[\x21-\x7e]{1,128}")
_BUNDLES = {"application/x-tar": "tar", "application/zip": "zip"}
QUIET_ROUTES = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes log at DEBUG


def request_id(headers: Headers) -> str:
    given = headers.get(REQUEST_ID, "")
    return given if _GOOD_ID.fullmatch(given) else uuid.uuid4().hex


@dataclass
class _Outcome:
    status: int = 500  # what the client got if the app raised before answering
    sent: int = 0
    served: Counter | None = None  # the bundle format's byte counter, for a download
    started: float = field(default_factory=time.perf_counter)


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope))
        logs.new_request(rid)
        outcome = _Outcome()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID] = rid
                if fmt := _BUNDLES.get(headers.get("content-type", "")):
                    outcome.served = self.metrics.bytes_served.labels(fmt)
            elif message["type"] == "http.response.body":
                size = len(message.get("body", b""))
                outcome.sent += size
                if outcome.served is not None:
                    outcome.served.inc(size)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self._record(scope, outcome)

    def _record(self, scope: Scope, outcome: _Outcome) -> None:
        seconds = time.perf_counter() - outcome.started
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.http_request(scope["method"], route, outcome.status, seconds)
        client = scope.get("client")
        log.log(
            logging.DEBUG if route in QUIET_ROUTES else logging.INFO,
            "%s %s %d",
            scope["method"],
            scope["path"][:300],
            outcome.status,
            extra={
                "method": scope["method"],
                "path": scope["path"][:300],
                "status": outcome.status,
                "bytes": outcome.sent,
                "duration_ms": round(seconds * 1000, 1),
                "client": client[0] if client else None,
            },
        )
