"""The pagecache-add lock closes the stale re-insert race (SPEC 4, seed 004).

The race: a buffered fill reads old bytes from the image, a direct write of the same pages
shoots the cache down, writes and shoots down again, and only then does the fill insert what it
read. Without the lock the old bytes stay cached and every later buffered read returns them.

Making it reproducible on a real mount needs two things:
  - a window: `-o fill_delay=S` makes every fill sleep between its image read and its insert;
  - pages the kernel did not ask for. A direct write through the mount first invalidates the
    kernel's folios of its range, which waits for the folio locks that a pending READ holds:
    it cannot overtake a fill of pages the kernel READ asked for. The daemon's own readahead
    goes beyond the READ (diofs/cache/readahead.py: a first sequential read of n pages fills
    max(min_pages, 2n) pages), and those pages carry no kernel lock.
Measured here (Linux 6.18, default ra of 128 KiB): a fresh `pread(fd, 128 KiB, 0)` sends a
READ of 128 KiB at 0 and, once that is answered, an async readahead READ of 128 KiB at
128 KiB (whose folio locks would order the direct write after it); with POSIX_FADV_RANDOM on
the fd it sends exactly
one READ of 128 KiB (32 pages, `cache.bytes_served` 131072). The daemon's handle readahead
then fills pages [0, 64) in one run, 32 of them readahead (`cache.readahead_pages` 32).
The direct write of [128 KiB, 256 KiB) issued during the fill's delay either waits for the
fill (lock: `locks.block_waits` += 1, about FILL_DELAY, 0 stale pages) or overtakes it (--bug
no-pagecache-lock: all 32 pages stale).
"""

from __future__ import annotations

import pytest

from harness.io import direct_pwrite
from harness.mount import MountFactory, run_in_child
from harness.workloads.fill_race import (
    FILE_SIZE,
    FILL_DELAY,
    NEW,
    OLD,
    PAGE,
    RA_LEN,
    RA_OFF,
    race_fill_against_direct_write,
)

pytestmark = pytest.mark.deadline(60)


@pytest.mark.parametrize("bug_on", [False, True], ids=["default", "no-pagecache-lock"])
def test_fill_cannot_reinsert_after_direct_write(mount_factory: MountFactory, bug_on: bool) -> None:
    m = mount_factory(opts={"fill_delay": FILL_DELAY}, bugs=["no-pagecache-lock"] if bug_on else [])
    r = run_in_child(race_fill_against_direct_write, str(m.mnt), timeout=30, mounts=[m])
    # the race was set up as designed: the fill covered the written pages as readahead only
    assert r["reader_ok"] and r["image_new"], r
    assert r["readahead_pages"] >= RA_LEN // PAGE, r
    if bug_on:
        assert r["stale_pages"] == RA_LEN // PAGE, r
        assert r["block_waits"] == 0, r
        assert r["write_s"] < FILL_DELAY / 2, r  # it overtook the fill
    else:
        assert r["stale_pages"] == 0, r
        assert r["block_waits"] == 1, r  # the direct write waited for the fill's ADD
        assert r["block_wait_ns"] > 0, r


def test_fill_after_direct_write_sees_new_bytes(mount_factory: MountFactory) -> None:
    """Control: without the race (the fill starts after the write), no stale page either way,
    and the lock is not contended."""
    m = mount_factory(bugs=["no-pagecache-lock"])
    path = m.path("f")
    with open(path, "wb"):
        pass
    assert direct_pwrite(path, OLD * FILE_SIZE, 0) == FILE_SIZE
    assert direct_pwrite(path, NEW * RA_LEN, RA_OFF) == RA_LEN
    with open(path, "rb") as f:
        data = f.read()
    assert data == OLD * RA_OFF + NEW * RA_LEN + OLD * (FILE_SIZE - RA_OFF - RA_LEN)
