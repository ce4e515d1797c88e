"""Request and response models: the validation rules of PROTOCOL.md, and the OpenAPI shapes."""

from __future__ import annotations

import hashlib
import re
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any, NamedTuple, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from cartd import generated
from cartd.bundle import MAX_NAME_BYTES

CART_ID_PATTERN = r"^[A-Za-z0-9._~-]{1,128}$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEX = re.compile(r"[0-9a-fA-F]+")
MAX_PATH_BYTES = 4096
MAX_ID_CHARS = 1024
PACKED_SLICE = 2000  # entries PackedFiles unpacks at once when it is iterated
PACKED_BLOCK = 1 << 20  # bytes of entries per PackedFiles block, at most (bar one huge entry)


def _require_utf8(value: str, what: str) -> None:
    """JSON can smuggle lone surrogates (\\ud800) that no database or file name can hold."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not valid Unicode") from None


def valid_cart_id(cart_id: str) -> bool:
    return bool(re.fullmatch(CART_ID_PATTERN, cart_id)) and cart_id not in {".", ".."}


def digest_size(hashtype: str) -> int | None:
    """Hex length of a hashlib algorithm's digest, or None if we cannot verify with it."""
    if hashtype not in hashlib.algorithms_available:
        return None  # also keeps arbitrary client strings out of the cache below
    return _digest_size(hashtype)


@cache
def _digest_size(hashtype: str) -> int | None:
    try:
        hasher = hashlib.new(hashtype)
    except (ValueError, TypeError):
        return None
    if hasher.digest_size == 0:  # shake_* need a length: not a checksum we can compare
        return None
    return hasher.digest_size * 2


def normalise_path(raw: str) -> str:
    """Apply PROTOCOL.md's bundle path rules; raise ValueError naming the problem."""
    path = raw[1:] if raw.startswith("/") else raw
    if not path:
        raise ValueError(f"path {raw!r} is empty")
    _require_utf8(path, "path")
    if _CONTROL.search(path):
        raise ValueError(f"path {raw!r} contains a control character")
    if "\\" in path:
        raise ValueError(f"path {raw!r} contains a backslash")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"path {raw[:64]!r}... is longer than {MAX_PATH_BYTES} bytes")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            problem = "an empty" if not segment else f"a {segment!r}"
            raise ValueError(
                f"path {raw!r} has {problem} segment; it must be relative and normalised"
            )
        if len(segment.encode()) > MAX_NAME_BYTES:
            raise ValueError(
                f"path {raw[:64]!r}... has a segment longer than {MAX_NAME_BYTES} bytes, "
                "which no file system can extract"
            )
    return path


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt = Field(description="The file's id in the archive.")
    path: StrictStr = Field(description="Where the file goes inside the bundle.")
    hashtype: StrictStr = Field(description="A hashlib algorithm name, e.g. sha1, md5, sha256.")
    hashsum: StrictStr = Field(description="Expected hex digest (case-insensitive).")

    @field_validator("id")
    @classmethod
    def _id_is_storable(cls, value: str | int) -> str | int:
        text = str(value)
        if not text or "\x00" in text:
            raise ValueError("id must be a non-empty string without NUL, or an integer")
        if len(text) > MAX_ID_CHARS:
            raise ValueError(f"id is longer than {MAX_ID_CHARS} characters")
        _require_utf8(text, "id")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return normalise_path(value)

    @field_validator("hashtype")
    @classmethod
    def _hashtype(cls, value: str) -> str:
        if digest_size(value.lower()) is None:
            raise ValueError(f"hashtype {value!r} is not a supported hashlib algorithm")
        return sys.intern(value.lower())  # one "sha1" for every entry, not 100,000

    @model_validator(mode="after")
    def _hashsum_matches_type(self) -> FileEntry:
        expected = digest_size(self.hashtype)
        if not _HEX.fullmatch(self.hashsum) or len(self.hashsum) != expected:
            raise ValueError(
                f"hashsum {self.hashsum[:140]!r} is not a {self.hashtype} digest "
                f"({expected} hex digits)"
            )
        self.hashsum = self.hashsum.lower()
        return self

    @property
    def archive_id(self) -> str:
        return str(self.id)


class CartRequest(BaseModel):
    """A cart as pacifica-cartd clients POST it; unknown keys are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "fileids": [
                        {
                            "id": "foo.txt",
                            "path": "1/2/3/foo.txt",
                            "hashtype": "sha1",
                            "hashsum": "f572d396fae9206628714fb2ce00f72e94f2258f",
                        }
                    ]
                }
            ]
        },
    )

    fileids: list[FileEntry] = Field(
        min_length=1,
        description="The files, at most CARTD_MAX_FILES_PER_CART; no two share a path, and "
        "no path is another's directory.",
    )
    ttl: float | None = Field(
        None,
        gt=0,
        description="Seconds until the cart is deleted (beyond 0.7.0); the server caps it at "
        "CARTD_CART_TTL_MAX and defaults it to CARTD_CART_TTL.",
    )
    bundle: Any = Field(
        None, description="Accepted for 0.7.0 compatibility; bundles are always streamed."
    )
    manifest: bool = Field(
        False,
        description="Beyond 0.7.0: every download of this cart ends with MANIFEST.sha256 "
        "(sha256sum -c format) and a MANIFEST.<hashtype> per other hash type; ?manifest= "
        "overrides it per download.",
    )
    allow_partial: bool = Field(
        False,
        description="Beyond 0.7.0: a failed file does not fail the cart.  Once every file is "
        "staged or failed the cart is ready (in error if none staged); its bundle lists the "
        "failed files in ERRORS.json and its message counts them.",
    )

    @model_validator(mode="after")
    def _paths_do_not_collide(self) -> CartRequest:
        check_paths([entry.path for entry in self.fileids])
        return self

    @model_validator(mode="after")
    def _paths_leave_room_for_generated_files(self) -> CartRequest:
        check_generated(
            [(entry.path, entry.hashtype) for entry in self.fileids],
            manifest=self.manifest,
            allow_partial=self.allow_partial,
        )
        return self


def check_paths(paths: Collection[str]) -> None:
    """No two files share a path and none is another's directory (a tar cannot hold both).

    A function rather than only a validator, so carts.parse_cart can run the same rules on
    the compact entries it keeps instead of the models.  A cart that passes is judged by
    its paths' hashes alone; only a refusal (or a hash collision) pays for the dict that
    names the offending pair.
    """
    if _clear_by_hash(paths):
        return
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        if path in seen:
            raise ValueError(f"fileids[{index}] path {path!r} duplicates fileids[{seen[path]}]")
        seen[path] = index
    for index, path in enumerate(paths):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in seen:
                raise ValueError(
                    f"fileids[{seen[parent]}] path {parent!r} is a directory of "
                    f"fileids[{index}] path {path!r}"
                )


def _clear_by_hash(paths: Collection[str]) -> bool:
    """True only if the paths pass check_paths's rules, judged by their hashes.

    Naming an offending pair takes every path in a dict: about 11 MB at 100,000 files,
    beside the body and the packed entries.  Their sorted hashes are less than half that.
    Equal hashes (a duplicate, or very rarely two paths that collide) or a directory with a
    path's hash give False, and the dict decides.
    """
    hashes = [0] * len(paths)  # at its final size: no copies left behind as it grows
    directories: set[str] = set()
    for at, path in enumerate(paths):
        hashes[at] = hash(path)
        parent, slash, _name = path.rpartition("/")
        while slash and parent not in directories:  # its own parents are in there already
            directories.add(parent)
            parent, slash, _name = parent.rpartition("/")
    hashes.sort()
    if any(first == second for first, second in pairwise(hashes)):
        return False
    for directory in directories:
        at = bisect_left(hashes, hash(directory))
        if at < len(hashes) and hashes[at] == hash(directory):
            return False
    return True


def check_generated(
    entries: Collection[tuple[str, str]], *, manifest: bool, allow_partial: bool
) -> None:
    """No (path, hashtype) entry is where a download puts a generated file."""
    hashtypes = {hashtype for _path, hashtype in entries} if manifest else set()
    taken = generated.names(hashtypes, manifest=manifest, partial=allow_partial)
    if not taken:
        return  # most carts: nothing to look for in 100,000 paths
    path = generated.clash((path for path, _hashtype in entries), taken)
    if path is not None:
        raise ValueError(
            f"path {path!r} is where cartd puts its {path.split('/')[0]}; "
            "rename it, or leave out manifest/allow_partial"
        )


class NewFile(NamedTuple):
    """A validated cart entry: a tuple, not a model; a cart keeps them in PackedFiles.

    A FileEntry model costs about 740 bytes in Python (its __dict__ and fields-set), so a
    100,000-file cart was a 74 MB list; four strings in a tuple are about a third of that.
    """

    archive_id: str
    path: str
    hashtype: str
    hashsum: str


class PackedFiles(Sequence[NewFile]):
    """NewFiles packed into blocks of bytes, unpacked again a slice at a time as read.

    A NewFile of four strings still costs about 300 bytes in Python, so a 100,000-file
    cart was a 29 MB list alive for the whole POST; packed it is the entries' UTF-8 text
    plus 4 bytes each (about 7 MB).  Its readers take a slice at a time (fingerprint,
    insert), so only a slice is ever unpacked.  Every field ends with a NUL, which
    validation keeps out of all four: one decode and split unpacks a run of entries.

    Blocks rather than one growing buffer: in a server's fragmented heap every growth of
    a 7 MB bytearray was a copy, and the copies it left stayed resident until the next
    trim (about 17 MB more at the POST's peak in bench/memory.py).  A block is allocated
    once, at its final size, and filled in place.
    """

    __slots__ = ("_blocks", "_ends", "_first", "_used")

    def __init__(self, files: Iterable[NewFile] = ()) -> None:
        self._blocks: list[bytearray] = []
        self._ends: list[array[int]] = []  # where each entry ends in its block
        self._first = array("Q")  # the index of each block's first entry
        self._used = 0  # bytes filled in the last block
        for file in files:
            self.append(file)

    def append(self, file: NewFile) -> None:
        data = f"{file[0]}\0{file[1]}\0{file[2]}\0{file[3]}\0".encode()
        if not self._blocks or self._used + len(data) > len(self._blocks[-1]):
            # Small carts stay small: blocks double from 4 KiB up to PACKED_BLOCK.
            size = min(PACKED_BLOCK, 4096 << len(self._blocks))
            self._first.append(len(self))
            self._blocks.append(bytearray(max(size, len(data))))
            self._ends.append(array("I"))
            self._used = 0
        self._blocks[-1][self._used : self._used + len(data)] = data
        self._used += len(data)
        self._ends[-1].append(self._used)

    def __len__(self) -> int:
        return self._first[-1] + len(self._ends[-1]) if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> NewFile: ...

    @overload
    def __getitem__(self, index: slice) -> list[NewFile]: ...

    def __getitem__(self, index: int | slice) -> NewFile | list[NewFile]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._unpack(start, stop)
            return [self._unpack(n, n + 1)[0] for n in range(start, stop, step)]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("PackedFiles index out of range")
        return self._unpack(index, index + 1)[0]

    def __iter__(self) -> Iterator[NewFile]:
        for start in range(0, len(self), PACKED_SLICE):
            yield from self._unpack(start, start + PACKED_SLICE)

    def column(self, field: int) -> Iterator[str]:
        """One field (NewFile's order) of every entry, without the tuples."""
        for start in range(0, len(self), PACKED_SLICE):
            yield from self._fields(start, start + PACKED_SLICE)[field::4]

    def _fields(self, start: int, stop: int) -> list[str]:
        """The fields of entries start..stop, in order."""
        fields: list[str] = []
        stop = min(stop, len(self))
        while start < stop:
            block = bisect_right(self._first, start) - 1
            first, ends = self._first[block], self._ends[block]
            last = min(stop, first + len(ends))
            begin = ends[start - first - 1] if start > first else 0
            text = self._blocks[block][begin : ends[last - first - 1]].decode()
            fields += text.split("\0")[:-1]  # the empty string after the last NUL
            start = last
        return fields

    def _unpack(self, start: int, stop: int) -> list[NewFile]:
        each = iter(self._fields(start, stop))
        return list(map(NewFile._make, zip(each, each, each, each, strict=True)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedFiles):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"PackedFiles({list(self)!r})"


@dataclass(frozen=True, slots=True)
class NewCart:
    """A validated POST body: CartRequest's values, with its entries packed (PackedFiles)."""

    fileids: PackedFiles
    ttl: float | None = None
    manifest: bool = False
    allow_partial: bool = False

    @classmethod
    def of(cls, request: CartRequest) -> NewCart:
        return cls(
            PackedFiles(
                NewFile(e.archive_id, e.path, e.hashtype, e.hashsum) for e in request.fileids
            ),
            request.ttl,
            request.manifest,
            request.allow_partial,
        )


class Message(BaseModel):
    message: str = Field(description="What happened, in pacifica-cartd's words.")


class ErrorBody(BaseModel):
    """Every error answer's body (PROTOCOL.md): never a traceback."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": 404, "message": "No cart with uid c1 found"}]}
    )

    status: int = Field(description="The HTTP status code again, for clients that log bodies.")
    message: str = Field(description="What is wrong, naming the offending input.")


class FileStatus(BaseModel):
    id: str = Field(description="The file's id in the archive (as a string).")
    path: str = Field(description="The file's path inside the bundle (normalised).")
    state: str = Field(description="waiting | staging | staged | error")
    size: int | None = Field(description="Bytes, once the archive has said; else null.")
    bytes_staged: int = Field(description="Bytes in the cache so far.")
    error: str = Field(description="Why the file failed; empty otherwise.")
    attempts: int = Field(description="Fetch attempts so far (retries included).")


class CartStatus(BaseModel):
    """All times are Unix epoch seconds."""

    cart_id: str = Field(description="The id the cart was created with.")
    state: str = Field(
        description="waiting | staging | ready | error (X-Pacifica-Status folds the first "
        "two into staging)"
    )
    message: str = Field(description="Empty, or the error text (also X-Pacifica-Message).")
    created_at: float = Field(description="When the cart was POSTed.")
    updated_at: float = Field(description="When the cart's state or message last changed.")
    ready_at: float | None = Field(description="When the cart became ready; else null.")
    last_used_at: float = Field(
        description="Last creation, HEAD, download or becoming ready: the cache evicts the "
        "least recently used ready carts first."
    )
    expires_at: float | None = Field(description="When the cart is deleted (ttl); else null.")
    files_total: int = Field(description="Files in the cart.")
    files_staged: int = Field(description="Files verified in the cache.")
    files_error: int = Field(description="Files that failed for good.")
    bytes_total: int = Field(description="Sum of the known file sizes.")
    bytes_staged: int = Field(description="Bytes in the cache, files in flight included.")
    files_waiting: int = Field(description="Files not started yet.")
    files_staging: int = Field(description="Files being staged now (tape recall or download).")
    eta_seconds: float | None = Field(
        description="Estimated seconds until the cart is ready: 0 when ready, null when "
        "unknown (waiting, error, or no bytes received yet).  Average throughput since "
        "staging began; files of unknown size count as the average known size."
    )
    files: list[FileStatus] | None = Field(
        None, description="Per-file detail; left out of the response with ?files=0."
    )

    def document(self) -> dict[str, Any]:
        """The JSON body: `files` is absent (not null) when it was not asked for."""
        return self.model_dump(mode="json", exclude={"files"} if self.files is None else None)
