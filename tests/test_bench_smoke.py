"""The benchmark suite at toy sizes, so the harness of `make bench` cannot rot unnoticed.

No timing is asserted (timings belong in bench/results/); the test checks that every
benchmark ran against its reference and reported the numbers the README table quotes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite.py"


def test_smoke_suite_reports_every_benchmark(tmp_path: Path) -> None:
    argv = [sys.executable, str(SUITE), "--smoke", "--no-plots", "--out-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"cpu", "cores", "ram_gib", "kernel", "python", "date", "git_commit"} <= set(
        report["machine"]
    )
    results = report["results"]
    assert results["download"]["nginx_gbps"] > 0
    assert results["download"]["cartd_zip_gbps"] > 0
    runs = results["staging"]["runs"]
    assert {(r["archive"], r["database"]) for r in runs} == {
        ("test", "sqlite"),
        ("reference", "sqlite"),
    }
    assert all(r["reference_s"] > 0 and r["cartd_s"] > 0 for r in runs)
    assert results["bigfile"]["bare_get_s"] > 0
    poll = results["polling"]["runs"][0]
    for run in (poll["fixed_rate"], poll["ceiling"]):
        assert run["requests_per_s"] > 0
        assert run["non_2xx"] == 0
        assert "p99_ms" in run
    assert results["memory"]["peak_rss_post_mib"] > 0
