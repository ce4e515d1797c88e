"""Archive backends behind one small interface; `open_archive` picks one from the URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from cartd.archive.base import Archive, ArchiveFileError, FileInfo, Media, TransientArchiveError
from cartd.archive.local import LocalArchive
from cartd.archive.pacifica import PacificaArchive
from cartd.settings import Settings

__all__ = [
    "Archive",
    "ArchiveFileError",
    "FileInfo",
    "Media",
    "TransientArchiveError",
    "open_archive",
]


def open_archive(settings: Settings) -> Archive:
    url = settings.archive_interface_url
    if urlsplit(url).scheme == "file":
        return LocalArchive.from_url(url, chunk_size=settings.transfer_size)
    return PacificaArchive(url, settings)
