"""The OpenAPI document describes what the service really does, completely enough that a
client generated from it works, and the committed docs/openapi.json is that document."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from archive_server import ArchiveServer
from cartd import cli
from cartd.api import examples
from cartd.api.openapi import render
from cartd.app import create_app
from cartd.schemas import CartRequest, CartStatus
from conftest import MTIME, Service, assert_error, entry, make_ready

COMMITTED = Path(__file__).parent.parent / "docs" / "openapi.json"
VERBS = ("get", "put", "post", "delete", "head", "patch", "options", "trace")
# The generated client's binary answers; tar and zip are bytes to it like any other.
GENERATOR_CONFIG = """\
post_hooks: []
content_type_overrides:
  application/x-tar: application/octet-stream
  application/zip: application/octet-stream
"""


def _document() -> dict[str, Any]:
    document: dict[str, Any] = create_app().openapi()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, verb, operation)
        for path, item in document["paths"].items()
        for verb, operation in item.items()
        if verb in VERBS
    ]


def test_document_passes_the_openapi_spec_validator() -> None:
    validate(_document())


def test_committed_document_is_the_one_the_code_builds() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(_document()), (
        "docs/openapi.json is out of date with the code: run `make openapi` and commit it"
    )


def test_cartd_openapi_writes_the_document_without_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make openapi` runs this; it must work on a machine with no database or volume."""
    monkeypatch.setenv("CARTD_DATABASE_URL", "mysql+aiomysql://root@127.0.0.1:1/none")
    monkeypatch.setenv("CARTD_VOLUME_PATH", str(tmp_path / "absent"))
    cli.main(["openapi", "-o", str(tmp_path / "openapi.json")])
    cli.main(["openapi"])
    written = (tmp_path / "openapi.json").read_text(encoding="utf-8")
    assert written == capsys.readouterr().out == render(_document())
    assert not (tmp_path / "absent").exists()


def test_cart_body_schema_is_published_with_examples() -> None:
    document = _document()
    post = document["paths"]["/{cart_id}"]["post"]
    media = post["requestBody"]["content"]["application/json"]
    assert media["schema"] == {"$ref": "#/components/schemas/CartRequest"}
    cart = document["components"]["schemas"]["CartRequest"]
    assert cart["properties"]["fileids"]["items"] == {"$ref": "#/components/schemas/FileEntry"}
    assert set(post["responses"]) == {"201", "400", "401", "403", "409", "413", "500"}
    assert "Location" in post["responses"]["201"]["headers"]
    ids = [f["id"] for example in media["examples"].values() for f in example["value"]["fileids"]]
    assert {type(i) for i in ids} == {str, int}  # both id types pacifica clients send


def test_no_phantom_422_and_errors_documented() -> None:
    document = _document()
    for path, verb, operation in _operations(document):
        assert "422" not in operation["responses"], (path, verb)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    head = document["paths"]["/{cart_id}"]["head"]["responses"]
    assert set(head) == {"204", "400", "401", "403", "404", "500"}
    error = document["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"status", "message"}


def test_every_operation_is_described_with_a_stable_id_and_tag() -> None:
    ids = []
    for path, verb, operation in _operations(_document()):
        where = f"{verb.upper()} {path}"
        assert operation.get("summary"), where
        assert operation.get("description"), where
        assert operation.get("tags"), where
        ids.append(operation["operationId"])
        if path.startswith("/{cart_id}"):  # each reads the database, which can fail
            assert "500" in operation["responses"], where
    assert len(ids) == len(set(ids))
    assert {"create_cart", "head_cart", "download_cart", "cart_status", "delete_cart"} <= set(ids)


def test_every_parameter_has_a_description_and_an_example() -> None:
    for path, verb, operation in _operations(_document()):
        for parameter in operation.get("parameters", []):
            where = f"{verb.upper()} {path} {parameter['in']} {parameter['name']}"
            assert parameter.get("description"), where
            assert parameter.get("examples") or parameter.get("example") is not None, where


def _check_body(where: str, code: str, response: dict[str, Any]) -> None:
    assert response.get("description"), where
    if code in ("204", "304"):
        assert "content" not in response, where
        return
    for media_type, media in response.get("content", {}).items():
        assert media.get("schema"), (where, media_type)
        if media_type == "application/json":
            assert media.get("example") or media.get("examples"), (where, media_type)
    if code.startswith(("4", "5")) and "content" in response:
        (media,) = response["content"].values()
        if where == "GET /readyz 503":  # an error body that also lists the checks
            assert media["schema"] == {"$ref": "#/components/schemas/NotReady"}, where
            assert {"status", "message"} <= set(media["example"]), where
            return
        assert media["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, where
        for example in media["examples"].values():
            assert example["value"]["status"] == int(code), where
            assert example["value"]["message"], where


def test_every_response_has_a_description_schema_and_example() -> None:
    for path, verb, operation in _operations(_document()):
        for code, response in operation["responses"].items():
            where = f"{verb.upper()} {path} {code}"
            if verb == "head":
                assert "content" not in response, where  # HEAD answers have no body
                assert {"X-Pacifica-Status", "X-Pacifica-Message"} <= set(response["headers"])
            else:
                assert "content" in response or code in ("204", "304"), where
                _check_body(where, code, response)


def test_download_documents_its_validators_ranges_and_headers() -> None:
    download = _document()["paths"]["/{cart_id}"]["get"]
    headers = {p["name"] for p in download["parameters"] if p["in"] == "header"}
    assert headers == {"Range", "If-Range", "If-None-Match"}
    responses = download["responses"]
    assert set(responses) == {
        *("200", "202", "206", "304", "400", "401", "403", "404", "409", "416", "500")
    }
    for code in ("200", "206"):
        assert set(responses[code]["content"]) == {"application/x-tar", "application/zip"}
        required = {k for k, v in responses[code]["headers"].items() if v["required"]}
        assert {"ETag", "Accept-Ranges", "Content-Disposition", "Content-Length"} <= required
    assert "Content-Range" in responses["206"]["headers"]
    assert "Content-Range" in responses["416"]["headers"]
    assert "ETag" in responses["304"]["headers"]


def test_every_schema_property_is_described() -> None:
    for name, schema in _document()["components"]["schemas"].items():
        for prop, definition in schema.get("properties", {}).items():
            assert definition.get("description"), f"{name}.{prop}"


# --- a client generated from the live document -------------------------------------------


@pytest.fixture(scope="session")
def generated_clients() -> dict[str, ModuleType]:
    """Generated packages by document hash: each distinct document is generated once."""
    return {}


def _generate(spec: bytes, root: Path) -> ModuleType:
    """openapi-python-client, offline: it reads the document from a file, runs no hooks."""
    name = "cartd_client_" + hashlib.sha256(spec).hexdigest()[:12]
    (root / "openapi.json").write_bytes(spec)
    (root / "config.yaml").write_text(GENERATOR_CONFIG)
    generator = Path(sys.executable).parent / "openapi-python-client"
    done = subprocess.run(
        [
            *(generator, "generate", "--path", "openapi.json", "--config", "config.yaml"),
            *("--meta", "none", "--output-path", name, "--fail-on-warning"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _client_package(
    service: Service, cache: dict[str, ModuleType], factory: pytest.TempPathFactory
) -> ModuleType:
    response = service.client.get("/openapi.json")  # the live document, over HTTP
    assert response.status_code == 200
    key = hashlib.sha256(response.content).hexdigest()
    if key not in cache:
        cache[key] = _generate(response.content, factory.mktemp("generated-client"))
    return cache[key]


def test_generated_client_creates_reads_and_downloads_a_cart(
    service: Service,
    archive: ArchiveServer,
    generated_clients: dict[str, ModuleType],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    package = _client_package(service, generated_clients, tmp_path_factory)
    create_cart, head_cart, download_cart, cart_status = (
        importlib.import_module(f"{package.__name__}.api.{name}")
        for name in (
            "carts.create_cart",
            "carts.head_cart",
            "carts.download_cart",
            "progress.cart_status",
        )
    )
    models = importlib.import_module(f"{package.__name__}.models")
    files = {"a/one.txt": b"first file\n", "two.bin": bytes(range(256)) * 40}
    for index, data in enumerate(files.values()):
        archive.add_file(f"gen-{index}", data, mtime=MTIME)
    fileids = [
        models.FileEntry.from_dict(entry(f"gen-{i}", path, data))
        for i, (path, data) in enumerate(files.items())
    ]
    client = package.Client(base_url=service.url, raise_on_unexpected_status=True)

    created = create_cart.sync_detailed("gen", client=client, body=models.CartRequest(fileids))
    assert created.status_code == 201
    assert created.parsed.message == "Cart Processing has begun"
    assert created.headers["Location"].endswith("/gen")

    _wait_ready(head_cart, client)
    status = cart_status.sync("gen", client=client)
    assert isinstance(status, models.CartStatus)
    assert (status.state, status.files_total, status.files_staged) == ("ready", 2, 2)
    assert sorted(f.path for f in status.files) == sorted(files)

    bundle = download_cart.sync_detailed("gen", client=client, filename="gen.tar")
    assert bundle.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(bundle.parsed.payload.read())) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {f"gen/{path}": data for path, data in files.items()}

    tail = download_cart.sync_detailed(
        "gen",
        client=client,
        filename="gen.tar",
        range_="bytes=-100",
        if_range=bundle.headers["ETag"],
    )
    assert tail.status_code == 206
    assert tail.parsed.payload.read() == bundle.content[-100:]

    missing = cart_status.sync("nope", client=client)
    assert isinstance(missing, models.ErrorBody)
    assert (missing.status, missing.message) == (404, "No cart with uid nope found")


def _wait_ready(head_cart: ModuleType, client: Any) -> None:
    """Poll HEAD through the generated client, as pacifica-downloader polls."""
    deadline = time.monotonic() + 60
    while True:
        head = head_cart.sync_detailed("gen", client=client)
        if head.headers["X-Pacifica-Status"] != "staging" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert (head.status_code, head.headers["X-Pacifica-Status"]) == (204, "ready")


# --- the examples are true -----------------------------------------------------------------


def test_example_bodies_validate_against_their_models() -> None:
    for example in examples.CART_BODIES.values():
        CartRequest.model_validate(example["value"])
    CartStatus.model_validate(examples.STATUS)


def _documented_error_examples(codes: tuple[str, ...] = ()) -> set[tuple[str, str, str, str]]:
    """(verb, path, status, example name) of every error example of these statuses, or of
    every status but the 500 and access control's (replayed in tests/test_auth.py)."""
    found = set()
    for path, verb, operation in _operations(_document()):
        for code, response in operation["responses"].items():
            wanted = code in codes if codes else code not in ("500", "401", "403")
            for media in response.get("content", {}).values():
                for name in media.get("examples", {}) if wanted else ():
                    found.add((verb.upper(), path, code, name))
    return found


def _raw_post(service: Service, cart_id: str, declared_length: int) -> tuple[int, str]:
    """A POST that declares a body it never sends: the limit is checked before reading."""
    with socket.create_connection(("127.0.0.1", service.thread.port), timeout=30) as sock:
        sock.sendall(
            f"POST /{cart_id} HTTP/1.1\r\nHost: cartd\r\n"
            f"Content-Length: {declared_length}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["message"]


Key = tuple[str, str, str, str]
Expect = Callable[[Key, httpx.Response, str], None]
CART = "/{cart_id}"


def test_error_examples_are_the_services_own_messages(
    service: Service, archive: ArchiveServer
) -> None:
    """Each documented error example is replayed: the real answer has that status and text."""
    proven: set[Key] = set()

    def expect(key: Key, response: httpx.Response, message: str) -> None:
        assert assert_error(response, int(key[2])) == message, key
        proven.add(key)

    _replay_refusals(service, expect)
    status, message = _raw_post(service, "my-cart", 64 * 1024 * 1024 + 1)
    assert (status, message) == (413, examples.TOO_LARGE)
    proven.add(("POST", CART, "413", "too_large"))
    _replay_cart_answers(service, archive, expect)
    assert proven == _documented_error_examples()


def _replay_refusals(service: Service, expect: Expect) -> None:
    """Bad ids, unknown carts and invalid bodies: no cart needs to exist."""
    ops = service.client
    for verb in ("POST", "GET", "DELETE"):
        expect((verb, CART, "400", "cart_id"), ops.request(verb, "/a b"), examples.INVALID_CART_ID)
    for path in ("/{cart_id}/status", "/{cart_id}/events"):
        response = ops.get(path.replace("{cart_id}", "a b"))
        expect(("GET", path, "400", "cart_id"), response, examples.INVALID_CART_ID)
        response = ops.get(path.replace("{cart_id}", "my-cart"))
        expect(("GET", path, "404", "not_found"), response, examples.NOT_FOUND)
        response = ops.get(path.replace("{cart_id}", "my-cart"), params={"files": "maybe"})
        expect(("GET", path, "400", "files"), response, examples.BAD_FILES)
    expect(("GET", CART, "404", "not_found"), ops.get("/my-cart"), examples.GONE)
    response = ops.get("/my-cart", params={"format": "rar"})
    expect(("GET", CART, "400", "format"), response, examples.BAD_FORMAT)
    expect(("DELETE", CART, "404", "not_found"), ops.delete("/my-cart"), examples.GONE)
    expect(
        ("POST", CART, "400", "json"),
        ops.post("/my-cart", content=b""),
        examples.INVALID_BODY["json"],
    )
    bodies = {
        "path": {"fileids": [entry("x", "../x", b"")]},
        "hashtype": {"fileids": [{**entry("x", "x", b""), "hashtype": "sha7"}]},
        "empty": {"fileids": []},
    }
    for name, body in bodies.items():
        response = ops.post("/my-cart", json=body)
        expect(("POST", CART, "400", name), response, examples.INVALID_BODY[name])


def _replay_cart_answers(service: Service, archive: ArchiveServer, expect: Expect) -> None:
    """Conflicts, bad names, failed carts, manifest clashes and ranges past the end."""
    ops = service.client
    archive.add_file("bar", b"bar", mtime=MTIME)
    assert service.post("my-cart", [entry("bar", "bar.txt", b"bar")]).status_code == 201
    response = service.post("my-cart", [entry("bar", "other.txt", b"bar")])
    expect(("POST", CART, "409", "conflict"), response, examples.CONFLICT)
    response = ops.get("/my-cart", params={"filename": "a/b.tar"})
    expect(("GET", CART, "400", "filename"), response, examples.BAD_FILENAME)

    archive.add_file("foo.txt", b"corrupted in the archive", mtime=MTIME)
    failing = entry("foo.txt", "foo.txt", b"what the client expects")
    assert service.post("failed", [failing]).status_code == 201
    assert service.wait_settled("failed")[0] == 500
    expect(("GET", CART, "409", "failed"), ops.get("/failed"), examples.FAILED)

    make_ready(service, archive, "clash", {"MANIFEST.sha256": b"mine"})
    response = ops.get("/clash", params={"manifest": "1"})
    expect(("GET", CART, "409", "manifest"), response, examples.MANIFEST_CLASH)
    response = ops.get("/clash", headers={"Range": "bytes=20480-"})
    expect(("GET", CART, "416", "past_end"), response, examples.PAST_END)
