"""What the worker needs from an archive, and the two ways a request can fail.

The split between *transient* and *file* errors is the whole retry policy's input: a
transient error (5xx, dropped connection, short body) is worth retrying with backoff, a file
error (missing file, media error) is final for that file and names the cause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Media(StrEnum):
    DISK = "disk"
    TAPE = "tape"
    ERROR = "error"


@dataclass(frozen=True)
class FileInfo:
    size: int
    mtime: float
    media: Media


class ArchiveError(Exception):
    """Base of everything an archive backend raises on purpose."""


class TransientArchiveError(ArchiveError):
    """The archive may succeed if asked again later."""


class ArchiveFileError(ArchiveError):
    """The file cannot be had from the archive; retrying will not help."""


class Archive(Protocol):
    async def stage(self, file_id: str) -> None:
        """Ask the archive to bring the file online (tape to disk)."""

    async def status(self, file_id: str) -> FileInfo:
        """Report size, mtime and where the file currently sits."""

    def open(self, file_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream the file's bytes; the context closes the underlying connection or file."""

    async def aclose(self) -> None:
        """Release connections."""
