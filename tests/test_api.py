"""The cart API contract of PROTOCOL.md section 1, exercised through the real service.

Every test talks HTTP to cartd running under uvicorn, backed by the loopback archive and a
real database (SQLite and MariaDB).  Tests that stage carts get a fresh service each (the
`service` / `make_service` fixtures); tests whose requests are refused, or that only read
unknown ids, share one service per database (`shared`) to keep the suite fast.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from archive_server import ArchiveServer
from conftest import (
    DATABASES,
    MTIME,
    MakeService,
    Service,
    assert_error,
    entry,
    make_ready,
    standalone_service,
)

CREATED = {"message": "Cart Processing has begun"}
NOT_READY = {"message": "The cart is not ready for download."}
GONE = "The cart does not exist or has already been deleted"
DEFAULT_NAME = re.compile(r"data_(\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2})\.tar")


# --- a shared service for requests that change nothing ---------------------------------------


@pytest.fixture(scope="module", params=DATABASES)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service per database for requests that are refused or touch no cart.

    Starting a service costs most of a test's time; these tests create nothing (or only carts
    under ids of their own), so they share one instead of paying for it dozens of times.
    """
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    # No keep-alive: a request that breaks its connection must not fail the next test.
    with standalone_service(request.param, root, keepalive=False) as (service, _archive):
        yield service


# --- helpers -------------------------------------------------------------------------------


def placeholder(index: int, path: str) -> dict[str, Any]:
    """A well-formed entry whose file never needs to exist (for requests that must fail)."""
    return entry(f"unused-{index}", path, b"unused")


def make_error(service: Service, archive: ArchiveServer, cart_id: str) -> str:
    """A cart whose only file never matches its checksum; returns the HEAD message."""
    archive.add_file(f"{cart_id}-bad", b"what the archive holds")
    response = service.post(cart_id, [entry(f"{cart_id}-bad", "bad.txt", b"what was promised")])
    assert response.status_code == 201, response.text
    code, status, message = service.wait_settled(cart_id)
    assert (code, status) == (500, "error")
    return message


def make_staging(service: Service, archive: ArchiveServer, cart_id: str) -> None:
    """A cart whose file stays on tape for the whole test."""
    archive.add_file(f"{cart_id}-tape", b"slow", tape_delay=math.inf)
    response = service.post(cart_id, [entry(f"{cart_id}-tape", "slow.txt", b"slow")])
    assert response.status_code == 201, response.text


def members(body: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {member.name: member for member in tar.getmembers()}


def read_member(body: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*("(?:[^"\\\x00-\x1f]|\\.)*"|{_TOKEN})')


def disposition_filename(value: str) -> str:
    """Parse Content-Disposition strictly (RFC 6266/7230) and return the effective name."""
    assert value.isascii(), value
    kind = re.match(_TOKEN, value)
    assert kind is not None, value
    assert kind.group(0) == "attachment", value
    params: dict[str, str] = {}
    position = kind.end()
    while position < len(value):
        match = _PARAM.match(value, position)
        assert match is not None, f"unparseable Content-Disposition {value!r} at {position}"
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
        position = match.end()
    if "filename*" in params:
        charset, _, encoded = params["filename*"].partition("''")
        assert charset.upper() == "UTF-8", value
        return unquote(encoded, encoding="utf-8", errors="strict")
    return params["filename"]


# --- GET / -----------------------------------------------------------------------------------


def test_root_reports_up_and_running(shared: Service) -> None:
    response = shared.client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Pacifica Cartd Interface Up and Running"}


# --- POST: accepted bodies -----------------------------------------------------------------


def test_post_returns_201_message_and_location(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("loc", b"here")
    response = service.post("cart-loc", [entry("loc", "here.txt", b"here")])
    assert response.status_code == 201
    assert response.json() == CREATED
    location = response.headers["Location"]
    assert httpx.URL(location).path == "/cart-loc"
    followed = service.client.get(location)
    assert followed.status_code in (200, 202)


def test_post_without_content_type_is_parsed_as_json(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("raw", b"raw bytes")
    body = json.dumps({"fileids": [entry("raw", "raw.txt", b"raw bytes")]}).encode()
    response = service.client.post("/cart-raw", content=body)
    assert "content-type" not in response.request.headers
    assert response.status_code == 201, response.text
    assert service.wait_settled("cart-raw") == (204, "ready", "")


def test_post_with_form_content_type_is_parsed_as_json(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("form", b"form bytes")
    body = json.dumps({"fileids": [entry("form", "form.txt", b"form bytes")]}).encode()
    response = service.client.post(
        "/cart-form",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 201, response.text
    assert service.wait_settled("cart-form") == (204, "ready", "")


# --- POST: malformed bodies ----------------------------------------------------------------


def test_malformed_json_is_400(shared: Service) -> None:
    response = shared.client.post("/bad-json", content=b'{"fileids": [')
    message = assert_error(response, 400)
    assert "JSON" in message


def test_empty_body_is_400(shared: Service) -> None:
    assert_error(shared.client.post("/empty-body", content=b""), 400)


def test_body_that_is_not_utf8_is_400(shared: Service) -> None:
    assert_error(shared.client.post("/latin1", content=b'{"fileids": "\xff"}'), 400)


@pytest.mark.parametrize("document", [[], "fileids", 42, None], ids=repr)
def test_json_that_is_not_an_object_is_400(shared: Service, document: Any) -> None:
    response = shared.client.post("/not-object", content=json.dumps(document).encode())
    assert "object" in assert_error(response, 400)


def test_missing_fileids_is_400(shared: Service) -> None:
    response = shared.client.post("/no-fileids", json={"files": []})
    assert "fileids" in assert_error(response, 400)


def test_empty_fileids_is_400(shared: Service) -> None:
    response = shared.client.post("/empty-fileids", json={"fileids": []})
    assert "fileids" in assert_error(response, 400)


def test_fileids_not_a_list_is_400(shared: Service) -> None:
    response = shared.client.post("/fileids-dict", json={"fileids": {"id": 1}})
    assert "fileids" in assert_error(response, 400)


def test_more_files_than_the_maximum_is_400(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(max_files_per_cart=3)
    over = [placeholder(i, f"f{i}") for i in range(4)]
    assert "maximum" in assert_error(service.post("too-many", over), 400)
    for i in range(3):
        archive.add_file(f"max-{i}", b"m")
    at_limit = [entry(f"max-{i}", f"f{i}", b"m") for i in range(3)]
    assert service.post("at-limit", at_limit).status_code == 201


def _padded_body(size: int) -> bytes:
    """A valid cart of exactly `size` bytes (the padding is an ignored extra key)."""
    document = {"fileids": [placeholder(0, "a")], "pad": ""}
    document["pad"] = "x" * (size - len(json.dumps(document).encode()))
    body = json.dumps(document).encode()
    assert len(body) == size
    return body


def test_body_over_the_limit_is_413(make_service: MakeService) -> None:
    service = make_service(max_request_bytes=2048)
    assert_error(service.client.post("/big", content=_padded_body(4096)), 413)
    assert service.client.post("/small", content=_padded_body(1500)).status_code == 201


def test_chunked_body_over_the_limit_is_413(make_service: MakeService) -> None:
    service = make_service(max_request_bytes=2048)
    body = _padded_body(4096)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    response = service.client.post("/big-chunked", content=chunks())
    assert "content-length" not in response.request.headers
    assert_error(response, 413)


def test_deeply_nested_json_is_400_not_500(shared: Service) -> None:
    assert_error(shared.client.post("/deep", content=b"[" * 100_000), 400)
    nested = b'{"fileids": ' + b"[" * 100_000
    assert_error(shared.client.post("/deep-object", content=nested), 400)


# --- POST: path rules ------------------------------------------------------------------------

INVALID_PATHS = {
    "dot-dot segment": "a/../b.txt",
    "absolute after one strip": "//etc/passwd",
    "empty segment": "a//b.txt",
    "trailing slash": "a/b/",
    "dot segment": "a/./b.txt",
    "NUL": "a\x00b.txt",
    "control character": "a\x07b.txt",
    "backslash": "a\\b.txt",
    "empty": "",
    "only a slash": "/",
}


@pytest.mark.parametrize("path", INVALID_PATHS.values(), ids=INVALID_PATHS.keys())
def test_invalid_path_is_400_naming_the_entry(shared: Service, path: str) -> None:
    fileids = [placeholder(0, "fine.txt"), placeholder(1, path)]
    message = assert_error(shared.post("bad-path", fileids), 400)
    assert "fileids[1]" in message
    assert "fileids[0]" not in message


def test_duplicate_paths_are_400(shared: Service) -> None:
    fileids = [placeholder(0, "x/same.txt"), placeholder(1, "x/same.txt")]
    message = assert_error(shared.post("dup", fileids), 400)
    assert "fileids[1]" in message
    assert "fileids[0]" in message


def test_paths_equal_after_stripping_the_slash_are_duplicates(shared: Service) -> None:
    fileids = [placeholder(0, "/same.txt"), placeholder(1, "same.txt")]
    assert_error(shared.post("dup-strip", fileids), 400)


@pytest.mark.parametrize(
    "paths", [["a/b", "a/b/c.txt"], ["a/b/c.txt", "a/b"], ["a", "a/b/c.txt"]], ids=str
)
def test_path_that_is_another_files_directory_is_400(shared: Service, paths: list[str]) -> None:
    fileids = [placeholder(i, path) for i, path in enumerate(paths)]
    assert "directory" in assert_error(shared.post("dir-clash", fileids), 400)


def test_one_leading_slash_is_stripped(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "slash", {"/a.txt": b"alpha", "/d/b.txt": b"beta"})
    body = service.client.get("/slash", params={"filename": "s.tar"}).content
    assert read_member(body, "s/a.txt") == b"alpha"
    assert read_member(body, "s/d/b.txt") == b"beta"
    assert all(name == "s" or name.startswith("s/") for name in members(body))


def test_id_may_be_an_integer_or_a_string(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("1234", b"by integer")
    archive.add_file("foo.txt", b"by string")
    fileids = [entry(1234, "int.bin", b"by integer"), entry("foo.txt", "str.txt", b"by string")]
    assert service.post("ids", fileids).status_code == 201
    assert service.wait_settled("ids") == (204, "ready", "")
    body = service.client.get("/ids", params={"filename": "i.tar"}).content
    assert read_member(body, "i/int.bin") == b"by integer"
    assert read_member(body, "i/str.txt") == b"by string"


@pytest.mark.parametrize("file_id", [True, 1.5, None, "", ["x"]], ids=repr)
def test_id_of_another_type_is_400(shared: Service, file_id: Any) -> None:
    bad = {**placeholder(0, "a.txt"), "id": file_id}
    assert "fileids[0]" in assert_error(shared.post("bad-id", [bad]), 400)


# --- POST: hashes --------------------------------------------------------------------------


@pytest.mark.parametrize("hashtype", ["nosuchhash", "shake_128", ""])
def test_unknown_hashtype_is_400(shared: Service, hashtype: str) -> None:
    bad = {**placeholder(0, "a.txt"), "hashtype": hashtype}
    assert "hashtype" in assert_error(shared.post("bad-hashtype", [bad]), 400)


def test_hashtype_and_hashsum_are_case_insensitive(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("case", b"CaSe")
    shouting = entry("case", "case.txt", b"CaSe", "sha256")
    shouting["hashtype"] = "SHA256"
    shouting["hashsum"] = shouting["hashsum"].upper()
    assert service.post("case", [shouting]).status_code == 201
    assert service.wait_settled("case") == (204, "ready", "")


def test_blake2b_is_accepted(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("blake", b"blake")
    assert service.post("blake", [entry("blake", "b.txt", b"blake", "blake2b")]).status_code == 201
    assert service.wait_settled("blake") == (204, "ready", "")


@pytest.mark.parametrize(
    "hashsum",
    ["a" * 39, "a" * 41, "g" * 40, " " + "a" * 39, "a" * 38 + "\u00e9a", "", "a" * 39 + "\n"],
    ids=["short", "long", "non-hex", "space", "non-ascii", "empty", "trailing-newline"],
)
def test_hashsum_of_wrong_shape_is_400(shared: Service, hashsum: str) -> None:
    bad = {**placeholder(0, "a.txt"), "hashtype": "sha1", "hashsum": hashsum}
    assert "hashsum" in assert_error(shared.post("bad-hashsum", [bad]), 400)


# --- POST: ignored extras ------------------------------------------------------------------


def test_extra_keys_and_top_level_bundle_are_ignored(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("extra", b"extra")
    item = {**entry("extra", "e.txt", b"extra"), "mimetype": "text/plain", "size": 5}
    document = {"fileids": [item], "bundle": True, "comment": {"nested": [1, 2]}}
    assert service.client.post("/extra", json=document).status_code == 201
    assert service.wait_settled("extra") == (204, "ready", "")
    body = service.client.get("/extra", params={"filename": "e.tar"}).content
    assert set(members(body)) == {"e", "e/e.txt"}


# --- cart ids --------------------------------------------------------------------------------

INVALID_CART_IDS = {
    "dot-dot": "%2E%2E",
    "dot": "%2E",
    "129 characters": "a" * 129,
    "space": "a%20b",
    "unicode": "caf%C3%A9",
    "plus": "a+b",
    "percent": "a%25b",
}


@pytest.mark.parametrize("verb", ["POST", "GET", "DELETE"])
@pytest.mark.parametrize("raw", INVALID_CART_IDS.values(), ids=INVALID_CART_IDS.keys())
def test_invalid_cart_id_is_400(shared: Service, raw: str, verb: str) -> None:
    body = {"fileids": [placeholder(0, "a.txt")]} if verb == "POST" else None
    assert "cart id" in assert_error(shared.client.request(verb, f"/{raw}", json=body), 400)


@pytest.mark.parametrize("raw", INVALID_CART_IDS.values(), ids=INVALID_CART_IDS.keys())
def test_head_invalid_cart_id_is_400_with_pacifica_headers(shared: Service, raw: str) -> None:
    response = shared.client.head(f"/{raw}")
    assert response.status_code == 400
    assert response.headers["X-Pacifica-Status"] == "error"
    assert "cart id" in response.headers["X-Pacifica-Message"]


def test_invalid_cart_id_status_is_400(shared: Service) -> None:
    assert_error(shared.client.get("/%2E%2E/status"), 400)


def test_longest_cart_id_with_every_allowed_character_is_accepted(
    service: Service, archive: ArchiveServer
) -> None:
    cart_id = ("Az09._~-" * 16)[:128]
    archive.add_file("long-id", b"long")
    assert service.post(cart_id, [entry("long-id", "l.txt", b"long")]).status_code == 201
    assert service.wait_settled(cart_id) == (204, "ready", "")
    assert service.client.delete(f"/{cart_id}").status_code == 200


def test_cart_ids_are_case_sensitive(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "casecart", {"lower.txt": b"lower"})
    make_ready(service, archive, "CASECART", {"upper.txt": b"upper"})
    body = service.client.get("/CASECART", params={"filename": "u.tar"}).content
    assert set(members(body)) == {"u", "u/upper.txt"}


# --- re-POST and reuse ---------------------------------------------------------------------


def _barrier(service: Service, archive: ArchiveServer) -> None:
    """Stage one more cart to completion, so earlier background work has had its turn."""
    make_ready(service, archive, "barrier", {"barrier.txt": b"barrier"})


def test_identical_repost_of_ready_cart_is_201_and_stages_nothing(
    service: Service, archive: ArchiveServer
) -> None:
    fileids = make_ready(service, archive, "again", {"a.txt": b"once"})
    response = service.post("again", fileids)
    assert response.status_code == 201
    assert response.json() == CREATED
    _barrier(service, archive)
    assert archive.count("GET", "again-0") == 1
    assert service.state("again") == (204, "ready", "")


def test_identical_repost_while_staging_stages_once(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("retry", b"retry", tape_delay=math.inf)
    fileids = [entry("retry", "r.txt", b"retry")]
    assert service.post("retry", fileids).status_code == 201
    assert service.post("retry", fileids).status_code == 201
    assert service.state("retry")[1] == "staging"
    archive.add_file("retry", b"retry")  # the recall completes: the file is now on disk
    assert service.wait_settled("retry") == (204, "ready", "")
    assert archive.count("GET", "retry") == 1
    assert archive.count("POST", "retry") == 1


def test_repost_differing_only_in_hash_case_and_slash_is_identical(
    service: Service, archive: ArchiveServer
) -> None:
    fileids = make_ready(service, archive, "same-ish", {"s.txt": b"same"})
    variant = {**fileids[0], "path": "/s.txt", "hashsum": fileids[0]["hashsum"].upper()}
    assert service.post("same-ish", [variant]).status_code == 201


def test_repost_with_different_list_is_409(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "conflict", {"a.txt": b"first"})
    response = service.post("conflict", [placeholder(0, "b.txt")])
    assert_error(response, 409)
    assert service.state("conflict") == (204, "ready", "")


def test_deleted_id_can_be_reused_with_a_new_list(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "reuse", {"old.txt": b"old content"})
    assert service.client.delete("/reuse").status_code == 200
    make_ready(service, archive, "reuse", {"new.txt": b"new content"})
    body = service.client.get("/reuse", params={"filename": "r.tar"}).content
    assert set(members(body)) == {"r", "r/new.txt"}
    assert read_member(body, "r/new.txt") == b"new content"


# --- HEAD ----------------------------------------------------------------------------------


def test_head_unknown_cart_is_404_with_pacifica_headers(shared: Service) -> None:
    response = shared.client.head("/nobody")
    assert response.status_code == 404
    assert response.headers["X-Pacifica-Status"] == "error"
    assert response.headers["X-Pacifica-Message"] == "No cart with uid nobody found"


def test_head_staging_cart_is_204_staging(service: Service, archive: ArchiveServer) -> None:
    make_staging(service, archive, "on-tape")
    assert service.state("on-tape") == (204, "staging", "")


def test_head_ready_cart_is_204_ready_with_empty_message(
    service: Service, archive: ArchiveServer
) -> None:
    make_ready(service, archive, "head-ready", {"a": b"a"})
    response = service.client.head("/head-ready")
    assert response.status_code == 204
    assert response.headers["X-Pacifica-Status"] == "ready"
    assert response.headers["X-Pacifica-Message"] == ""


def test_head_error_cart_is_500_with_failed_to_pull(
    service: Service, archive: ArchiveServer
) -> None:
    message = make_error(service, archive, "head-error")
    assert message == "Failed to pull file(File hash does not match provided hash)"


def test_head_of_deleted_cart_is_404(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "head-gone", {"a": b"a"})
    assert service.client.delete("/head-gone").status_code == 200
    assert service.state("head-gone") == (404, "error", "No cart with uid head-gone found")


# --- GET (download states) -----------------------------------------------------------------


def test_get_not_ready_is_202(service: Service, archive: ArchiveServer) -> None:
    make_staging(service, archive, "not-yet")
    response = service.client.get("/not-yet")
    assert response.status_code == 202
    assert response.json() == NOT_READY


def test_get_error_cart_is_409_with_cart_message(service: Service, archive: ArchiveServer) -> None:
    head_message = make_error(service, archive, "get-error")
    response = service.client.get("/get-error")
    assert assert_error(response, 409) == head_message


def test_get_unknown_cart_is_404(shared: Service) -> None:
    response = shared.client.get("/unknown-cart")
    assert assert_error(response, 404) == GONE


def test_get_deleted_cart_is_404(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "get-gone", {"a": b"a"})
    assert service.client.delete("/get-gone").status_code == 200
    assert assert_error(service.client.get("/get-gone"), 404) == GONE


# --- DELETE --------------------------------------------------------------------------------


def test_delete_unknown_cart_is_404(shared: Service) -> None:
    assert_error(shared.client.delete("/never-made"), 404)


def test_delete_twice_is_200_then_404(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "twice", {"a": b"a"})
    first = service.client.delete("/twice")
    assert first.status_code == 200
    assert first.json() == {"message": "Cart Deleted Successfully"}
    assert_error(service.client.delete("/twice"), 404)


def test_delete_staging_cart_succeeds(service: Service, archive: ArchiveServer) -> None:
    make_staging(service, archive, "del-staging")
    assert service.client.delete("/del-staging").status_code == 200
    assert service.state("del-staging")[0] == 404


# --- download ------------------------------------------------------------------------------


def test_download_headers_and_exact_length(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "dl", {"a.txt": b"a" * 1000, "d/b.bin": bytes(range(256)) * 7})
    response = service.client.get("/dl", params={"filename": "bundle.tar"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-tar"
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert disposition_filename(response.headers["Content-Disposition"]) == "bundle.tar"
    assert read_member(response.content, "bundle/d/b.bin") == bytes(range(256)) * 7


def test_download_layout_modes_and_mtimes(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "layout", {"1/2/3/foo.txt": b"foo"})
    body = service.client.get("/layout", params={"filename": "my_cart.tar"}).content
    found = members(body)
    assert list(found) == [
        "my_cart",
        "my_cart/1",
        "my_cart/1/2",
        "my_cart/1/2/3",
        "my_cart/1/2/3/foo.txt",
    ]
    for name, member in found.items():
        if name.endswith(".txt"):
            assert member.isfile()
            assert member.mode == 0o644
            assert member.mtime == int(MTIME)
        else:
            assert member.isdir()
            assert member.mode == 0o755


def test_content_disposition_quotes_a_double_quote(
    service: Service, archive: ArchiveServer
) -> None:
    make_ready(service, archive, "quote", {"q.txt": b"q"})
    name = 'say "hi"; x=1.tar'
    response = service.client.get("/quote", params={"filename": name})
    assert response.status_code == 200
    assert disposition_filename(response.headers["Content-Disposition"]) == name
    assert 'say "hi"; x=1/q.txt' in members(response.content)


def test_non_ascii_name_gets_rfc6266_filename_star(
    service: Service, archive: ArchiveServer
) -> None:
    make_ready(service, archive, "utf8", {"q.txt": b"q"})
    name = "donn\u00e9es \u6570\u636e.tar"
    response = service.client.get("/utf8", params={"filename": name})
    header = response.headers["Content-Disposition"]
    assert "filename*=UTF-8''donn%C3%A9es%20%E6%95%B0%E6%8D%AE.tar" in header
    assert disposition_filename(header) == name
    assert "donn\u00e9es \u6570\u636e/q.txt" in members(response.content)


def test_no_content_encoding_even_when_gzip_is_accepted(
    service: Service, archive: ArchiveServer
) -> None:
    make_ready(service, archive, "gz", {"z.txt": b"z" * 100_000})
    response = service.client.get(
        "/gz", params={"filename": "z.tar"}, headers={"Accept-Encoding": "gzip, deflate, br"}
    )
    assert "Content-Encoding" not in response.headers
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert read_member(response.content, "z/z.txt") == b"z" * 100_000


def test_default_name_is_timestamped(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "default", {"a.txt": b"a"})
    before = time.time()
    response = service.client.get("/default")
    after = time.time()
    name = disposition_filename(response.headers["Content-Disposition"])
    match = DEFAULT_NAME.fullmatch(name)
    assert match is not None, name
    stamp = time.mktime(time.strptime(match.group(1), "%Y_%m_%d_%H_%M_%S"))
    assert before - 2 <= stamp <= after + 1
    top = name.removesuffix(".tar")
    assert set(members(response.content)) == {top, f"{top}/a.txt"}


def test_bad_download_names_are_400(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "badname", {"a.txt": b"a"})
    wrong = []
    for name in ("a/b.tar", "a\\b.tar", "a\x01b.tar", "a\nb.tar", "a\x7fb.tar", "..tar"):
        response = service.client.get("/badname", params={"filename": name})
        if response.status_code != 400:
            wrong.append(f"{name!r}: {response.status_code}")
        else:
            assert_error(response, 400)
    assert not wrong, wrong


def test_same_cart_and_name_give_identical_bytes(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "same", {"a.txt": b"a" * 3000, "b/c.txt": b"c"})
    first = service.client.get("/same", params={"filename": "x.tar"})
    second = service.client.get("/same", params={"filename": "x.tar"})
    assert first.status_code == second.status_code == 200
    assert first.content == second.content


def test_files_appear_in_cart_order(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "order", {"z.txt": b"z", "a/m.txt": b"m", "b.txt": b"b"})
    body = service.client.get("/order", params={"filename": "o.tar"}).content
    assert list(members(body)) == ["o", "o/z.txt", "o/a", "o/a/m.txt", "o/b.txt"]


# --- /status -------------------------------------------------------------------------------


def test_status_of_ready_cart(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "stat", {"a.txt": b"a" * 10, "b/c.txt": b"c" * 25})
    status = service.status("stat")
    assert status["cart_id"] == "stat"
    assert status["state"] == "ready"
    assert status["message"] == ""
    assert (status["files_total"], status["files_staged"], status["files_error"]) == (2, 2, 0)
    assert status["bytes_total"] == status["bytes_staged"] == 35
    assert status["ready_at"] is not None
    files = [(f["id"], f["path"], f["state"], f["size"], f["error"]) for f in status["files"]]
    assert files == [("stat-0", "a.txt", "staged", 10, ""), ("stat-1", "b/c.txt", "staged", 25, "")]


def test_status_of_error_cart_names_the_file_error(
    service: Service, archive: ArchiveServer
) -> None:
    message = make_error(service, archive, "stat-err")
    status = service.status("stat-err")
    assert status["state"] == "error"
    assert status["message"] == message
    assert status["files_error"] == 1
    [file] = status["files"]
    assert file["state"] == "error"
    assert file["error"] == "File hash does not match provided hash"


def test_status_of_staging_cart(service: Service, archive: ArchiveServer) -> None:
    make_staging(service, archive, "stat-tape")
    status = service.status("stat-tape")
    assert status["state"] in ("waiting", "staging")
    assert status["files_staged"] == 0
    assert status["ready_at"] is None


def test_status_of_unknown_cart_is_404(shared: Service) -> None:
    assert_error(shared.client.get("/nothing-here/status"), 404)


# --- inputs that must never cause a 500 ----------------------------------------------------


def test_lone_surrogate_in_id_is_not_a_server_error(shared: Service) -> None:
    body = json.dumps({"fileids": [{**placeholder(0, "a.txt"), "id": "x\ud800y"}]})
    response = shared.client.post("/surrogate-id", content=body.encode())
    assert response.status_code in (201, 400), response.text
    if response.status_code == 400:
        assert_error(response, 400)


def test_lone_surrogate_in_path_is_400(shared: Service) -> None:
    body = json.dumps({"fileids": [placeholder(0, "a\udc80.txt")]})
    response = shared.client.post("/surrogate-path", content=body.encode())
    assert "fileids[0]" in assert_error(response, 400)


def test_very_long_archive_id_is_not_a_server_error(shared: Service) -> None:
    response = shared.post("long-archive-id", [{**placeholder(0, "a.txt"), "id": "i" * 5000}])
    assert response.status_code in (201, 400), response.text
    if response.status_code == 400:
        assert_error(response, 400)


def test_every_error_body_is_json_with_status_and_message(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(max_request_bytes=2048)
    make_ready(service, archive, "errs", {"a": b"a"})
    cases: list[tuple[int, httpx.Response]] = [
        (400, service.client.post("/e1", content=b"not json")),
        (400, service.client.post("/e2", json={"fileids": [placeholder(0, "../x")]})),
        (400, service.client.get("/%2E%2E")),
        (400, service.client.get("/errs", params={"filename": "a/b"})),
        (404, service.client.get("/missing")),
        (404, service.client.get("/missing/status")),
        (404, service.client.delete("/missing")),
        (404, service.client.get("/a/b/c")),
        (405, service.client.put("/errs", content=b"{}")),
        (409, service.post("errs", [placeholder(0, "other")])),
        (413, service.client.post("/e3", content=b" " * 4096)),
    ]
    for status, response in cases:
        assert_error(response, status)


def test_huge_integer_id_is_400_not_500(shared: Service) -> None:
    fileid = {"id": int("9" * 1100), "path": "a", "hashtype": "md5", "hashsum": "0" * 32}
    response = shared.client.post("/hugeint", json={"fileids": [fileid]})
    assert "longer than 1024" in assert_error(response, 400)


def test_unknown_hashtypes_are_refused_without_growing_a_cache(shared: Service) -> None:
    from cartd.schemas import _digest_size

    before = _digest_size.cache_info().currsize
    for number in range(50):
        fileid = {"id": "x", "path": "a", "hashtype": f"nohash{number}", "hashsum": "00"}
        response = shared.client.post(f"/nohash{number}", json={"fileids": [fileid]})
        assert "not a supported hashlib algorithm" in assert_error(response, 400)
    assert _digest_size.cache_info().currsize == before
