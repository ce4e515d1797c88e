"""Per request: a request id, an access log line, HTTP metrics and the bytes of bundles served.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: it runs the app in the
request's own task, so the context that the request id starts (and the cart id that the
route binds) is the one every line of the request is logged with, and a streamed download
passes through untouched, counted chunk by chunk as it leaves.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from prometheus_client import Counter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cartd import logs
from cartd.metrics import Metrics

log = logging.getLogger("cartd.access")

REQUEST_ID = "X-Request-ID"
_RID_KEY = REQUEST_ID.lower().encode("latin-1")
# A caller's id is kept if it is one short token of visible ASCII; anything else (spaces,
# control characters, a megabyte) could forge or flood log lines, so it gets a fresh id.
_GOOD_ID = re.compile(r"[\x21-\x7e]{1,128}")
_BUNDLES = {"application/x-tar": "tar", "application/zip": "zip"}
QUIET_ROUTES = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes log at DEBUG


class _Ids:
    """Fresh request ids: 32 hex digits, a random per-process prefix and a counter.

    Ids need to be unique, not unguessable, and uuid4 cost about 4% of a kept HEAD
    (py-spy).  A forked child draws a prefix of its own, so no two processes share ids.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & _COUNT_MASK:016x}"


_COUNT_MASK = (1 << 64) - 1
_ids = _Ids()


def request_id(headers: Headers) -> str:
    given = headers.get(REQUEST_ID, "")
    return given if _GOOD_ID.fullmatch(given) else _ids.next()


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
                outcome.served = self._tag(message, rid)
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

    def _tag(self, message: Message, rid: str) -> Counter | None:
        """Set the request id header; a bundle's byte counter if this response is one.

        One pass over the raw headers: MutableHeaders' item assignment and lookup each
        scan and decode them, a few percent of a kept HEAD.
        """
        headers = message["headers"] = list(message.get("headers", ()))
        served = None
        for index in reversed(range(len(headers))):
            name = headers[index][0].lower()
            if name == _RID_KEY:
                del headers[index]  # the app's own id, if any, gives way as it always did
            elif name == b"content-type":
                fmt = _BUNDLES.get(headers[index][1].decode("latin-1"))
                served = self.metrics.bytes_served.labels(fmt) if fmt else None
        headers.append((_RID_KEY, rid.encode("latin-1")))
        return served

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
