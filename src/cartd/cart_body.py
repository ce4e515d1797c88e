"""A cart's POST body read a value at a time, for carts.parse_cart.

json.loads decodes the whole body to text first (11 MB for a 100,000-file cart, beside
the body's own 11 MB) and builds the whole document before any of it can be dropped.
This decodes a window of the body at a time and hands each value to json's own decoder,
so the values are json's; each entry is packed as soon as it is decoded.  What it does
not follow (a body that is not UTF-8, a second "fileids", anything but an object of
values) it gives up on with None, and the caller decodes the body the plain way: only
that path explains a refusal.
"""

from __future__ import annotations

import codecs
import json
import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from json.scanner import make_scanner
from typing import Any, cast

from cartd.schemas import NewFile, PackedFiles

CHUNK = 1 << 16  # bytes decoded at a time, at least
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # json's own definition
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]}])[ \t\n\r]*")

Decode = Callable[[str, int], tuple[Any, int]]


@dataclass(frozen=True)
class Scanned:
    """A body that is a JSON object whose "fileids" is a list of entries."""

    options: dict[str, Any]  # every other key, decoded plainly
    files: PackedFiles  # the first `keep` entries
    count: int  # the entries in "fileids", kept or not


class _Window:
    """Decoded text over the body, refilled as a value needs more of it."""

    def __init__(self, body: memoryview) -> None:
        self._body = body
        self._read = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")  # as json
        self.text = ""
        self.pos = 0

    def _grow(self) -> bool:
        """Decode at least as much again as is unread (so a long value is retried only a
        logarithmic number of times); False at the end of the body."""
        if self._read >= len(self._body):
            return False
        size = max(CHUNK, 2 * (len(self.text) - self.pos))
        piece = self._body[self._read : self._read + size]
        self._read += len(piece)
        final = self._read >= len(self._body)
        self.text = self.text[self.pos :] + self._decoder.decode(piece, final)
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace, not consumed; '' at the end."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._grow():
                return ""

    def separator(self) -> str:
        """The next ',', ']' or '}', consumed with the whitespace around it; else ''."""
        found = _SEPARATOR.match(self.text, self.pos)
        if found is not None and found.end() < len(self.text):
            self.pos = found.end()  # the common case, in one regex call
            return found.group(1)
        char = self.peek()
        if char not in (",", "]", "}"):
            return ""
        self.pos += 1
        return char

    def take(self, char: str) -> bool:
        if self.peek() != char:
            return False
        self.pos += 1
        return True

    def value(self, decode: Decode) -> Any:
        """The next JSON value.  One cut short by the window's end (json raises) or a
        number that may go on after it is decoded again over a longer window."""
        if self.pos >= len(self.text) or self.text[self.pos] in " \t\n\r":
            self.peek()
        while True:
            try:
                value, end = decode(self.text, self.pos)
            except (StopIteration, json.JSONDecodeError):  # the scanner's two ways to fail
                if not self._grow():
                    raise ValueError(f"not JSON at character {self.pos}") from None
                continue
            # A number may go on in the next window: "1" of "1.5e+3" is valid JSON alone.
            complete = not isinstance(value, int | float) or end + 2 < len(self.text)
            if complete or not self._grow():
                self.pos = end
                return value


def scan(
    body: bytes | bytearray | mmap.mmap, entry_hook: Callable[[dict[str, Any]], Any], keep: int
) -> Scanned | None:
    """The body's options and entries, or None if it is anything else.

    `entry_hook` is json's object_hook for the objects in "fileids": every element must
    come out of it a NewFile.  Raises ValueError (json's, or UTF-8's) or RecursionError
    where the body is not valid JSON, perhaps only as far as this reading can tell.
    """
    if json.detect_encoding(body[:4]) != "utf-8":
        return None  # json.loads also reads UTF-16, UTF-32 and a UTF-8 BOM: leave them to it
    hooked = _scanner(json.JSONDecoder(object_hook=entry_hook))
    with memoryview(body) as view:
        window = _Window(view)
        scanned = _object(window, hooked, keep)
        return scanned if scanned is not None and not window.peek() else None


def _scanner(decoder: json.JSONDecoder) -> Decode:
    """json's (C) scanner without raw_decode's wrapper, a fifth of the time per entry;
    it fails with StopIteration or JSONDecodeError."""
    return cast(Decode, make_scanner(cast(Any, decoder)))


def _object(window: _Window, hooked: Decode, keep: int) -> Scanned | None:
    plain = _scanner(json.JSONDecoder())
    if not window.take("{") or window.peek() != '"':
        return None  # {} has no "fileids"
    options: dict[str, Any] = {}
    found: tuple[PackedFiles, int] | None = None
    while True:
        if window.peek() != '"':
            return None
        key = window.value(plain)
        if not window.take(":"):
            return None
        if key != "fileids":
            options[key] = window.value(plain)
        elif found is None:  # a second one (json keeps the last) is left to json
            found = _entries(window, hooked, keep)
            if found is None:
                return None
        else:
            return None
        separator = window.separator()
        if separator == "}":
            return None if found is None else Scanned(options, *found)
        if separator != ",":
            return None


def _entries(window: _Window, decode: Decode, keep: int) -> tuple[PackedFiles, int] | None:
    if not window.take("["):
        return None
    files, count = PackedFiles(), 0
    if window.take("]"):
        return files, count
    while True:
        entry = window.value(decode)
        if type(entry) is not NewFile:
            return None
        count += 1
        if count <= keep:
            files.append(entry)
        separator = window.separator()
        if separator == "]":
            return files, count
        if separator != ",":
            return None
