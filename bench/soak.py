"""Fault-injection soak: 50 carts of 1-200 files against an archive that fails ~20% of requests.

The CI version is tests/test_soak.py (12 carts of 1-40 files); this is the full run.

    .venv/bin/python bench/soak.py [--carts 50] [--max-files 200] [--seed N]
                                   [--database mariadb] [--out F]

Prints the seed first, then one JSON line with the carts, files, faults injected by kind,
ready and error counts and the wall time.  A broken promise stops it with an
AssertionError that names the cart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import emit

from conftest import standalone_service
from crashloop import new_seed
from soak import Soak, SoakConfig, assert_volume_clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carts", type=int, default=50)
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--wrong-files", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seed = new_seed() if args.seed is None else args.seed
    print(f"soak seed {seed}", flush=True)
    config = SoakConfig(seed, args.carts, args.max_files, args.fault_rate, args.wrong_files)
    with (
        tempfile.TemporaryDirectory(prefix="cartd-soak-") as tmp,
        standalone_service(args.database, Path(tmp)) as (service, archive),
    ):
        report = Soak(service.client, archive, config).run()
        assert_volume_clean(service.volume, service.client)
    emit(
        {
            "seed": seed,
            "database": args.database,
            "carts": report.carts,
            "files": report.files,
            "tape_files": report.tape_files,
            "ready": report.ready,
            "error": report.errored,
            "archive_requests": report.archive_requests,
            "faults_injected": report.faults_injected,
            "faults": dict(report.faults),
            "seconds": round(report.seconds, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
