"""`cartd healthcheck`: the container's HEALTHCHECK, asking the service's liveness endpoint.

Slim images have no curl, and a probe written inline in the Dockerfile would hard-code the
port.  This one reads the port from Settings like the service does, so `CARTD_PORT` moves
both together.
"""

from __future__ import annotations

import httpx

from cartd.settings import Settings

# The service listens on every address when bound to a wildcard; loopback reaches it then.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (recognised, not bound to)


def default_url(settings: Settings, path: str = "/healthz") -> str:
    host = "127.0.0.1" if settings.host in _WILDCARDS else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}{path}"


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """(healthy, what to print): healthy means a 2xx answer within `timeout` seconds."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__}: {exc}"
    body = response.text.strip().replace("\n", " ")[:200]
    return response.is_success, f"{url}: {response.status_code} {body}".rstrip()
