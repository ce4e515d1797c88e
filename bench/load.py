"""Concurrency and load: HEAD pollers, downloads and staging carts at once, on one database.

The CI version is tests/test_load.py; this one takes the sizes as options and can leave
the service running under py-spy.

    .venv/bin/python bench/load.py [--database mariadb] [--pollers 200] [--downloaders 20]
                                   [--staging 20] [--files 15] [--poll-interval 0.5] [--out F]

Prints one JSON line: requests by status code, downloads, HEAD latency p50/p99/max, and the
wall time of the storm.  A 5xx, a lost update or a changed download stops it with an
AssertionError; "database is locked" or an unhandled error in the service log too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import emit

from archive_server import ArchiveServer
from cartd_proc import Cartd, cartd_env
from conftest import database
from load import Load, LoadConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--downloaders", type=int, default=20)
    parser.add_argument("--staging", type=int, default=20)
    parser.add_argument("--files", type=int, default=15)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=5150)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = LoadConfig(
        seed=args.seed,
        pollers=args.pollers,
        downloaders=args.downloaders,
        staging=args.staging,
        files_per_cart=args.files,
        poll_interval=args.poll_interval,
        deadline=900,
    )
    with tempfile.TemporaryDirectory(prefix="cartd-load-") as tmp:
        root = Path(tmp)
        with database(args.database, root) as url, ArchiveServer(root / "archive") as archive:
            env = cartd_env(url, root / "volume", archive.url)
            service = Cartd(env, root / "cartd.log").wait_up()
            print(f"cartd pid {service.proc.pid}", flush=True)
            try:
                report = asyncio.run(Load(service.url, archive, config).run())
            finally:
                service.terminate()
                service.proc.wait(timeout=60)
            log = service.log_text()
    assert "database is locked" not in log
    assert "unhandled error" not in log, log[-3000:]
    assert not any(code >= 500 for code in report.codes), report.codes
    emit({"database": args.database, **vars(config), **report.summary()}, args.out)


if __name__ == "__main__":
    main()
