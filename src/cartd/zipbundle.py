"""Zip bundles: STORED (uncompressed) entries, every record built by hand with `struct`.

Each file's size and CRC-32 are known before the first byte (the CRC is computed while
staging), so the local headers carry them directly: no data descriptors, an exact
Content-Length, and a plan of the same shape as the tar's (members plus a trailer, here the
central directory and end records), so `bundle.stream_range` serves any range of either.
Zip64 fields appear only where a size, an offset or the entry count overflows the classic
ones (APPNOTE 6.3.10, sections 4.3 and 4.5).
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cartd.bundle import Entry, Format, Generated, Member, Plan, StagedFile, layout, top_directory

LOCAL_SIGNATURE = 0x04034B50
CENTRAL_SIGNATURE = 0x02014B50
ZIP64_END_SIGNATURE = 0x06064B50
ZIP64_LOCATOR_SIGNATURE = 0x07064B50
END_SIGNATURE = 0x06054B50
UTF8_NAMES = 1 << 11  # general purpose flag bit 11: names are UTF-8
STORED = 0
VERSION = 20  # 2.0: directories
ZIP64_VERSION = 45  # 4.5: Zip64 extensions
MADE_BY_UNIX = 3 << 8  # external attributes hold Unix modes
ZIP64_EXTRA = 0x0001
TIMESTAMP_EXTRA = 0x5455  # Info-ZIP extended timestamp: exact Unix mtime, UTC
MAX32 = 0xFFFFFFFF  # also the "look in the Zip64 field" marker, so it counts as overflow
MAX16 = 0xFFFF
FILE_ATTRIBUTES = 0o100644 << 16
DIR_ATTRIBUTES = (0o040755 << 16) | 0x10  # 0x10: the MS-DOS directory bit

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")


class MissingCrc(ValueError):
    """A file without a CRC-32 cannot get a local header; fill it in before planning."""


@dataclass(frozen=True)
class _Record:
    """What one entry's local and central headers share."""

    name: bytes
    crc: int
    size: int
    mtime: int
    offset: int  # of the local header, from the start of the zip
    directory: bool

    @property
    def zip64(self) -> bool:
        return self.size >= MAX32 or self.offset >= MAX32

    @property
    def version(self) -> int:
        return ZIP64_VERSION if self.zip64 else VERSION


def _record(entry: Entry, offset: int) -> _Record:
    name = entry.path + ("/" if entry.file is None and entry.content is None else "")
    encoded = name.encode("utf-8", "surrogateescape")
    if entry.file is not None:
        if entry.file.crc32 is None:
            raise MissingCrc(f"{entry.file.path!r} has no CRC-32")
        return _Record(encoded, entry.file.crc32, entry.file.size, entry.mtime, offset, False)
    if entry.content is not None:
        content = entry.content
        return _Record(encoded, zlib.crc32(content), len(content), entry.mtime, offset, False)
    return _Record(encoded, 0, 0, entry.mtime, offset, True)


def dos_datetime(mtime: int) -> tuple[int, int]:
    """(time, date) fields in local time, as zip tools expect, clamped to 1980-2107.

    DOS fields have two-second steps and no zone; the extended timestamp carries the exact
    time, and unzip and bsdtar prefer it.
    """
    moment = time.localtime(min(max(mtime, 0), 1 << 33))  # 1970 to 2242: clamped below
    if moment.tm_year < 1980:
        return 0, (1 << 5) | 1  # 1980-01-01 00:00:00
    if moment.tm_year > 2107:
        return (23 << 11) | (59 << 5) | 29, (127 << 9) | (12 << 5) | 31
    clock = (moment.tm_hour << 11) | (moment.tm_min << 5) | (moment.tm_sec // 2)
    date = ((moment.tm_year - 1980) << 9) | (moment.tm_mon << 5) | moment.tm_mday
    return clock, date


def _timestamp_extra(mtime: int) -> bytes:
    """The extended timestamp field (modification time only); its field is a signed 32 bits."""
    if not -(1 << 31) <= mtime < 1 << 31:
        return b""
    return struct.pack("<HHBi", TIMESTAMP_EXTRA, 5, 1, mtime)


def _zip64_extra(*values: int) -> bytes:
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", ZIP64_EXTRA, 8 * len(values), *values)


def _local_header(record: _Record) -> bytes:
    """Sizes and CRC up front; a Zip64 local header must carry both sizes in its extra."""
    big = record.size >= MAX32
    extra = _zip64_extra(*([record.size] * 2 if big else [])) + _timestamp_extra(record.mtime)
    size = MAX32 if big else record.size
    fixed = _LOCAL.pack(
        LOCAL_SIGNATURE, record.version, UTF8_NAMES, STORED, *dos_datetime(record.mtime),
        record.crc, size, size, len(record.name), len(extra),
    )  # fmt: skip
    return fixed + record.name + extra


def _central_header(record: _Record) -> bytes:
    """The Zip64 extra holds, in order, just the fields whose classic slot overflowed."""
    wide = [record.size, record.size] if record.size >= MAX32 else []
    wide += [record.offset] if record.offset >= MAX32 else []
    extra = _zip64_extra(*wide) + _timestamp_extra(record.mtime)
    size, offset = min(record.size, MAX32), min(record.offset, MAX32)
    attributes = DIR_ATTRIBUTES if record.directory else FILE_ATTRIBUTES
    fixed = _CENTRAL.pack(
        CENTRAL_SIGNATURE, MADE_BY_UNIX | record.version, record.version, UTF8_NAMES, STORED,
        *dos_datetime(record.mtime), record.crc, size, size, len(record.name), len(extra),
        0, 0, 0, attributes, offset,
    )  # fmt: skip
    return fixed + record.name + extra


def _end_records(count: int, start: int, size: int) -> bytes:
    """End of central directory, preceded by the Zip64 end record and locator if needed."""
    records = b""
    if count >= MAX16 or start >= MAX32 or size >= MAX32:
        made_by = MADE_BY_UNIX | ZIP64_VERSION
        records += _ZIP64_END.pack(
            ZIP64_END_SIGNATURE, _ZIP64_END.size - 12, made_by, ZIP64_VERSION, 0, 0,
            count, count, size, start,
        )  # fmt: skip
        records += _ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIGNATURE, 0, start + size, 1)
    short = min(count, MAX16)
    return records + _END.pack(
        END_SIGNATURE, 0, 0, short, short, min(size, MAX32), min(start, MAX32), 0
    )


def _member(entry: Entry, header: bytes) -> Member:
    if entry.file is not None:
        return Member(header, entry.file.source, entry.file.size, entry.file.checksum)
    return Member(header + (entry.content or b""), None, 0)


def plan_zip(name: str, files: Sequence[StagedFile], extra: Sequence[Generated] = ()) -> Plan:
    """Local header and data per entry, then the central directory and end records."""
    members: list[Member] = []
    central: list[bytes] = []
    offset = 0
    for entry in layout(top_directory(name, Format.ZIP), files, extra):
        record = _record(entry, offset)
        members.append(_member(entry, _local_header(record)))
        central.append(_central_header(record))
        offset += members[-1].length
    directory = b"".join(central)
    trailer = directory + _end_records(len(members), offset, len(directory))
    return Plan(name, tuple(members), trailer, Format.ZIP.media_type)
