"""--bug no-align-check: O_DIRECT requests whose offset or length is not a multiple of the
logical block size (512 here) are accepted and land at their exact byte ranges, splitting
sectors, where a Linux block filesystem answers EINVAL and changes nothing (SPEC 3). The
kernel does not check alignment for FUSE (fuse-facts row 5): only the daemon can.

Workload: a 64 KiB file of 'o' bytes; eight misaligned O_DIRECT writes of 'N' bytes from an
aligned buffer and one misaligned O_DIRECT read; then the file is compared with its old bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any

BUG = "no-align-check"
TITLE = "misaligned O_DIRECT requests accepted (sectors split) instead of EINVAL"
BAD_KEY = "misaligned_accepted"
SIZE = 64 * 1024
SECTOR = 512
# (offset, length): each breaks the 512-byte rule in offset, length or both
WRITES = [
    (1, 4096),
    (100, 1000),
    (4095, 2),
    (8192, 511),
    (12800, 100),
    (16384 + 7, 512),
    (20480, 4097),
    (32768 - 3, 6),
]


def _ranges(old: bytes, new: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(new):
        if new[i] != old[i]:
            j = i
            while j < len(new) and new[j] != old[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(bugs=[BUG] if bug_on else [])
    path = m.path("f")
    old = b"o" * SIZE
    with open(path, "wb") as f:
        f.write(old)
    accepted = einval = 0
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        with mmap.mmap(-1, 2 * 4096 + 4096) as buf:
            buf.write(b"N" * len(buf))
            for off, length in WRITES:
                try:
                    os.pwritev(fd, [memoryview(buf)[:length]], off)
                    accepted += 1
                except OSError as exc:
                    assert exc.errno == errno.EINVAL, exc
                    einval += 1
            try:
                os.preadv(fd, [memoryview(buf)[:1000]], 3)
                read_accepted = 1
            except OSError as exc:
                assert exc.errno == errno.EINVAL, exc
                read_accepted = 0
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        new = f.read()
    changed = _ranges(old, new)
    split = {i // SECTOR for a, b in changed for i in (a, b) if i % SECTOR}
    stats = m.stats()
    m.unmount()
    return {
        "misaligned_writes": len(WRITES),
        "misaligned_accepted": accepted,
        "einval": einval,
        "misaligned_read_accepted": read_accepted,
        "bytes_changed": sum(b - a for a, b in changed),
        "changed_ranges": len(changed),
        "first_changed": f"[{changed[0][0]}, {changed[0][1]})" if changed else "-",
        "sectors_split": len(split),
        "dio.misaligned": int(stats.get("dio.misaligned", 0)),
    }
