"""PNG plots of a suite report (matplotlib, from the `bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def draw(report: dict[str, Any], out: Path) -> None:
    results = report["results"]
    for name, painter in (
        ("download", _download),
        ("staging", _staging),
        ("memory", _memory),
        ("polling", _polling),
    ):
        if name in results:
            fig, _axes = painter(results[name])
            fig.suptitle(
                f"{report['machine']['cpu']}, {report['machine']['cores']} cores", fontsize=8
            )
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
            plt.close(fig)
    if "staging" in results and len(results["staging"]["linearity_s"]) > 1:
        fig, _ = _linearity(results["staging"]["linearity_s"])
        fig.savefig(out / "linearity.png", dpi=100)
        plt.close(fig)


def _download(result: dict[str, Any]) -> tuple[Any, Any]:
    keys = [k for k in result if k.endswith("_gbps")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(
        [k.removesuffix("_gbps") for k in keys],
        [result[k] for k in keys],
        color=["grey" if k.startswith("nginx") else "tab:blue" for k in keys],
    )
    ax.set_xlabel("GB/s over loopback (curl -o /dev/null)")
    ax.set_title(
        f"Download of {result['files']} files, {result['bytes'] / 2**30:.1f} GiB: "
        f"cartd/nginx = {result['ratio']}"
    )
    return fig, ax


def _staging(result: dict[str, Any]) -> tuple[Any, Any]:
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['archive']}/{r['database']}/{r['files']}" for r in runs]
    ax.barh(labels, [r["ratio"] for r in runs], color="tab:blue")
    ax.axvline(1.2, color="red", linestyle="--", label="target 1.2")
    ax.set_xlabel("cartd time / bare httpx loop time (lower is better)")
    ax.set_title("Staging small files, POST to ready")
    ax.legend()
    return fig, ax


def _linearity(seconds: dict[str, float]) -> tuple[Any, Any]:
    counts = [int(n) for n in seconds]
    times = list(seconds.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(counts, times, "o-", label="cartd (test archive, SQLite)")
    per_file = times[0] / counts[0]
    ax.loglog(counts, [n * per_file for n in counts], "--", color="grey", label="linear")
    ax.set_xlabel("files in the cart (4 KiB each)")
    ax.set_ylabel("seconds, POST to ready")
    ax.set_title("Staging time against cart size")
    ax.legend()
    fig.tight_layout()
    return fig, ax


def _memory(result: dict[str, Any]) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(7, 4))
    times, rss = zip(*result["timeline"], strict=True)
    ax.plot(times, rss)
    ax.axhline(150, color="red", linestyle="--", label="target 150 MiB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MiB")
    ax.set_title(
        f"{result['downloads']} concurrent downloads + {result['staging_files']} "
        f"files staging; POST of {result['posted_files']}: "
        f"{result['peak_rss_post_mib']} MiB"
    )
    ax.legend()
    return fig, ax


def _polling(result: dict[str, Any]) -> tuple[Any, Any]:
    results = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    names = [r["database"] for r in results]
    left.bar(names, [r["ceiling"]["requests_per_s"] for r in results])
    left.axhline(3000, color="red", linestyle="--")
    left.set_title("HEAD ceiling, req/s")
    right.bar(names, [r["fixed_rate"].get("p99_ms", 0) for r in results])
    right.axhline(20, color="red", linestyle="--")
    right.set_title(f"p99 ms at {results[0]['offered_rate']:g} req/s offered")
    return fig, (left, right)
