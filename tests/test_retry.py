"""The bounded retry loop that every archive request goes through."""

from __future__ import annotations

import time

import pytest

from cartd.archive import ArchiveFileError, TransientArchiveError
from cartd.retry import Backoff, retry_transient


async def test_keeps_trying_for_the_whole_configured_time() -> None:
    """A long last backoff is cut to the deadline, never turned into giving up early."""
    attempts = 0

    async def always_down() -> None:
        nonlocal attempts
        attempts += 1
        raise TransientArchiveError("archive unreachable")

    started = time.monotonic()
    with pytest.raises(ArchiveFileError, match="archive unreachable") as raised:
        await retry_transient(always_down, Backoff(0.4, 0.4), give_up_after=1.0)
    assert time.monotonic() - started >= 1.0
    assert f"gave up after {attempts} attempts" in str(raised.value)
    assert attempts <= 1 + 1.0 / 0.2 + 1  # full jitter waits at least half the backoff


async def test_returns_as_soon_as_the_archive_answers() -> None:
    answers = iter([TransientArchiveError("503"), TransientArchiveError("503"), "ok"])

    async def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await retry_transient(flaky, Backoff(0.001, 0.002), give_up_after=5) == "ok"
