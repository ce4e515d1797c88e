"""The files cartd writes into a bundle: ERRORS.json (partial carts) and MANIFEST.* (opt-in).

They sit in the top directory, after every archive file, with MANIFEST.sha256 last.

- `MANIFEST.sha256` is in `sha256sum -c` format with paths relative to the top directory,
  so `sha256sum -c MANIFEST.sha256` run inside the extracted top directory checks every file.
- The client's own checksums go in one `MANIFEST.<hashtype>` per other hash type, in the
  same format, so `sha1sum -c MANIFEST.sha1` or `md5sum -c MANIFEST.md5` check them too.
  Separate files rather than comment lines, which stricter checkers refuse.  A client that
  sent sha256 needs nothing more: its digests are the ones in MANIFEST.sha256.
- Bundle paths never hold a backslash or a newline (schemas.normalise_path), so no line
  needs the checkers' escaping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cartd.bundle import Generated, StagedFile

ERRORS = "ERRORS.json"
MANIFEST = "MANIFEST.sha256"


@dataclass(frozen=True)
class MissingFile:
    """A file of a partial cart that failed: what ERRORS.json says about it."""

    archive_id: str
    path: str
    reason: str


def errors_json(missing: Sequence[MissingFile]) -> Generated:
    """One object per missing file, in cart order; ids are strings, as the archive keys them."""
    listed = [{"id": m.archive_id, "path": m.path, "reason": m.reason} for m in missing]
    text = json.dumps({"missing": listed}, indent=2, ensure_ascii=False) + "\n"
    return Generated(ERRORS, text.encode())


def _digest_file(name: str, lines: Iterable[tuple[str, str]]) -> Generated:
    return Generated(name, "".join(f"{digest}  {path}\n" for digest, path in lines).encode())


def manifests(files: Sequence[StagedFile]) -> list[Generated]:
    """MANIFEST.<hashtype> for each client hash type but sha256, then MANIFEST.sha256."""
    by_type: dict[str, list[tuple[str, str]]] = {}
    for staged in files:
        hashtype, _, hashsum = staged.checksum.partition(":")
        if hashtype != "sha256":
            by_type.setdefault(hashtype, []).append((hashsum, staged.path))
    extra = [_digest_file(f"MANIFEST.{kind}", by_type[kind]) for kind in sorted(by_type)]
    return [*extra, _digest_file(MANIFEST, ((_sha256(f), f.path) for f in files))]


def _sha256(staged: StagedFile) -> str:
    if staged.sha256 is None:
        raise ValueError(f"{staged.path!r} has no SHA-256")
    return staged.sha256


def names(hashtypes: Iterable[str], *, manifest: bool, partial: bool) -> set[str]:
    """The names generated files may take in a cart with these hash types and options."""
    found = {ERRORS} if partial else set()
    if manifest:
        found |= {MANIFEST} | {f"MANIFEST.{kind}" for kind in hashtypes}
    return found


def clash(paths: Iterable[str], generated: set[str]) -> str | None:
    """A cart path that a generated file would overwrite (as a file or a directory), if any."""
    return next((path for path in paths if path.split("/", 1)[0] in generated), None)
