"""Cart use cases: create, look up, report, delete.  No HTTP and no SQL strings here.

The API layer turns the exceptions below into status codes and wakes the worker for new
carts; a deletion cancels the cart's fetches through the Worker it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mmap
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from cartd import cart_body, progress
from cartd.db import store
from cartd.db.models import Cart, CartFile, CartState, FileState
from cartd.db.session import SessionFactory
from cartd.db.store import CartBrief
from cartd.schemas import (
    CartRequest,
    CartStatus,
    FileEntry,
    FileStatus,
    NewCart,
    NewFile,
    check_generated,
    check_paths,
)
from cartd.status_cache import HeadAnswer, StatusCache
from cartd.volume import Volume
from cartd.worker import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")


class CartError(Exception):
    """A request the service refuses; the message is meant for the client."""


class InvalidCart(CartError):
    pass


# What pacifica-cartd answers for a cart that a download or DELETE cannot find.
GONE = "The cart does not exist or has already been deleted"


class CartNotFound(CartError):
    pass


class CartConflict(CartError):
    pass


@dataclass(frozen=True)
class Created:
    cart_id: int
    new: bool


HASH_SLICE = 2000  # entries per json.dumps when fingerprinting a cart

Body = bytes | bytearray | mmap.mmap  # a POST body as the API read it


def parse_cart(body: Body, max_files: int) -> NewCart:
    """Decode and validate a POST body; every failure names what is wrong.

    A valid body is read an entry at a time (cartd.cart_body), each JSON object judged by
    FileEntry and packed at once: neither a model per entry (74 MB at 100,000 files), nor a
    document of dicts (44 MB), nor the body's whole decoded text (11 MB beside the body)
    ever exists.  Anything that path refuses is decided and explained by the whole model
    from a plain decode, as before.
    """
    cart = _compact(body, max_files)
    if cart is not None:
        return cart
    document = _decode(body, max_files)
    try:
        return NewCart.of(CartRequest.model_validate(document))
    except ValidationError as exc:
        raise InvalidCart(_describe(exc)) from None


def _check_count(count: int, max_files: int) -> None:
    if count > max_files:
        raise InvalidCart(f"cart has {count} files; the maximum is {max_files}")


def _decode(body: Body, max_files: int) -> dict[str, Any]:
    try:
        document = json.loads(body if isinstance(body, bytes | bytearray) else body[:])
    except (ValueError, RecursionError) as exc:
        raise InvalidCart(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidCart('request body must be a JSON object with a "fileids" list')
    fileids = document.get("fileids")
    if isinstance(fileids, list):
        _check_count(len(fileids), max_files)
    return document


def _compact(body: Body, max_files: int) -> NewCart | None:
    """CartRequest's verdict on a valid body, without a model per entry; None if refused.

    Every JSON object in fileids that FileEntry accepts is decoded as a NewFile, so the
    body is valid if its fileids are all NewFiles, CartRequest accepts its options beside
    the first entry, and the list passes the model's cross-entry rules.  A list over the
    limit is refused for its length whatever else is wrong with it, as `_decode` does.
    """
    try:
        scanned = cart_body.scan(body, _entry_or_object, keep=max_files)
    except (ValueError, RecursionError):  # JSON or UTF-8, or a shape this scan leaves alone
        return None
    if scanned is None:
        return None
    _check_count(scanned.count, max_files)
    files = scanned.files
    try:
        first = [dict(zip(("id", "path", "hashtype", "hashsum"), files[0], strict=True))]
        options = CartRequest.model_validate({**scanned.options, "fileids": first})
        check_paths(_Column(lambda: files.column(1), len(files)))
        check_generated(
            _Column(lambda: map(itemgetter(1, 2), files), len(files)),
            manifest=options.manifest,
            allow_partial=options.allow_partial,
        )
    except (ValueError, IndexError):  # ValidationError included; IndexError: no fileids
        return None
    return NewCart(files, options.ttl, options.manifest, options.allow_partial)


class _Column(Collection[T]):
    """Values of the packed entries, unpacked as they are read: check_paths and
    check_generated read every entry twice, and keep only what they need."""

    def __init__(self, read: Callable[[], Iterator[T]], count: int) -> None:
        self._read = read
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[T]:
        return self._read()

    def __contains__(self, value: object) -> bool:
        return any(mine == value for mine in self)


def _entry_or_object(value: dict[str, Any]) -> Any:
    try:
        entry = FileEntry.model_validate(value)
    except ValidationError:
        return value
    return NewFile(entry.archive_id, entry.path, entry.hashtype, entry.hashsum)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where.lstrip('.') or 'body'}: {message}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more errors" if more > 0 else "")


def time_to_live(requested: float | None, default: float, maximum: float) -> float | None:
    """The cart's TTL in seconds (None: kept until evicted); 0 settings mean "no limit"."""
    if requested is not None and maximum and requested > maximum:
        raise InvalidCart(f"ttl {requested:g}s exceeds the server maximum of {maximum:g}s")
    return requested or default or None


def fingerprint(cart: NewCart) -> str:
    """Identity of a file list and its options: a retried POST is recognised as the same cart.

    The sha256 of `json.dumps([[archive_id, path, hashtype, hashsum], ...])` (plus the
    options, when set), fed a slice at a time so that a big cart's document never exists
    whole; stored fingerprints depend on these exact bytes.
    """
    digest = hashlib.sha256(b"[")
    separator = b""
    for start in range(0, len(cart.fileids), HASH_SLICE):
        chunk = json.dumps(cart.fileids[start : start + HASH_SLICE])[1:-1]
        digest.update(separator + chunk.encode())
        separator = b", "
    if cart.manifest or cart.allow_partial:  # only then, so older carts keep their fingerprint
        options = {"manifest": cart.manifest, "allow_partial": cart.allow_partial}
        digest.update(separator + json.dumps(options).encode())
    digest.update(b"]")
    return digest.hexdigest()


async def create_cart(
    sessions: SessionFactory,
    uid: str,
    cart: NewCart,
    ttl: float | None = None,
    *,
    owner: str,
    answers: StatusCache,
) -> Created:
    """Insert a cart, or accept an identical retry; a different list for a live id conflicts.

    Ids are per owner: another identity's cart of the same id is neither found nor in the
    way, so a POST can never tell that it exists.  A new cart drops the kept HEAD answers
    (`answers`): one of them may be the 404 of a poll that came first.
    """
    digest = await asyncio.to_thread(fingerprint, cart)
    new_id = None
    try:
        async with sessions.begin() as session:
            existing = await store.active_cart(session, owner, uid)
            if existing is None:
                row = await store.insert_cart(
                    session,
                    uid,
                    digest,
                    cart.fileids,
                    ttl,
                    owner=owner,
                    manifest=cart.manifest,
                    allow_partial=cart.allow_partial,
                )
                new_id = row.id
    except IntegrityError:
        # A concurrent POST of the same id won the unique index; judge against its cart.
        new_id = None  # the commit may be what failed
        async with sessions.begin() as session:
            existing = await store.active_cart(session, owner, uid)
    if new_id is not None:
        answers.invalidate()  # committed: a HEAD from now on reads the new cart
        return Created(new_id, new=True)
    if existing is None or existing.fingerprint != digest:
        raise CartConflict(f"cart {uid} already exists with a different file list or options")
    return Created(existing.id, new=False)


async def head_status(
    readers: SessionFactory, answers: StatusCache, uid: str, *, owner: str
) -> tuple[CartBrief, int]:
    """HEAD's answer, and the Retry-After for a poller of a cart still staging.

    Pollers hit this thousands of times a second, so the answer is kept for a moment
    (status_cache) and the use is noted in memory rather than written here.
    """
    answer = answers.get(owner, uid)
    if answer is None:
        answer = await answers.load(owner, uid, lambda: _read_head(readers, uid, owner))
    return _answered(answers, uid, answer)


def kept_head_status(answers: StatusCache, uid: str, *, owner: str) -> tuple[CartBrief, int] | None:
    """`head_status` from a kept answer alone; None when only the database can answer."""
    answer = answers.get(owner, uid)
    return None if answer is None else _answered(answers, uid, answer)


def _answered(answers: StatusCache, uid: str, answer: HeadAnswer) -> tuple[CartBrief, int]:
    if answer.cart is None:
        raise CartNotFound(f"No cart with uid {uid} found")
    answers.used(answer.cart.id)
    return answer.cart, answer.retry_after


async def _read_head(readers: SessionFactory, uid: str, owner: str) -> HeadAnswer:
    """One read-only transaction on a reader connection, which never waits for the writer.

    The per-file totals behind the ETA are summed only while the cart stages (a waiting
    cart has no rate yet).
    """
    async with readers() as session:
        cart = await store.cart_brief(session, owner, uid)
        totals = None
        if cart is not None and cart.state == CartState.STAGING:
            totals = await store.cart_totals(session, cart.id)
    eta = None
    if cart is not None and totals is not None:
        eta = progress.eta_seconds(cart.state, cart.updated_at, totals, time.time())
    return HeadAnswer(cart, progress.retry_after(eta))


async def cart_status(
    sessions: SessionFactory, uid: str, *, owner: str, files: bool = True
) -> CartStatus:
    """The progress report; `files=False` skips the per-file rows (a 100,000-file cart)."""
    async with sessions.begin() as session:
        cart = await store.active_cart(session, owner, uid)
        if cart is None:
            raise CartNotFound(f"No cart with uid {uid} found")
        if files:
            rows: Sequence[CartFile] | None = await store.cart_files(session, cart.id)
            totals = _totals_of(rows or ())
        else:
            rows, totals = None, await store.cart_totals(session, cart.id)
    # While a cart is staging nothing else writes its row, so updated_at is the moment
    # its first file was claimed: the start of the ETA's throughput window.
    eta = progress.eta_seconds(cart.state, cart.updated_at, totals, time.time())
    return CartStatus(
        cart_id=uid,
        state=cart.state,
        message=cart.message,
        created_at=cart.created_at,
        updated_at=cart.updated_at,
        ready_at=cart.ready_at,
        last_used_at=cart.last_used_at,
        expires_at=cart.expires_at,
        files_total=totals.files,
        files_staged=totals.staged,
        files_error=totals.errored,
        bytes_total=totals.bytes_total,
        bytes_staged=totals.bytes_staged,
        files_waiting=totals.waiting,
        files_staging=totals.staging,
        eta_seconds=eta,
        files=None if rows is None else [_file_status(f) for f in rows],
    )


def _totals_of(rows: Sequence[CartFile]) -> store.CartTotals:
    """store.cart_totals over rows already read.

    Under READ COMMITTED a second query may see progress written after the rows were
    read; summing the same rows keeps a status's totals equal to its per-file list.
    """
    states = Counter(row.state for row in rows)
    return store.CartTotals(
        files=len(rows),
        staged=states[FileState.STAGED],
        errored=states[FileState.ERROR],
        bytes_total=sum(row.size or 0 for row in rows),
        bytes_staged=sum(row.bytes_staged for row in rows),
        waiting=states[FileState.WAITING],
        staging=states[FileState.STAGING],
        sized=sum(row.size is not None for row in rows),
    )


def _file_status(row: CartFile) -> FileStatus:
    return FileStatus(
        id=row.archive_id,
        path=row.path,
        state=row.state,
        size=row.size,
        bytes_staged=row.bytes_staged,
        error=row.error,
        attempts=row.attempts,
    )


async def ready_files(
    sessions: SessionFactory, uid: str, *, owner: str, hold: store.Lease | None = None
) -> tuple[Cart, Sequence[CartFile]]:
    """The cart and its files if it can be downloaded now; touches it for LRU.

    On a shared volume (`hold` given: this replica and its lease length) it also holds
    the cart, so that no other replica evicts or removes the files this download is
    about to read; the download's replica renews the hold while it streams.
    """
    async with sessions.begin() as session:
        cart = await store.active_cart(session, owner, uid)
        if cart is None:
            raise CartNotFound(GONE)
        await store.touch(session, cart.id)
        if cart.state != CartState.READY:
            return cart, []
        if hold is not None:
            until = time.time() + hold.seconds
            if not await store.hold_cart(session, cart.id, until, hold.owner):
                raise CartNotFound(GONE)
        return cart, await store.cart_files(session, cart.id)


async def delete_cart(
    sessions: SessionFactory,
    worker: Worker,
    volume: Volume,
    uid: str,
    *,
    owner: str,
    answers: StatusCache,
) -> None:
    """Mark deleted first (the truth), then stop its fetches and free its files."""
    async with sessions.begin() as session:
        cart = await store.active_cart(session, owner, uid)
        if cart is None:
            raise CartNotFound(GONE)
        await store.mark_deleted(session, cart.id)
        # Read after the UPDATE: a download starting elsewhere either held the cart before
        # it (seen here) or finds it deleted (its hold_cart matches no row).
        held = volume.shared and await store.is_held(session, cart.id, time.time())
    answers.invalidate()  # committed: a HEAD from now on answers 404
    await worker.cancel_cart(cart.id)  # other replicas' fetches stop at their next renewal
    if not held or volume.is_streaming(cart.id):
        await volume.remove_cart(cart.id)  # else the sweep removes it once the hold lapses
    log.info("cart %s (row %d) deleted", uid, cart.id)
