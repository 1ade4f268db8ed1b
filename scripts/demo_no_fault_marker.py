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
"""

from __future__ import annotations

import re
import time
from typing import Any

from diofs import watchdog
from tests.test_dio_mmap_self import LOCKED, locked_self_write, prepared_mount

BUG = "no-fault-marker"
TITLE = "mmap + O_DIRECT self-write deadlocks under a locked shootdown"
BAD_KEY = "hung_runs"
RUNS = 2
HANG_TIMEOUT_S = 6.0  # a good run takes about 1 s


def _stuck_lines(report: str, frames: int = 4) -> list[str]:
    """The D-state threads of the report, each with its top kernel stack frames."""
    out: list[str] = []
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if "state=D" in line:
            out.append(line.strip())
            stack = [s.strip() for s in lines[i + 1 : i + 1 + frames] if s.startswith("      [")]
            out.extend("    " + re.sub(r"^\[<0>\] ", "", s) for s in stack)
    return out


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    hung = completed = correct = marker_fills = aborted = 0
    left_mounted = d_state_left = 0
    for _ in range(RUNS):
        m = prepared_mount(factory, LOCKED, bugs=(BUG,) if bug_on else ())
        daemon_pid = m.daemon.pid if m.daemon else None
        m.expect_rescue()  # for the bug side; the good side never needs it
        t0 = time.monotonic()
        result = m.run(locked_self_write, str(m.mnt), timeout=HANG_TIMEOUT_S)
        if result.timed_out:
            hung += 1
            aborted += f"abort conn {m.conn_id}: done" in result.report
            print(f"   [{BUG}] run hung for {time.monotonic() - t0:.1f}s; watchdog: stuck tasks")
            for line in _stuck_lines(result.report):
                print(f"      {line}")
            end = time.monotonic() + 15
            while daemon_pid and watchdog.process_alive(daemon_pid) and time.monotonic() < end:
                time.sleep(0.1)
        elif result.returncode == 0:
            completed += 1
            r = result.value
            correct += bool(r["in_mapping"] and r["on_image"] and r["rest_ok"])
            marker_fills += int(m.stats().get("locks.faults_disabled_fills", 0))
            m.unmount()
        left_mounted += watchdog.is_mounted(m.mnt)
        d_state_left += sum(
            1 for t in watchdog.stuck_tasks() if t.pid in (result.pid, daemon_pid)
        )
    return {
        "runs": RUNS,
        "completed": completed,
        "correct_data": correct,
        "faults_disabled_fills": marker_fills,
        "hung_runs": hung,
        "connections_aborted": aborted,
        "left_mounted": left_mounted,
        "d_state_left": d_state_left,
    }
