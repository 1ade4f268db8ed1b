"""--bug open-drop-at-answer: an O_DIRECT read into a MAP_SHARED mapping of a file, while
another thread opens the same file with O_DIRECT, hangs the mount when the open's answer
already counts the kernel's cache of the file as dropped (seed 002; issue 12, found as a
two-hour hang).

Workload (tests/test_dio_kernel_cache.py::test_direct_open_while_reading_into_mapping): a
3-page file; thread A writes page 2 through an O_DIRECT fd and reads it back with O_DIRECT into
a MAP_SHARED mapping of page 0; thread B opens and closes the file with O_DIRECT in a loop.
An O_DIRECT open is answered without keep_cache, so after our answer the kernel drops the
whole file (fuse_open -> invalidate_inode_pages2), laundering the mapped page that A's last
read dirtied: it holds that page's folio lock while it waits for the launder WRITE.
The protection keeps the inode marked "the kernel may cache it" until a request with the new
fh shows the open returned, so A's direct READs are answered from a worker thread and the loop
reads the WRITE. With the bug the mark goes at the answer, A's next READ is answered from the
loop, whose write(2) of the reply sleeps on that folio lock: the watchdog prints the stuck
tasks' kernel stacks and aborts the FUSE connection, and nothing stays mounted or stuck.
"""

from __future__ import annotations

import os
from typing import Any

from demolib import hang_runs

from harness.workloads.kernel_cache import PAGE, direct_reads_into_mapping_vs_direct_opens

BUG = "open-drop-at-answer"
TITLE = "O_DIRECT open vs an O_DIRECT read into a mapping of the same file hangs the mount"
BAD_KEY = "hung_runs"
RUNS = 2
ROUNDS = 1000  # direct reads into the mapping per run (about 1.5 s with the protection on)
HANG_TIMEOUT_S = 10.0  # with the bug it hangs before the first round completes


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    def start(m: Any, i: int) -> tuple[Any, tuple[Any, ...]]:
        path = m.path("f")
        with open(path, "wb") as f:
            f.write(os.urandom(3 * PAGE))
        return direct_reads_into_mapping_vs_direct_opens, (path, ROUNDS)

    def done(m: Any, result: Any) -> dict[str, int]:
        reads, opens = result.value
        return {"direct_reads_into_mapping": reads, "direct_opens": opens,
                "thread_replies": int(m.stats().get("dio.thread_replies", 0))}

    return hang_runs(factory, BUG, bug_on, RUNS, HANG_TIMEOUT_S, start, done)
