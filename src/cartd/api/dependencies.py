"""What every route takes from the running application, as FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from cartd.runtime import Runtime


# A coroutine on purpose: FastAPI runs a plain function in a worker thread, two thread
# hops per request that cost a HEAD poller more than its database read.
async def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
