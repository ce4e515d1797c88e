"""Every checksum cartd keeps for a file, from one pass over its bytes.

The client's own digest proves the file arrived intact.  SHA-256 feeds MANIFEST.sha256
and CRC-32 feeds the zip headers.  For a small file both come from the same pass while
staging, so a download never has to read it just to describe it.  A big file's readiness
waits only for the client's digest: two more digests of every byte would slow its staging
by half on two cores, so digests.py computes them after the file is staged.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Checksums:
    requested: str  # hex digest in the client's hash type
    sha256: str | None  # None: left for later (digests.py), see the module docstring
    crc32: int | None


class Hasher:
    """Feed chunks in order; hashing a chunk releases the GIL, so run it in a worker thread."""

    def __init__(self, hashtype: str, *, extras: bool = True) -> None:
        self._requested = hashlib.new(hashtype)
        # A client that asked for sha256 already gets it computed: do not hash twice.
        if hashtype == "sha256":
            self._sha256: Any = self._requested
        else:
            self._sha256 = hashlib.sha256() if extras else None
        self._crc: int | None = 0 if extras else None

    def update(self, chunk: bytes) -> None:
        for part in self.parts():
            part(chunk)

    def parts(self) -> list[Callable[[bytes], None]]:
        """The independent updates, each releasing the GIL: parallel threads may run them,
        as long as each part sees the chunks in order."""
        parts: list[Callable[[bytes], None]] = [self._requested.update]
        if self._crc is not None:
            parts.append(self._update_crc)
        if self._sha256 is not None and self._sha256 is not self._requested:
            parts.append(self._sha256.update)
        return parts

    def _update_crc(self, chunk: bytes) -> None:
        self._crc = zlib.crc32(chunk, self._crc or 0)  # only a part while _crc is an int

    def result(self) -> Checksums:
        sha256 = None if self._sha256 is None else str(self._sha256.hexdigest())
        return Checksums(self._requested.hexdigest(), sha256, self._crc)


def file_extras(path: Path, sha256: str | None = None) -> tuple[int, str]:
    """(CRC-32, SHA-256) of a staged file that lacks them: staged big, or before schema 0003.

    A SHA-256 already known (a client that sent sha256 digests) is not computed again: it
    is the dearer of the two.  Blocking: run it in a worker thread.
    """
    crc, digest = 0, None if sha256 else hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
            if digest is not None:
                digest.update(chunk)
    return crc, sha256 or (digest.hexdigest() if digest is not None else "")
