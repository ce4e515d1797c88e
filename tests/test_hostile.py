"""Hostile input that the API tests do not already cover: cart ids as raw and
percent-encoded bytes, header injection through `filename`, and huge `fileids`.

(Oversized and deeply nested bodies: tests/test_api.py.  Generated requests:
tests/test_schemathesis.py.  Bundle paths: tests/test_properties.py.)
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from archive_server import ArchiveServer
from conftest import DATABASES, Service, assert_error, entry, make_ready, standalone_service

RAW_IDS = [
    b"/caf%C3%A9",  # a non-ASCII id, percent-encoded
    b"/%E2%82%AC",  # decodes to a character that latin-1 headers cannot carry
    b"/%ff",  # not UTF-8 at all: decodes to U+FFFD
    b"/a%00b",
    b"/%2e%2e",
    b"/%2e",
    b"/a%20b",
    b"/a%0d%0aSet-Cookie:%20x=1",
    b"/" + b"a" * 129,
    b"/a%2Fb",
    b"/caf\xc3\xa9",  # raw UTF-8 in the request line
    b"/\xff\xfe",
]
VERBS = [b"HEAD", b"GET", b"DELETE", b"POST"]


@pytest.fixture(scope="module", params=DATABASES)
def hostile(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, ArchiveServer]]:
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with standalone_service(request.param, root, keepalive=False) as started:
        yield started


def raw_request(service: Service, verb: bytes, target: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no client library would send, and parse the reply by hand."""
    with socket.create_connection(("127.0.0.1", service.thread.port), timeout=10) as sock:
        sock.sendall(
            verb + b" " + target + b" HTTP/1.1\r\nHost: cartd\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("target", RAW_IDS, ids=repr)
def test_hostile_cart_ids_get_4xx_never_5xx(
    hostile: tuple[Service, ArchiveServer], target: bytes
) -> None:
    service, _archive = hostile
    for verb in VERBS:
        code, headers, body = raw_request(service, verb, target)
        assert 400 <= code < 500, (verb, target, code, body[:200])
        assert "set-cookie" not in headers
        if headers.get("server") != "uvicorn" or body.startswith(b"Invalid HTTP"):
            continue  # refused by the HTTP parser before it reached cartd
        if verb == b"HEAD":
            assert headers["x-pacifica-status"] == "error", (target, headers)
            assert headers["x-pacifica-message"], (target, headers)
        else:
            document = json.loads(body)
            assert document["status"] == code, (verb, target, document)


def test_ids_that_cannot_be_put_in_a_header_are_400_on_head(
    hostile: tuple[Service, ArchiveServer],
) -> None:
    service, _archive = hostile
    for target in (b"/%E2%82%AC", b"/%ff"):
        code, headers, _body = raw_request(service, b"HEAD", target)
        assert code == 400, target
        assert headers["x-pacifica-message"].startswith("invalid cart id"), headers


def test_a_percent_encoded_valid_id_is_the_same_cart(
    hostile: tuple[Service, ArchiveServer],
) -> None:
    service, archive = hostile
    make_ready(service, archive, "pct-cart", {"a.txt": b"percent"})
    code, headers, _body = raw_request(service, b"HEAD", b"/%70ct-cart")
    assert (code, headers["x-pacifica-status"]) == (204, "ready")


@pytest.mark.parametrize(
    "name",
    ["a\r\nSet-Cookie: x=1.tar", "a\nb.tar", "a\x00b.tar", "a/b.tar", "a\\b.tar", "\x7f.tar"],
    ids=repr,
)
def test_filename_cannot_inject_headers(hostile: tuple[Service, ArchiveServer], name: str) -> None:
    service, archive = hostile
    make_ready(service, archive, "inject", {"a.txt": b"inject"})
    response = service.client.get("/inject", params={"filename": name})
    assert_error(response, 400)
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    ("name", "fallback", "extended"),
    [
        ('a"b.tar', 'filename="a_b.tar"', "filename*=UTF-8''a%22b.tar"),
        ("a;b=c.tar", 'filename="a;b=c.tar"', None),
        ("caf\u00e9.tar", 'filename="caf?.tar"', "filename*=UTF-8''caf%C3%A9.tar"),
        ("\u202eexe.tar", 'filename="?exe.tar"', "filename*=UTF-8''%E2%80%AEexe.tar"),
    ],
    ids=repr,
)
def test_odd_filenames_are_quoted_not_obeyed(
    hostile: tuple[Service, ArchiveServer], name: str, fallback: str, extended: str | None
) -> None:
    service, archive = hostile
    make_ready(service, archive, "quoted", {"a.txt": b"quoted"})
    response = service.client.get("/quoted", params={"filename": name})
    assert response.status_code == 200, response.text
    disposition = response.headers["content-disposition"]
    assert disposition.startswith(f"attachment; {fallback}")
    if extended is not None:
        assert disposition.endswith(f"; {extended}")
    assert disposition.count('"') == 2, disposition


def one_file(file_id: object, path: str = "p") -> dict[str, object]:
    return {"fileids": [{**entry("x", path, b""), "id": file_id}]}


@pytest.mark.parametrize(
    ("uid", "document"),
    [
        ("id-1025", one_file("i" * 1025)),
        ("int-2000-digits", one_file(int("9" * 2000))),
        ("path-4097", one_file("x", "p" * 4097)),
    ],
)
def test_huge_values_are_400(
    hostile: tuple[Service, ArchiveServer], uid: str, document: dict[str, object]
) -> None:
    service, _archive = hostile
    message = assert_error(service.client.post(f"/{uid}", json=document), 400)
    assert message.startswith("fileids[0]"), message


def test_an_integer_too_long_for_json_is_400(hostile: tuple[Service, ArchiveServer]) -> None:
    service, _archive = hostile
    body = json.dumps(one_file(0)).replace('"id": 0', '"id": ' + "9" * 5000)
    message = assert_error(service.client.post("/int-5000", content=body), 400)
    assert "not valid JSON" in message


def test_a_hundred_thousand_and_one_files_are_400_at_once(
    hostile: tuple[Service, ArchiveServer],
) -> None:
    service, _archive = hostile
    item = entry("x", "p", b"")
    body = json.dumps({"fileids": [item] * 100_001}).encode()
    response = service.client.post("/too-many", content=body, timeout=60)
    message = assert_error(response, 400)
    assert "maximum is 100000" in message
    assert service.client.head("/too-many").status_code == 404


def test_the_service_still_answers(hostile: tuple[Service, ArchiveServer]) -> None:
    service, _archive = hostile
    assert httpx.get(f"{service.url}/", timeout=10).status_code == 200
