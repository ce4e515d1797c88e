"""Crash-recovery soak: SIGKILL `cartd serve` many times at random points, then audit.

The CI version is tests/test_crashloop.py (10 kills); this runs as many as you like.

    .venv/bin/python bench/crashloop.py --kills 50 [--seed N] [--database mariadb] [--out F]

Prints the seed first, then one JSON line: kills per point, carts, files, deletions, the
debris fsck saw straight after the kills (all swept by recovery) and the wall time.
Any broken promise stops the run with an AssertionError that names it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import emit

from archive_server import ArchiveServer
from conftest import database
from crashloop import CrashLoop, new_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seed = new_seed() if args.seed is None else args.seed
    print(f"crash loop seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cartd-crashloop-") as tmp:
        root = Path(tmp)
        with database(args.database, root) as url, ArchiveServer(root / "archive") as archive:
            report = CrashLoop(root, url, archive, seed).run(args.kills)
    emit(
        {
            "seed": seed,
            "database": args.database,
            "kills": dict(report.kills),
            "carts": report.carts,
            "files": report.files,
            "deleted": report.deleted,
            "debris_after_kills": dict(report.debris_after_kills),
            "seconds": round(report.seconds, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
