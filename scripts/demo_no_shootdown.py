"""--bug no-shootdown: a direct write leaves the daemon's cached pages in place, so a later
buffered read (or a fault of an existing mmap) returns the old bytes (SPEC 3, seed 004)."""

from __future__ import annotations

import mmap
import os
from typing import Any

BUG = "no-shootdown"
TITLE = "stale cached bytes read after a direct write"
BAD_KEY = "stale_pages"
SIZE = 1 << 20
PAGE = 4096


def count_stale(data: bytes, new: int) -> int:
    return sum(1 for i in range(0, len(data), PAGE) if data[i] != new)


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(bugs=[BUG] if bug_on else [])
    path = m.path("f")
    with open(path, "wb") as f:  # old bytes, read once so the daemon caches them
        f.write(b"A" * SIZE)
    with open(path, "rb") as f:
        assert f.read() == b"A" * SIZE
    buf = mmap.mmap(-1, SIZE)  # page-aligned, as O_DIRECT wants
    buf.write(b"B" * SIZE)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, 0) == SIZE
    finally:
        os.close(fd)
    with open(path, "rb") as f:  # the kernel dropped its own copy: this READ reaches the daemon
        buffered = f.read()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ) as mm:
        mapped = mm[:]
    stats = m.stats()
    m.unmount()
    return {
        "pages_written_direct": SIZE // PAGE,
        "stale_pages": count_stale(buffered, ord("B")),
        "stale_pages_mmap": count_stale(mapped, ord("B")),
        "shootdown_pages": int(stats.get("dio.shootdown_pages", 0)),
    }
