"""The randomized buffered exerciser (tests/fsx.py) on real mounts: no mismatch with the model.

Each case runs thousands of random operations (buffered, cold, mmap and O_DIRECT reads and
writes, truncates up and down, punch / zero range, fsync, reopen, remounts) on two files and
checks every read and st_size against an in-memory model. Cases vary the cache: default,
a 1 MiB cache with a 0.2 s writeback age (eviction and background writeback all the time), and
a 2 MiB cache with 4 KiB direct-I/O alignment. `test_fsx_catches_no_shootdown` checks the
checker: with `--bug no-shootdown` the daemon keeps stale cached pages after a direct write,
and the exerciser must report a mismatch.

`--stress` adds long runs (tens of thousands of operations per seed).
"""

from __future__ import annotations

import pytest

from tests.fsx import Fsx, run_with_remounts
from tests.mounting import MountFactory

CASES = [
    pytest.param(1, {}, 512, id="default"),
    pytest.param(2, {"cache_size": "1M", "writeback_age": 0.2}, 512, id="tiny-cache-fast-wb"),
    pytest.param(3, {"cache_size": "2M"}, 4096, id="small-cache-dio4k"),
    pytest.param(4, {"writeback_age": 0.5}, 512, id="wb-half-second"),
]


def _run(mount_factory: MountFactory, seed: int, opts: dict, align: int, ops: int,
         segment: tuple[int, int] = (200, 500), timeout: float = 40.0, **kw: object) -> dict[str, object]:
    m = mount_factory(size="64M", opts=opts)
    fsx = Fsx(m.mnt, seed=seed, dio_align=align, **kw)  # type: ignore[arg-type]
    summary = run_with_remounts(m, fsx, ops, segment=segment, timeout=timeout)
    print(summary)
    return summary


@pytest.mark.deadline(60)
@pytest.mark.parametrize(("seed", "opts", "align"), CASES)
def test_fsx_no_mismatch(mount_factory: MountFactory, seed: int, opts: dict,
                         align: int) -> None:
    summary = _run(mount_factory, seed, opts, align, 1500)
    assert summary["ops"] == 1500
    counts = summary["counts"]
    assert isinstance(counts, dict)
    assert counts.get("remount", 0) >= 1 and counts.get("mapwrite", 0) > 0


@pytest.mark.deadline(60)
def test_fsx_catches_no_shootdown(mount_factory: MountFactory) -> None:
    m = mount_factory(size="64M", bugs=["no-shootdown"])
    with pytest.raises(AssertionError, match="first differing offset"):
        run_with_remounts(m, Fsx(m.mnt, seed=1), 2000)


@pytest.mark.stress
@pytest.mark.deadline(1800)
@pytest.mark.parametrize(("seed", "opts", "align"), CASES)
@pytest.mark.parametrize("round_", range(3))
def test_fsx_stress(mount_factory: MountFactory, seed: int, opts: dict, align: int,
                    round_: int) -> None:
    _run(mount_factory, 100 * (round_ + 1) + seed, opts, align, 20000,
         segment=(1000, 4000), timeout=600, max_size=4 << 20, nfiles=3)
