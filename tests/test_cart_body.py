"""parse_cart's reading of a body an entry at a time (cartd.cart_body), and PackedFiles.

Reading a window at a time must give json's values and the model's verdicts wherever the
windows happen to end, so most tests here run with windows of a few bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from typing import Any

import pytest
from pydantic import ValidationError

from cartd import cart_body, carts, schemas
from cartd.carts import InvalidCart, parse_cart
from cartd.schemas import CartRequest, NewCart, NewFile, PackedFiles

SHA1 = hashlib.sha1(b"a").hexdigest()
MD5 = hashlib.md5(b"a").hexdigest()


def entry(file_id: Any = "a", path: str = "a.txt", **overrides: Any) -> dict[str, Any]:
    return {"id": file_id, "path": path, "hashtype": "sha1", "hashsum": SHA1, **overrides}


def verdict(body: carts.Body, max_files: int = 10) -> Any:
    """parse_cart's answer: the cart, or the refusal's message."""
    try:
        return parse_cart(body, max_files)
    except InvalidCart as exc:
        return f"refused: {exc}"


def document_verdict(body: bytes, max_files: int = 10) -> Any:
    """The same question answered from the whole document, as parse_cart did before."""
    try:
        return carts.NewCart.of(CartRequest.model_validate(carts._decode(body, max_files)))
    except InvalidCart as exc:
        return f"refused: {exc}"
    except ValidationError as exc:
        return f"refused: {carts._describe(exc)}"


ENTRY = json.dumps(entry("e", "entry"))
BODIES = [
    json.dumps({"fileids": [entry("a", "x/1"), entry(7, "/x/2", hashtype="MD5", hashsum=MD5)]}),
    json.dumps({"fileids": [entry()], "ttl": 12345.5, "manifest": True}, indent=4),
    json.dumps({"ttl": 1e3, "fileids": [entry(10**30, "\u00e9t\u00e9/\u6570\u636e")]}),
    json.dumps({"fileids": [entry(path="\u00e9" * 50)]}, ensure_ascii=False),
    '{"fileids":[' + ",".join(json.dumps(entry(str(n), f"d/{n}")) for n in range(40)) + "]}",
    f' \n\t{{ "fileids" : [ {ENTRY} , {ENTRY[:-1]}, "path": "other"}} ] , "ttl" : 1 }}\r\n',
    f'{{"fileids": [{ENTRY}], "fileids": [{ENTRY}]}}',  # json keeps the last
    f'{{"fileids": [{ENTRY}], "manifest": {ENTRY}}}',
    f'{{"fileids": [{ENTRY}], "bundle": {{"x": [{ENTRY}, 1.5e-3, null, true]}}}}',
    f'{{"fileids": [{ENTRY}], "ttl": 5e}}',
    f'{{"fileids": [{ENTRY},]}}',
    f'{{"fileids": [{ENTRY}],}}',
    f'{{"fileids": [{ENTRY}]}} x',
    f'{{"fileids": [{ENTRY}]}}{{}}',
    f'{{"fileids": [{ENTRY} {ENTRY}]}}',
    f'{{"fileids": [{ENTRY}], "ttl": -Infinity}}',
    f'{{"fileids": [{ENTRY}], "ttl": NaN}}',
    f'{{"fileids": [{ENTRY}, {ENTRY}]}}',  # the same path twice
    json.dumps({"fileids": [entry(path="a"), entry(path="a/b")]}),
    json.dumps({"fileids": [entry(path="MANIFEST.sha1")], "manifest": True}),
    json.dumps({"fileids": [entry(path="ERRORS.json")], "allow_partial": True}),
    json.dumps({"fileids": [entry(path="ERRORS.json")]}),
    json.dumps({"fileids": [entry(path="a/../b")]}),
    json.dumps({"fileids": []}),
    json.dumps({"fileids": {}}),
    json.dumps({"files": [entry()]}),
    json.dumps({}),
    json.dumps([entry()]),
    '{"fileids": [' + ENTRY,
    '{"fileids": ["\\ud800"]}',
    '{"fileids": [' + ENTRY.replace('"entry"', '"\\ud800"') + "]}",
]


@pytest.fixture(params=[1, 3, 64, cart_body.CHUNK], ids=lambda n: f"window{n}")
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cart_body, "CHUNK", request.param)
    return int(request.param)


@pytest.mark.parametrize("body", BODIES)
def test_reading_a_window_at_a_time_agrees_with_the_whole_document(body: str, window: int) -> None:
    raw = body.encode("utf-8", "surrogatepass")
    assert verdict(raw) == document_verdict(raw)


VALID = [body for body in BODIES[:6] if "fileids" in body]


@pytest.mark.parametrize("body", VALID)
def test_valid_bodies_are_read_a_window_at_a_time(
    body: str, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wherever a window ends (in a number, a string, a multi-byte character), a valid
    body is accepted without the whole-document decode."""
    raw = body.encode()
    expected = document_verdict(raw, 100)
    assert isinstance(expected, NewCart)

    def whole(*args: object) -> None:
        raise AssertionError("the body was decoded whole")

    monkeypatch.setattr(carts, "_decode", whole)
    assert parse_cart(raw, 100) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"\xef\xbb\xbf" + json.dumps({"fileids": [entry()]}).encode(),  # json.loads takes a BOM
        json.dumps({"fileids": [entry()]}).encode("utf-16"),
        json.dumps({"fileids": [entry()]}).encode("utf-32-le"),
        json.dumps({"fileids": [entry(path="\u00e9t\u00e9")]}, ensure_ascii=False).encode()[:-9]
        + b"\xff\xfe\x00]}",
    ],
)
def test_bodies_in_other_encodings_get_json_loads_verdict(raw: bytes, window: int) -> None:
    assert verdict(raw) == document_verdict(raw)


def test_the_decoded_text_is_a_window_not_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of reading a window at a time: the body's whole text never exists."""
    monkeypatch.setattr(cart_body, "CHUNK", 256)
    widest = 0
    grow = cart_body._Window._grow

    def measured(self: cart_body._Window) -> bool:
        nonlocal widest
        grown = grow(self)
        widest = max(widest, len(self.text))
        return grown

    monkeypatch.setattr(cart_body._Window, "_grow", measured)
    body = json.dumps({"fileids": [entry(str(n), f"d/{n}") for n in range(1000)]}).encode()
    assert len(parse_cart(body, 1000).fileids) == 1000
    assert 0 < widest < 1024 < len(body)


def test_a_valid_cart_is_never_decoded_as_a_document(monkeypatch: pytest.MonkeyPatch) -> None:
    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body was decoded whole")

    monkeypatch.setattr(json, "loads", whole)
    monkeypatch.setattr(carts, "_decode", whole)
    body = json.dumps({"fileids": [entry(str(n), f"d/{n}") for n in range(100)]}).encode()
    assert len(parse_cart(body, 100).fileids) == 100
    assert verdict(body, 99) == "refused: cart has 100 files; the maximum is 99"


def test_a_cart_over_the_limit_keeps_no_more_entries_than_the_limit() -> None:
    body = json.dumps({"fileids": [entry(str(n), f"d/{n}") for n in range(50)]}).encode()
    scanned = cart_body.scan(body, carts._entry_or_object, keep=3)
    assert scanned is not None
    assert (scanned.count, len(scanned.files)) == (50, 3)


# --- PackedFiles ---------------------------------------------------------------------------

FILES = [
    NewFile(str(n), f"d{n % 3}/\u00e9\u6570{n}", "sha1" if n % 2 else "md5", f"{n:040x}")
    for n in range(4500)
]


def test_packed_files_read_back_as_they_were_packed() -> None:
    packed = PackedFiles(FILES)
    assert len(packed) == len(FILES)
    assert list(packed) == FILES
    assert packed[0] == FILES[0]
    assert packed[-1] == FILES[-1]
    assert packed[1999:2003] == FILES[1999:2003]
    assert packed[4400:9999] == FILES[4400:]
    assert packed[::1000] == FILES[::1000]
    assert packed[5:2] == []
    assert list(packed.column(1)) == [f.path for f in FILES]


def test_packed_files_hold_entries_longer_than_a_block() -> None:
    files = [
        NewFile("a", "x" * 4000, "sha1", SHA1),
        *FILES[:3],
        NewFile("b", "y" * 9000, "md5", MD5),
    ]
    packed = PackedFiles(files)
    assert list(packed) == files
    assert packed[1:4] == files[1:4]
    assert list(packed.column(1)) == [f.path for f in files]


def test_packed_files_index_out_of_range() -> None:
    packed = PackedFiles(FILES[:2])
    with pytest.raises(IndexError):
        packed[2]
    with pytest.raises(IndexError):
        packed[-3]


def test_packed_files_compare_by_contents() -> None:
    assert PackedFiles(FILES[:3]) == PackedFiles(FILES[:3])
    assert PackedFiles(FILES[:3]) != PackedFiles(FILES[1:4])
    assert PackedFiles() == PackedFiles([])
    assert NewCart(PackedFiles(FILES[:1])) != NewCart(PackedFiles(FILES[1:2]))


# --- the path rules, judged by hashes --------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "clear"),
    [
        (["a", "b", "c/d", "c/e/f", "c/e/g"], True),
        (["a", "a"], False),
        (["c/d", "x", "c/d"], False),
        (["a", "a/b"], False),  # a file and a directory of the same name, either order
        (["a/b/c", "a/b"], False),
        (["a/b/c", "a"], False),
        (["ab/c", "a"], True),
        (["a/bc", "a/b"], True),
    ],
)
def test_paths_clear_by_hash_agrees_with_check_paths(paths: list[str], clear: bool) -> None:
    assert schemas._clear_by_hash(paths) is clear
    try:
        carts.check_paths(paths)
    except ValueError:
        assert not clear
    else:
        assert clear


def test_colliding_hashes_fall_back_to_check_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A collision costs the memory the hashes save, never a wrong verdict or the slow path."""
    monkeypatch.setattr(schemas, "hash", lambda _path: 7, raising=False)
    body = json.dumps({"fileids": [entry(str(n), f"d/{n}") for n in range(5)]}).encode()
    assert not schemas._clear_by_hash([f"d/{n}" for n in range(5)])

    def whole(*args: object) -> None:
        raise AssertionError("the body was decoded whole")

    monkeypatch.setattr(carts, "_decode", whole)
    assert len(parse_cart(body, 10).fileids) == 5


@pytest.mark.parametrize("body", BODIES)
def test_a_body_in_a_mapping_gets_the_same_verdict(body: str) -> None:
    """The API reads a body of declared length into an anonymous mapping."""
    raw = body.encode("utf-8", "surrogatepass")
    mapped = mmap.mmap(-1, len(raw))
    mapped[:] = raw
    assert verdict(mapped) == document_verdict(raw)
