"""Cache space: reservations for fetches, least-recently-used eviction, watermarks, expiry.

Every fetch reserves its file's size before the first byte arrives, under one lock, so
concurrent fetches can never together promise more space than the volume has.  When a
reservation does not fit, finished carts are evicted least recently used first, but only
if evicting them can actually make room, and never a cart that is staging, being
downloaded right now, or used within LRU_BUFFER_TIME.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

from cartd.db import store
from cartd.db.models import Cart
from cartd.db.session import SessionFactory
from cartd.db.store import CartUsage
from cartd.metrics import Metrics
from cartd.settings import Settings, parse_amount
from cartd.volume import Volume

log = logging.getLogger(__name__)

NO_SPACE = "No Space Available"
BLOCK = 4096  # what a small file really costs on disk; estimates round up to it


class NoSpace(Exception):
    """The volume cannot hold this file, even after every allowed eviction."""


@dataclass
class Reservation:
    size: int
    written: int = 0

    @property
    def outstanding(self) -> int:
        return max(self.size - self.written, 0)


def _on_disk(usage: CartUsage) -> int:
    return usage.bytes + usage.files * BLOCK


class Cache:
    def __init__(
        self,
        sessions: SessionFactory,
        volume: Volume,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.volume = volume
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._lock = asyncio.Lock()
        self._held: dict[int, Reservation] = {}
        self._cart_bytes: dict[int, int] = {}  # sizes seen per cart, for the early refusal
        # Set by the runtime: stops a cart's fetches before an expiry removes its files.
        self.cancel_fetches: Callable[[int], Awaitable[None]] | None = None

    def _disk(self) -> tuple[int, int]:
        usage = psutil.disk_usage(str(self.volume.root))
        return usage.total, usage.free

    def free(self) -> int:
        """Free bytes that no fetch has already promised itself."""
        return self._disk()[1] - self.reserved()

    def reserved(self) -> int:
        """Bytes promised to fetches in flight and not written yet."""
        return sum(r.outstanding for r in self._held.values())

    async def reserve(self, key: int, cart_id: int, size: int) -> Reservation:
        """Promise `size` bytes to one fetch, evicting LRU carts if that can make room.

        A cart whose files add up to more than the whole volume is refused outright, as
        soon as the sizes seen so far show it, without evicting anything for it.
        """
        async with self._lock:
            total = self._disk()[0]
            cart_bytes = self._cart_bytes.get(cart_id, 0) + size
            if cart_bytes > total:
                raise NoSpace(f"{NO_SPACE}: the cart needs more than the volume's {total} bytes")
            if self.free() < size:
                await self._make_room(size)
            self._cart_bytes[cart_id] = cart_bytes
            reservation = Reservation(size)
            self._held[key] = reservation
            return reservation

    def release(self, key: int) -> None:
        """The fetch finished, failed or was cancelled: its unwritten promise is void."""
        self._held.pop(key, None)

    def in_flight(self) -> dict[int, int]:
        """Bytes written so far by each fetch in flight, by key (file row id).

        Every fetch holds a reservation while it writes, so this is the one place that
        sees partial progress; the progress loop copies it into the database.
        """
        return {key: reservation.written for key, reservation in self._held.items()}

    def forget_cart(self, cart_id: int) -> None:
        self._cart_bytes.pop(cart_id, None)

    async def _make_room(self, size: int) -> None:
        candidates = await self._evictable()
        if self.free() + sum(_on_disk(c) for c in candidates) < size:
            raise NoSpace(NO_SPACE)  # evicting would destroy carts and still not fit
        for candidate in candidates:
            if self.free() >= size:
                return
            await self._evict(candidate, "evicted")
        if self.free() < size:
            raise NoSpace(NO_SPACE)

    async def _evictable(self) -> list[CartUsage]:
        cutoff = time.time() - self.settings.lru_buffer_time
        async with self.sessions.begin() as session:
            candidates = await store.eviction_candidates(session, cutoff)
        return [c for c in candidates if not self.volume.is_streaming(c.cart_id)]

    async def _evict(self, usage: CartUsage, reason: str) -> bool:
        """Delete a finished cart unless it was used or opened since it was chosen."""
        if self.volume.is_streaming(usage.cart_id):
            return False
        cutoff = time.time() - self.settings.lru_buffer_time
        async with self.sessions.begin() as session:
            unused = (Cart.last_used_at < cutoff, Cart.state.in_(store.FINISHED_CART_STATES))
            if not await store.mark_deleted(session, usage.cart_id, reason, *unused):
                return False
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
        """One pass of the background policy: expire carts, then keep free space up."""
        await self.expire()
        total, free = self._disk()
        low = parse_amount(self.settings.cache_low_watermark, total)
        if free >= low:
            return
        high = parse_amount(self.settings.cache_high_watermark, total)
        async with self._lock:
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
            if self.cancel_fetches is not None:
                await self.cancel_fetches(cart_id)
            await self.volume.remove_cart(cart_id)
            self.metrics.evictions.labels("expired").inc()
            log.info("cart %s expired and was deleted", uid, extra={"cart_id": uid})
        return len(expired)

    async def run(self) -> None:
        """The watermark and expiry loop; an error is logged and the loop goes on."""
        while True:
            try:
                await self.maintain()
            except Exception:
                log.exception("cache maintenance failed")
            await asyncio.sleep(self.settings.cache_check_interval)
