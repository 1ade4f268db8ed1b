"""--bug inval-before-reply: an answer that waits for a reverse kernel invalidation hangs the
mount (fuse-facts row 10; the "Kernel waits" in diofs/locks/__init__.py).

Workload (xfstests generic/029, with xfs_io): write 5120 bytes, map them, dirty the mapping,
truncate to 2048 and back to 5120, dirty the mapping again; the file must read 2048 x 0x58 then
3072 x 0x59. The kernel holds FUSE's NOWRITE state while it waits for the SETATTR answer, so
writeback WRITEs are queued, not sent. With the bug the daemon answers SETATTR only after a
reverse invalidation of the range, which waits in fuse_launder_folio for one of those WRITEs:
nobody moves. The protection answers at once and lets the kernel truncate its own cache after
the answer (diofs/kernel_cache.py). The watchdog prints the stuck tasks' kernel stacks and
aborts the FUSE connection; nothing stays mounted or stuck.
"""

from __future__ import annotations

import time
from typing import Any

from demolib import leftovers, report_hang


BUG = "inval-before-reply"
TITLE = "truncate of a file with mmap-dirtied pages hangs when SETATTR waits for invalidation"
BAD_KEY = "hung_runs"
RUNS = 2
HANG_TIMEOUT_S = 10.0  # xfs_io takes milliseconds; with the bug the first truncate hangs
COMMANDS = ["truncate 5120", "pwrite -S 0x58 0 5120", "mmap -rw 0 5120",
            "mwrite -S 0x5a 2048 3072", "truncate 2048", "truncate 5120",
            "mwrite -S 0x59 2048 3072", "close"]
WANT = b"\x58" * 2048 + b"\x59" * 3072


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    hung = completed = right_bytes = aborted = left_mounted = d_state_left = 0
    for i in range(RUNS):
        m = factory(size="16M", bugs=(BUG,) if bug_on else ())
        daemon_pid = m.daemon.pid if m.daemon else None
        m.expect_rescue()  # the runs that hang are rescued by the watchdog
        path = m.path(f"f{i}")
        argv = ["xfs_io", "-f", *(a for c in COMMANDS for a in ("-c", c)), path]
        t0 = time.monotonic()
        result = m.run(argv, timeout=HANG_TIMEOUT_S)
        if result.timed_out:
            hung += 1
            aborted += f"abort conn {m.conn_id}: done" in result.report
            report_hang(BUG if bug_on else "protection on", time.monotonic() - t0,
                        result.report, daemon_pid, frames=5)
        elif result.returncode == 0:
            completed += 1
            with open(path, "rb") as f:
                right_bytes += f.read() == WANT
            m.unmount()
        mounted, stuck = leftovers(m, result, daemon_pid)
        left_mounted += mounted
        d_state_left += stuck
    return {
        "runs": RUNS,
        "completed": completed,
        "right_bytes": right_bytes,
        "hung_runs": hung,
        "connections_aborted": aborted,
        "left_mounted": left_mounted,
        "d_state_left": d_state_left,
    }
