"""Property tests: whatever path a client manages to get accepted, and whatever download name
it asks for, the tar extracts (by Python's tarfile with filter="data" and by GNU tar) to
files inside the one top directory, with the right bytes, and nothing anywhere else.

The paths come from hypothesis: dot segments, backslashes, control and bidi characters,
Windows drive letters, long segments and arbitrary unicode, mixed with plain names, so
that most generated carts are accepted and the rest exercise the refusals.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cartd import bundle
from cartd.schemas import CartRequest
from conftest import entry

TRICKY = ["..", ".", "", "~", "-", " ", "a b", "C:", "c:\\x", "\u202e", "\x00", "\n", "\\"]
NAME_MAX = 255  # bytes in one file name, on every common file system
plain = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=["Cc", "Cs"], exclude_characters="/\\"
    ),
    min_size=1,
    max_size=12,
)
segments = st.one_of(
    plain,
    plain,
    plain,
    st.sampled_from(TRICKY),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12),
    st.text(alphabet="ab./\\", min_size=1, max_size=6),
    st.text(alphabet="x", min_size=250, max_size=260),
)
raw_paths = (
    st.lists(segments, min_size=1, max_size=5)
    .map("/".join)
    .map(lambda p: st.sampled_from([p, "/" + p, "//" + p]))
    .flatmap(lambda s: s)
)
names = st.one_of(
    plain.map(lambda n: n + ".tar"),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.sampled_from(["..tar", ".tar", "a.tar.tar", "x", "...", " ", "\u00e9.tar"]),
)
# Derandomized: CI runs the same examples every time; run with a fresh --hypothesis-seed
# (and a larger max_examples) to explore further.
FAST_PROPERTIES = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def accepted(paths: list[str]) -> CartRequest | None:
    fileids = [{**entry(f"id{i}", path, b""), "path": path} for i, path in enumerate(paths)]
    try:
        return CartRequest.model_validate({"fileids": fileids})
    except ValidationError:
        return None


def build_tar(cart: CartRequest, name: str, root: Path) -> tuple[bytes, dict[str, bytes]]:
    staged, expected = [], {}
    for index, item in enumerate(cart.fileids):
        data = f"file {index}: {item.path}".encode("utf-8", "surrogatepass")
        source = root / f"src{index}"
        source.write_bytes(data)
        staged.append(bundle.StagedFile(item.path, len(data), 1444938166.5, source))
        expected[item.path] = data
    plan = bundle.plan_tar(name, staged)

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in bundle.stream(plan, 1 << 16)])

    return asyncio.run(collect()), expected


def extracted_files(dest: Path) -> dict[str, bytes]:
    """Every entry below dest, as paths relative to it; symlinks or devices are a failure."""
    found = {}
    for top, dirs, files in os.walk(dest):
        for entry_name in dirs + files:
            path = Path(top, entry_name)
            assert not path.is_symlink(), path
            assert path.is_dir() or path.is_file(), path
            if path.is_file():
                found[path.relative_to(dest).as_posix()] = path.read_bytes()
    return found


def inside(dest: Path, top: str) -> None:
    """Whatever an extraction managed to write, all of it is under the top directory."""
    assert {p.name for p in dest.iterdir()} <= {top}


def check_extraction(tar: bytes, top: str, expected: dict[str, bytes], dest: Path) -> None:
    """Both extractors put exactly the cart under `top`.  A name longer than NAME_MAX cannot
    be created at all: then the extraction may fail, but still writes nothing elsewhere."""
    wanted = {f"{top}/{path}": data for path, data in expected.items()}
    names = [top, *(part for path in expected for part in path.split("/"))]
    creatable = all(len(part.encode()) <= NAME_MAX for part in names)
    by_python, by_gnu = dest / "python", dest / "gnu"
    by_python.mkdir()
    by_gnu.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(by_python, filter="data")
    except OSError:
        assert not creatable
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    gnu = subprocess.run(
        ["tar", "-xf", "-", "-C", str(by_gnu)], input=tar, capture_output=True, env=env
    )
    inside(by_python, top)
    inside(by_gnu, top)
    if creatable:
        assert gnu.returncode == 0, gnu.stderr
        assert extracted_files(by_python) == wanted
        assert extracted_files(by_gnu) == wanted


@given(paths=st.lists(raw_paths, min_size=1, max_size=4), name=names)
@example(paths=["../../etc/passwd"], name="x.tar")
@example(paths=["/a/b", "a/b/c"], name="x.tar")
@example(paths=["a/./b"], name="..tar")
@example(paths=["\u00e9/\u202e\u0301"], name="\u00e9t\u00e9.tar")
@FAST_PROPERTIES
def test_any_accepted_cart_extracts_inside_its_top_directory(paths: list[str], name: str) -> None:
    cart = accepted(paths)
    assume(cart is not None)
    assert cart is not None
    try:
        name = bundle.check_name(name)
    except bundle.InvalidBundleName:
        assume(False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tar, expected = build_tar(cart, name, root)
        (root / "out").mkdir()
        check_extraction(tar, bundle.top_directory(name), expected, root / "out")


@given(raw=raw_paths)
@FAST_PROPERTIES
def test_accepted_paths_are_relative_and_normalised(raw: str) -> None:
    cart = accepted([raw])
    assume(cart is not None)
    assert cart is not None
    path = cart.fileids[0].path
    parts = path.split("/")
    assert not path.startswith("/")
    assert all(part not in ("", ".", "..") for part in parts), path
    assert "\\" not in path
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path), path


@pytest.mark.parametrize("name", ["../x.tar", "a/b.tar", "..tar", ".tar", "a\\b.tar", "\x00.tar"])
def test_names_that_would_escape_are_refused(name: str) -> None:
    with pytest.raises(bundle.InvalidBundleName):
        bundle.check_name(name)
