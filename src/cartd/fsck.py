"""`cartd fsck`: find (and on request repair) every disagreement between database and volume.

The database is the truth.  Start-up recovery already repairs what a crash normally leaves
behind; fsck is the operator's independent check that the two agree, runnable at any time
the service is stopped, and the crash-recovery proof's referee.  It reports:

- on the volume, anything the database does not account for: cart directories of deleted
  or unknown carts, `.part` files, files of rows that are not `staged`, unknown names;
- in the database, `staged` rows whose file is missing, has the wrong size or (with
  `--checksums`) the wrong digest;
- carts whose state contradicts their files: live with every file staged (stuck forever,
  since nothing is left to claim), or `ready` with files that are not staged.

Repairs delete what the database does not own, send bad `staged` rows back to `waiting`
(the next `cartd serve` fetches them again) and mark fully staged carts ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cartd.db import audit, migrate, store
from cartd.db.audit import CartRow, FileRow
from cartd.db.models import CartState, FileState
from cartd.db.session import (
    SessionFactory,
    create_engine,
    create_session_factory,
    wait_for_database,
)
from cartd.settings import Settings
from cartd.volume import PART_SUFFIX, Volume
from cartd.volume_lock import exclusive


class Kind(StrEnum):
    ORPHAN_DIR = "orphan-dir"
    UNKNOWN_ENTRY = "unknown-entry"
    PART_FILE = "part-file"
    STRAY_FILE = "stray-file"
    MISSING_FILE = "missing-file"
    WRONG_SIZE = "wrong-size"
    WRONG_CHECKSUM = "wrong-checksum"
    CART_NOT_READY = "cart-not-ready"
    READY_NOT_STAGED = "ready-not-staged"


@dataclass(frozen=True)
class Finding:
    """One disagreement, with what a repair does about it."""

    kind: Kind
    where: str
    detail: str
    remove: Path | None = None  # delete this file or directory
    restage: int | None = None  # send this file row back to waiting
    ready_cart: int | None = None  # mark this cart ready

    def __str__(self) -> str:
        return f"{self.kind:<16} {self.where}: {self.detail}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    carts: int = 0
    files: int = 0


@dataclass(frozen=True)
class _Snapshot:
    carts: dict[int, CartRow]
    files: dict[int, dict[int, FileRow]]  # cart id -> file id -> row


async def _snapshot(sessions: SessionFactory) -> _Snapshot:
    async with sessions.begin() as session:
        carts = {row.id: row for row in await audit.live_carts(session)}
        files = {
            cart_id: {f.id: f for f in await audit.cart_file_rows(session, cart_id)}
            for cart_id in carts
        }
    return _Snapshot(carts, files)


def _digest(path: Path, hashtype: str) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, hashtype).hexdigest()


def _check_staged(path: Path, row: FileRow, checksums: bool) -> Finding | None:
    """A staged row's file must exist with the recorded size (and digest, if asked)."""
    where = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Finding(Kind.MISSING_FILE, where, "staged in the database, absent", None, row.id)
    if size != row.size:
        detail = f"{size} bytes on disk, {row.size} recorded"
        return Finding(Kind.WRONG_SIZE, where, detail, path, row.id)
    if checksums and _digest(path, row.hashtype) != row.hashsum.lower():
        detail = f"content does not match its {row.hashtype} digest"
        return Finding(Kind.WRONG_CHECKSUM, where, detail, path, row.id)
    return None


def _classify_entry(entry: Path, rows: dict[int, FileRow]) -> Finding | None:
    """An entry in a live cart's directory that no staged row accounts for, if it is one."""
    name = entry.name
    if name.endswith(PART_SUFFIX) and entry.is_file():
        return Finding(Kind.PART_FILE, str(entry), "half-written download", entry)
    row = rows.get(int(name)) if name.isdigit() else None
    if row is None or not entry.is_file():
        return Finding(Kind.STRAY_FILE, str(entry), "no file row of this cart owns it", entry)
    if row.state != FileState.STAGED:
        return Finding(Kind.STRAY_FILE, str(entry), f"its row is {row.state}, not staged", entry)
    return None


def _scan_cart_dir(path: Path, rows: dict[int, FileRow], checksums: bool) -> list[Finding]:
    findings = [f for e in sorted(path.iterdir()) if (f := _classify_entry(e, rows))]
    for row in rows.values():
        if row.state == FileState.STAGED:
            problem = _check_staged(path / str(row.id), row, checksums)
            if problem is not None:
                findings.append(problem)
    return findings


def _scan_volume(volume: Volume, snap: _Snapshot, checksums: bool) -> list[Finding]:
    findings: list[Finding] = []
    present = volume.cart_dirs()
    if volume.carts_dir.is_dir():
        for entry in sorted(volume.carts_dir.iterdir()):
            if not (entry.is_dir() and entry.name.isdigit()):
                findings.append(Finding(Kind.UNKNOWN_ENTRY, str(entry), "not a cart", entry))
    for cart_id, path in sorted(present.items()):
        if cart_id not in snap.carts:
            findings.append(Finding(Kind.ORPHAN_DIR, str(path), "no live cart owns it", path))
    for cart_id, rows in snap.files.items():
        path = volume.cart_dir(cart_id)
        if cart_id in present:
            findings += _scan_cart_dir(path, rows, checksums)
        else:  # a cart with staged rows but no directory at all
            findings += [f for r in rows.values() if (f := _check_missing(path, r))]
    return findings


def _check_missing(path: Path, row: FileRow) -> Finding | None:
    if row.state != FileState.STAGED:
        return None
    return Finding(
        Kind.MISSING_FILE, str(path / str(row.id)), "staged, no cart directory", None, row.id
    )


def _check_states(snap: _Snapshot) -> list[Finding]:
    """Cart state against file states: the database must agree with itself too."""
    findings = []
    for cart in snap.carts.values():
        rows = snap.files[cart.id].values()
        # A partial cart's failed files are settled: its bundle lists them in ERRORS.json.
        settled = (FileState.STAGED, FileState.ERROR) if cart.allow_partial else (FileState.STAGED,)
        unstaged = [r.id for r in rows if r.state not in settled]
        where = f"cart {cart.uid!r} (row {cart.id})"
        if cart.state in store.LIVE_CART_STATES and rows and not unstaged:
            detail = f"{cart.state} although every file is staged"
            findings.append(Finding(Kind.CART_NOT_READY, where, detail, ready_cart=cart.id))
        elif cart.state == CartState.READY:
            detail = "ready although {n} file(s) are not staged"
            findings += [
                Finding(Kind.READY_NOT_STAGED, where, detail.format(n=len(unstaged)), restage=i)
                for i in unstaged
            ]
    return findings


async def check(sessions: SessionFactory, volume: Volume, checksums: bool = False) -> Report:
    """Compare; changes nothing.  Call only while no service uses the volume."""
    snap = await _snapshot(sessions)
    findings = await asyncio.to_thread(_scan_volume, volume, snap, checksums)
    findings += _check_states(snap)
    files = sum(len(rows) for rows in snap.files.values())
    return Report(findings, len(snap.carts), files)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


async def repair(sessions: SessionFactory, findings: list[Finding]) -> None:
    """Deletions first, then re-staging, then readiness (its SQL guard sees the re-staging)."""
    for finding in findings:
        if finding.remove is not None:
            await asyncio.to_thread(_remove, finding.remove)
    restage = sorted({f.restage for f in findings if f.restage is not None})
    ready = sorted({f.ready_cart for f in findings if f.ready_cart is not None})
    async with sessions.begin() as session:
        await store.restage_files(session, restage)
        for cart_id in ready:
            await audit.mark_ready(session, cart_id)


@dataclass(frozen=True)
class Outcome:
    found: Report
    remaining: Report | None  # the re-check after a repair


async def fsck(settings: Settings, *, fix: bool, checksums: bool) -> Outcome:
    """Lock the volume (no service may run), check, and optionally repair and re-check."""
    volume = Volume(settings.volume_path)
    engine = create_engine(settings)
    try:
        with exclusive(volume.root):
            await wait_for_database(engine, settings)
            await migrate.require_current(engine)  # its tables must be ours, and current
            sessions = create_session_factory(engine)
            found = await check(sessions, volume, checksums)
            if not fix or not found.findings:
                return Outcome(found, None)
            await repair(sessions, found.findings)
            return Outcome(found, await check(sessions, volume, checksums))
    finally:
        await engine.dispose()


def render(outcome: Outcome, fixed: bool) -> tuple[list[str], int]:
    """Lines for the operator and the exit status: 0 consistent, 1 disagreements remain."""
    found = outcome.found
    lines = [str(finding) for finding in found.findings]
    summary = f"fsck: {found.carts} carts, {found.files} files, {len(found.findings)} problems"
    if outcome.remaining is None:
        if found.findings and not fixed:
            summary += " (run with --repair to fix them)"
        lines.append(summary)
        return lines, 1 if found.findings else 0
    left = outcome.remaining.findings
    lines.append(f"{summary}, {len(found.findings) - len(left)} repaired")
    lines += [f"still wrong: {finding}" for finding in left]
    return lines, 1 if left else 0
