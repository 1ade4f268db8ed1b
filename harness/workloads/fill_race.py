"""A buffered fill racing a direct write of the pages it reads ahead (SPEC 4, seed 004;
tests/test_dio_locks.py, scripts/demo_no_pagecache_lock.py).

`-o fill_delay=S` widens the window between the fill's image read and its insert; the
workload waits for the daemon's cache.fill_delays counter, then writes the readahead range
with O_DIRECT. With the pagecache lock the write waits for the fill (0 stale pages); with
--bug no-pagecache-lock it overtakes it and the fill re-inserts the old bytes."""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any

from diofs.cli.stats import read_stats
from harness.io import direct_pwrite, wait_for

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
