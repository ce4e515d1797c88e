"""`file:` archive: a mounted directory (an HSM file system, or ./archive by default).

The file id is a path relative to the root.  Anything that resolves outside the root,
through `..` or a symlink, is refused as a file error, never read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles

from cartd.archive.base import ArchiveFileError, FileInfo, Media

log = logging.getLogger(__name__)


class LocalArchive:
    def __init__(self, root: Path, chunk_size: int) -> None:
        self.root = root.resolve()
        self.chunk_size = chunk_size
        if not self.root.is_dir():
            log.warning("local archive %s does not exist; every file will be missing", self.root)

    @classmethod
    def from_url(cls, url: str, chunk_size: int) -> LocalArchive:
        """Accept `file:///abs/dir` and the relative `file:./dir` form used by the defaults."""
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.netloc == "." else unquote(parts.path)
        return cls(Path(path or "."), chunk_size)

    def _resolve(self, file_id: str) -> Path:
        if not file_id or "\x00" in file_id:
            raise ArchiveFileError(f"invalid archive file id {file_id!r}")
        candidate = (self.root / file_id.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root):
            raise ArchiveFileError(f"file id {file_id!r} resolves outside the archive")
        return candidate

    def _stat(self, file_id: str) -> os.stat_result:
        path = self._resolve(file_id)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ArchiveFileError(f"file {file_id!r} not found in archive") from None
        except PermissionError:
            raise ArchiveFileError(f"file {file_id!r} is not readable") from None
        if not path.is_file():
            raise ArchiveFileError(f"file {file_id!r} is not a regular file")
        return info

    async def stage(self, file_id: str) -> None:
        await asyncio.to_thread(self._stat, file_id)

    async def status(self, file_id: str) -> FileInfo:
        info = await asyncio.to_thread(self._stat, file_id)
        return FileInfo(size=info.st_size, mtime=info.st_mtime, media=Media.DISK)

    @asynccontextmanager
    async def open(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await asyncio.to_thread(self._stat, file_id)
        async with aiofiles.open(self._resolve(file_id), "rb") as handle:
            yield self._chunks(handle)

    async def _chunks(
        self, handle: aiofiles.threadpool.binary.AsyncBufferedReader
    ) -> AsyncIterator[bytes]:
        while chunk := await handle.read(self.chunk_size):
            yield chunk

    async def aclose(self) -> None:
        return None
