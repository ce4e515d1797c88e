"""Cache space: reservations for fetches, least-recently-used eviction, watermarks, expiry.

Every fetch reserves its file's size before the first byte arrives, under one lock, so
concurrent fetches can never together promise more space than the volume has.  When a
reservation does not fit, finished carts are evicted least recently used first, but only
if evicting them can actually make room, and never a cart that is staging, being
downloaded right now, or used within LRU_BUFFER_TIME.

On a volume shared by replicas the lock is a database row (`cartd_locks`, taken FOR
UPDATE), the other replicas' promises are read from their file rows (`reserved`, minus
the bytes their progress shows written), and "downloaded right now" is a cart's
`held_until`.  Evictions are conditional UPDATEs, so one cart is evicted once.

That locked transaction before every download was a third of the database round trips
of a many-file cart.  So while the volume has room, the claim that leases files to this
replica (one transaction for many files) also promises each of them ALLOWANCE bytes under
the same lock: a file that turns out no bigger is then granted here, with no transaction
of its own, and a bigger one reserves its size as before.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import psutil
from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db import store
from cartd.db.models import Cart
from cartd.db.session import SessionFactory
from cartd.db.store import CartUsage, FileJob
from cartd.metrics import Metrics
from cartd.settings import Settings, parse_amount
from cartd.status_cache import StatusCache
from cartd.volume import Volume

log = logging.getLogger(__name__)

NO_SPACE = "No Space Available"
BLOCK = 4096  # what a small file really costs on disk; estimates round up to it
# Promised to every file claimed on a shared volume with room (see the module docstring):
# most files of a many-file cart fit, and a round of claims promises only a few MiB.
ALLOWANCE = 64 * 1024
# Claims in the claim transaction: leases `limit` files; given the allowance or None.
Claim = Callable[[AsyncSession, int | None], Awaitable[list[FileJob]]]


class NoSpace(Exception):
    """The volume cannot hold this file, even after every allowed eviction."""


@dataclass
class Reservation:
    size: int
    written: int = 0

    @property
    def outstanding(self) -> int:
        return max(self.size - self.written, 0)


@dataclass
class _Request:
    key: int
    cart_id: int
    size: int
    future: asyncio.Future[Reservation]


def _on_disk(usage: CartUsage) -> int:
    return usage.bytes + usage.files * BLOCK


class Cache:
    def __init__(
        self,
        sessions: SessionFactory,
        volume: Volume,
        settings: Settings,
        owner: str = "",
        metrics: Metrics | None = None,
        answers: StatusCache | None = None,
    ) -> None:
        self.sessions = sessions
        # HEAD's kept answers, dropped when a cart here changes state, and its unwritten uses.
        self.answers = answers or StatusCache(0)
        self.volume = volume
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.owner = owner  # this replica's lease owner id: its own promises are in memory
        self._lock = asyncio.Lock()
        self._held: dict[int, Reservation] = {}
        self._requests: list[_Request] = []  # reservations waiting for the next batch
        self._granter: asyncio.Task[None] | None = None
        self._cart_bytes: dict[int, int] = {}  # sizes seen per cart, for the early refusal
        # Files claimed with ALLOWANCE promised, by file id: when the promise stops
        # counting here (the lease's length; a job dropped unstarted just lets it lapse).
        self._allowed: dict[int, float] = {}
        # Set by the runtime: stops a cart's fetches before an expiry removes its files.
        self.cancel_fetches: Callable[[int], Awaitable[None]] | None = None

    def _disk(self) -> tuple[int, int]:
        usage = psutil.disk_usage(str(self.volume.root))
        return usage.total, usage.free

    def free(self, elsewhere: int = 0) -> int:
        """Free bytes that no fetch (here, or `elsewhere` on other replicas) promised itself."""
        return self._disk()[1] - self.reserved() - elsewhere

    def reserved(self) -> int:
        """Bytes this replica promised to fetches in flight and has not written yet, and
        to claimed files not started yet."""
        now = time.monotonic()
        allowed = sum(1 for until in self._allowed.values() if until > now)
        return sum(r.outstanding for r in self._held.values()) + allowed * ALLOWANCE

    async def claim(self, limit: int, claim: Claim) -> list[FileJob]:
        """Run a claim transaction; on a shared volume with room, it also promises each
        claimed file ALLOWANCE bytes, decided under the space lock like any reservation.

        "Room" means the volume stays above its high watermark with all of them promised:
        near full, every file is decided exactly, when its size is known.
        """
        if not self.volume.shared:
            async with self.sessions.begin() as session:
                return await claim(session, None)
        async with self._deciding() as (session, elsewhere):
            assert session is not None  # a shared volume's decisions are transactions
            total, _free = self._disk()
            room = parse_amount(self.settings.cache_high_watermark, total)
            fits = self.free(elsewhere) - limit * ALLOWANCE >= room
            jobs = await claim(session, ALLOWANCE if fits else None)
            if fits:  # before the commit: a grant that follows it must count them
                now = time.monotonic()
                self._allowed = {k: t for k, t in self._allowed.items() if t > now}
                until = now + self.settings.lease_seconds
                self._allowed.update((job.file_id, until) for job in jobs)
            return jobs

    @asynccontextmanager
    async def _deciding(self) -> AsyncIterator[tuple[AsyncSession | None, int]]:
        """Hold the space lock; yields its session (shared volume) and others' promises."""
        async with self._lock:
            if not self.volume.shared:
                yield None, 0
                return
            async with self.sessions.begin() as session:
                await store.lock_space(session)
                yield session, await store.promised_elsewhere(session, self.owner)

    async def reserve(self, key: int, cart_id: int, size: int) -> Reservation:
        """Promise `size` bytes to one fetch, evicting LRU carts if that can make room.

        A cart whose files add up to more than the whole volume is refused outright, as
        soon as the sizes seen so far show it, without evicting anything for it.  On a
        shared volume, requests that arrive together are decided in one locked
        transaction (each costs the database a commit otherwise).
        """
        if not self.volume.shared:
            async with self._lock:
                return await self._grant(cart_id, key, size, 0)
        if (allowed := self._within_allowance(key, cart_id, size)) is not None:
            return allowed
        request = _Request(key, cart_id, size, asyncio.get_running_loop().create_future())
        self._requests.append(request)
        if self._granter is None or self._granter.done():
            self._granter = asyncio.create_task(self._grant_batches(), name="cartd-space")
        return await request.future  # a cancelled fetch cancels it: the granter skips it

    def _within_allowance(self, key: int, cart_id: int, size: int) -> Reservation | None:
        """A file no bigger than the allowance its claim promised it: granted here."""
        until = self._allowed.pop(key, None)
        if until is None or until <= time.monotonic() or size > ALLOWANCE:
            return None
        self._cart_bytes[cart_id] = self._cart_bytes.get(cart_id, 0) + size
        reservation = Reservation(size)
        self._held[key] = reservation
        return reservation

    async def _grant(self, cart_id: int, key: int, size: int, elsewhere: int) -> Reservation:
        total = self._disk()[0]
        cart_bytes = self._cart_bytes.get(cart_id, 0) + size
        if cart_bytes > total:
            raise NoSpace(f"{NO_SPACE}: the cart needs more than the volume's {total} bytes")
        if self.free(elsewhere) < size:
            await self._make_room(size, elsewhere)
        self._cart_bytes[cart_id] = cart_bytes
        reservation = Reservation(size)
        self._held[key] = reservation
        return reservation

    async def _grant_batches(self) -> None:
        while self._requests:
            batch, self._requests = self._requests, []
            for request, outcome in await self._grant_batch(batch):
                if request.future.done():  # the fetch was cancelled meanwhile
                    self.release(request.key)
                elif isinstance(outcome, Reservation):
                    request.future.set_result(outcome)
                else:
                    request.future.set_exception(outcome)

    async def _grant_batch(
        self, batch: list[_Request]
    ) -> list[tuple[_Request, Reservation | Exception]]:
        """Decide a batch under the space lock; other replicas see it once it commits."""
        outcomes: list[tuple[_Request, Reservation | Exception]] = []
        try:
            async with self._deciding() as (session, elsewhere):
                for r in (r for r in batch if not r.future.done()):
                    try:
                        outcomes.append((r, await self._grant(r.cart_id, r.key, r.size, elsewhere)))
                    except NoSpace as exc:
                        outcomes.append((r, exc))
                promised = {r.key: o.size for r, o in outcomes if isinstance(o, Reservation)}
                if session is not None:
                    await store.record_reserved(session, promised)
        except Exception as exc:  # nothing was promised after all
            for request, _outcome in outcomes:
                self.release(request.key)
            return [(request, exc) for request in batch]
        return outcomes

    def release(self, key: int) -> None:
        """The fetch finished, failed or was cancelled: its unwritten promise is void."""
        self._held.pop(key, None)

    def in_flight(self) -> dict[int, int]:
        """Bytes written so far by each fetch in flight, by key (file row id).

        Every fetch holds a reservation while it writes, so this is the one place that
        sees partial progress; the progress loop copies it into the database.
        """
        return {key: reservation.written for key, reservation in self._held.items()}

    def cart_finished(self, cart_id: int) -> None:
        """The cart became ready or failed (committed): its sizes and HEAD answer are stale."""
        self._cart_bytes.pop(cart_id, None)
        self.answers.invalidate()

    async def _make_room(self, size: int, elsewhere: int) -> None:
        candidates = await self._evictable()
        if self.free(elsewhere) + sum(_on_disk(c) for c in candidates) < size:
            raise NoSpace(NO_SPACE)  # evicting would destroy carts and still not fit
        for candidate in candidates:
            if self.free(elsewhere) >= size:
                return
            await self._evict(candidate, "evicted")
        if self.free(elsewhere) < size:
            raise NoSpace(NO_SPACE)

    async def _evictable(self) -> list[CartUsage]:
        """Least recently used first, counting the HEAD uses not written yet."""
        cutoff = time.time() - self.settings.lru_buffer_time
        async with self.sessions.begin() as session:
            candidates = await store.eviction_candidates(session, cutoff)
        used = [
            replace(c, last_used_at=self.answers.last_used(c.cart_id, c.last_used_at))
            for c in candidates
            if not self.volume.is_streaming(c.cart_id)
        ]
        return sorted(
            (c for c in used if c.last_used_at < cutoff), key=lambda c: (c.last_used_at, c.cart_id)
        )

    async def _evict(self, usage: CartUsage, reason: str) -> bool:
        """Delete a finished cart unless it was used or opened since it was chosen."""
        now = time.time()
        cutoff = now - self.settings.lru_buffer_time
        if (
            self.volume.is_streaming(usage.cart_id)
            or self.answers.last_used(usage.cart_id, 0.0) >= cutoff
        ):
            return False
        async with self.sessions.begin() as session:
            unused = (
                Cart.last_used_at < cutoff,
                Cart.state.in_(store.FINISHED_CART_STATES),
                store.not_held(now),
            )
            if not await store.mark_deleted(session, usage.cart_id, reason, *unused):
                return False
        self.answers.invalidate()
        await self.volume.remove_cart(usage.cart_id)
        self.metrics.evictions.labels(reason).inc()
        log.info(
            "cart %s %s (LRU): %d bytes freed, last used %.0fs ago",
            usage.uid,
            reason,
            usage.bytes,
            time.time() - usage.last_used_at,
            extra={"cart_id": usage.uid},
        )
        return True

    async def maintain(self) -> None:
        """One pass of the background policy: expire carts, sweep the directories of
        deleted ones (a shared volume), then keep free space up."""
        await self.expire()
        if self.volume.shared:
            await self.sweep()
        total, free = self._disk()
        low = parse_amount(self.settings.cache_low_watermark, total)
        if free >= low:
            return
        high = parse_amount(self.settings.cache_high_watermark, total)
        async with self._deciding():
            for candidate in await self._evictable():
                if self._disk()[1] >= high:
                    break
                await self._evict(candidate, "evicted")

    async def expire(self) -> int:
        """Delete carts whose time to live has passed, whatever their state."""
        async with self.sessions.begin() as session:
            expired = await store.expired_carts(session, time.time())
        for cart_id, uid in expired:
            async with self.sessions.begin() as session:
                if not await store.mark_deleted(session, cart_id, "expired"):
                    continue
            self.answers.invalidate()
            if self.cancel_fetches is not None:
                await self.cancel_fetches(cart_id)
            await self.discard(cart_id)
            self.metrics.evictions.labels("expired").inc()
            log.info("cart %s expired and was deleted", uid, extra={"cart_id": uid})
        return len(expired)

    async def discard(self, cart_id: int) -> None:
        """Remove a deleted cart's files, unless another replica still streams them: then
        the sweep of whichever replica runs it first removes them once the hold lapses."""
        if self.volume.shared and not self.volume.is_streaming(cart_id):
            async with self.sessions.begin() as session:
                if await store.is_held(session, cart_id, time.time()):
                    return
        await self.volume.remove_cart(cart_id)

    async def sweep(self) -> int:
        """Remove directories of carts that are deleted and no longer streamed anywhere.

        Listed before the database is read: a directory that existed then belongs to a
        cart row already committed, so the snapshot judges it rightly.
        """
        present = await asyncio.to_thread(self.volume.cart_dirs)
        async with self.sessions.begin() as session:
            keep = await store.live_cart_ids(session)
        gone = [
            path
            for cart_id, path in present.items()
            if cart_id not in keep and not self.volume.is_streaming(cart_id)
        ]
        for path in gone:
            await asyncio.to_thread(shutil.rmtree, path, True)
        return len(gone)

    async def run(self) -> None:
        """The watermark and expiry loop; an error is logged and the loop goes on."""
        while True:
            try:
                await self.maintain()
            except Exception:
                log.exception("cache maintenance failed")
            await asyncio.sleep(self.settings.cache_check_interval)
