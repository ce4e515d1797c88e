"""Summarise py-spy's collapsed stacks (BENCH_PROFILE=DIR): where a cartd spent its samples.

.venv/bin/python bench/profile_summary.py DIR/cartd-PID.txt [--top 30]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in args.stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"== {title} ({total} samples)")
        for frame, count in counter.most_common(args.top):
            print(f"{100 * count / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()
