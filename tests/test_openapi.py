"""The OpenAPI document describes what the service really does."""

from __future__ import annotations

from typing import Any

from cartd.app import create_app


def _document() -> dict[str, Any]:
    document: dict[str, Any] = create_app().openapi()
    return document


def test_cart_body_schema_is_published() -> None:
    document = _document()
    post = document["paths"]["/{cart_id}"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/CartRequest"}
    cart = document["components"]["schemas"]["CartRequest"]
    assert cart["properties"]["fileids"]["items"] == {"$ref": "#/components/schemas/FileEntry"}
    assert set(post["responses"]) == {"201", "400", "409", "413"}


def test_no_phantom_422_and_errors_documented() -> None:
    document = _document()
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            assert "422" not in operation["responses"], (path, verb)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    head = document["paths"]["/{cart_id}"]["head"]["responses"]
    assert set(head) == {"204", "400", "404", "500"}
    assert "X-Pacifica-Status" in head["404"]["headers"]
    error = document["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"status", "message"}
