"""DirectWriter: big files staged around the page cache, byte-exact whatever the pieces."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cartd import direct_write
from cartd.direct_write import BLOCK, DirectWriter, direct_writer

CAPACITY = 4 * BLOCK


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    descriptor = os.open(tmp_path / "f.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    yield descriptor
    os.close(descriptor)


def _writer(fd: int) -> DirectWriter:
    writer = direct_writer(fd, CAPACITY)
    assert writer is not None, "this volume's file system refused O_DIRECT"
    return writer


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [1],
        [BLOCK - 1],
        [BLOCK],
        [BLOCK + 1],
        [CAPACITY],
        [CAPACITY + 1],
        [3 * CAPACITY + 17],  # one piece filling the buffer several times
        [100] * 300,  # many pieces, none aligned
        [BLOCK - 1, 2, BLOCK, 0, CAPACITY - 3, 7],
    ],
)
def test_the_file_holds_exactly_the_pieces(fd: int, tmp_path: Path, sizes: list[int]) -> None:
    pieces = [os.urandom(size) for size in sizes]
    writer = _writer(fd)
    assert _is_direct(fd)
    half = len(pieces) // 2
    writer.write(pieces[:half])  # two batches, as staging's pipeline sends them
    writer.write(pieces[half:])
    assert writer.direct, "a write fell back from O_DIRECT"
    writer.finish()
    assert not _is_direct(fd)  # the tail, and anything after, goes through the page cache
    assert (tmp_path / "f.part").read_bytes() == b"".join(pieces)


def test_blocks_are_written_as_they_fill_and_the_tail_waits(fd: int, tmp_path: Path) -> None:
    writer = _writer(fd)
    writer.write([b"a" * (BLOCK + 10)])
    assert (tmp_path / "f.part").stat().st_size == BLOCK
    writer.finish()
    assert (tmp_path / "f.part").read_bytes() == b"a" * (BLOCK + 10)


def test_a_refused_direct_write_is_written_without_o_direct(
    fd: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems accept the flag but not the I/O: the bytes must still land."""
    real_pwrite = os.pwrite

    def refuse_direct(descriptor: int, data: memoryview, offset: int) -> int:
        if _is_direct(descriptor):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    pieces = [os.urandom(3 * BLOCK + 5), os.urandom(CAPACITY * 2)]
    writer = _writer(fd)
    writer.write(pieces)
    assert not writer.direct
    writer.finish()
    assert (tmp_path / "f.part").read_bytes() == b"".join(pieces)


def test_a_short_direct_write_continues_without_o_direct(
    fd: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What follows an unaligned short write is no longer aligned for O_DIRECT."""
    real_pwrite = os.pwrite
    shortened: list[int] = []

    def short_once(descriptor: int, data: memoryview, offset: int) -> int:
        if not shortened and _is_direct(descriptor):
            shortened.append(offset)
            flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
            fcntl.fcntl(descriptor, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            written = real_pwrite(descriptor, data[:100], offset)
            fcntl.fcntl(descriptor, fcntl.F_SETFL, flags)
            return written
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", short_once)
    pieces = [os.urandom(CAPACITY + BLOCK + 1)]
    writer = _writer(fd)
    writer.write(pieces)
    assert shortened
    assert not writer.direct
    writer.finish()
    assert (tmp_path / "f.part").read_bytes() == b"".join(pieces)


def test_a_file_system_that_refuses_the_flag_gets_no_writer(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fcntl.fcntl

    def refuse(descriptor: int, command: int, argument: int = 0) -> int:
        if command == fcntl.F_SETFL and argument & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(descriptor, command, argument)

    monkeypatch.setattr(direct_write.fcntl, "fcntl", refuse)
    assert direct_writer(fd, CAPACITY) is None
    assert not _is_direct(fd)


def test_a_failed_write_is_raised(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(descriptor: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = _writer(fd)
    with pytest.raises(OSError, match="No space left") as raised:
        writer.write([os.urandom(2 * BLOCK)])
    assert raised.value.errno == errno.ENOSPC
    writer.close()
