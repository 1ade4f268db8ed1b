"""--bug writeback-as-direct: the kernel's writeback of a MAP_SHARED mapping of an O_DIRECT fd
is taken for a direct write, and msync(MS_SYNC) fails with EINVAL (xfstests generic/263).

Workload: open a file O_RDWR|O_CREAT|O_DIRECT, ftruncate it to 0x7a0a8 bytes (not a multiple
of 512), map it MAP_SHARED, write bytes into the mapping, msync. The kernel writes the dirty
pages back through that handle with tid 0 and request flags 0; the last page's WRITE is 0xa8
bytes long. The protection routes every tid-0 WRITE through the buffered path (diofs/ops.py
`write`); with the bug the handle's open flags choose the direct path, whose alignment check
refuses the partial page.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

BUG = "writeback-as-direct"
TITLE = "msync of a mapping of an O_DIRECT fd fails with EINVAL"
BAD_KEY = "failed_msyncs"
RUNS = 4
SIZE = 0x7A0A8
LO = 0x69200


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    failed = right_bytes = 0
    m = factory(size="16M", bugs=(BUG,) if bug_on else ())
    for i in range(RUNS):
        path = m.path(f"f{i}")
        fill = bytes([0x41 + i]) * (SIZE - LO)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            with mmap.mmap(fd, SIZE) as mm:
                mm[LO:SIZE] = fill
                try:
                    mm.flush()  # msync(MS_SYNC)
                except OSError:
                    failed += 1
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            right_bytes += f.read() == bytes(LO) + fill
    m.unmount()
    return {"msyncs": RUNS, "failed_msyncs": failed, "right_bytes": right_bytes}
