"""Archive outage at full scale: the archive vanishes for a minute, with production clocks.

The CI version is tests/test_outage.py (seconds, fast clocks).  Here the service runs with
the default retry settings (0.5 s doubling to 30 s); the archive goes away right after
the carts are posted and returns after --outage seconds; then a second round keeps it
away past --limit (CARTD_ARCHIVE_UNREACHABLE_TIMEOUT) and checks that the carts fail
saying the archive was unreachable.

    .venv/bin/python bench/outage.py [--outage 60] [--limit 90] [--mode dropped|stopped]
                                     [--database mariadb] [--out F]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import emit

from conftest import standalone_service
from outage import MODES, Clocks, give_up, survive

PRODUCTION = Clocks(retry_initial=0.5, retry_max=30.0, fetch_concurrency=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--limit", type=float, default=90.0)
    parser.add_argument("--mode", choices=MODES, default="dropped")
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = {
        "retry_initial": PRODUCTION.retry_initial,
        "retry_max": PRODUCTION.retry_max,
        "fetch_concurrency": PRODUCTION.fetch_concurrency,
        "archive_unreachable_timeout": args.limit,
    }
    with tempfile.TemporaryDirectory(prefix="cartd-outage-") as tmp:
        root = Path(tmp)
        with standalone_service(args.database, root, **settings) as (service, archive):
            report = survive(service.client, archive, PRODUCTION, args.mode, args.outage)
            assert report.requests_during_outage <= report.request_bound, report
            started = time.monotonic()
            failed = give_up(service.client, archive, args.mode, args.limit, PRODUCTION.retry_max)
            gave_up_after = time.monotonic() - started
    messages = sorted({message for _code, _status, message in failed.values()})
    assert all("archive unreachable" in m for m in messages), messages
    emit(
        {
            **vars(report),
            "database": args.database,
            "limit": args.limit,
            "gave_up_after": round(gave_up_after, 1),
            "failure_message": messages[0],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
