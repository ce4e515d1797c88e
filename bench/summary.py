"""A markdown table of a suite report: each target, the measured ratio or value, met or not.

.venv/bin/python bench/summary.py [bench/results/report.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str]


def _download(r: dict[str, Any]) -> list[Row]:
    many = next(k for k in r if k.startswith("ratio_x"))
    return [
        (
            "Download, tar",
            f"{r['cartd_tar_gbps']} vs nginx {r['nginx_gbps']} GB/s",
            f"{r['ratio']}x",
            "≥ 0.7x",
        ),
        ("Download, zip", f"{r['cartd_zip_gbps']} GB/s", f"{r['ratio_zip']}x", "≥ 0.7x"),
        (
            f"Download, {many.removeprefix('ratio_x')} at once",
            f"{r[f'cartd_tar_x{many[7:]}_gbps']} vs nginx {r[f'nginx_x{many[7:]}_gbps']} GB/s",
            f"{r[many]}x",
            "≥ 0.7x",
        ),
    ]


def _staging(r: dict[str, Any]) -> list[Row]:
    rows = [
        (
            f"Staging {x['files']} x 4 KiB, {x['archive']} archive, {x['database']}",
            f"{x['cartd_s']} s vs bare loop {x['reference_s']} s",
            f"{x['ratio']}x",
            "≤ 1.2x",
        )
        for x in r["runs"]
    ]
    linear = r["linearity_s"]
    if len(linear) > 1:
        points = ", ".join(f"{n}: {s} s" for n, s in linear.items())
        rows.append(("Linearity (test archive, SQLite)", points, "", "linear"))
    return rows


def _bigfile(r: dict[str, Any]) -> list[Row]:
    rows = [
        (
            "One 2 GiB file, sha1",
            f"{r['cartd_s']} s vs bare GET {r['bare_get_s']} s",
            f"{r['ratio']}x",
            "≥ 0.9x",
        )
    ]
    if "bare_get_fsync_s" in r:  # reports from before these fields lack them
        rows.append(
            (
                "One 2 GiB file, vs bare GET + fsync",
                f"{r['cartd_s']} s vs {r['bare_get_fsync_s']} s",
                f"{r['ratio_vs_durable']}x",
                "",
            )
        )
        rows.append(
            (
                "One 2 GiB file, CPU seconds",
                f"cartd {r['cartd_cpu_s']} s vs bare GET {r['bare_get_cpu_s']} s",
                "",
                "",
            )
        )
    return rows


def _polling(r: dict[str, Any]) -> list[Row]:
    rows = []
    for x in r["runs"]:
        if x.get("idle_ceiling"):
            idle = x["idle_ceiling"]["requests_per_s"]
            rows.append(
                (f"HEAD ceiling, nothing staging, {x['database']}", f"{idle} req/s", "", "")
            )
        rows.append(
            (
                f"HEAD ceiling, {x['database']}",
                f"{x['ceiling']['requests_per_s']} req/s",
                "",
                "≥ 3000 req/s",
            )
        )
        fixed = x["fixed_rate"]
        rows.append(
            (
                f"HEAD p99 at {x['offered_rate']:g} req/s offered, {x['database']}",
                f"{fixed.get('p99_ms')} ms ({fixed['requests_per_s']} req/s served)",
                "",
                "≤ 20 ms",
            )
        )
    return rows


def _memory(r: dict[str, Any]) -> list[Row]:
    return [
        (
            "Peak RSS, 8 downloads + staging",
            f"{r['peak_rss_busy_mib']} MiB (idle-ish start {r['start_rss_mib']} MiB)",
            "",
            "≤ 150 MiB",
        ),
        (
            f"Peak RSS, POST of {r['posted_files']} files",
            f"{r['peak_rss_post_mib']} MiB",
            "",
            "≤ 150 MiB",
        ),
    ]


def main() -> None:
    path = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "report.json"
    )
    report = json.loads(path.read_text())
    print("| Benchmark | Measured | Ratio | Target |\n|---|---|---|---|")
    for name, rows in (
        ("download", _download),
        ("staging", _staging),
        ("bigfile", _bigfile),
        ("polling", _polling),
        ("memory", _memory),
    ):
        if name in report["results"]:
            for row in rows(report["results"][name]):
                print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
