"""The published OpenAPI document: what clients generated from it need beyond FastAPI's guess.

Routes declare their own responses with the helpers here, so each route says in one place
which statuses, headers and bodies it answers with.  `document()` then adds what FastAPI
cannot express from the routes (the hand-parsed cart body, no 422), and `render()` is the
byte-exact form committed as docs/openapi.json, so a change of contract shows in review.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from cartd.api import examples
from cartd.schemas import CartRequest, ErrorBody, Message

ERROR_REF = "#/components/schemas/ErrorBody"
MESSAGE_REF = "#/components/schemas/Message"
Responses = dict[int | str, dict[str, Any]]

DESCRIPTION = """\
Stages archive files into a cache and serves carts as tar streams: a drop-in replacement for
pacifica-cartd 0.7.0, whose clients (curl scripts, pacifica-downloader, pacifica-cli) work
unchanged.  Operations marked "beyond 0.7.0" are additions old clients never see.

- A cart id is chosen by the client: 1-128 characters from `[A-Za-z0-9._~-]`, not `.` or `..`.
- Every error answers JSON `{"status": <code>, "message": "<what is wrong>"}`; invalid input
  is a 400 (never 422), naming the offending entry.  HEAD answers carry no body: their
  `X-Pacifica-Status` and `X-Pacifica-Message` headers say the same.
- Downloads are resumable: a strong `ETag`, `Range` and `If-Range` (206, 416).
"""

TAGS = [
    {"name": "carts", "description": "The pacifica-cartd 0.7.0 verbs on a cart."},
    {"name": "progress", "description": "Beyond 0.7.0: detailed and live staging progress."},
    {"name": "service", "description": "The service itself: health, readiness, metrics."},
]


def header(description: str, *, required: bool = True, kind: str = "string") -> dict[str, Any]:
    """A response header; `required` only where every such response really carries it."""
    return {"description": description, "required": required, "schema": {"type": kind}}


PACIFICA_HEADERS = {
    "X-Pacifica-Status": {
        **header("staging | ready | error: every unfinished phase reads staging"),
        "schema": {"type": "string", "enum": ["staging", "ready", "error"]},
    },
    "X-Pacifica-Message": header("Empty, or the error text (one line of latin-1)"),
}


def error(code: int, description: str, examples: dict[str, str], **headers: Any) -> Responses:
    """One error status with the JSON `{"status", "message"}` body and real messages.

    The content is spelled out rather than given as a `model`: FastAPI would list a model
    under the route's own media type, which is a tar or an event stream for some routes.
    """
    response: dict[str, Any] = {
        "description": description,
        "content": {
            "application/json": {
                "schema": {"$ref": ERROR_REF},
                "examples": {
                    name: {"value": {"status": code, "message": message}}
                    for name, message in examples.items()
                },
            }
        },
    }
    if headers:
        response["headers"] = headers
    return {code: response}


def head_error(code: int, description: str) -> Responses:
    """HEAD answers carry no body: pacifica clients read the status headers instead."""
    return {code: {"description": description, "headers": PACIFICA_HEADERS}}


def message(description: str, text: str) -> dict[str, Any]:
    """A `{"message": ...}` success answer with the exact text pacifica clients see.

    Spelled out like `error()`, for routes whose own media type is not JSON.
    """
    media = {"schema": {"$ref": MESSAGE_REF}, "example": {"message": text}}
    return {"description": description, "content": {"application/json": media}}


INTERNAL = error(
    500,
    "An unexpected failure, such as an unreachable database; the cause is in the server log",
    {"internal": "internal server error"},
)


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the cart body schema, which the POST route parses by hand."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
            servers=app.servers,
        )
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (CartRequest, ErrorBody, Message):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        _drop_422(spec)
        _document_access_control(spec)
        app.openapi_schema = spec
    return app.openapi_schema


SECURITY_SCHEMES = {
    "bearerToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "CARTD_AUTH=token: a token from CARTD_AUTH_TOKENS_FILE",
    },
    "basicToken": {
        "type": "http",
        "scheme": "basic",
        "description": "CARTD_AUTH=token: the identity as user name and its token as "
        "password (what pacifica-downloader's `auth` sends)",
    },
}


def _auth_errors(head: bool) -> Responses:
    """401 and 403 exist only when CARTD_AUTH is on; HEAD says so in its headers."""
    unauthorized = "CARTD_AUTH=token: no token, or not a valid one"
    forbidden = "CARTD_AUTH=proxy: not from a trusted proxy, or no identity header"
    if head:
        return {**head_error(401, unauthorized), **head_error(403, forbidden)}
    challenge = header('Bearer realm="cartd", plus error="invalid_token" for a wrong token')
    return {
        **error(
            401,
            unauthorized,
            {"missing": examples.AUTH_REQUIRED, "invalid": examples.AUTH_INVALID},
            **{"WWW-Authenticate": challenge},
        ),
        **error(
            403,
            forbidden,
            {"untrusted": examples.PROXY_ONLY, "no_identity": examples.PROXY_NO_IDENTITY},
        ),
    }


def _document_access_control(spec: dict[str, Any]) -> None:
    """Cart operations take credentials when access control is on (off by default, hence
    the empty requirement that makes them optional); the service routes never do."""
    spec["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in spec.get("paths", {}).items():
        if not path.startswith("/{cart_id}"):
            continue
        for verb, operation in operations.items():
            operation["security"] = [{}, {"bearerToken": []}, {"basicToken": []}]
            operation["responses"].update(
                {str(code): answer for code, answer in _auth_errors(verb == "head").items()}
            )


def _drop_422(spec: dict[str, Any]) -> None:
    """Invalid requests answer 400 here (pacifica clients expect it), never FastAPI's 422."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def operation_id(route: APIRoute) -> str:
    """The route's function name: generated clients get `create_cart`, not `create_cart_post`."""
    return route.name


def render(spec: dict[str, Any]) -> str:
    """The committed form: stable key order and a trailing newline, so diffs stay small."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
