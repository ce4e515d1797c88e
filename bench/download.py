"""Benchmark 1: downloading a ready, page-cached cart, against nginx serving the same tar.

nginx (one worker, sendfile) serves the very tar cartd produced, saved to a file, so both
sides send the same bytes; curl -o /dev/null receives over loopback.  Each rate is the best
of `repeat` runs, taken back to back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from harness import FileIds, best_rate, cartd, fresh_database, nginx, stage
from sizes import Sizes

TARGET = 0.7


def run(work: Path, archive_url: str, big: FileIds, sizes: Sizes) -> dict[str, Any]:
    with fresh_database("sqlite", work) as db, cartd(db, work, archive_url) as service:
        stage(service, "download", big)
        www = work / "www"
        www.mkdir(exist_ok=True)
        tar_url = f"{service.url}/download?filename=cart.tar"
        zip_url = f"{service.url}/download?format=zip&filename=cart.zip"
        subprocess.run(["curl", "-sSf", "-o", str(www / "cart.tar"), tar_url], check=True)
        with nginx(www) as nginx_url:
            plain = nginx_url + "cart.tar"
            many = sizes.concurrent
            rates = {
                "nginx_gbps": best_rate([plain], sizes.repeat),
                "cartd_tar_gbps": best_rate([tar_url], sizes.repeat),
                "cartd_zip_gbps": best_rate([zip_url], sizes.repeat),
                f"nginx_x{many}_gbps": best_rate([plain] * many, 1),
                f"cartd_tar_x{many}_gbps": best_rate([tar_url] * many, 1),
            }
        (www / "cart.tar").unlink()
    ratio = rates["cartd_tar_gbps"] / rates["nginx_gbps"]
    return {
        "files": len(big),
        "bytes": sizes.big_size * len(big),
        **rates,
        "ratio": round(ratio, 3),
        "ratio_zip": round(rates["cartd_zip_gbps"] / rates["nginx_gbps"], 3),
        f"ratio_x{many}": round(rates[f"cartd_tar_x{many}_gbps"] / rates[f"nginx_x{many}_gbps"], 3),
        "target": f">= {TARGET} x nginx",
        "met": ratio >= TARGET,
    }
