"""An O_DIRECT read into a MAP_SHARED mapping of the same file racing a direct write
(tests/test_fsx.py, scripts/demo_reply_in_loop.py: --bug reply-in-loop hangs the mount)."""

from __future__ import annotations

import mmap
import os
import threading
import time

from harness.mount import Mount


def read_into_mapping_vs_direct_write(path: str, seconds: float) -> list[int]:
    """Thread A: O_DIRECT read of file page 2 into a MAP_SHARED mapping of page 0 of the same
    file; thread B: O_DIRECT write of 512 bytes at offset 0 (page 0). Returns op counts; an
    error in a thread stops it and is raised after both ended (no thread traceback on stderr
    when a watchdog abort fails the calls)."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    mfd = os.open(path, os.O_RDWR)
    m = mmap.mmap(mfd, 3 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    stop = time.monotonic() + seconds
    n = [0, 0]
    errors: list[OSError] = []

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                v = memoryview(m)[0:4096]
                os.preadv(fd, [v], 8192)
                v.release()
                n[0] += 1
        except OSError as exc:
            errors.append(exc)

    def writer() -> None:
        buf = mmap.mmap(-1, 4096)
        try:
            while time.monotonic() < stop:
                os.pwritev(fd, [memoryview(buf)[:512]], 0)
                n[1] += 1
        except OSError as exc:
            errors.append(exc)

    ts = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return n


def prepare_read_into_mapping(m: Mount) -> str:
    """The workload's file: 3 pages written buffered and fsynced (nothing dirty anywhere)."""
    path = m.path("f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, os.urandom(3 * 4096), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
