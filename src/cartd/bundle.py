"""Tar bundles planned up front and streamed on the fly.

The plan is the list of members with their header bytes, so the exact size is known
before the first byte is sent, and the same cart and name always give the same bytes.
Headers are built with `TarInfo.tobuf` (PAX), never by driving a TarFile.
"""

from __future__ import annotations

import re
import tarfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiofiles

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")


class InvalidBundleName(ValueError):
    pass


@dataclass(frozen=True)
class StagedFile:
    path: str  # relative path inside the bundle, already validated
    size: int
    mtime: float
    source: Path


@dataclass(frozen=True)
class Member:
    header: bytes
    source: Path | None
    size: int

    @property
    def length(self) -> int:
        return len(self.header) + self.size + _padding(self.size)


@dataclass(frozen=True)
class Plan:
    name: str
    members: tuple[Member, ...]
    trailer: bytes

    @property
    def size(self) -> int:
        return sum(m.length for m in self.members) + len(self.trailer)


def _padding(size: int) -> int:
    return -size % BLOCK


def default_name(now: float | None = None) -> str:
    return time.strftime("data_%Y_%m_%d_%H_%M_%S.tar", time.localtime(now))


def check_name(name: str) -> str:
    """A download name becomes the top directory, so it must be one plain path segment."""
    if _BAD_NAME.search(name):
        raise InvalidBundleName("filename must not contain '/', '\\' or control characters")
    if top_directory(name) in ("", ".", ".."):
        raise InvalidBundleName(f"filename {name!r} does not give a usable top directory")
    return name


def top_directory(name: str) -> str:
    return name.removesuffix(".tar")


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


def plan_tar(name: str, files: Sequence[StagedFile]) -> Plan:
    """Members in order: top directory, then each file preceded by any new parent dirs."""
    top = top_directory(name)
    dir_mtime = int(max((f.mtime for f in files), default=0))
    members = [Member(_header(top, tarfile.DIRTYPE, 0, dir_mtime, 0o755), None, 0)]
    made: set[str] = set()
    for staged in files:
        parts = staged.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                made.add(parent)
                header = _header(f"{top}/{parent}", tarfile.DIRTYPE, 0, dir_mtime, 0o755)
                members.append(Member(header, None, 0))
        header = _header(
            f"{top}/{staged.path}", tarfile.REGTYPE, staged.size, int(staged.mtime), 0o644
        )
        members.append(Member(header, staged.source, staged.size))
    body = sum(m.length for m in members)
    end = 2 * BLOCK
    trailer = bytes(end + -(body + end) % RECORD)
    return Plan(name=name, members=tuple(members), trailer=trailer)


async def stream(plan: Plan, chunk_size: int) -> AsyncIterator[bytes]:
    """Yield the tar; a file that shrank underneath us aborts rather than send wrong bytes."""
    for member in plan.members:
        yield member.header
        if member.source is None:
            continue
        remaining = member.size
        async with aiofiles.open(member.source, "rb") as handle:
            while remaining:
                chunk = await handle.read(min(chunk_size, remaining))
                if not chunk:
                    raise OSError(f"{member.source} is shorter than its recorded size")
                remaining -= len(chunk)
                yield chunk
        if pad := _padding(member.size):
            yield bytes(pad)
    yield plan.trailer
