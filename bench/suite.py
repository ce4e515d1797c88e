"""The benchmark suite: every benchmark of issue 7, one JSON report, PNG plots.

    make bench                                   # the full suite (about 15-25 min on 2 cores)
    .venv/bin/python bench/suite.py [--only download,staging,bigfile,polling,memory]
        [--linearity 1000,10000,100000] [--staging-sizes 1000,10000]
        [--databases sqlite,mariadb] [--archives test,reference] [--set big_count=4 ...]
        [--out-dir bench/results]
    .venv/bin/python bench/suite.py --smoke --out-dir DIR --no-plots   # seconds (CI)

Every benchmark is a ratio against a reference measured in the same run, back to back.
To compare two versions of cartd in one session, run it with BENCH_CARTD_SRC=OTHER/src
(e.g. from `git archive REV src alembic | tar -x -C OTHER`), then without.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bigfile
import download
import memory
import polling
import staging
from harness import FileIds, archive, load_average, machine, write_files
from sizes import FULL, SMOKE, Sizes

BENCHMARKS = ("download", "staging", "bigfile", "polling", "memory")


@dataclasses.dataclass
class Files:
    root: Path
    big: FileIds
    huge: FileIds
    small: FileIds


def make_files(root: Path, sizes: Sizes, only: set[str]) -> Files:
    needs_big = bool(only & {"download", "memory"})
    big_count = max(sizes.big_count, sizes.mem_files) if needs_big else 0
    return Files(
        root,
        write_files(root, "b", big_count, sizes.big_size),
        write_files(root, "h", 1 if "bigfile" in only else 0, sizes.huge_size),
        write_files(
            root,
            "s",
            sizes.small_count if only & {"staging", "polling", "memory"} else 0,
            sizes.small_size,
        ),
    )


def run_staging(work: Path, files: Files, sizes: Sizes) -> dict[str, Any]:
    rows = []
    for kind in sizes.archives:
        for db_kind in sizes.databases:
            rows += staging.matrix(
                work, files.root, files.small, kind, db_kind, sizes.staging, sizes.staging_repeat
            )
    measured = {
        r["files"]: r["cartd_s"]
        for r in rows
        if (r["archive"], r["database"]) == ("test", "sqlite")
    }
    missing = tuple(n for n in sizes.linearity if n not in measured)
    linear = staging.linearity(work, files.root, files.small, missing) if missing else {}
    linear.update({str(n): measured[n] for n in sizes.linearity if n in measured})
    return {"runs": rows, "linearity_s": dict(sorted(linear.items(), key=lambda kv: int(kv[0])))}


def run_all(work: Path, files: Files, sizes: Sizes, only: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    steps: dict[str, Callable[[str], Any]] = {
        "download": lambda url: download.run(work, url, files.big[: sizes.big_count], sizes),
        "bigfile": lambda url: bigfile.run(work, url, files.huge, sizes.huge_repeat),
        "polling": lambda url: {
            "runs": [polling.run(work, url, files.small, db, sizes) for db in sizes.databases]
        },
        "memory": lambda url: memory.run(work, url, files.big, files.small, sizes),
    }
    with archive("test", files.root) as url:  # one archive process for all but staging
        for name in (n for n in BENCHMARKS if n in only):
            print(f"== {name} (load {load_average()})", flush=True)
            started = time.monotonic()
            if name == "staging":
                results[name] = run_staging(work, files, sizes)
            else:
                results[name] = steps[name](url)
            results[name]["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(results[name])[:2000], flush=True)
    return results


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else FULL
    numbers = {"staging": args.staging_sizes, "linearity": args.linearity}
    for key, value in numbers.items():
        if value:
            sizes = dataclasses.replace(sizes, **{key: tuple(int(n) for n in value.split(","))})
    for key in ("databases", "archives"):
        if getattr(args, key):
            sizes = dataclasses.replace(sizes, **{key: tuple(getattr(args, key).split(","))})
    for setting in args.set:
        key, _, value = setting.partition("=")
        kind = type(getattr(sizes, key))
        parsed = value.lower() in ("1", "true") if kind is bool else kind(float(value))
        sizes = dataclasses.replace(sizes, **{key: parsed})
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--staging-sizes")
    parser.add_argument("--linearity", help="cart sizes for the linearity plot")
    parser.add_argument("--databases")
    parser.add_argument("--archives")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=N", help="any field of sizes.Sizes"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    sizes, only = sizes_from(args), set(args.only.split(","))
    report: dict[str, Any] = {"machine": machine(), "load_before": load_average()}
    report["sizes"] = dataclasses.asdict(sizes)
    with tempfile.TemporaryDirectory(prefix="cartd-bench-") as tmp:
        work = Path(tmp)
        files = make_files(work / "archive", sizes, only)
        report["results"] = run_all(work, files, sizes, only)
    report["load_after"] = load_average()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_plots:
        import plots

        plots.draw(report, args.out_dir)
    print(f"report: {args.out_dir / 'report.json'}")


if __name__ == "__main__":
    main()
