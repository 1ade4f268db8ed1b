"""--bug inval-always: after every direct write of a file the kernel may cache, the daemon's
invalidator drops the written range from the kernel's page cache, also when no older page can
be cached there; an O_DIRECT read into a MAP_SHARED mapping of the same file then loses its
bytes (seed 002; docs/concurrency.md race 19).

Workload (tests/test_dio_kernel_cache.py::test_direct_read_into_own_mapping_keeps_its_bytes):
a 3-page file read once buffered (the kernel caches it); then, 1500 times, a 512-byte direct
write at offset 0 and an O_DIRECT read of page 2 into a MAP_SHARED mapping of page 0. The read
faults page 0 in and pins it; a drop of page 0 at that moment takes the pinned page out of the
page cache, the read's bytes land in the orphaned page and the mapping shows the old ones.
The protection queues only pages a buffered answer may have filled with bytes older than the
write (kernel_cache.py "Which pages"): here none.
"""

from __future__ import annotations

import os
from typing import Any

from harness.io import read_file
from harness.workloads.kernel_cache import PAGE, direct_reads_into_own_mapping

BUG = "inval-always"
TITLE = "O_DIRECT reads into a mapping of the same file lose their bytes"
BAD_KEY = "reads_lost"
ROUNDS = 1500


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(size="16M", bugs=[BUG] if bug_on else [])
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * PAGE))
    read_file(path)  # the kernel caches the file: its direct writes are watched
    lost = m.run(direct_reads_into_own_mapping, path, ROUNDS, timeout=50).value
    st = m.stats()
    m.unmount()
    return {
        "direct_reads_into_mapping": ROUNDS,
        "kernel_invalidations_posted": int(st.get("kernel.invalidations_posted", 0)),
        "reads_lost": lost,
    }
