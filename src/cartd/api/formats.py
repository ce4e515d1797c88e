"""Which bundle format a download gets when it names none: content negotiation on Accept.

Tar stays the default for every existing client: zip only for a client that rates
`application/zip` above `application/x-tar`.  Wildcards express no preference, so
`Accept: */*` (curl, browsers, pacifica-downloader) keeps getting tar.
"""

from __future__ import annotations

import re

from cartd.bundle import Format

_QUALITY = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")


def from_accept(accept: str | None) -> Format:
    weights = _weights(accept or "")
    if weights.get(Format.ZIP.media_type, 0.0) > weights.get(Format.TAR.media_type, 0.0):
        return Format.ZIP
    return Format.TAR


def _weights(accept: str) -> dict[str, float]:
    """Media type -> its q value (RFC 9110 section 12.5.1); a malformed q counts as 0."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                match = _QUALITY.fullmatch(value.strip())
                quality = float(match.group(0)) if match else 0.0
        media = media.lower()
        weights[media] = max(quality, weights.get(media, 0.0))
    return weights
