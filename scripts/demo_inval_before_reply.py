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

from typing import Any

from demolib import hang_runs

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
    paths: list[str] = []

    def start(m: Any, i: int) -> tuple[list[str], tuple[()]]:
        paths.append(m.path(f"f{i}"))
        return ["xfs_io", "-f", *(a for c in COMMANDS for a in ("-c", c)), paths[-1]], ()

    def done(m: Any, result: Any) -> dict[str, int]:
        with open(paths[-1], "rb") as f:
            return {"right_bytes": int(f.read() == WANT)}

    return hang_runs(factory, BUG, bug_on, RUNS, HANG_TIMEOUT_S, start, done)
