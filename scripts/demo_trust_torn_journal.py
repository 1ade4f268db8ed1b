"""--bug trust-torn-journal: the mount replays a journal transaction whose header checks out
without checking the checksum of its records (diofs/format/image.py, replay). A power cut in
the middle of an append leaves the header sector and not the records: with the check the
mount shows the commit before it; without it, the torn records are replayed and the mount
fails on the garbage (a damaged image where the previous commit was intact).

Workload: file f on a fresh image, remount (a checkpoint); 12 files with long names and an
fsync (one ~3 KiB journal transaction); kill the daemon; zero the transaction after its first
512-byte sector; mount again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diofs.format.journal import HEADER_BYTES  # noqa: E402
from harness.crafting import one_transaction_then_kill, tear_first_append  # noqa: E402
from harness.mount import MountError  # noqa: E402

BUG = "trust-torn-journal"
TITLE = "a torn journal append is replayed: the mount fails where the last commit was intact"
BAD_KEY = "torn_mount_refused"


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    bugs = [BUG] if bug_on else []
    img = one_transaction_then_kill(factory, bugs)
    # the tear keeps the first 512-byte sector: the header and the payload's first bytes
    torn = tear_first_append(img) - (512 - HEADER_BYTES)
    out: dict[str, Any] = {"payload_bytes_torn": torn,
                           "torn_mount_refused": 0, "files_after_mount": 0}
    m = factory(image=img, bugs=bugs, mount=False)
    m.expect_dirty()
    try:
        m.start()
    except MountError:
        out["torn_mount_refused"] = 1
        return out
    out["files_after_mount"] = len(os.listdir(m.mnt))
    m.unmount()
    return out
