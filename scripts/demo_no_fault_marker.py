"""--bug no-fault-marker: in `-o shootdown=locked` mode (the kernel cache is invalidated while
the direct write holds BLOCK, as a kernel filesystem does under its invalidate lock), an mmap +
O_DIRECT self-write deadlocks without the per-task fault marker (SPEC 4, fuse-facts 2 and 3,
seeds 002 and 004).

Workload (tests/test_dio_mmap_self.py): a 28 MiB file not cached anywhere; pwritev of 4 MiB
from a MAP_SHARED mapping of its first 4 MiB to offset 8 MiB through an O_DIRECT fd, with
`-o dio_delay=0.2` so that the writer's fault READs of chunk N+1 arrive while chunk N holds
BLOCK. With the marker those READs take the faults-disabled path; without it they wait for
BLOCK while the holder waits for their folio locks. The watchdog then prints the stuck tasks'
kernel stacks and aborts the FUSE connection: nothing stays mounted or stuck.

With the protection on, one more run adds a second process faulting another range of the file:
it hangs even with the marker (fuse-facts row 3: the marker only knows the writer's own tid),
which is why the default mode never invalidates the kernel cache under the lock
(`locked_2nd_process_hung`; not run with the bug, where the first runs already hang).
"""

from __future__ import annotations

import time
from typing import Any

from demolib import leftovers, report_hang

from harness.workloads.mmap_self import (
    LOCKED,
    locked_self_write,
    locked_self_write_with_faulter,
    prepared_mount,
)

BUG = "no-fault-marker"
TITLE = "mmap + O_DIRECT self-write deadlocks under a locked shootdown"
BAD_KEY = "hung_runs"
RUNS = 2
HANG_TIMEOUT_S = 6.0  # a good run takes about 1 s


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    hung = completed = correct = marker_fills = aborted = 0
    left_mounted = d_state_left = 0
    second_hung = 0
    jobs = [locked_self_write] * RUNS + ([] if bug_on else [locked_self_write_with_faulter])
    for job in jobs:
        m = prepared_mount(factory, LOCKED, bugs=(BUG,) if bug_on else ())
        daemon_pid = m.daemon.pid if m.daemon else None
        m.expect_rescue()  # the runs that hang are rescued by the watchdog
        t0 = time.monotonic()
        result = m.run(job, str(m.mnt), timeout=HANG_TIMEOUT_S)
        label = BUG if bug_on else "protection on"
        if job is locked_self_write_with_faulter:
            label += ", 2nd faulting process"
        if result.timed_out:
            if job is locked_self_write_with_faulter:
                second_hung += 1
            else:
                hung += 1
                aborted += f"abort conn {m.conn_id}: done" in result.report
            report_hang(label, time.monotonic() - t0, result.report, daemon_pid)
        elif result.returncode == 0 and job is locked_self_write:
            completed += 1
            r = result.value
            correct += bool(r["in_mapping"] and r["on_image"] and r["rest_ok"])
            marker_fills += int(m.stats().get("locks.faults_disabled_fills", 0))
            m.unmount()
        mounted, stuck = leftovers(m, result, daemon_pid)
        left_mounted += mounted
        d_state_left += stuck
    out: dict[str, Any] = {
        "runs": RUNS,
        "completed": completed,
        "correct_data": correct,
        "faults_disabled_fills": marker_fills,
        "hung_runs": hung,
        "connections_aborted": aborted,
        "left_mounted": left_mounted,
        "d_state_left": d_state_left,
    }
    if not bug_on:
        out["locked_2nd_process_hung"] = second_hung
    return out
