"""Endpoints for operators and their machines: liveness, readiness and Prometheus metrics.

They take three names out of the cart id space: `GET /metrics` cannot be a download of a
cart called `metrics`, so POSTing a cart with one of these ids is refused (400) instead of
creating a cart that could never be downloaded.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, Field

from cartd import health, scrape
from cartd.api.dependencies import RuntimeDep
from cartd.schemas import Message

router = APIRouter(tags=["service"])
RESERVED_CART_IDS = frozenset({"healthz", "readyz", "metrics"})




_CHECKS = "Each check (database, volume, worker) and `ok` or what is wrong with it"
_ALL_OK = {"database": "ok", "volume": "ok", "worker": "ok"}
_VOLUME_DOWN = {**_ALL_OK, "volume": "not writable: [Errno 30] Read-only file system"}


class Ready(BaseModel):
    message: str = Field(description="Always `ready`", examples=["ready"])
    checks: dict[str, str] = Field(description=_CHECKS, examples=[_ALL_OK])


class NotReady(BaseModel):
    """An error body (`status`, `message`) that also names each check's result."""

    status: int = Field(description="The HTTP status code, 503", examples=[503])
    message: str = Field(description="`not ready: ` and every failed check with its reason")
    checks: dict[str, str] = Field(description=_CHECKS, examples=[_VOLUME_DOWN])


@router.get(
    "/healthz",
    response_model=Message,
    summary="Liveness: the process answers (touches neither database nor volume)",
    description="For a liveness probe or the container HEALTHCHECK (`cartd healthcheck`): "
    "200 whenever the event loop answers.  It never touches the database or the volume, so "
    "a slow database does not get a healthy process restarted.",
    responses={200: {"content": {"application/json": {"example": {"message": "alive"}}}}},
)
async def healthz() -> Message:
    return Message(message="alive")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: the database answers, the volume is writable, the worker runs",
    description="For a readiness probe or a load balancer: 200 when a `SELECT 1` answers, "
    "a file can be created in the volume, and the staging worker runs, each within "
    "CARTD_READY_TIMEOUT seconds; else 503 naming what failed.",
    responses={
        200: {
            "content": {
                "application/json": {"example": {"message": "ready", "checks": _ALL_OK}}
            }
        },
        503: {
            "model": NotReady,
            "description": "Not ready; `checks` says why",
            "content": {
                "application/json": {
                    "example": {
                        "status": 503,
                        "message": "not ready: volume: not writable: "
                        "[Errno 30] Read-only file system",
                        "checks": _VOLUME_DOWN,
                    }
                }
            },
        },
    },
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
    description="Carts by state, queue depth, fetches in flight, cache bytes, files and bytes "
    "staged and served, archive request latency and errors, retries, checksum failures and "
    "evictions.  No label carries a cart id.",
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
