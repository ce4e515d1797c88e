"""HEAD's answers kept for a moment, and the cart use that HEAD records without a write.

A downloader polls HEAD on its cart several times a second, and many pollers poll the
same carts.  Reading the database for each of them made HEAD cost a database round trip
and, every second, a write transaction queued behind the staging worker's.  So:

- The answer (the cart's state, message and Retry-After, or "no such cart") is kept per
  owner and cart id for `CARTD_HEAD_CACHE_TTL` seconds.  This process's own state changes
  (a cart created, finished, deleted, evicted or expired) drop every kept answer at once,
  so a HEAD after one of them reads the database again.  Another replica's changes show
  up once the answer expires.  Only HEAD reads here: a download reads the database, so a
  stale "ready" can never make it serve a file that is missing.
- The use HEAD makes of a cart (LRU) is noted in memory, and `run` writes the uses noted
  in one transaction a second.  Eviction, which orders carts by their last use, applies
  the uses not yet written (`last_used`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db import store
from cartd.db.store import CartBrief

log = logging.getLogger(__name__)

MAX_ANSWERS = 10_000  # distinct carts polled within one TTL; beyond it, expired ones go
Commit = Callable[[Callable[[AsyncSession], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True)
class HeadAnswer:
    cart: CartBrief | None  # None: the owner has no live cart of that id
    retry_after: int


class StatusCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._answers: dict[tuple[str, str], tuple[float, HeadAnswer]] = {}
        self._uses: dict[int, float] = {}  # cart row id -> last use not yet written
        self._writing: dict[int, float] = {}  # the uses a flush in flight is writing
        self._generation = 0
        self._loading: dict[tuple[str, str], tuple[int, asyncio.Future[HeadAnswer]]] = {}

    @property
    def generation(self) -> int:
        """Changes with every invalidation: an answer read before one must not be kept."""
        return self._generation

    def get(self, owner: str, uid: str) -> HeadAnswer | None:
        entry = self._answers.get((owner, uid))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._answers[(owner, uid)]
            return None
        return entry[1]

    def put(self, owner: str, uid: str, answer: HeadAnswer, generation: int) -> None:
        """Keep an answer read from the database, unless a state change happened meanwhile
        (its `generation` is older): the answer may predate the change."""
        if self.ttl <= 0 or generation != self._generation:
            return
        now = time.monotonic()
        self._answers.pop((owner, uid), None)  # to the end: the dict stays in expiry order
        while self._answers and next(iter(self._answers.values()))[0] <= now:
            del self._answers[next(iter(self._answers))]  # the oldest, which expired
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()  # too many carts polled within one TTL: start afresh
        self._answers[(owner, uid)] = (now + self.ttl, answer)

    async def load(
        self, owner: str, uid: str, read: Callable[[], Awaitable[HeadAnswer]]
    ) -> HeadAnswer:
        """`read` the answer and keep it; polls that miss meanwhile share that one read.

        When a kept answer expires, every poll in flight misses at once (200 pollers: 200
        reads queued on the reader connection in the same millisecond).  A poll that
        arrives after an invalidation does not join a read begun before it.  With a TTL
        of 0 nothing is shared either.
        """
        if self.ttl <= 0:
            return await read()  # off means every poll reads the database itself
        key = (owner, uid)
        while (loading := self._loading.get(key)) is not None and loading[0] == self._generation:
            try:
                return await asyncio.shield(loading[1])
            except asyncio.CancelledError:
                if not loading[1].cancelled():
                    raise  # this poll itself was cancelled
                # the reading poll was cancelled, not this one: read again
        generation = self._generation
        future: asyncio.Future[HeadAnswer] = asyncio.get_running_loop().create_future()
        self._loading[key] = (generation, future)
        try:
            answer = await read()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            if self._loading.get(key, (0, None))[1] is future:
                del self._loading[key]
        future.set_result(answer)
        self.put(owner, uid, answer, generation)
        return answer

    def invalidate(self) -> None:
        """A cart changed state in this process: no kept answer may be served any more.

        Everything goes, not just that cart: state changes are rare next to polls, and the
        callers (worker, eviction) know the cart's row id but not its owner and uid.
        """
        self._generation += 1
        self._answers.clear()

    @property
    def unwritten(self) -> int:
        """Carts whose last use is only in memory (or being written) now."""
        return len(self._uses.keys() | self._writing.keys())

    def used(self, cart_id: int) -> None:
        self._uses[cart_id] = time.time()

    def last_used(self, cart_id: int, recorded: float) -> float:
        """The cart's last use: `recorded` (the database's), or a later one not yet written."""
        return max(recorded, self._uses.get(cart_id, 0.0), self._writing.get(cart_id, 0.0))

    async def flush(self, commit: Commit) -> int:
        """Write the uses noted so far in one transaction; returns how many carts.

        A failed write puts its uses back (unless newer ones came meanwhile), so eviction
        keeps seeing them and the next flush tries again.
        """
        if not self._uses or self._writing:
            return 0
        uses = self._writing = self._uses
        self._uses = {}
        try:
            await commit(lambda session: store.touch_many(session, uses))
        except BaseException:
            self._uses = {**uses, **self._uses}
            raise
        finally:
            self._writing = {}
        return len(uses)

    async def run(self, commit: Commit, interval: float = store.TOUCH_GRANULARITY) -> None:
        """Flush forever; a failed write is retried at the next interval."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(commit)
            except SQLAlchemyError as exc:
                log.warning("could not record cart use: %s", exc)
            except Exception:  # the loop must outlive any one failure, as Cache.run does
                log.exception("recording cart use failed; retrying at the next interval")
