"""Bundles planned up front and streamed on the fly: tar here, zip in `zipbundle`.

The plan is the list of members with their header bytes, so the exact size is known
before the first byte is sent, and the same cart and name always give the same bytes.
Both formats encode the same format-neutral `layout` (top directory, parent directories,
files, generated files), and both plans are members plus a trailer, so one byte walker
(`stream_range`) serves any range of either.  Tar headers are built with `TarInfo.tobuf`
(PAX), never by driving a TarFile.  Because every member's length is known, any byte range
can be served by seeking straight to it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import os
import re
import tarfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
MAX_NAME_BYTES = 255  # one file name, on every common file system
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")


class InvalidBundleName(ValueError):
    pass


class Format(StrEnum):
    """The bundle formats a download can ask for; tar is the default (pacifica-cartd's)."""

    TAR = "tar"
    ZIP = "zip"

    @property
    def suffix(self) -> str:
        return f".{self.value}"

    @property
    def media_type(self) -> str:
        return "application/zip" if self is Format.ZIP else "application/x-tar"


@dataclass(frozen=True)
class StagedFile:
    path: str  # relative path inside the bundle, already validated
    size: int
    mtime: float
    source: Path
    checksum: str = ""  # e.g. "sha1:f572...", the verified content; feeds the digest only
    crc32: int | None = None  # computed while staging; a zip header needs it up front
    sha256: str | None = None  # computed while staging; MANIFEST.sha256 lists it


@dataclass(frozen=True)
class Generated:
    """A file cartd writes into the bundle itself (ERRORS.json, MANIFEST.*)."""

    path: str  # relative to the top directory, like StagedFile.path
    content: bytes


@dataclass(frozen=True)
class Entry:
    """One member in format-neutral terms: tar and zip encode the same list of entries.

    `path` includes the top directory.  An entry with neither `file` nor `content` is a
    directory.
    """

    path: str
    mtime: int
    file: StagedFile | None = None
    content: bytes | None = None


@dataclass(frozen=True)
class Member:
    """What the byte walker serves: `header` bytes, `size` bytes of `source`, `pad` zeros.

    A generated file has no source: its content is part of `header`, since it is as much
    in memory as a header is.
    """

    header: bytes
    source: Path | None
    size: int
    checksum: str = ""
    pad: int = 0

    @property
    def length(self) -> int:
        return len(self.header) + self.size + self.pad


@dataclass(frozen=True)
class Plan:
    name: str
    members: tuple[Member, ...]
    trailer: bytes
    media_type: str = Format.TAR.media_type
    # Where each member starts, then where the trailer starts, then the total size.
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once, where the plan is built (off the event loop), not per range request.
        lengths = [m.length for m in self.members] + [len(self.trailer)]
        object.__setattr__(self, "offsets", tuple(itertools.accumulate(lengths, initial=0)))
        digest = _digest(self.name, self.media_type, self.members, self.trailer)
        object.__setattr__(self, "digest", digest)

    @property
    def size(self) -> int:
        return self.offsets[-1]


def _digest(name: str, media_type: str, members: Sequence[Member], trailer: bytes) -> str:
    """Identity of the bytes a plan yields, for a strong ETag; never reads file contents.

    The NAME, the media type (a tar and a zip of one cart are different representations),
    every header (path, size, mtime, CRC), size and verified checksum, and the trailer,
    each length-prefixed so that no two different plans can feed the hash the same bytes.
    """
    hasher = hashlib.sha256(b"cartd-bundle-1")

    def feed(data: bytes) -> None:
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)

    feed(name.encode("utf-8", "surrogatepass"))
    feed(media_type.encode())
    for member in members:
        feed(member.header)
        feed(f"{member.size}+{member.pad}".encode())
        feed(member.checksum.encode("utf-8", "surrogatepass"))
    feed(trailer)
    return hasher.hexdigest()


def _padding(size: int) -> int:
    return -size % BLOCK


def default_name(now: float | None = None, fmt: Format = Format.TAR) -> str:
    return time.strftime(f"data_%Y_%m_%d_%H_%M_%S{fmt.suffix}", time.localtime(now))


def check_name(name: str, fmt: Format = Format.TAR) -> str:
    """A download name becomes the top directory, so it must be one plain path segment."""
    if _BAD_NAME.search(name):
        raise InvalidBundleName("filename must not contain '/', '\\' or control characters")
    top = top_directory(name, fmt)
    if top in ("", ".", ".."):
        raise InvalidBundleName(f"filename {name!r} does not give a usable top directory")
    if len(top.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise InvalidBundleName(f"filename gives a top directory over {MAX_NAME_BYTES} bytes")
    return name


def top_directory(name: str, fmt: Format = Format.TAR) -> str:
    return name.removesuffix(fmt.suffix)


def content_disposition(name: str) -> str:
    """RFC 6266: a quoted ASCII fallback, plus `filename*` when the name is not ASCII."""
    fallback = name.encode("ascii", "replace").decode().replace("\\", "_").replace('"', "_")
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


def _header(name: str, kind: bytes, size: int, mtime: int, mode: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def layout(top: str, files: Sequence[StagedFile], extra: Sequence[Generated] = ()) -> list[Entry]:
    """The entries of either format: top, each file after its new parents, generated files.

    Directories and generated files take the newest file mtime, never the clock, so that
    the same cart always gives the same bytes.
    """
    dir_mtime = int(max((f.mtime for f in files), default=0))
    entries = [Entry(top, dir_mtime)]
    made: set[str] = set()
    for staged in files:
        parts = staged.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                made.add(parent)
                entries.append(Entry(f"{top}/{parent}", dir_mtime))
        entries.append(Entry(f"{top}/{staged.path}", int(staged.mtime), file=staged))
    entries += [Entry(f"{top}/{g.path}", dir_mtime, content=g.content) for g in extra]
    return entries


def _tar_member(entry: Entry) -> Member:
    if entry.file is not None:
        staged = entry.file
        header = _header(entry.path, tarfile.REGTYPE, staged.size, entry.mtime, 0o644)
        return Member(header, staged.source, staged.size, staged.checksum, _padding(staged.size))
    if entry.content is not None:
        size = len(entry.content)
        header = _header(entry.path, tarfile.REGTYPE, size, entry.mtime, 0o644)
        return Member(header + entry.content, None, 0, pad=_padding(size))
    return Member(_header(entry.path, tarfile.DIRTYPE, 0, entry.mtime, 0o755), None, 0)


def plan_tar(name: str, files: Sequence[StagedFile], extra: Sequence[Generated] = ()) -> Plan:
    """The tar of `layout`, ending in two zero blocks padded to a whole record."""
    members = [_tar_member(entry) for entry in layout(top_directory(name), files, extra)]
    body = sum(m.length for m in members)
    end = 2 * BLOCK
    trailer = bytes(end + -(body + end) % RECORD)
    return Plan(name=name, members=tuple(members), trailer=trailer)


async def stream(plan: Plan, chunk_size: int) -> AsyncIterator[bytes]:
    """The whole bundle: the full range, so there is one byte-walking code path, not two."""
    async for chunk in stream_range(plan, 0, plan.size - 1, chunk_size):
        yield chunk


async def stream_range(plan: Plan, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
    """Yield exactly bytes [start, end] (inclusive, as in HTTP) of the bundle, tar or zip.

    Bisecting the member offsets finds the first member at once, and only files that overlap
    the range are opened, so resuming near the end of a huge cart costs what it sends.
    """
    if not 0 <= start <= end < plan.size:
        raise ValueError(f"range {start}-{end} is outside a {plan.size}-byte bundle")
    stop = end + 1
    first = bisect.bisect_right(plan.offsets, start) - 1
    for index in range(first, len(plan.members) + 1):
        base = plan.offsets[index]
        if base >= stop:
            return
        if index < len(plan.members):
            segment = plan.members[index]
        else:
            segment = Member(plan.trailer, None, 0)
        async for chunk in _member_range(segment, start - base, stop - base, chunk_size):
            yield chunk


async def _member_range(member: Member, lo: int, hi: int, chunk_size: int) -> AsyncIterator[bytes]:
    """Bytes [lo, hi) of one member (clipped to it): header slice, file data, zero padding."""
    lo, hi = max(lo, 0), min(hi, member.length)
    head = len(member.header)
    data_end = head + member.size
    if lo < head:
        yield member.header[lo : min(hi, head)]
    first, last = max(lo, head) - head, min(hi, data_end) - head
    if member.source is not None and first < last:
        async for chunk in _read_file(member.source, first, last - first, chunk_size):
            yield chunk
    if hi > data_end:
        yield bytes(hi - max(lo, data_end))


async def _read_file(
    source: Path, offset: int, count: int, chunk_size: int
) -> AsyncIterator[bytes]:
    """`count` bytes from `offset`; a file that shrank underneath us aborts, never sends wrong
    bytes, and one that grew is cut at its planned size.

    The next chunk is read in a worker thread while the event loop sends this one, so
    the disk and the socket work at the same time; positioned reads (pread) need no seek.
    """
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, os.open, source, os.O_RDONLY)
    ahead: asyncio.Future[bytes] | None = None
    try:
        while count:
            read = ahead or loop.run_in_executor(None, os.pread, fd, min(chunk_size, count), offset)
            chunk, ahead = await read, None
            if not chunk:
                raise OSError(f"{source} is shorter than its recorded size")
            offset, count = offset + len(chunk), count - len(chunk)
            if count:
                ahead = loop.run_in_executor(None, os.pread, fd, min(chunk_size, count), offset)
            yield chunk
    finally:
        if ahead is not None:
            await asyncio.wait({ahead})  # the thread must be done with `fd` before it closes
        os.close(fd)
