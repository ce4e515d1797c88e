"""Conditional and partial downloads (RFC 9110 sections 13 and 14): HTTP parsing only.

Just what resuming a download needs: one byte range per request, guarded by a strong ETag.
Whatever the RFC lets a server ignore (several ranges, another unit, a malformed header)
falls back to the full 200 body, which every client handles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_TAG = re.compile(r'(?:W/)?("[^"]*")')
# int() refuses more than 4300 digits; anything this long is past every size we serve anyway.
_MAX_DIGITS = 30


class Unsatisfiable(Exception):
    """A well-formed single range that lies wholly outside the representation: 416."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, total: int) -> str:
        return f"bytes {self.start}-{self.end}/{total}"


def strong_etag(digest: str) -> str:
    return f'"{digest}"'


def none_match(header: str | None, etag: str) -> bool:
    """If-None-Match holds (answer 304) for `*` or any listed tag, by weak comparison."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return etag in _TAG.findall(header)


def selected_range(
    range_header: str | None, if_range: str | None, etag: str, total: int
) -> ByteRange | None:
    """The range to send, or None for the full body; raises Unsatisfiable for a 416.

    If-Range is checked first: when it fails the Range header must be ignored entirely,
    even one that would be unsatisfiable.  It needs the current strong ETag; a weak tag or
    an HTTP date never matches, because we send no Last-Modified to compare a date with.
    """
    if range_header is None:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None
    return parse_range(range_header, total)


def parse_range(header: str, total: int) -> ByteRange | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n`; None when the header is to be ignored."""
    unit, equals, range_set = header.partition("=")
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if not equals or unit.strip().lower() != "bytes" or len(specs) != 1:
        return None
    match = _SPEC.fullmatch(specs[0])
    if match is None or specs[0] == "-":
        return None
    first, last = match.groups()
    if not first:
        suffix = _number(last)
        if suffix == 0:
            raise Unsatisfiable(f"range {header[:100]!r} asks for no bytes")
        return ByteRange(max(total - suffix, 0), total - 1)
    start = _number(first)
    if last and _number(last) < start:  # invalid syntax, so RFC 9110 says to ignore it
        return None
    if start >= total:
        raise Unsatisfiable(f"range {header[:100]!r} starts past the end of a {total}-byte bundle")
    return ByteRange(start, min(_number(last), total - 1) if last else total - 1)


def _number(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _MAX_DIGITS else 10**_MAX_DIGITS
