"""--bug reply-in-loop: an O_DIRECT read into a MAP_SHARED mapping of the same file, racing an
O_DIRECT write of the mapped page, deadlocks the daemon when direct READ replies go out from
its main loop (seed 002; the deadlock the concurrent exerciser found, tests/test_fsx.py).

Workload (tests/test_fsx.py::test_dio_read_into_mapping_deadlock): a 3-page file; thread A
preadv()s file page 2 through an O_DIRECT fd into a MAP_SHARED mapping of page 0, thread B
pwritev()s 512 bytes at offset 0 through the O_DIRECT fd, both in a loop. With FUSE async DIO
the kernel dirties the destination page inside the daemon's write(2) of the READ reply
(fuse_aio_complete_req -> folio_mark_dirty_lock, which sleeps on that page's folio lock); an
invalidation of the page (B's direct write, or the daemon's own after B's previous write) holds
that lock in fuse_launder_folio while it waits for the WRITE it sent.
The protection sends direct READ replies from a worker thread while the kernel may cache
pages of the mount (`dio.thread_replies`), so the main loop answers that WRITE. With the bug
the only thread sleeps in the reply: the watchdog prints the stuck tasks' kernel stacks and
aborts the FUSE connection, and nothing stays mounted or stuck.
"""

from __future__ import annotations

from typing import Any

from demolib import hang_runs

from harness.workloads.mapping import prepare_read_into_mapping, read_into_mapping_vs_direct_write

BUG = "reply-in-loop"
TITLE = "O_DIRECT read into a mapping of the same file vs a direct write deadlocks the daemon"
BAD_KEY = "hung_runs"
RUNS = 2
WORKLOAD_S = 1.5  # each run's length with the protection on
HANG_TIMEOUT_S = 5.0  # with the bug it hangs in under 1 s


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    def start(m: Any, i: int) -> tuple[Any, tuple[Any, ...]]:
        return read_into_mapping_vs_direct_write, (prepare_read_into_mapping(m), WORKLOAD_S)

    def done(m: Any, result: Any) -> dict[str, int]:
        reads, writes = result.value
        return {"direct_reads_into_mapping": reads, "direct_writes": writes,
                "thread_replies": int(m.stats().get("dio.thread_replies", 0))}

    return hang_runs(factory, BUG, bug_on, RUNS, HANG_TIMEOUT_S, start, done)
