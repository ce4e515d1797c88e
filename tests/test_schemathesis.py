"""Fuzz the service through its own OpenAPI document (schemathesis, positive and negative
data): no generated request may get a 5xx, and every response must match what the
document says about its status code, content type, headers and body.

schemathesis' pytest plugin does not work with pytest 9 (it writes the removed
`Node._nodeid`), so each operation is driven through its hypothesis strategy instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cartd.app import create_app
from conftest import DATABASES, Service, standalone_service

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 40  # per operation and mode; derandomized, so CI sends the same requests each run
DOCUMENT = create_app().openapi()
# Negative data needs something to violate: GET / takes no parameters and no body.
CASES = [
    (path, method.upper(), mode)
    for path, methods in DOCUMENT["paths"].items()
    for method, operation in methods.items()
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or operation.get("parameters") or "requestBody" in operation
]
FUZZED: Counter[str] = Counter()


@pytest.fixture(scope="module", params=DATABASES)
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with standalone_service(request.param, root, keepalive=False) as (service, _archive):
        yield service
    print(f"\nschemathesis on {request.param}: {sum(FUZZED.values())} requests, {dict(FUZZED)}")
    FUZZED.clear()


@pytest.fixture(scope="module")
def api_schema(fuzzed: Service) -> schemathesis.BaseSchema:
    """The document the running service serves, not the one in the source."""
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=str)
def test_every_generated_request_gets_a_documented_answer(
    api_schema: schemathesis.BaseSchema,
    fuzzed: Service,
    path: str,
    method: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        FUZZED[f"{method} {path} {mode}"] += 1
        case.call_and_validate(base_url=fuzzed.url, checks=CHECKS, timeout=30)

    fuzz()
