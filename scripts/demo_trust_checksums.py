"""--bug trust-checksums: the mount uses the newest commit whose checksums match without
checking what it says (diofs/format/verify.py). A crafted image, its checksums valid, whose
file extent points at block 0: with the checks the mount refuses it with one line and writes
nothing; without them, reading the file returns the superblock and writing it destroys the
image (the next mount: not a diofs image).

Workload: files a and b of 8 KiB on a fresh image; unmount; rewrite the commit with a's extent
on block 0 (harness/crafting.py); mount; read a; write a; unmount; mount again.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diofs.format.layout import MAGIC  # noqa: E402
from harness.crafting import move_extent, rewrite_commit  # noqa: E402
from harness.mount import MountError  # noqa: E402

BUG = "trust-checksums"
TITLE = "a crafted image (valid checksums, an extent on the superblock) is mounted and used"
BAD_KEY = "superblock_bytes_read"
SIZE = 8192


def _mounts(m: Any) -> bool:
    try:
        m.start()
    except MountError:
        return False
    return True


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(bugs=[BUG] if bug_on else [])
    for name in ("a", "b"):
        with open(m.path(name), "wb") as f:
            f.write(b"d" * SIZE)
    m.unmount()
    m.expect_dirty()
    rewrite_commit(m.image, lambda md, sb: move_extent(md, b"a", 0))
    before = hashlib.sha256(m.image.read_bytes()).hexdigest()
    out: dict[str, Any] = {"crafted_mount_refused": 0, "superblock_bytes_read": 0,
                           "image_destroyed": 0}
    if not _mounts(m):
        out["crafted_mount_refused"] = 1
        out["image_unchanged"] = int(hashlib.sha256(m.image.read_bytes()).hexdigest() == before)
        return out
    with open(m.path("a"), "rb") as f:
        head = f.read(SIZE)
    out["superblock_bytes_read"] = SIZE if head.startswith(MAGIC) else 0
    with open(m.path("a"), "r+b") as f:
        f.write(b"X" * SIZE)
    m.unmount()
    out["image_destroyed"] = int(not _mounts(m))
    if m.daemon is not None:
        m.unmount()
    return out
