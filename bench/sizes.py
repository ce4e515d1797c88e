"""How big each benchmark is: the full suite's sizes, and the seconds-long smoke version."""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    big_count: int = 16  # download: files of `big_size` in the cart
    big_size: int = 128 * MiB
    concurrent: int = 8  # simultaneous downloads
    repeat: int = 3  # download runs; the best counts
    small_size: int = 4096
    staging: tuple[int, ...] = (1000, 10_000)  # small-file carts, against the bare loop
    staging_repeat: int = 3  # runs a side, alternating; the medians make the ratio
    archives: tuple[str, ...] = ("test", "reference")
    databases: tuple[str, ...] = ("sqlite", "mariadb")
    linearity: tuple[int, ...] = (1000, 10_000)  # add 100000 with --linearity (slow)
    huge_size: int = 2 * GiB  # the one large file
    huge_repeat: int = 3  # runs of each step, alternating; the medians make the ratio
    poll_files: int = 10_000  # the cart staging while HEAD is polled
    poll_connections: int = 200
    poll_seconds: float = 10
    poll_rate: float = 500
    poll_idle: bool = True  # also measure the ceiling with nothing staging, for scale
    mem_downloads: int = 8  # concurrent downloads of a cart of `mem_files` big files
    mem_files: int = 8
    mem_stage_files: int = 10_000
    post_files: int = 100_000

    @property
    def small_count(self) -> int:
        return max(*self.staging, *self.linearity, self.poll_files, self.mem_stage_files)


FULL = Sizes()
SMOKE = replace(
    FULL,
    big_count=2,
    big_size=1 * MiB,
    concurrent=2,
    repeat=1,
    staging=(20,),
    staging_repeat=1,
    databases=("sqlite",),  # MariaDB differs only in the URL; the smoke test covers the harness
    linearity=(20,),
    huge_size=8 * MiB,
    huge_repeat=1,
    poll_files=200,
    poll_connections=20,
    poll_seconds=1,
    poll_rate=50,
    poll_idle=False,
    mem_downloads=2,
    mem_files=2,
    mem_stage_files=50,
    post_files=1000,
)
