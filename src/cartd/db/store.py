"""Every SQL statement the service runs, as plain async functions over a session.

State transitions are single conditional UPDATEs (`... WHERE state IN (...)`), so a
transition that lost a race (a DELETE, a failure elsewhere in the cart) simply matches no
row instead of overwriting newer state.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db.models import Cart, CartFile, CartState, FileState, Lock

LIVE_CART_STATES = (CartState.WAITING, CartState.STAGING)
FINISHED_CART_STATES = (CartState.READY, CartState.ERROR)
UNFINISHED_FILE_STATES = (FileState.WAITING, FileState.STAGING, FileState.ERROR)
PENDING_FILE_STATES = (FileState.WAITING, FileState.STAGING)  # a partial cart waits for these

# The hot paths (claims, outcomes, the space lock) use Core statements on the tables,
# built once here: building a statement, and the ORM's execution of it, cost about as
# much client CPU as the round trip itself on MariaDB.  A statement built once also
# computes its cache key once.
_CARTS = Cart.metadata.tables[Cart.__tablename__]
_FILES = CartFile.metadata.tables[CartFile.__tablename__]


def _one_of(column: Any, values: Sequence[str]) -> Any:
    """`column IN (values)` as ORed comparisons: SQLAlchemy expands a literal IN list
    into its parameters again on every execution, ORed comparisons are compiled once.
    Both databases plan them alike."""
    return or_(*(column == value for value in values))


@dataclass(frozen=True)
class FileJob:
    """What the worker needs to fetch one file, detached from any session."""

    file_id: int
    cart_id: int
    archive_id: str
    hashtype: str
    hashsum: str
    cart_uid: str = ""  # the client's cart id, for log lines


@dataclass(frozen=True)
class CartTotals:
    files: int
    staged: int
    errored: int
    bytes_total: int  # of the sizes known so far
    bytes_staged: int
    waiting: int = 0
    staging: int = 0
    sized: int = 0  # files whose size is known (the archive reported it, or staged)


def _update(model: type[Cart] | type[CartFile]) -> Any:
    """An UPDATE that skips the ORM's identity-map synchronisation.

    These sessions hold no objects that the statements could make stale, and the
    synchronisation ("evaluate") costs real CPU on every per-file write.
    """
    return update(model).execution_options(synchronize_session=False)


@dataclass(frozen=True)
class CartBrief:
    """The columns a HEAD answers from: reading them costs no ORM object."""

    id: int
    state: str
    message: str
    updated_at: float
    last_used_at: float


async def cart_brief(session: AsyncSession, owner: str, uid: str) -> CartBrief | None:
    columns = (Cart.id, Cart.state, Cart.message, Cart.updated_at, Cart.last_used_at)
    query = select(*columns).where(Cart.owner == owner, Cart.active_uid == uid)
    row = (await session.execute(query)).one_or_none()
    return None if row is None else CartBrief(*row)


async def active_cart(session: AsyncSession, owner: str, uid: str) -> Cart | None:
    """The owner's live cart of that id; another owner's cart of the same id is not it."""
    result = await session.execute(select(Cart).where(Cart.owner == owner, Cart.active_uid == uid))
    return result.scalar_one_or_none()


INSERT_BATCH = 2000  # rows per INSERT: a 100,000-file cart never has all its rows bound at once
FILE_COLUMNS = ("archive_id", "path", "hashtype", "hashsum")  # insert_cart's tuples, in order


async def insert_cart(
    session: AsyncSession,
    uid: str,
    fingerprint: str,
    files: Sequence[tuple[str, str, str, str]],
    ttl: float | None = None,
    *,
    owner: str = "",
    manifest: bool = False,
    allow_partial: bool = False,
) -> Cart:
    now = time.time()
    cart = Cart(
        owner=owner,
        manifest=manifest,
        allow_partial=allow_partial,
        expires_at=now + ttl if ttl else None,
        uid=uid,
        active_uid=uid,
        state=CartState.WAITING,
        message="",
        fingerprint=fingerprint,
        file_count=len(files),
        created_at=now,
        updated_at=now,
        last_used_at=now,
    )
    session.add(cart)
    await session.flush()
    defaults = {
        "cart_id": cart.id,
        "state": FileState.WAITING,
        "bytes_staged": 0,
        "error": "",
        "attempts": 0,
        "updated_at": now,
    }
    for start in range(0, len(files), INSERT_BATCH):
        # Built a batch at a time: a dict per row for the whole cart was 36 MB at 100,000.
        batch = files[start : start + INSERT_BATCH]
        rows = [
            {**defaults, "position": position, **dict(zip(FILE_COLUMNS, file, strict=True))}
            for position, file in enumerate(batch, start)
        ]
        await session.execute(insert(CartFile), rows)
    return cart


async def mark_deleted(
    session: AsyncSession, cart_id: int, reason: str = "deleted", *conditions: Any
) -> bool:
    """Delete a cart row's identity; extra `conditions` let eviction lose races safely."""
    now = time.time()
    result = await session.execute(
        _update(Cart)
        .where(Cart.id == cart_id, Cart.state != CartState.DELETED, *conditions)
        .values(
            state=CartState.DELETED,
            active_uid=None,
            deleted_at=now,
            deleted_reason=reason,
            updated_at=now,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CartUsage:
    """A cart as the cache policy sees it: when it was used and what it holds on disk."""

    cart_id: int
    uid: str
    state: str
    last_used_at: float
    created_at: float
    expires_at: float | None
    files: int
    bytes: int


def _usage_query() -> Any:
    held = func.coalesce(func.sum(CartFile.bytes_staged), 0)
    return (
        select(
            Cart.id,
            Cart.uid,
            Cart.state,
            Cart.last_used_at,
            Cart.created_at,
            Cart.expires_at,
            Cart.file_count,
            held,
        )
        .outerjoin(CartFile, CartFile.cart_id == Cart.id)
        .where(Cart.state != CartState.DELETED)
        .group_by(Cart.id)
    )


def not_held(now: float) -> Any:
    """No replica streams the cart's files (its hold lapsed or was never taken)."""
    return or_(Cart.held_until.is_(None), Cart.held_until < now)


async def eviction_candidates(session: AsyncSession, used_before: float) -> list[CartUsage]:
    """Finished carts not used since `used_before` nor held, least recently used first."""
    query = (
        _usage_query()
        .where(
            Cart.state.in_(FINISHED_CART_STATES),
            Cart.last_used_at < used_before,
            not_held(time.time()),
        )
        .order_by(Cart.last_used_at, Cart.id)
    )
    return [CartUsage(*row) for row in (await session.execute(query)).all()]


async def carts_usage(session: AsyncSession) -> list[CartUsage]:
    """Every cart that is not deleted, oldest use first (for `cartd carts list`)."""
    query = _usage_query().order_by(Cart.last_used_at, Cart.id)
    return [CartUsage(*row) for row in (await session.execute(query)).all()]


async def expired_carts(session: AsyncSession, now: float) -> list[tuple[int, str]]:
    result = await session.execute(
        select(Cart.id, Cart.uid).where(
            Cart.state != CartState.DELETED, Cart.expires_at.is_not(None), Cart.expires_at < now
        )
    )
    return [(row[0], row[1]) for row in result.all()]


TOUCH_GRANULARITY = 1.0


async def touch(session: AsyncSession, cart_id: int) -> None:
    """Record use for LRU; at most one write a second per cart, however hard clients poll."""
    now = time.time()
    await session.execute(
        _update(Cart)
        .where(Cart.id == cart_id, Cart.last_used_at < now - TOUCH_GRANULARITY)
        .values(last_used_at=now)
    )


_TOUCH = (
    update(_CARTS)
    .where(_CARTS.c.id == bindparam("cart_id"), _CARTS.c.last_used_at < bindparam("used_at"))
    .values(last_used_at=bindparam("used_at"))
)


async def touch_many(session: AsyncSession, uses: Mapping[int, float]) -> None:
    """Uses noted in memory (status_cache), as one executemany in row order.

    A use never moves a cart's last use backwards: a download or a later flush may have
    written a newer one meanwhile.
    """
    if uses:
        rows = [{"cart_id": key, "used_at": uses[key]} for key in sorted(uses)]
        await session.execute(_TOUCH, rows)


async def hold_carts(
    session: AsyncSession, cart_ids: Sequence[int], until: float, owner: str
) -> None:
    """Keep carts' files from every replica's eviction until `until` (a download runs)."""
    if cart_ids:
        await session.execute(
            _update(Cart)
            .where(Cart.id.in_(sorted(cart_ids)))
            .values(held_until=until, held_by=owner)
        )


async def hold_owners(session: AsyncSession) -> list[str]:
    """Every replica holding a cart now (start-up looks for dead ones on its host)."""
    result = await session.execute(
        select(Cart.held_by).where(Cart.held_by.is_not(None), ~not_held(time.time())).distinct()
    )
    return [owner for owner in result.scalars().all() if owner is not None]


async def release_holds(session: AsyncSession, owners: Sequence[str]) -> None:
    """Holds of replicas known dead end now: their downloads died with them."""
    if owners:
        await session.execute(
            _update(Cart).where(Cart.held_by.in_(owners)).values(held_until=None, held_by=None)
        )


async def hold_cart(session: AsyncSession, cart_id: int, until: float, owner: str) -> bool:
    """Take a download's hold; False if the cart was deleted meanwhile (by any replica)."""
    result = await session.execute(
        _update(Cart)
        .where(Cart.id == cart_id, Cart.state != CartState.DELETED)
        .values(held_until=until, held_by=owner)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def is_held(session: AsyncSession, cart_id: int, now: float) -> bool:
    """Whether a replica's download (this one's included) still holds the cart's files."""
    return bool(await session.scalar(select(exists().where(Cart.id == cart_id, ~not_held(now)))))


async def cart_files(session: AsyncSession, cart_id: int) -> Sequence[CartFile]:
    result = await session.execute(
        select(CartFile).where(CartFile.cart_id == cart_id).order_by(CartFile.position)
    )
    return result.scalars().all()


async def cart_totals(session: AsyncSession, cart_id: int) -> CartTotals:
    def count_in(state: FileState) -> Any:  # MySQL has no FILTER clause
        return func.sum(case((CartFile.state == state, 1), else_=0))

    row = (
        await session.execute(
            select(
                func.count(),
                count_in(FileState.STAGED),
                count_in(FileState.ERROR),
                func.sum(func.coalesce(CartFile.size, 0)),
                func.sum(CartFile.bytes_staged),
                count_in(FileState.WAITING),
                count_in(FileState.STAGING),
                func.count(CartFile.size),
            ).where(CartFile.cart_id == cart_id)
        )
    ).one()
    return CartTotals(*(int(value or 0) for value in row))


CLAIM_CARTS = 64  # live carts looked at per claim; the oldest are served first


@dataclass(frozen=True)
class Lease:
    """Who claims (a replica id) and until when the claim holds unless renewed."""

    owner: str
    seconds: float


_LIVE_CARTS = (
    select(_CARTS.c.id, _CARTS.c.uid, _CARTS.c.state)
    .where(_one_of(_CARTS.c.state, LIVE_CART_STATES))
    .order_by(_CARTS.c.id)
    .limit(CLAIM_CARTS)
)
_CLAIMABLE = (
    select(_FILES.c.id, _FILES.c.cart_id, _FILES.c.archive_id, _FILES.c.hashtype, _FILES.c.hashsum)
    .where(
        _FILES.c.state == FileState.WAITING,
        _FILES.c.cart_id.in_(bindparam("live", expanding=True)),
    )
    .order_by(_FILES.c.cart_id, _FILES.c.position)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    update(_FILES)
    .where(_FILES.c.id.in_(bindparam("ids", expanding=True)), _FILES.c.state == FileState.WAITING)
    .values(
        state=FileState.STAGING,
        attempts=_FILES.c.attempts + 1,
        updated_at=bindparam("now"),
        lease_owner=bindparam("owner"),
        lease_expires=bindparam("expires"),
        reserved=bindparam("promise"),
    )
)
_START_CARTS = (
    update(_CARTS)
    .where(_CARTS.c.id.in_(bindparam("ids", expanding=True)), _CARTS.c.state == CartState.WAITING)
    .values(state=CartState.STAGING, updated_at=bindparam("now"))
)


async def _live_carts(session: AsyncSession) -> tuple[dict[int, str], set[int]]:
    """Live carts' row ids and client ids (log lines of a fetch name the client's id),
    and which of them are still `waiting`."""
    rows = (await session.execute(_LIVE_CARTS)).all()
    waiting = {cart_id for cart_id, _uid, state in rows if state == CartState.WAITING}
    return {cart_id: uid for cart_id, uid, _state in rows}, waiting


async def claim_files(
    session: AsyncSession, limit: int, lease: Lease, promise: int | None = None
) -> list[FileJob]:
    """Lease up to `limit` waiting files of live carts to this replica, oldest cart first,
    each promised `promise` bytes of the volume (cache.py decides that).

    Live carts are chosen first, so the files of dead carts, however many, are never
    scanned.  The file rows are locked with SKIP LOCKED (MariaDB >= 10.6, MySQL 8): two
    replicas claiming at once each take different rows instead of waiting for each other
    (SQLite, one process, ignores the clause).  A DELETE racing this claim is settled by
    the worker, which drops jobs of carts it was told to cancel, and on other replicas by
    the lease renewal, which finds the cart deleted.
    """
    live, waiting = await _live_carts(session)
    if not live:
        return []
    query = {"live": list(live), "limit": limit}
    rows = (await session.execute(_CLAIMABLE, query)).all()
    if not rows:
        return []
    now = time.time()
    leased = {"now": now, "owner": lease.owner, "expires": now + lease.seconds}
    ids = [row[0] for row in rows]
    await session.execute(_CLAIM, {"ids": ids, "promise": promise, **leased})
    # Only a cart seen `waiting` can need starting: no cart ever goes back to `waiting`,
    # so for the others the UPDATE would match nothing, at the cost of a round trip.
    if starting := waiting.intersection(row[1] for row in rows):
        await session.execute(_START_CARTS, {"ids": sorted(starting), "now": now})
    return [FileJob(*row, cart_uid=live[row[1]]) for row in rows]


async def renew_leases(session: AsyncSession, file_ids: Sequence[int], lease: Lease) -> set[int]:
    """Extend this replica's leases on `file_ids`; returns the ids it no longer may fetch.

    A lease is lost when its row went back to `waiting` (the cart failed, or the lease
    lapsed), when another replica took it over, or when its cart is no longer live (a
    DELETE, an expiry or an eviction on any replica).  The caller cancels those fetches.
    A row this replica finished (staged or failed, possibly in this very transaction) is
    not lost: its fetch is over.
    """
    if not file_ids:
        return set()
    now = time.time()
    mine = and_(CartFile.lease_owner == lease.owner, CartFile.state == FileState.STAGING)
    await session.execute(
        _update(CartFile)
        .where(CartFile.id.in_(sorted(file_ids)), mine)
        .values(lease_expires=now + lease.seconds)
    )
    finished = CartFile.state.in_((FileState.STAGED, FileState.ERROR))
    lost = await session.execute(
        select(CartFile.id)
        .join(Cart, Cart.id == CartFile.cart_id)
        .where(
            CartFile.id.in_(file_ids),
            or_(~Cart.state.in_(LIVE_CART_STATES), and_(~mine, ~finished)),
        )
    )
    return set(lost.scalars().all())


def _lease_lapsed(now: float) -> Any:
    return or_(CartFile.lease_expires.is_(None), CartFile.lease_expires < now)


async def requeue_expired(session: AsyncSession, dead: Sequence[str] = ()) -> int:
    """`staging` rows whose lease lapsed go back to `waiting`: their replica died or gave up.
    So do the rows of `dead` owners, known dead before their leases lapse.

    Replaces the single-process reaper: a row is requeued by time, never because this
    process happens not to be fetching it, since another replica may well be.
    """
    now = time.time()
    lapsed = or_(_lease_lapsed(now), CartFile.lease_owner.in_(dead)) if dead else _lease_lapsed(now)
    result = await session.execute(
        _update(CartFile).where(CartFile.state == FileState.STAGING, lapsed).values(_requeued(now))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def give_back(session: AsyncSession, file_ids: Sequence[int], lease: Lease) -> None:
    """Leases this replica took but will not use (jobs claimed ahead, at a stop) go back
    to `waiting` now, rather than when they lapse: other replicas may fetch them at once."""
    if file_ids:
        mine = and_(CartFile.lease_owner == lease.owner, CartFile.state == FileState.STAGING)
        await session.execute(
            _update(CartFile).where(CartFile.id.in_(file_ids), mine).values(_requeued(time.time()))
        )


def _requeued(now: float) -> dict[str, Any]:
    return {
        "state": FileState.WAITING,
        "bytes_staged": 0,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires": None,
        "reserved": None,
    }


async def lease_owners(session: AsyncSession) -> list[str]:
    """Every replica holding a lease now (start-up looks for dead ones on its host)."""
    result = await session.execute(
        select(CartFile.lease_owner)
        .where(CartFile.state == FileState.STAGING, CartFile.lease_owner.is_not(None))
        .distinct()
    )
    return [owner for owner in result.scalars().all() if owner is not None]


async def leased_files(session: AsyncSession) -> set[int]:
    """Ids of files some replica is fetching now (a `.part` of theirs must survive)."""
    now = time.time()
    result = await session.execute(
        select(CartFile.id).where(CartFile.state == FileState.STAGING, ~_lease_lapsed(now))
    )
    return set(result.scalars().all())


_LOCK_SPACE = (
    select(Lock.__table__.c.name).where(Lock.__table__.c.name == "space").with_for_update()
)


async def lock_space(session: AsyncSession) -> None:
    """Serialise space decisions across replicas until this transaction ends."""
    await session.execute(_LOCK_SPACE)


_UNWRITTEN = _FILES.c.reserved - _FILES.c.bytes_staged
_PROMISED = select(func.coalesce(func.sum(case((_UNWRITTEN > 0, _UNWRITTEN), else_=0)), 0)).where(
    _FILES.c.state == FileState.STAGING,
    _FILES.c.reserved.is_not(None),
    _FILES.c.lease_owner != bindparam("owner"),
    _FILES.c.lease_expires.is_not(None),  # the lease has not lapsed
    _FILES.c.lease_expires >= bindparam("now"),
)


async def promised_elsewhere(session: AsyncSession, owner: str) -> int:
    """Bytes other replicas' live fetches promised themselves and have not written yet.

    Their written bytes come from the progress rows, which lag: the estimate errs on the
    side of less free space, never more.
    """
    result = await session.execute(_PROMISED, {"owner": owner, "now": time.time()})
    return int(result.scalar() or 0)


async def record_reserved(session: AsyncSession, promised: Mapping[int, int]) -> None:
    """Space promised to fetches (file id -> bytes), as one executemany."""
    if promised:
        rows = [{"file_id": key, "promise": promised[key]} for key in sorted(promised)]
        await session.execute(_RESERVE, rows)


async def record_size(session: AsyncSession, file_id: int, size: int, mtime: float) -> None:
    await session.execute(
        _update(CartFile)
        .where(CartFile.id == file_id)
        .values(size=size, mtime=mtime, updated_at=time.time())
    )


# Core, not ORM: an ORM UPDATE given a list of parameters becomes "bulk by primary key",
# which cannot keep the state condition below.
_PROGRESS = (
    update(_FILES)
    .where(_FILES.c.id == bindparam("file_id"), _FILES.c.state == FileState.STAGING)
    .values(bytes_staged=bindparam("written"))
)


_RESERVE = (
    update(_FILES).where(_FILES.c.id == bindparam("file_id")).values(reserved=bindparam("promise"))
)


async def record_progress(session: AsyncSession, written: Mapping[int, int]) -> None:
    """Bytes written so far by fetches in flight, as one executemany.

    Only `staging` rows match: a count read just before a file was recorded staged
    (bytes_staged = size) or failed must not overwrite that outcome.  `updated_at` stays
    put: it dates state changes, and progress is not one.
    """
    if written:
        rows = [{"file_id": key, "written": written[key]} for key in sorted(written)]
        await session.execute(_PROGRESS, rows)


@dataclass(frozen=True)
class StagedFile:
    """A verified file's outcome, waiting for the group commit that records it."""

    job: FileJob
    size: int
    mtime: float
    crc32: int | None = None
    sha256: str | None = None


STAGED_CHUNK = 50  # rows per UPDATE: 551 parameters, inside SQLite's oldest limit of 999
# The outcome columns that differ from file to file, in the order of their parameters.
_STAGED_COLUMNS = ("size", "bytes_staged", "mtime", "crc32", "sha256")


@functools.lru_cache(maxsize=2 * STAGED_CHUNK)
def _staged_sql(rows: int, mark: str) -> str:
    """One UPDATE for `rows` outcomes: a CASE per column, the rest shared by every row.

    An executemany is one statement per row on aiomysql, each a round trip; a CASE
    statement built with SQLAlchemy cost more CPU to compile every time than that saved.
    This text is made once per batch size and handed to the driver as it is, so neither
    compilation nor a cache key is ever computed for it.  `mark` is the driver's
    positional placeholder.
    """
    whens = " ".join([f"WHEN {mark} THEN {mark}"] * rows)
    cases = ", ".join(f"{column} = CASE id {whens} END" for column in _STAGED_COLUMNS)
    marks = ", ".join([mark] * rows)
    # Only constants and placeholders are spliced in: every value travels as a parameter.
    return (
        f"UPDATE {_FILES.name} SET state = '{FileState.STAGED}', error = '',"  # noqa: S608
        f" lease_owner = NULL, lease_expires = NULL, reserved = NULL,"
        f" updated_at = {mark}, {cases}"
        f" WHERE id IN ({marks}) AND state = '{FileState.STAGING}'"
    )


def _staged_parameters(outcomes: Sequence[StagedFile], now: float) -> tuple[Any, ...]:
    """The parameters of `_staged_sql`, in the order of its placeholders."""
    ids = [o.job.file_id for o in outcomes]
    sizes = [o.size for o in outcomes]
    values: dict[str, list[Any]] = {"size": sizes, "bytes_staged": sizes}
    values["mtime"] = [o.mtime for o in outcomes]
    values |= {"crc32": [o.crc32 for o in outcomes], "sha256": [o.sha256 for o in outcomes]}
    cases = [
        value
        for column in _STAGED_COLUMNS
        for pair in zip(ids, values[column], strict=True)
        for value in pair
    ]
    return (now, *cases, *ids)


async def _record_staged(session: AsyncSession, outcomes: Sequence[StagedFile], now: float) -> None:
    """Mark files staged, STAGED_CHUNK rows per statement, in file id order.

    Only rows still `staging` change: a DELETE or a failure that raced the outcome wins.
    """
    connection = await session.connection()
    mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    ordered = sorted(outcomes, key=lambda o: o.job.file_id)
    for start in range(0, len(ordered), STAGED_CHUNK):
        chunk = ordered[start : start + STAGED_CHUNK]
        await connection.exec_driver_sql(
            _staged_sql(len(chunk), mark), _staged_parameters(chunk, now)
        )


async def files_staged(session: AsyncSession, outcomes: Sequence[StagedFile]) -> list[bool]:
    """Record verified files; True for the one outcome per cart that made it ready.

    A batch costs one lock, one UPDATE per STAGED_CHUNK files and one completion check
    per cart, where a file at a time cost three statements each: small files finish
    hundreds per second.  Carts are locked in id order, so two batches of stagings cannot
    deadlock on them.  A group commit that also holds a failure (`file_failed`, cart lock
    first) or a claim can still meet another replica's in the other order; MariaDB then
    picks a victim, and the group commit retries each operation alone.
    """
    if not outcomes:
        return []
    now = time.time()
    carts = sorted({o.job.cart_id for o in outcomes})
    partial = await _lock_carts(session, carts)
    await _record_staged(session, outcomes, now)
    finished = {cart_id for cart_id in carts if await _finish(session, cart_id, partial, now)}
    results = []
    for outcome in outcomes:
        results.append(outcome.job.cart_id in finished)
        finished.discard(outcome.job.cart_id)  # one caller reports the cart ready
    return results


_LOCK_CARTS = (
    select(_CARTS.c.id, _CARTS.c.allow_partial)
    .where(_CARTS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_CARTS.c.id)
    .with_for_update()
)


async def _lock_carts(session: AsyncSession, cart_ids: Sequence[int]) -> set[int]:
    """Serialise carts' completion checks; returns those that allow partial results.

    Without the row lock, two files finishing at once under READ COMMITTED each see the
    other still `staging`, neither marks the cart ready, and it is stuck forever.  Carts
    are locked in id order, so two transactions never wait for each other's carts.
    """
    result = await session.execute(_LOCK_CARTS, {"ids": list(cart_ids)})
    return {cart_id for cart_id, allow_partial in result.all() if allow_partial}


# A list of states rather than `!= staged`, so the claim index answers it with a few
# seeks instead of a scan of the whole cart for every file that completes.
_UNFINISHED = exists().where(
    _FILES.c.cart_id == bindparam("cart_id"),
    _one_of(_FILES.c.state, UNFINISHED_FILE_STATES),
)
_READY = (
    update(_CARTS)
    .where(
        _CARTS.c.id == bindparam("cart_id"),
        _one_of(_CARTS.c.state, LIVE_CART_STATES),
        ~_UNFINISHED,
    )
    .values(
        state=CartState.READY,
        ready_at=bindparam("now"),
        last_used_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
)


async def _finish(session: AsyncSession, cart_id: int, partial: set[int], now: float) -> bool:
    """Mark the cart finished if no file is left; True if this call did it."""
    if cart_id in partial:
        return await finish_partial(session, cart_id, now)
    result = await session.execute(_READY, {"cart_id": cart_id, "now": now})
    return bool(result.rowcount)  # type: ignore[attr-defined]


MAX_ERROR_CHARS = 2000  # MariaDB TEXT holds 64 KiB; archives have sent more than that


async def file_failed(session: AsyncSession, job: FileJob, error: str) -> bool:
    """Record a failed file and fail its cart; True if that finished the cart.

    The cart's other in-flight files are being cancelled: they go back to `waiting`, so
    the status never shows a fetch that nobody runs.  A partial cart instead carries on,
    and finishes only when its last file is staged or failed.
    """
    now = time.time()
    error = error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "..."
    partial = job.cart_id in await _lock_carts(session, [job.cart_id])
    await session.execute(
        _update(CartFile)
        .where(CartFile.id == job.file_id)
        .values(
            state=FileState.ERROR,
            error=error,
            bytes_staged=0,
            updated_at=now,
            lease_owner=None,
            lease_expires=None,
            reserved=None,
        )
    )
    if partial:
        return await finish_partial(session, job.cart_id, now)
    await session.execute(
        _update(CartFile)
        .where(CartFile.cart_id == job.cart_id, CartFile.state == FileState.STAGING)
        .values(_requeued(now))
    )
    result = await session.execute(
        _update(Cart)
        .where(Cart.id == job.cart_id, Cart.state.in_(LIVE_CART_STATES))
        .values(state=CartState.ERROR, message=failed_message(error), updated_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def failed_message(error: str) -> str:
    """pacifica-cartd's text for a cart that failed; clients match on it."""
    return f"Failed to pull file({error})"


async def finish_partial(session: AsyncSession, cart_id: int, now: float) -> bool:
    """A partial cart with no file waiting or staging is done: `ready` if any file staged,
    with a message that counts the failures, else `error` like any other cart.

    The cheap existence check runs on every outcome; the counts only once, at the end.
    """
    pending = exists().where(
        and_(CartFile.cart_id == cart_id, CartFile.state.in_(PENDING_FILE_STATES))
    )
    if (await session.execute(select(pending))).scalar():
        return False
    totals = await cart_totals(session, cart_id)
    path, error = await _first_failure(session, cart_id) if totals.errored else ("", "")
    values: dict[str, Any] = {"state": CartState.ERROR, "message": failed_message(error)}
    if totals.staged:
        summary = f"{totals.errored} of {totals.files} files failed: {path}: {error}"
        message = summary if totals.errored else ""
        values = {"state": CartState.READY, "message": message, "ready_at": now}
        values["last_used_at"] = now
    result = await session.execute(
        _update(Cart)
        .where(Cart.id == cart_id, Cart.state.in_(LIVE_CART_STATES))
        .values(updated_at=now, **values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def _first_failure(session: AsyncSession, cart_id: int) -> tuple[str, str]:
    """(path, error) of the cart's first failed file in cart order, or empty strings."""
    row = (
        await session.execute(
            select(CartFile.path, CartFile.error)
            .where(CartFile.cart_id == cart_id, CartFile.state == FileState.ERROR)
            .order_by(CartFile.position)
            .limit(1)
        )
    ).first()
    return (row[0], row[1]) if row else ("", "")


_CHECKSUMS = (
    update(_FILES)
    .where(_FILES.c.id == bindparam("file_id"))
    .values(crc32=bindparam("crc"), sha256=bindparam("sha"))
)


async def checksums_known(session: AsyncSession, file_id: int) -> bool:
    """Whether a file's CRC-32 (recorded with its SHA-256) is known already."""
    result = await session.execute(select(CartFile.crc32).where(CartFile.id == file_id))
    return result.scalar() is not None


async def record_checksums(session: AsyncSession, found: Mapping[int, tuple[int, str]]) -> None:
    """Save (CRC-32, SHA-256) by file id, computed after staging (digests.py, downloads.py).

    A plain executemany: a row deleted meanwhile (its cart deleted or evicted) matches
    nothing and costs the others nothing; the digests were only ever a cache.
    """
    if found:
        rows = [{"file_id": key, "crc": crc, "sha": sha} for key, (crc, sha) in found.items()]
        await session.execute(_CHECKSUMS, rows)


async def requeue_interrupted(session: AsyncSession) -> int:
    """After a restart of the only replica (SQLite) nothing is in flight, so `staging`
    rows are work to do again, whatever their leases say."""
    result = await session.execute(
        _update(CartFile).where(CartFile.state == FileState.STAGING).values(_requeued(time.time()))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def live_cart_ids(session: AsyncSession) -> set[int]:
    """Carts whose directory must stay: not deleted, or still streamed by some replica."""
    now = time.time()
    result = await session.execute(
        select(Cart.id).where(or_(Cart.state != CartState.DELETED, ~not_held(now)))
    )
    return set(result.scalars().all())


async def staged_files(session: AsyncSession) -> Sequence[tuple[int, int, int | None]]:
    """(cart id, file id, size) of every staged file of a non-deleted cart."""
    result = await session.execute(
        select(CartFile.cart_id, CartFile.id, CartFile.size)
        .join(Cart, Cart.id == CartFile.cart_id)
        .where(CartFile.state == FileState.STAGED, Cart.state != CartState.DELETED)
    )
    return [(r[0], r[1], r[2]) for r in result.all()]


async def restage_files(session: AsyncSession, file_ids: Sequence[int]) -> None:
    """Files whose bytes vanished from the volume go back to waiting, their carts to staging."""
    if not file_ids:
        return
    now = time.time()
    cart_ids = select(CartFile.cart_id).where(CartFile.id.in_(file_ids)).scalar_subquery()
    await session.execute(
        _update(Cart)
        .where(Cart.id.in_(cart_ids), Cart.state == CartState.READY)
        .values(state=CartState.STAGING, ready_at=None, updated_at=now)
    )
    await session.execute(_update(CartFile).where(CartFile.id.in_(file_ids)).values(_requeued(now)))


@contextmanager
def schema_lock(connection: Connection, timeout: int = 600) -> Iterator[None]:
    """Hold a MariaDB named lock (one per database) while the schema is checked and changed,
    so replicas starting together migrate one after the other: DDL commits implicitly, so
    no transaction can serialise them.  SQLite serves one host's processes: no lock."""
    if connection.dialect.name != "mysql":
        yield
        return
    name = "CONCAT('cartd_schema.', DATABASE())"
    acquired = connection.execute(
        text(f"SELECT GET_LOCK({name}, :timeout)"), {"timeout": timeout}
    ).scalar()
    if acquired != 1:
        raise TimeoutError(f"another cartd held the schema lock for {timeout}s")
    try:
        yield
    finally:
        connection.execute(text(f"SELECT RELEASE_LOCK({name})"))


async def ping(session: AsyncSession) -> None:
    """The cheapest statement that proves the database answers (readiness)."""
    await session.execute(text("SELECT 1"))


async def cart_counts(session: AsyncSession) -> dict[str, int]:
    """Carts by state, deleted ones left out (they only accumulate)."""
    query = (
        select(Cart.state, func.count()).where(Cart.state != CartState.DELETED).group_by(Cart.state)
    )
    return {state: count for state, count in (await session.execute(query)).all()}


async def queue_depth(session: AsyncSession) -> int:
    """Files of live carts that no fetch has claimed yet."""
    query = (
        select(func.count())
        .select_from(CartFile)
        .join(Cart, Cart.id == CartFile.cart_id)
        .where(CartFile.state == FileState.WAITING, Cart.state.in_(LIVE_CART_STATES))
    )
    return int((await session.execute(query)).scalar_one())
