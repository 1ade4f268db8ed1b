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

import mmap
import os
import threading
import time
from typing import Any

import pytest

from diofs.cli.stats import read_stats
from harness.io import direct_pwrite, wait_for
from harness.mount import MountFactory, run_in_child

pytestmark = pytest.mark.deadline(60)

PAGE = 4096
FILE_SIZE = 1 << 20
READ_SIZE = 128 * 1024  # the kernel READ: pages [0, 32)
RA_OFF, RA_LEN = 128 * 1024, 128 * 1024  # daemon-only readahead: pages [32, 64)
FILL_DELAY = 1.0
OLD, NEW = b"o", b"N"


def race_fill_against_direct_write(mnt: str) -> dict[str, Any]:
    """The workload (run in a child): returns counts and the stats delta."""
    path = os.path.join(mnt, "race")
    # the old bytes go in with O_DIRECT: neither the daemon nor the kernel caches them
    with open(path, "wb"):
        pass
    assert direct_pwrite(path, OLD * FILE_SIZE, 0) == FILE_SIZE
    # opened before the race: an O_DIRECT open makes the kernel drop the file's cache, which
    # waits for the reader's READ in flight (ops.Operations._file_info)
    wfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    s0 = read_stats(mnt)

    got: dict[str, bytes] = {}

    def reader() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            # no kernel readahead: exactly one READ of [0, READ_SIZE) (without this the kernel
            # follows up with an async READ from READ_SIZE on, and holds those folios)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            got["read"] = os.pread(fd, READ_SIZE, 0)
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    # the fill has read the image and now sleeps FILL_DELAY before its insert
    wait_for(
        lambda: read_stats(mnt).get("cache.fill_delays", 0) > s0.get("cache.fill_delays", 0),
        "the fill of the buffered READ to reach its delay",
    )
    t0 = time.monotonic()
    assert direct_pwrite(wfd, NEW * RA_LEN, RA_OFF) == RA_LEN
    write_s = time.monotonic() - t0
    os.close(wfd)
    t.join()
    s1 = read_stats(mnt)
    # a fresh buffered read of the written range: the kernel has no copy, the daemon decides.
    # No kernel readahead: a READ beyond the range would fill (and sleep) after we return.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        seen = os.pread(fd, RA_LEN, RA_OFF)
    finally:
        os.close(fd)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, RA_LEN) as buf:
            os.preadv(dfd, [buf], RA_OFF)
            on_image = bytes(buf)
    finally:
        os.close(dfd)
    delta = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1 if isinstance(s1[k], (int, float))}
    return {
        "reader_ok": got.get("read") == OLD * READ_SIZE,
        "stale_pages": sum(1 for i in range(0, RA_LEN, PAGE) if seen[i : i + 1] != NEW),
        "image_new": on_image == NEW * RA_LEN,
        "write_s": write_s,
        "readahead_pages": delta.get("cache.readahead_pages", 0),
        "block_waits": delta.get("locks.block_waits", 0),
        "block_wait_ns": delta.get("locks.block_wait_ns", 0),
    }


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
