"""Archive outages: shorter than the limit, carts wait with bounded backoff and complete;
longer, they fail saying the archive was unreachable (bench/outage.py: a one-minute outage)."""

from __future__ import annotations

import pytest

from archive_server import ArchiveServer
from conftest import MakeService
from outage import MODES, Clocks, give_up, survive

CLOCKS = Clocks(retry_initial=0.02, retry_max=0.4, fetch_concurrency=8)


@pytest.mark.parametrize("mode", MODES)
def test_an_outage_shorter_than_the_limit_is_waited_out(
    make_service: MakeService, archive: ArchiveServer, mode: str
) -> None:
    service = make_service(
        archive_unreachable_timeout=30.0,
        retry_initial=CLOCKS.retry_initial,
        retry_max=CLOCKS.retry_max,
        fetch_concurrency=CLOCKS.fetch_concurrency,
    )
    report = survive(service.client, archive, CLOCKS, mode, outage=3.0)
    print(report)
    if mode == "dropped":  # a stopped archive logs nothing: refused connections never arrive
        assert 0 < report.requests_during_outage <= report.request_bound, report
    assert report.recovered_after < 2 * CLOCKS.retry_max + 5, report


@pytest.mark.parametrize("mode", MODES)
def test_an_outage_past_the_limit_fails_the_carts_saying_why(
    make_service: MakeService, archive: ArchiveServer, mode: str
) -> None:
    service = make_service(archive_unreachable_timeout=1.5, retry_max=0.3)
    for uid, (code, status, message) in give_up(service.client, archive, mode, 1.5, 0.3).items():
        assert (code, status) == (500, "error"), uid
        assert message.startswith("Failed to pull file("), message
        assert "archive unreachable" in message, message
        assert "gave up after" in message, message
