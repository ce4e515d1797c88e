"""Endpoints for operators and their machines: liveness, readiness and Prometheus metrics.

They take three names out of the cart id space: `GET /metrics` cannot be a download of a
cart called `metrics`, so POSTing a cart with one of these ids is refused (400) instead of
creating a cart that could never be downloaded.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel

from cartd import health, scrape
from cartd.runtime import Runtime
from cartd.schemas import Message

router = APIRouter(tags=["operations"])
RESERVED_CART_IDS = frozenset({"healthz", "readyz", "metrics"})


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


class Ready(BaseModel):
    message: str
    checks: dict[str, str]


class NotReady(BaseModel):
    status: int
    message: str
    checks: dict[str, str]


@router.get(
    "/healthz",
    response_model=Message,
    summary="Liveness: the process answers (touches neither database nor volume)",
)
async def healthz() -> Message:
    return Message(message="alive")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: the database answers, the volume is writable, the worker runs",
    responses={503: {"model": NotReady, "description": "Not ready; `checks` says why"}},
)
async def readyz(runtime: RuntimeDep) -> Response:
    checks = await health.readiness(runtime)
    summary = {check.name: check.problem or "ok" for check in checks}
    failed = [f"{check.name}: {check.problem}" for check in checks if not check.ok]
    if failed:
        body = {"status": 503, "message": "not ready: " + "; ".join(failed), "checks": summary}
        return JSONResponse(body, 503)
    return JSONResponse({"message": "ready", "checks": summary})


_EXPOSITION = {"schema": {"type": "string"}}


@router.get(
    "/metrics",
    summary="Prometheus metrics: text format 0.0.4, or OpenMetrics when the Accept header asks",
    response_class=Response,
    responses={
        200: {
            "description": "Every cartd series (see the README's Observability section)",
            "content": {
                "text/plain; version=0.0.4; charset=utf-8": _EXPOSITION,
                "application/openmetrics-text; version=1.0.0; charset=utf-8": _EXPOSITION,
            },
        }
    },
)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    await scrape.collect_state(runtime)
    # prometheus_client's own negotiation, as its ASGI app does.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(runtime.metrics.registry), headers={"Content-Type": content_type})
