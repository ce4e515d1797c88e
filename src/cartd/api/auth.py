"""Access control: which identity a request speaks for (CARTD_AUTH).  HTTP concerns only.

The cart routes depend on `owner`; the use cases get the identity as a plain string and
scope every cart by it.  With CARTD_AUTH=none every request is the empty identity, which
is exactly pacifica-cartd's single shared namespace.  Health, metrics, `/` and the API
documentation never depend on it: they say nothing about anybody's carts.

- token: `Authorization: Bearer <token>`, or HTTP Basic with the identity as user name and
  the token as password (what pacifica-downloader's `auth={"auth": (user, token)}` sends).
  Missing or wrong credentials get 401 with a `WWW-Authenticate: Bearer` challenge.
- proxy: the CARTD_AUTH_HEADER that a proxy in CARTD_TRUSTED_PROXIES sets after it has
  authenticated the user.  Anything else gets 403: cartd has no challenge to offer, since
  the login happens at the proxy, and new credentials sent to cartd could not help.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from cartd.api.peer import TrustedProxies, peer_host
from cartd.settings import Settings
from cartd.tokens import Tokens, load_tokens, valid_identity

ANONYMOUS = ""  # the identity of every request when access control is off
CHALLENGE = 'Bearer realm="cartd"'


class AuthConfigError(ValueError):
    """The access-control settings cannot work; start-up stops with this message."""


@dataclass(frozen=True)
class Authenticator:
    mode: str
    tokens: Tokens | None = None
    header: str = ""
    proxies: TrustedProxies | None = None

    def identify(self, request: Request) -> str:
        if self.mode == "token":
            assert self.tokens is not None
            return _from_token(self.tokens, request.headers.get("authorization", ""))
        if self.mode == "proxy":
            assert self.proxies is not None
            return _from_proxy(self.proxies, self.header, request)
        return ANONYMOUS


def authenticator(settings: Settings) -> Authenticator:
    """Built once at start-up: a bad token file or proxy list refuses to serve at all."""
    try:
        proxies = TrustedProxies(settings.trusted_proxies)  # also used for X-Forwarded-*
        if settings.auth == "token":
            return Authenticator("token", tokens=load_tokens(settings.auth_tokens_file))
        if settings.auth == "proxy":
            if proxies.everyone or not proxies.networks:
                raise ValueError(
                    "CARTD_AUTH=proxy needs CARTD_TRUSTED_PROXIES to list the proxy's "
                    "addresses; with '*' or none, any client could claim any identity"
                )
            if not settings.auth_header.strip():
                raise ValueError("CARTD_AUTH=proxy needs a CARTD_AUTH_HEADER name")
            return Authenticator("proxy", header=settings.auth_header.strip(), proxies=proxies)
    except ValueError as exc:
        raise AuthConfigError(str(exc)) from None
    return Authenticator("none")


def _unauthorized(message: str, error: str = "") -> HTTPException:
    challenge = f'{CHALLENGE}, error="{error}"' if error else CHALLENGE
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def _from_token(tokens: Tokens, authorization: str) -> str:
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if not scheme or not credentials:
        raise _unauthorized("authentication required: send Authorization: Bearer <token>")
    if scheme.lower() == "bearer":
        identity = tokens.identify(credentials)
    elif scheme.lower() == "basic":
        user, token = _basic(credentials)
        identity = tokens.identify(token)
        identity = identity if identity == user else None
    else:
        raise _unauthorized(f"unsupported authorization scheme {scheme[:20]!r}: use Bearer")
    if identity is None:
        raise _unauthorized("invalid credentials", error="invalid_token")
    return identity


def _basic(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    # binascii.Error and UnicodeDecodeError are ValueErrors, as is a non-ASCII header
    # (Starlette decodes headers as latin-1): all are the client's malformed credentials.
    except ValueError:
        raise _unauthorized("malformed Basic credentials", error="invalid_request") from None
    user, _, token = decoded.partition(":")
    return user, token


def _from_proxy(proxies: TrustedProxies, header: str, request: Request) -> str:
    if peer_host(request) not in proxies:
        raise HTTPException(403, "access control is on: requests must come through the proxy")
    identity = request.headers.get(header, "").strip()
    if not valid_identity(identity):
        raise HTTPException(403, f"the proxy sent no usable {header} identity")
    return identity


async def owner(request: Request) -> str:
    """The identity whose carts this request may see; raises 401/403 before any cart work."""
    auth: Authenticator = request.app.state.authenticator
    return auth.identify(request)


Owner = Annotated[str, Depends(owner)]
