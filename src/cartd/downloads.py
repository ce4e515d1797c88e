"""What one download contains, planned in the format asked for.  No HTTP here.

A ready cart's staged files, plus the files cartd generates: ERRORS.json when some of a
partial cart's files failed, MANIFEST.* when the cart or the request asks for a manifest.

Files staged before schema 0003 have no CRC-32 or SHA-256.  A zip or a manifest needs them
before its first byte, so they are computed here from the cached files, in a thread, and
saved: only the first such download of an old cart pays for reading it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from cartd import bundle, generated, zipbundle
from cartd.bundle import Format, Generated, Plan, StagedFile
from cartd.checksums import file_extras
from cartd.db import store
from cartd.db.models import Cart, CartFile, FileState
from cartd.db.session import SessionFactory
from cartd.volume import Volume

log = logging.getLogger(__name__)


class Refused(Exception):
    """The bundle asked for cannot be built from this cart (a 409 for the client)."""


@dataclass(frozen=True)
class Wanted:
    fmt: Format
    name: str  # already checked by bundle.check_name
    manifest: bool | None  # None: as chosen when the cart was posted


async def plan(
    sessions: SessionFactory, volume: Volume, cart: Cart, rows: Sequence[CartFile], wanted: Wanted
) -> Plan:
    """Fill in the checksums this bundle needs, then plan it in a thread (big carts)."""
    manifest = cart.manifest if wanted.manifest is None else wanted.manifest
    staged = [row for row in rows if row.state == FileState.STAGED]
    crc = wanted.fmt is Format.ZIP
    late = await _late_checksums(sessions, volume, cart.id, staged, crc=crc, sha256=manifest)
    files = [_staged_file(volume, cart.id, row, late) for row in staged]
    failed = [row for row in rows if row.state == FileState.ERROR]
    return await asyncio.to_thread(_plan, wanted, files, failed, manifest)


def _plan(wanted: Wanted, files: list[StagedFile], failed: list[CartFile], manifest: bool) -> Plan:
    extra: list[Generated] = []
    if failed:
        missing = [generated.MissingFile(f.archive_id, f.path, f.error) for f in failed]
        extra.append(generated.errors_json(missing))
    if manifest:
        _check_room_for_manifest(files)
        extra += generated.manifests(files)
    planner = zipbundle.plan_zip if wanted.fmt is Format.ZIP else bundle.plan_tar
    return planner(wanted.name, files, extra)


def _check_room_for_manifest(files: list[StagedFile]) -> None:
    """Checked at POST for carts posted with a manifest; ?manifest=1 may come later."""
    hashtypes = {staged.checksum.partition(":")[0] for staged in files}
    taken = generated.names(hashtypes, manifest=True, partial=False)
    if (path := generated.clash((staged.path for staged in files), taken)) is not None:
        raise Refused(f"cart path {path!r} is where the manifest would go; ask without it")


def _staged_file(
    volume: Volume, cart_id: int, row: CartFile, late: dict[int, tuple[int, str]]
) -> StagedFile:
    crc, sha256 = late.get(row.id, (row.crc32, _known_sha256(row)))
    return StagedFile(
        row.path,
        row.size or 0,
        row.mtime or 0.0,
        volume.file_path(cart_id, row.id),
        f"{row.hashtype}:{row.hashsum}",
        crc,
        sha256,
    )


def _known_sha256(row: CartFile) -> str | None:
    """A client that sent a sha256 digest told us the SHA-256, and staging verified it."""
    return row.sha256 or (row.hashsum if row.hashtype == "sha256" else None)


async def _late_checksums(
    sessions: SessionFactory,
    volume: Volume,
    cart_id: int,
    rows: Sequence[CartFile],
    *,
    crc: bool,
    sha256: bool,
) -> dict[int, tuple[int, str]]:
    """(CRC-32, SHA-256) by file id of the files that lack one this bundle needs."""
    todo = [
        (row.id, volume.file_path(cart_id, row.id), _known_sha256(row))
        for row in rows
        if (crc and row.crc32 is None) or (sha256 and _known_sha256(row) is None)
    ]
    if not todo:
        return {}
    found = await asyncio.to_thread(_hash_all, todo)
    try:
        async with sessions.begin() as session:
            await store.record_checksums(session, found)
    except SQLAlchemyError as exc:  # only a cache of what we computed: the next try saves it
        log.warning("could not save checksums of cart %d: %s", cart_id, exc)
    return found


def _hash_all(todo: list[tuple[int, Path, str | None]]) -> dict[int, tuple[int, str]]:
    return {file_id: file_extras(path, sha256) for file_id, path, sha256 in todo}
