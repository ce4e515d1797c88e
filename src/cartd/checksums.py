"""Every checksum cartd keeps for a file, from one pass over its bytes.

The client's own digest proves the file arrived intact.  SHA-256 feeds MANIFEST.sha256
and CRC-32 feeds the zip headers; both are computed in the same pass while staging, so a
download never has to read a file before its first byte just to describe it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Checksums:
    requested: str  # hex digest in the client's hash type
    sha256: str
    crc32: int


class Hasher:
    """Feed chunks in order; hashing a chunk releases the GIL, so run it in a worker thread."""

    def __init__(self, hashtype: str) -> None:
        self._requested = hashlib.new(hashtype)
        # A client that asked for sha256 already gets it computed: do not hash twice.
        self._sha256 = self._requested if hashtype == "sha256" else hashlib.sha256()
        self._crc = 0

    def update(self, chunk: bytes) -> None:
        for part in self.parts():
            part(chunk)

    def parts(self) -> list[Callable[[bytes], None]]:
        """The independent updates, each releasing the GIL: parallel threads may run them,
        as long as each part sees the chunks in order."""
        parts = [self._requested.update, self._update_crc]
        if self._sha256 is not self._requested:
            parts.append(self._sha256.update)
        return parts

    def _update_crc(self, chunk: bytes) -> None:
        self._crc = zlib.crc32(chunk, self._crc)

    def result(self) -> Checksums:
        return Checksums(self._requested.hexdigest(), self._sha256.hexdigest(), self._crc)


def hash_file(path: Path, hashtype: str = "sha256") -> Checksums:
    """Blocking: for files staged before their SHA-256 and CRC-32 were recorded."""
    hasher = Hasher(hashtype)
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            hasher.update(chunk)
    return hasher.result()
