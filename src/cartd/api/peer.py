"""Who is on the other end of the TCP connection, and which proxies may speak for others.

Forwarded headers (`X-Forwarded-For`, `X-Forwarded-Proto`) from CARTD_TRUSTED_PROXIES are
applied here, inside the app, rather than by uvicorn's `--proxy-headers`: uvicorn rewrites
`scope["client"]` before the app runs, and the address the connection really came from is
then lost.  `CARTD_AUTH=proxy` must decide on that real address, or any client that a
trusted proxy forwards (or, with a careless `FORWARDED_ALLOW_IPS=*`, any client at all)
could pass for the proxy by sending `X-Forwarded-For: <proxy address>`.  So `cartd serve`
runs uvicorn with proxy headers off and this middleware records the peer first.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

PEER_KEY = "cartd.peer"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """CARTD_TRUSTED_PROXIES parsed strictly: a typo must stop start-up, not trust nobody."""

    def __init__(self, text: str) -> None:
        entries = [item.strip() for item in text.split(",") if item.strip()]
        self.everyone = entries == ["*"]
        self.networks: list[Network] = []
        for item in [] if self.everyone else entries:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"CARTD_TRUSTED_PROXIES: {item!r} is not an IP address or network "
                    "(use comma-separated addresses or CIDRs, e.g. 127.0.0.1,10.0.0.0/8)"
                ) from None

    def __contains__(self, host: str | None) -> bool:
        if self.everyone:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False  # a Unix socket or no address: not a proxy we know
        return any(address in network for network in self.networks)


class RealPeer:
    """Record the connection's own address under PEER_KEY, then apply forwarded headers."""

    def __init__(self, app: ASGIApp, trusted_proxies: str) -> None:
        TrustedProxies(trusted_proxies)  # refuse a malformed list before serving anything
        self.app = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            scope[PEER_KEY] = client[0] if client else None
        await self.app(cast(Any, scope), cast(Any, receive), cast(Any, send))


def peer_host(request: Request) -> str | None:
    """The address of the connection itself, never one named in a header."""
    host: str | None = request.scope.get(PEER_KEY)
    return host
