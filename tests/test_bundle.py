"""Unit tests of cartd.bundle: planned size, streamed bytes, layout, names and headers."""

from __future__ import annotations

import io
import re
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from cartd import bundle
from cartd.bundle import InvalidBundleName, StagedFile

MTIME = 1444938166.5
BLOCK = 512


def stage(root: Path, path: str, data: bytes, mtime: float = MTIME) -> StagedFile:
    """Write `data` as a cache file and describe it the way the download route does."""
    source = root / "cache" / f"{len(list(root.glob('cache/*')))}.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    return StagedFile(path, len(data), mtime, source)


async def render(plan: bundle.Plan, chunk_size: int = 4096) -> bytes:
    return b"".join([chunk async for chunk in bundle.stream(plan, chunk_size)])


async def build(name: str, files: list[StagedFile], chunk_size: int = 4096) -> bytes:
    return await render(bundle.plan_tar(name, files), chunk_size)


def sample(root: Path) -> list[StagedFile]:
    return [
        stage(root, "top.txt", b"top level"),
        stage(root, "1/2/3/foo.txt", b"f" * 1000, mtime=MTIME + 10),
        stage(root, "1/2/bar.bin", bytes(range(256)) * 9),
        stage(root, "empty", b""),
        stage(root, "x/exact.bin", b"e" * BLOCK),
    ]


EXPECTED_SAMPLE = {
    "top.txt": b"top level",
    "1/2/3/foo.txt": b"f" * 1000,
    "1/2/bar.bin": bytes(range(256)) * 9,
    "empty": b"",
    "x/exact.bin": b"e" * BLOCK,
}


def tree(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """(kind, permission bits, mtime, bytes) of everything under root, by relative path."""
    found: dict[str, tuple[str, int, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        data = path.read_bytes() if kind == "file" else b""
        found[path.relative_to(root).as_posix()] = (
            kind,
            stat.S_IMODE(info.st_mode),
            int(info.st_mtime),
            data,
        )
    return found


def check_extracted(root: Path, top: str, expected: dict[str, bytes]) -> None:
    """Exactly the expected files under `top`, with 0644/0755 modes and integer mtimes."""
    found = tree(root)
    assert {p.split("/")[0] for p in found} == {top}
    files = {p.removeprefix(f"{top}/"): v for p, v in found.items() if v[0] == "file"}
    assert {p: v[3] for p, v in files.items()} == expected
    for path, (kind, mode, mtime, _) in found.items():
        if kind == "file":
            assert mode == 0o644, path
            assert mtime == int(MTIME) or mtime == int(MTIME + 10), path
        else:
            assert mode == 0o755, path


# --- size and framing ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 10_000, 65_536])
async def test_plan_size_equals_streamed_length(tmp_path: Path, size: int) -> None:
    plan = bundle.plan_tar("s.tar", [stage(tmp_path, "d/f.bin", b"z" * size)])
    assert len(await render(plan)) == plan.size


@pytest.mark.parametrize("chunk_size", [7, 512, 1 << 20])
async def test_chunk_size_does_not_change_the_bytes(tmp_path: Path, chunk_size: int) -> None:
    files = sample(tmp_path)
    assert await build("c.tar", files, chunk_size) == await build("c.tar", files)


async def test_sample_plan_size_equals_streamed_length(tmp_path: Path) -> None:
    plan = bundle.plan_tar("sample.tar", sample(tmp_path))
    assert len(await render(plan)) == plan.size


async def test_length_is_whole_blocks_ending_in_two_zero_blocks(tmp_path: Path) -> None:
    body = await build("z.tar", sample(tmp_path))
    assert len(body) % BLOCK == 0
    assert body[-2 * BLOCK :] == bytes(2 * BLOCK)


async def test_zero_blocks_come_after_the_last_member(tmp_path: Path) -> None:
    plan = bundle.plan_tar("z.tar", [stage(tmp_path, "a", b"\xff" * 700)])
    body = await render(plan)
    end_of_data = sum(member.length for member in plan.members) - (-700 % BLOCK)
    assert body[end_of_data - 700 : end_of_data] == b"\xff" * 700
    assert body[end_of_data:] == bytes(len(body) - end_of_data)
    assert len(body) - end_of_data >= 2 * BLOCK


# --- layout --------------------------------------------------------------------------------


async def test_members_lie_under_the_top_directory_in_cart_order(tmp_path: Path) -> None:
    body = await build("my_cart.tar", sample(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
    assert names == [
        "my_cart",
        "my_cart/top.txt",
        "my_cart/1",
        "my_cart/1/2",
        "my_cart/1/2/3",
        "my_cart/1/2/3/foo.txt",
        "my_cart/1/2/bar.bin",
        "my_cart/empty",
        "my_cart/x",
        "my_cart/x/exact.bin",
    ]


async def test_member_metadata(tmp_path: Path) -> None:
    body = await build("meta.tar", sample(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            if member.isdir():
                assert member.mode == 0o755, member.name
                assert member.mtime == int(MTIME + 10), member.name
            else:
                assert member.isreg(), member.name
                assert member.mode == 0o644, member.name
                assert isinstance(member.mtime, int)
            assert (member.uid, member.gid) == (0, 0)
        assert tar.getmember("meta/top.txt").mtime == int(MTIME)
        assert tar.getmember("meta/1/2/3/foo.txt").mtime == int(MTIME + 10)


async def test_extracts_with_tarfile_data_filter(tmp_path: Path) -> None:
    body = await build("cart.tar", sample(tmp_path))
    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(out, filter="data")
    check_extracted(out, "cart", EXPECTED_SAMPLE)


async def test_extracts_with_gnu_tar_without_warnings(tmp_path: Path) -> None:
    archive = tmp_path / "cart.tar"
    archive.write_bytes(await build("cart.tar", sample(tmp_path)))
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["tar", "-xpf", str(archive), "-C", str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_extracted(out, "cart", EXPECTED_SAMPLE)


NON_ASCII = "donn\u00e9es/\u6570\u636e/\u00fcber \u2603.csv"
LONG = "/".join(["d" * 60, "e" * 60, "f" * 60, "g" * 120 + ".bin"])


@pytest.mark.parametrize("path", [NON_ASCII, LONG], ids=["non-ascii", "long"])
async def test_pax_paths_round_trip_through_tarfile(tmp_path: Path, path: str) -> None:
    body = await build("p.tar", [stage(tmp_path, path, b"pax")])
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = tar.getmember(f"p/{path}")
        assert member.pax_headers.get("path") == f"p/{path}"
        handle = tar.extractfile(member)
        assert handle is not None
        assert handle.read() == b"pax"
    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(out, filter="data")
    assert (out / "p" / path).read_bytes() == b"pax"


@pytest.mark.parametrize("path", [NON_ASCII, LONG], ids=["non-ascii", "long"])
async def test_pax_paths_round_trip_through_gnu_tar(tmp_path: Path, path: str) -> None:
    archive = tmp_path / "p.tar"
    archive.write_bytes(await build("p.tar", [stage(tmp_path, path, b"pax")]))
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["tar", "-xpf", str(archive), "-C", str(out)], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (out / "p" / path).read_bytes() == b"pax"


async def test_non_ascii_top_directory(tmp_path: Path) -> None:
    body = await build("\u00e9t\u00e9 \u6570.tar", [stage(tmp_path, "a.txt", b"a")])
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == ["\u00e9t\u00e9 \u6570", "\u00e9t\u00e9 \u6570/a.txt"]


def test_size_beyond_the_ustar_limit_uses_a_pax_size(tmp_path: Path) -> None:
    huge = 8 * 1024**3 + 1  # one past the 11 octal digits of a ustar size field
    plan = bundle.plan_tar("big.tar", [StagedFile("big.bin", huge, MTIME, tmp_path / "none")])
    member = plan.members[-1]
    assert f" size={huge}\n".encode() in member.header
    assert member.length == len(member.header) + huge + (-huge % BLOCK)
    # A sparse file with the planned framing: tarfile must find the member's size and skip it.
    sparse = tmp_path / "big.tar"
    with sparse.open("wb") as handle:
        for planned in plan.members:
            handle.write(planned.header)
            handle.seek(planned.length - len(planned.header), io.SEEK_CUR)
        handle.write(plan.trailer)
    assert sparse.stat().st_size == plan.size
    with tarfile.open(sparse) as tar:
        assert tar.getmember("big/big.bin").size == huge


# --- determinism ---------------------------------------------------------------------------


async def test_same_plan_twice_gives_identical_bytes(tmp_path: Path) -> None:
    files = sample(tmp_path)
    first = await build("d.tar", files)
    second = await build("d.tar", files)
    assert first == second


async def test_bytes_do_not_depend_on_cache_paths_or_file_times(tmp_path: Path) -> None:
    one = [stage(tmp_path / "one", "a/b.txt", b"same")]
    two = [stage(tmp_path / "two", "a/b.txt", b"same")]
    (tmp_path / "two" / "cache").touch()
    for staged in two:
        staged.source.touch()
    assert await build("d.tar", one) == await build("d.tar", two)


def test_plans_are_equal_for_equal_input(tmp_path: Path) -> None:
    files = [StagedFile("a/b", 10, MTIME, tmp_path / "x")]
    assert bundle.plan_tar("n.tar", files) == bundle.plan_tar("n.tar", files)


# --- stream failures -----------------------------------------------------------------------


async def _consume(plan: bundle.Plan, received: list[bytes]) -> None:
    async for chunk in bundle.stream(plan, 1024):
        received.append(chunk)


async def test_shrunken_source_raises_instead_of_finishing_the_tar(tmp_path: Path) -> None:
    staged = stage(tmp_path, "a.bin", b"x" * 5000)
    plan = bundle.plan_tar("t.tar", [staged, stage(tmp_path, "b.bin", b"y")])
    staged.source.write_bytes(b"x" * 4000)
    received: list[bytes] = []
    with pytest.raises(OSError, match="shorter"):
        await _consume(plan, received)
    top, first = plan.members[0], plan.members[1]
    assert b"".join(received) == top.header + first.header + b"x" * 4000


async def test_missing_source_raises(tmp_path: Path) -> None:
    staged = stage(tmp_path, "a.bin", b"x")
    staged.source.unlink()
    with pytest.raises(FileNotFoundError):
        await render(bundle.plan_tar("t.tar", [staged]))


async def test_grown_source_never_exceeds_the_planned_length(tmp_path: Path) -> None:
    staged = stage(tmp_path, "a.bin", b"x" * 100)
    plan = bundle.plan_tar("t.tar", [staged])
    staged.source.write_bytes(b"x" * 5000)
    assert len(await render(plan)) == plan.size


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a.tar",
        "my_cart.tar",
        "no-suffix",
        "a.tar.tar",
        "sp ace.tar",
        "\u00e9t\u00e9.tar",
        'quo"te.tar',
        "semi;colon.tar",
        "100%.tar",
        "...x.tar",
        "n" * 255 + ".tar",
    ],
)
def test_check_name_accepts(name: str) -> None:
    assert bundle.check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "a/b.tar",
        "/a.tar",
        "a.tar/",
        "a\\b.tar",
        "a\x00b.tar",
        "a\nb.tar",
        "a\rb.tar",
        "a\tb.tar",
        "a\x1bb.tar",
        "a\x7fb.tar",
        "",
        ".tar",
        ".",
        "..",
        "..tar",
        "...tar",
        "n" * 256 + ".tar",
        "\u00e9" * 128,
    ],
)
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(InvalidBundleName):
        bundle.check_name(name)


@pytest.mark.parametrize("name", ["a\x85b.tar", "a\x9bb.tar", "a\x80b.tar"])
def test_check_name_refuses_c1_control_characters(name: str) -> None:
    with pytest.raises(InvalidBundleName):
        bundle.check_name(name)


def test_top_directory_strips_one_tar_suffix() -> None:
    assert bundle.top_directory("my_cart.tar") == "my_cart"
    assert bundle.top_directory("a.tar.tar") == "a.tar"
    assert bundle.top_directory("plain") == "plain"


def test_default_name_is_local_time() -> None:
    now = 1_700_000_000.0
    expected = time.strftime("data_%Y_%m_%d_%H_%M_%S.tar", time.localtime(now))
    assert bundle.default_name(now) == expected
    assert re.fullmatch(r"data_\d{4}(_\d{2}){5}\.tar", bundle.default_name())
    assert bundle.check_name(bundle.default_name()) == bundle.default_name()


# --- Content-Disposition -------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*("(?:[^"\\\x00-\x1f]|\\.)*"|{_TOKEN})')


def parse_disposition(value: str) -> dict[str, str]:
    """Parse strictly per RFC 6266 / RFC 7230: any stray quote or separator fails."""
    assert value.isascii(), value
    assert value.startswith("attachment"), value
    params: dict[str, str] = {}
    position = len("attachment")
    while position < len(value):
        match = _PARAM.match(value, position)
        assert match is not None, f"unparseable at {position}: {value!r}"
        raw = match.group(2)
        params[match.group(1).lower()] = (
            re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        )
        position = match.end()
    return params


def effective_name(value: str) -> str:
    params = parse_disposition(value)
    if "filename*" in params:
        charset, _, encoded = params["filename*"].partition("''")
        assert charset.upper() == "UTF-8"
        return unquote(encoded, errors="strict")
    return params["filename"]


def test_content_disposition_plain_ascii() -> None:
    assert bundle.content_disposition("my_cart.tar") == 'attachment; filename="my_cart.tar"'


@pytest.mark.parametrize(
    "name",
    [
        'say "hi".tar',
        "semi; colon=1.tar",
        "100%.tar",
        "back\\slash.tar",
        "\u00e9t\u00e9.tar",
        "\u6570\u636e \u2603.tar",
        "\U0001f600.tar",
        "'quote'.tar",
    ],
)
def test_content_disposition_round_trips(name: str) -> None:
    assert effective_name(bundle.content_disposition(name)) == name


def test_content_disposition_non_ascii_has_ascii_fallback_and_filename_star() -> None:
    params = parse_disposition(bundle.content_disposition("donn\u00e9es.tar"))
    assert params["filename"].isascii()
    assert params["filename"].endswith(".tar")
    assert params["filename*"] == "UTF-8''donn%C3%A9es.tar"
