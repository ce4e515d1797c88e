"""HEAD's kept answers and unwritten uses (cartd.status_cache): never stale after this
process's own changes, off with a TTL of 0, and the uses reach the database and eviction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from archive_server import ArchiveServer
from cartd import carts, status_cache
from cartd.db.store import CartBrief
from cartd.status_cache import HeadAnswer, StatusCache
from conftest import MakeService, Service, entry, sync_url
from test_cache import MiB, Mount, ready_cart, set_last_used, tmpfs  # noqa: F401 - a fixture

FOREVER = 3600.0  # a TTL no test outlives: whatever a test sees fresh, invalidation made so


def set_state(db_url: str, uid: str, state: str, message: str) -> None:
    """Change a cart behind the service's back, as another replica would."""
    engine = sa.create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE carts SET state = :s, message = :m WHERE active_uid = :u"),
                {"s": state, "m": message, "u": uid},
            )
    finally:
        engine.dispose()


def test_head_sees_a_new_cart_and_its_readiness_at_once(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(head_cache_ttl=FOREVER)
    data = b"staged after a while\n"
    archive.add_file("slow", data, tape_delay=0.3)
    assert service.state("slow") == (404, "error", "No cart with uid slow found")
    assert service.post("slow", [entry("slow", "s.bin", data)]).status_code == 201
    assert service.state("slow") == (204, "staging", "")  # the kept 404 went with the POST
    assert service.wait_settled("slow", timeout=30) == (204, "ready", "")


def test_head_sees_a_failure_at_once(make_service: MakeService, archive: ArchiveServer) -> None:
    service = make_service(head_cache_ttl=FOREVER)
    archive.add_file("bad", b"not what the hash says", tape_delay=0.3)
    wrong = entry("bad", "b.bin", b"something else")
    assert service.post("bad", [wrong]).status_code == 201
    assert service.state("bad")[1] == "staging"
    code, state, _message = service.wait_settled("bad", timeout=30)
    assert (code, state) == (500, "error")


def test_head_sees_a_delete_at_once(make_service: MakeService, archive: ArchiveServer) -> None:
    service = make_service(head_cache_ttl=FOREVER)
    ready_cart(service, archive, "gone", 1000)
    assert service.state("gone") == (204, "ready", "")
    assert service.client.delete("/gone").status_code == 200
    assert service.state("gone") == (404, "error", "No cart with uid gone found")


@pytest.mark.parametrize("ttl", [0.0, FOREVER])
def test_another_writers_change_shows_within_the_ttl_and_downloads_see_it_at_once(
    make_service: MakeService, archive: ArchiveServer, db_url: str, ttl: float
) -> None:
    service = make_service(head_cache_ttl=ttl)
    ready_cart(service, archive, "elsewhere", 1000)
    assert service.state("elsewhere") == (204, "ready", "")
    set_state(db_url, "elsewhere", "error", "failed on another replica")
    if ttl == 0:
        assert service.state("elsewhere") == (500, "error", "failed on another replica")
    else:
        assert service.state("elsewhere") == (204, "ready", "")  # the kept answer
    assert service.client.get("/elsewhere").status_code == 409  # never the stale "ready"


def test_head_use_reaches_the_database(
    make_service: MakeService, archive: ArchiveServer, db_url: str
) -> None:
    service = make_service()
    ready_cart(service, archive, "polled", 1000)
    set_last_used(db_url, "polled", 1000.0, service)
    assert service.client.head("/polled").status_code == 204
    service.wait_uses_written()
    assert service.status("polled")["last_used_at"] > time.time() - 60


def test_eviction_counts_a_head_use_however_recent(
    tmpfs: Mount,  # noqa: F811
    make_service: MakeService,
    archive: ArchiveServer,
    db_url: str,
) -> None:
    service = make_service(volume_path=tmpfs(8))
    for uid, when in (("polled", 1000.0), ("idle", 2000.0)):
        ready_cart(service, archive, uid, 2 * MiB)
        set_last_used(db_url, uid, when, service)
    assert service.client.head("/polled").status_code == 204  # now the most recently used
    ready_cart(service, archive, "needy", 5 * MiB)  # room for it costs one cart
    assert service.state("polled")[:2] == (204, "ready")
    assert service.state("idle")[0] == 404


# --- StatusCache on its own ----------------------------------------------------------------

BRIEF = CartBrief(id=7, state="ready", message="", updated_at=0.0, last_used_at=0.0)


def test_an_answer_read_before_an_invalidation_is_not_kept() -> None:
    cache = StatusCache(FOREVER)
    read_at = cache.generation
    cache.invalidate()  # the state changed while the answer was being read
    cache.put("", "c", HeadAnswer(BRIEF, 5), read_at)
    assert cache.get("", "c") is None
    cache.put("", "c", HeadAnswer(BRIEF, 5), cache.generation)
    assert cache.get("", "c") == HeadAnswer(BRIEF, 5)
    assert cache.get("someone else", "c") is None


def test_ttl_zero_keeps_nothing() -> None:
    cache = StatusCache(0)
    cache.put("", "c", HeadAnswer(BRIEF, 5), cache.generation)
    assert cache.get("", "c") is None


def test_uses_survive_a_failed_write() -> None:
    cache = StatusCache(0)
    cache.used(7)
    noted = cache.last_used(7, 0.0)
    assert noted > 0

    async def failing(_operation: Callable[[Any], Awaitable[Any]]) -> Any:
        raise sa.exc.OperationalError("UPDATE", {}, Exception("database away"))

    with pytest.raises(sa.exc.OperationalError):
        asyncio.run(cache.flush(failing))
    assert cache.unwritten == 1
    assert cache.last_used(7, 0.0) == noted
    assert cache.last_used(7, noted + 1) == noted + 1  # the database's newer use wins

    async def succeeding(_operation: Callable[[Any], Awaitable[Any]]) -> Any:
        return None

    assert asyncio.run(cache.flush(succeeding)) == 1
    assert cache.unwritten == 0


def _head(service: Service, uid: str) -> tuple[int, dict[str, str]]:
    response = service.client.head(f"/{uid}")
    varying = {"x-request-id", "date", "server"}
    return response.status_code, {k: v for k, v in response.headers.items() if k not in varying}


def test_a_kept_answer_is_the_routes_answer_logged_and_counted_alike(
    make_service: MakeService, archive: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second HEAD of each cart comes from the kept answer (api.fast_head)."""
    service = make_service(head_cache_ttl=FOREVER)
    ready_cart(service, archive, "here", 1000)
    archive.add_file("slow", b"on tape", tape_delay=FOREVER)
    assert service.post("slow", [entry("slow", "s.bin", b"on tape")]).status_code == 201
    firsts = {uid: _head(service, uid) for uid in ("here", "slow", "nowhere")}

    def route_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kept answer went through the route")

    monkeypatch.setattr(carts, "head_status", route_reached)  # the route would answer 500
    for uid, first in firsts.items():
        assert _head(service, uid) == first
    assert _head(service, "slow")[1]["retry-after"] == "5"
    metrics = service.client.get("/metrics").text
    counted = 'cartd_http_requests_total{method="HEAD",route="/{cart_id}",status="404"} 2.0'
    assert counted in metrics


def test_polls_that_miss_together_share_one_read_unless_the_state_changed() -> None:
    async def scenario() -> tuple[list[HeadAnswer], int]:
        cache = StatusCache(FOREVER)
        reads = 0
        release = asyncio.Event()

        async def read() -> HeadAnswer:
            nonlocal reads
            reads += 1
            number = reads
            await release.wait()
            return HeadAnswer(BRIEF, number)

        first = [asyncio.create_task(cache.load("", "c", read)) for _ in range(3)]
        await asyncio.sleep(0)
        cache.invalidate()  # a poll after this must not get the answer read before it
        later = asyncio.create_task(cache.load("", "c", read))
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*first, later), reads

    answers, reads = asyncio.run(scenario())
    assert reads == 2
    assert [a.retry_after for a in answers[:3]] == [1, 1, 1]
    assert answers[3].retry_after == 2


def test_a_failed_shared_read_fails_every_poll_that_waited_for_it() -> None:
    async def scenario() -> list[BaseException | HeadAnswer]:
        cache = StatusCache(FOREVER)

        async def read() -> HeadAnswer:
            await asyncio.sleep(0.01)
            raise sa.exc.OperationalError("SELECT", {}, Exception("database away"))

        polls = [cache.load("", "c", read) for _ in range(3)]
        return await asyncio.gather(*polls, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, sa.exc.OperationalError) for o in outcomes)


def test_kept_answers_expire_in_order_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each put drops the expired answers at the front; beyond the cap it starts afresh."""
    clock = [0.0]
    monkeypatch.setattr(status_cache, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(status_cache, "MAX_ANSWERS", 3)
    cache = StatusCache(1.0)
    answer = HeadAnswer(BRIEF, 0)
    for uid in ("a", "b"):
        cache.put("", uid, answer, cache.generation)
    clock[0] = 0.5
    cache.put("", "a", answer, cache.generation)  # kept again: now the newest
    clock[0] = 1.2
    cache.put("", "c", answer, cache.generation)  # "b" expired at 1.0 and goes
    assert len(cache._answers) == 2  # dropped, not merely hidden by `get`
    assert [cache.get("", uid) for uid in ("a", "b", "c")] == [answer, None, answer]
    cache.put("", "d", answer, cache.generation)
    cache.put("", "e", answer, cache.generation)  # a fourth live answer: over the cap
    assert [cache.get("", uid) for uid in ("a", "c", "d", "e")] == [None, None, None, answer]
