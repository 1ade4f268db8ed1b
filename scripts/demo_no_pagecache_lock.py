"""--bug no-pagecache-lock: a buffered fill that read old bytes inserts them after a direct
write's shootdown, so the old bytes stay cached and every later buffered read returns them
(SPEC 4, seed 004).

Workload (tests/test_dio_locks.py, `race_fill_against_direct_write`): a file of old bytes, not
cached; one buffered READ of its first 128 KiB (the daemon fills 256 KiB: 32 pages readahead)
with `-o fill_delay=1.0` holding the fill between its image read and its insert; during that
delay an O_DIRECT write of new bytes over the 32 readahead pages; then a buffered read of them.
"""

from __future__ import annotations

from typing import Any

from harness.mount import run_in_child
from harness.workloads.fill_race import FILL_DELAY, PAGE, RA_LEN, race_fill_against_direct_write

BUG = "no-pagecache-lock"
TITLE = "a racing buffered fill re-inserts old bytes after a direct write's shootdown"
BAD_KEY = "stale_pages"


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(opts={"fill_delay": FILL_DELAY}, bugs=[BUG] if bug_on else [])
    r = run_in_child(race_fill_against_direct_write, str(m.mnt), timeout=30, mounts=[m])
    m.unmount()
    return {
        "pages_written_direct": RA_LEN // PAGE,
        "readahead_pages_filled": int(r["readahead_pages"]),
        "stale_pages": int(r["stale_pages"]),
        "image_has_new_bytes": "yes" if r["image_new"] else "no",
        "direct_write_waits": int(r["block_waits"]),
        "direct_write_ms": round(r["write_s"] * 1000),
    }
