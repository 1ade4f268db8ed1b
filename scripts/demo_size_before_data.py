"""--bug size-before-data: a direct write into a hole or past EOF publishes the extent as
written and grows i_size before its data is on the image, so readers and power cuts expose
the old contents of the blocks, here a deleted file's "secret" (SPEC 5, seed 003).

The workload: fill all free space of a fresh image with SECRET_UNIT, delete that file and
commit, remount with the crash backend, a short commit interval and `-o data_delay` (the
window between allocation and data, made deterministic); then
  (1) live: 4 O_DIRECT writers fill the holes of a sparse file and 6 threads append to a new
      file (out of order), while O_DIRECT, buffered and mmap readers read both files;
  (2) power cut: concurrent appends / hole fills / preallocated appends on the crash
      backend; the image is rebuilt at every point of the crash log and each file of each
      cut image is read off-line.
It prints the secret bytes each side exposed (0 with the protection).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diofs.backend import crash  # noqa: E402
from harness.mount import run_in_child  # noqa: E402
from harness.workloads.holes import hole_fill_race, threaded_append_race  # noqa: E402
from harness.workloads.holes_power_cut import (  # noqa: E402
    check_cuts,
    crash_secret_mount,
    extending_writes,
    pick_cuts,
)

BUG = "size-before-data"
TITLE = "a deleted file's bytes exposed by writes into holes / past EOF (live and after a cut)"
BAD_KEY = "secret_bytes_exposed"


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m, log = crash_secret_mount(factory, factory.tmp_path, bug_on, size="32M")
    with open(m.image, "rb") as f:
        free_secret = f.read().count(b"SECRET-BYTES-42\n") * 16
    holes = run_in_child(hole_fill_race, str(m.mnt), ["direct", "buffered", "mmap"], 4,
                         timeout=90, mounts=[m])
    appends = run_in_child(threaded_append_race, str(m.mnt), 6, 32, timeout=90, mounts=[m])
    live = holes["secret"] + appends["secret"]
    start = crash.load_log(log).n_points - 1  # the power-cut part starts here
    run_in_child(extending_writes, str(m.mnt), 10, timeout=90, mounts=[m])
    cl = crash.load_log(log)
    m.unmount()
    cuts = [c for c in pick_cuts(cl, 200, seed=5) if c >= start]
    r = check_cuts(factory.tmp_path, cl, cuts, seed=5)
    return {
        "secret_bytes_on_free_blocks": free_secret,
        "live_reads": holes["direct_reads"] + holes["buffered_reads"] + holes["mmap_reads"]
        + appends["direct_reads"] + appends["buffered_reads"],
        "secret_bytes_read_live": live,
        "power_cuts_checked": r["cuts"],
        "cuts_exposing_secret": r["cuts_exposing"],
        "secret_bytes_after_cuts": r["secret_bytes"],
        "fsck_problems_in_cuts": len(r["problems"]),
        "secret_bytes_exposed": live + r["secret_bytes"],
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demolib import compare

    sys.exit(0 if compare(sys.modules[__name__]) else 1)
