"""Unit tests of the POST validation rules (cartd.schemas) and of parse_cart's messages."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from cartd import carts
from cartd.carts import HASH_SLICE, InvalidCart, fingerprint, parse_cart
from cartd.carts import _describe as describe
from cartd.schemas import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    CartRequest,
    FileEntry,
    NewCart,
    digest_size,
    normalise_path,
    valid_cart_id,
)

SHA1_OF_A = hashlib.sha1(b"a").hexdigest()


def item(file_id: Any = "a", path: str = "a.txt", **overrides: Any) -> dict[str, Any]:
    return {"id": file_id, "path": path, "hashtype": "sha1", "hashsum": SHA1_OF_A, **overrides}


def cart(*items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"fileids": list(items), **extra}


def refusal(document: Any, max_files: int = 100) -> str:
    with pytest.raises(InvalidCart) as caught:
        parse_cart(json.dumps(document).encode(), max_files)
    return str(caught.value)


# --- normalise_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a.txt", "a.txt"),
        ("/a.txt", "a.txt"),
        ("1/2/3/foo.txt", "1/2/3/foo.txt"),
        ("/1/2/foo.txt", "1/2/foo.txt"),
        ("..a/b..", "..a/b.."),
        ("...", "..."),
        (".hidden", ".hidden"),
        ("sp ace/\u00e9t\u00e9/\u6570\u636e.csv", "sp ace/\u00e9t\u00e9/\u6570\u636e.csv"),
        ("/".join(["a" * 240] * 17), "/".join(["a" * 240] * 17)),  # exactly MAX_PATH_BYTES
        ("a" * MAX_NAME_BYTES, "a" * MAX_NAME_BYTES),
    ],
)
def test_normalise_path_accepts_and_strips_one_slash(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "/",
        "//",
        "//etc/passwd",
        "..",
        "/..",
        "../a",
        "a/..",
        "a/../b",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        "a/b/",
        "a\x00b",
        "a\nb",
        "a\tb",
        "a\x1fb",
        "a\x7fb",
        "a\x85b",
        "a\\b",
        "..\\a",
        "a" * (MAX_PATH_BYTES + 1),
        "a" * (MAX_NAME_BYTES + 1),
        "ok/" + "\u00e9" * 128,
        "\u00e9" * (MAX_PATH_BYTES // 2 + 1),
    ],
)
def test_normalise_path_refuses(raw: str) -> None:
    with pytest.raises(ValueError, match="path"):
        normalise_path(raw)


def test_normalise_path_message_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="'\\.\\.' segment"):
        normalise_path("a/../b")
    with pytest.raises(ValueError, match="empty segment"):
        normalise_path("a//b")
    with pytest.raises(ValueError, match="control character"):
        normalise_path("a\x00b")
    with pytest.raises(ValueError, match="backslash"):
        normalise_path("a\\b")


# --- valid_cart_id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cart_id",
    ["a", "0", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "A.b_c~d-e", "...", ".a", "a" * 128],
)
def test_valid_cart_ids(cart_id: str) -> None:
    assert valid_cart_id(cart_id)


@pytest.mark.parametrize(
    "cart_id",
    ["", ".", "..", "a" * 129, "a b", "a/b", "a\nb", "abc\n", "caf\u00e9", "a+b", "a%20b", "a:b"],
)
def test_invalid_cart_ids(cart_id: str) -> None:
    assert not valid_cart_id(cart_id)


# --- digest_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hashtype", "hex_digits"),
    [
        ("md5", 32),
        ("sha1", 40),
        ("sha256", 64),
        ("sha512", 128),
        ("blake2b", 128),
        ("blake2s", 64),
        ("sha3_256", 64),
    ],
)
def test_digest_size_is_hex_length(hashtype: str, hex_digits: int) -> None:
    assert digest_size(hashtype) == hex_digits


@pytest.mark.parametrize("hashtype", ["nosuchhash", "", "shake_128", "shake_256"])
def test_digest_size_is_none_for_unusable_algorithms(hashtype: str) -> None:
    assert digest_size(hashtype) is None


# --- FileEntry / CartRequest ---------------------------------------------------------------


def test_entry_normalises_path_hashtype_and_hashsum() -> None:
    entry = FileEntry.model_validate(
        item(path="/x/a.txt", hashtype="SHA1", hashsum=SHA1_OF_A.upper())
    )
    assert entry.path == "x/a.txt"
    assert entry.hashtype == "sha1"
    assert entry.hashsum == SHA1_OF_A


@pytest.mark.parametrize(
    ("file_id", "archive_id"), [(1234, "1234"), ("1234", "1234"), ("a/b c", "a/b c"), (0, "0")]
)
def test_entry_id_may_be_int_or_str(file_id: int | str, archive_id: str) -> None:
    assert FileEntry.model_validate(item(file_id)).archive_id == archive_id


@pytest.mark.parametrize("file_id", [True, False, 1.0, None, "", "a\x00b", [1], {"id": 1}])
def test_entry_id_of_other_types_is_refused(file_id: Any) -> None:
    with pytest.raises(ValidationError):
        FileEntry.model_validate(item(file_id))


@pytest.mark.parametrize("field", ["id", "path", "hashtype", "hashsum"])
def test_entry_fields_are_required(field: str) -> None:
    document = item()
    del document[field]
    with pytest.raises(ValidationError):
        FileEntry.model_validate(document)


@pytest.mark.parametrize("field", ["path", "hashtype", "hashsum"])
def test_entry_string_fields_must_be_strings(field: str) -> None:
    not_a_string: dict[str, Any] = {field: 5}
    with pytest.raises(ValidationError):
        FileEntry.model_validate(item(**not_a_string))


@pytest.mark.parametrize(
    "hashsum",
    [
        SHA1_OF_A[:-1],
        SHA1_OF_A + "0",
        "g" * 40,
        "",
        " " + SHA1_OF_A[1:],
        SHA1_OF_A[:-1] + "\n",
        hashlib.md5(b"a").hexdigest(),
    ],
)
def test_entry_hashsum_must_be_a_digest_of_the_type(hashsum: str) -> None:
    with pytest.raises(ValidationError, match="hashsum"):
        FileEntry.model_validate(item(hashsum=hashsum))


def test_entry_hashtype_must_be_known() -> None:
    with pytest.raises(ValidationError, match="hashtype"):
        FileEntry.model_validate(item(hashtype="sha1024"))


def test_entry_ignores_extra_keys() -> None:
    entry = FileEntry.model_validate(item(size=5, mimetype="text/plain"))
    assert "size" not in entry.model_dump()


def test_request_accepts_bundle_and_extra_keys() -> None:
    request = CartRequest.model_validate(cart(item(), bundle=True, other={"x": 1}))
    assert [e.path for e in request.fileids] == ["a.txt"]


def test_request_needs_at_least_one_file() -> None:
    with pytest.raises(ValidationError, match="fileids"):
        CartRequest.model_validate(cart())


def test_request_refuses_duplicate_paths_naming_both() -> None:
    with pytest.raises(ValidationError, match=r"fileids\[2\].*duplicates fileids\[0\]"):
        CartRequest.model_validate(cart(item("a", "x"), item("b", "y"), item("c", "/x")))


@pytest.mark.parametrize("order", [("d", "d/f"), ("d/f", "d"), ("d", "d/e/f")])
def test_request_refuses_a_path_that_is_anothers_directory(order: tuple[str, str]) -> None:
    with pytest.raises(ValidationError, match="is a directory of"):
        CartRequest.model_validate(cart(item("a", order[0]), item("b", order[1])))


def test_request_allows_shared_directories_and_prefix_names() -> None:
    request = CartRequest.model_validate(
        cart(item("a", "d/x"), item("b", "d/y"), item("c", "dd"), item("e", "d.txt"))
    )
    assert len(request.fileids) == 4


def test_the_same_archive_file_may_appear_under_two_paths() -> None:
    request = CartRequest.model_validate(cart(item("a", "one"), item("a", "two")))
    assert [e.archive_id for e in request.fileids] == ["a", "a"]


# --- parse_cart ----------------------------------------------------------------------------


def test_parse_cart_returns_the_request() -> None:
    request = parse_cart(json.dumps(cart(item(7, "/a/b.txt"))).encode(), 10)
    assert request.fileids[0].archive_id == "7"
    assert request.fileids[0].path == "a/b.txt"


@pytest.mark.parametrize("body", [b"", b"{", b"{'fileids': []}", b"\xff\xfe\x00", b"nan"])
def test_parse_cart_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidCart, match="not valid JSON"):
        parse_cart(body, 10)


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_parse_cart_deep_nesting_is_invalid_cart(depth: int) -> None:
    with pytest.raises(InvalidCart, match="not valid JSON"):
        parse_cart(b"[" * depth + b"]" * depth, 10)


@pytest.mark.parametrize("document", [[], [cart(item())], "x", 1, None, True])
def test_parse_cart_needs_an_object(document: Any) -> None:
    assert refusal(document) == 'request body must be a JSON object with a "fileids" list'


ENTRY = json.dumps(item("e", "entry"))


def _raw(file_id: str = '"a"', path: str = '"x"', rest: str = "") -> str:
    """A cart body as JSON text, for inputs json.dumps cannot write."""
    entry = f'{{"id": {file_id}, "path": {path}, "hashtype": "sha1", "hashsum": "{"a" * 40}"}}'
    return f'{{"fileids": [{entry}]{rest}}}'


@pytest.mark.parametrize(
    "body",
    [
        _raw(rest=', "fileids": []'),  # duplicate key: the last one wins
        _raw(file_id="-0"),
        _raw(file_id="10000000000000000000000000"),
        _raw(file_id="1e2"),
        _raw(rest=', "ttl": "5", "manifest": 1, "other": NaN'),
        _raw(path='"\\ud800"'),  # a lone surrogate
        # Objects shaped like entries where no entry belongs: parse_cart decodes every
        # object that FileEntry accepts as an entry, wherever it is.
        _raw(rest=f', "manifest": {ENTRY}'),
        _raw(rest=f', "ttl": {ENTRY}'),
        _raw(rest=f', "bundle": {ENTRY}, "other": [{ENTRY}]'),
        _raw(file_id=ENTRY),
        _raw(rest=f", {ENTRY[1:-1]}"),  # the whole body is also an entry
        f'{{"fileids": [{ENTRY}, [{ENTRY}]]}}',
        f'{{"fileids": [{ENTRY[:-1]}, "extra": {ENTRY}}}]}}',
    ],
)
def test_parse_cart_fast_path_agrees_with_the_document_path(body: str) -> None:
    """parse_cart decodes entries as it goes; it must accept and refuse what the model
    does with json's document, and find the same values."""
    try:
        expected: Any = NewCart.of(CartRequest.model_validate(json.loads(body)))
    except ValueError:
        expected = InvalidCart
    try:
        got: Any = parse_cart(body.encode("utf-8", "surrogatepass"), 10)
    except InvalidCart:
        got = InvalidCart
    assert got == expected


def test_parse_cart_too_many_files() -> None:
    items = [item(str(i), f"f{i}") for i in range(4)]
    assert refusal(cart(*items), max_files=3) == "cart has 4 files; the maximum is 3"
    assert len(parse_cart(json.dumps(cart(*items[:3])).encode(), 3).fileids) == 3


def test_a_valid_body_is_decoded_once_into_tuples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory-saving path takes every valid body, even one over the file limit."""

    def whole_document(*args: object) -> None:
        raise AssertionError("the body was decoded a second time, as a whole document")

    monkeypatch.setattr(carts, "_decode", whole_document)
    items = [item(str(i), f"f{i}") for i in range(4)]
    assert len(parse_cart(json.dumps(cart(*items[:3])).encode(), 3).fileids) == 3
    assert refusal(cart(*items), max_files=3) == "cart has 4 files; the maximum is 3"


def test_parse_cart_missing_fileids() -> None:
    assert refusal({"files": []}) == "fileids: Field required"


def test_parse_cart_fileids_not_a_list() -> None:
    assert refusal({"fileids": {"0": item()}}) == "fileids: Input should be a valid list"


def test_parse_cart_empty_fileids() -> None:
    assert refusal(cart()).startswith("fileids: ")


def test_parse_cart_names_the_bad_entry_and_field() -> None:
    message = refusal(cart(item("a", "ok"), item("b", "a/../b")))
    assert message.startswith("fileids[1].path: ")
    assert "'..'" in message


def test_parse_cart_names_a_bad_hashsum_entry() -> None:
    message = refusal(cart(item("a", "ok"), item("b", "b", hashsum="abc")))
    assert message.startswith("fileids[1]: hashsum 'abc' is not a sha1 digest")


def test_parse_cart_limits_the_number_of_reported_errors() -> None:
    message = refusal(cart(*[item(str(i), "..") for i in range(8)]))
    assert message.count("fileids[") == 5
    assert message.endswith("; and 3 more errors")


def test_parse_cart_message_stays_short_for_huge_values() -> None:
    message = refusal(cart(item(hashsum="f" * 100_000)))
    assert len(message) < 1000


def test_parse_cart_lone_surrogate_in_path_is_invalid_cart() -> None:
    message = refusal(cart(item(path="a\udc80b")))
    assert message.startswith("fileids[0].path: ")


# --- fingerprint ---------------------------------------------------------------------------


def _fingerprint(document: dict[str, Any]) -> str:
    return fingerprint(NewCart.of(CartRequest.model_validate(document)))


def test_fingerprint_ignores_spelling_that_validation_normalises() -> None:
    plain = _fingerprint(cart(item("1", "a.txt")))
    spelled = _fingerprint(
        cart(item(1, "/a.txt", hashtype="SHA1", hashsum=SHA1_OF_A.upper(), extra=1), bundle=1)
    )
    assert plain == spelled


@pytest.mark.parametrize(
    "change",
    [{"id": "b"}, {"path": "b.txt"}, {"hashtype": "md5", "hashsum": hashlib.md5(b"a").hexdigest()}],
)
def test_fingerprint_differs_for_a_different_list(change: dict[str, Any]) -> None:
    assert _fingerprint(cart(item())) != _fingerprint(cart(item(**change)))


def test_fingerprint_depends_on_order() -> None:
    first, second = item("a", "a"), item("b", "b")
    assert _fingerprint(cart(first, second)) != _fingerprint(cart(second, first))


def _slices(count: int = HASH_SLICE * 2 + 7) -> list[dict[str, Any]]:
    """A cart spanning three of fingerprint's slices."""
    return [
        item(n if n % 2 else f"id{n}", f"/d{n % 3}/f{n}", hashtype="SHA1") for n in range(count)
    ]


@pytest.mark.parametrize("options", [{}, {"manifest": True}, {"allow_partial": True, "ttl": 5}])
def test_fingerprint_is_the_sha256_of_the_whole_list(options: dict[str, Any]) -> None:
    """Stored fingerprints must keep matching retries: it is hashed a slice at a time, but
    over the same bytes as one json.dumps of the canonical list."""
    request = CartRequest.model_validate(cart(*_slices(), **options))
    canonical: list[Any] = [[e.archive_id, e.path, e.hashtype, e.hashsum] for e in request.fileids]
    if options.get("manifest") or options.get("allow_partial"):
        canonical.append({"manifest": request.manifest, "allow_partial": request.allow_partial})
    whole = hashlib.sha256(json.dumps(canonical).encode()).hexdigest()
    assert fingerprint(NewCart.of(request)) == whole


def test_parse_cart_over_several_slices_equals_the_model() -> None:
    document = cart(*_slices(), ttl=7, manifest=True, other=1)
    got = parse_cart(json.dumps(document).encode(), 10**6)
    assert got == NewCart.of(CartRequest.model_validate(document))
    assert got.fileids[1].archive_id == "1"
    assert got.fileids[2].path == "d2/f2"
    assert {entry.hashtype for entry in got.fileids} == {"sha1"}


@pytest.mark.parametrize(
    "late",
    [
        {"path": "d0/f0"},  # duplicates the first entry, two slices earlier
        {"path": "d1"},  # a directory of entries in every slice
        {"hashsum": "x"},  # a bad entry in the last slice only
        {"path": "MANIFEST.sha1"},  # a generated file's name
    ],
)
def test_parse_cart_refuses_a_late_entry_as_the_model_does(late: dict[str, Any]) -> None:
    entries = _slices()
    entries[-1] = {**entries[-1], **late}
    document = cart(*entries, manifest=True)
    with pytest.raises(ValidationError) as caught:
        CartRequest.model_validate(document)
    assert refusal(document, 10**6) == describe(caught.value)
