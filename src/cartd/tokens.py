"""Static bearer tokens for `CARTD_AUTH=token`: the file format and the constant-time lookup.

The file is read once, at start-up, and any doubt about it stops the service: a typo that
silently dropped a line would lock a user out, and one that silently accepted a short or
shared token would let the wrong user in.  Format, one entry a line:

    # comment
    alice:9f2c1d0e7b6a5f4e3d2c1b0a
    bob:another-long-random-token

The identity is what owns carts; the token is the secret.  An identity may have several
tokens (rotation); a token belongs to exactly one identity.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_CHARS = 16
MAX_IDENTITY_CHARS = 255  # the width of carts.owner


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and the line."""


def valid_identity(identity: str) -> bool:
    """1-255 printable characters: it is stored with the cart and shown in logs."""
    return 0 < len(identity) <= MAX_IDENTITY_CHARS and identity.isprintable()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    """(SHA-256 of a token, identity) pairs.

    Comparing fixed-size digests, and always all of them, keeps the time a lookup takes
    independent of how much of a guess was right and of which entry it matched.
    """

    entries: tuple[tuple[bytes, str], ...]

    def identify(self, token: str) -> str | None:
        presented = _digest(token)
        found: str | None = None
        for digest, identity in self.entries:
            if hmac.compare_digest(digest, presented):
                found = identity
        return found


def _parse_line(line: str, where: str) -> tuple[str, str]:
    identity, colon, token = line.partition(":")
    identity, token = identity.strip(), token.strip()
    if not colon or not identity or not token:
        raise TokenFileError(f"{where}: expected 'identity:token'")
    if not valid_identity(identity):
        raise TokenFileError(f"{where}: identity must be 1-{MAX_IDENTITY_CHARS} printable chars")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenFileError(
            f"{where}: token of {identity!r} must be at least {MIN_TOKEN_CHARS} "
            "printable characters without spaces"
        )
    return identity, token


def parse_tokens(text: str, name: str) -> Tokens:
    """Entries of a token file's text; `name` is for messages only."""
    entries: list[tuple[bytes, str]] = []
    owners: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        identity, token = _parse_line(line, f"{name} line {number}")
        digest = _digest(token)
        if digest in owners:
            raise TokenFileError(
                f"{name} line {number}: this token is already given to {owners[digest]!r}; "
                "a token must name exactly one identity"
            )
        owners[digest] = identity
        entries.append((digest, identity))
    if not entries:
        raise TokenFileError(f"{name} has no 'identity:token' lines: nobody could log in")
    return Tokens(tuple(entries))


def load_tokens(path: Path | None) -> Tokens:
    if path is None:
        raise TokenFileError("CARTD_AUTH=token needs CARTD_AUTH_TOKENS_FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read CARTD_AUTH_TOKENS_FILE {path}: {exc}") from None
    return parse_tokens(text, str(path))
