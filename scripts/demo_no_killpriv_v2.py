"""--bug no-killpriv-v2: the INIT reply libfuse 3.14 sends by itself, without
FUSE_HANDLE_KILLPRIV_V2. The mount answers xattr requests, so the kernel, which must know
whether a write has to drop security.capability (file_remove_privs), asks GETXATTR before
every WRITE: one extra request per write (fuse-facts-more rows 10 and 28). With the flag the
mount has SB_NOSEC and diofs kills suid/sgid itself where the requests ask.

Workload: a 32 KiB file with one user xattr; 1000 buffered 4 KiB pwrites; GETXATTR and WRITE
requests counted by the daemon (`diofs stats`).
"""

from __future__ import annotations

import os
from typing import Any

BUG = "no-killpriv-v2"
TITLE = "one GETXATTR(security.capability) before every WRITE"
BAD_KEY = "getxattr_requests"
WRITES = 1000


def run(factory: Any, bug_on: bool) -> dict[str, Any]:
    m = factory(bugs=[BUG] if bug_on else [])
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(bytes(8 * 4096))
    os.setxattr(path, "user.demo", b"1")
    before = m.stats()
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(WRITES):
            os.pwrite(fd, b"w" * 4096, (i % 8) * 4096)
    finally:
        os.close(fd)
    after = m.stats()
    m.unmount()
    return {
        "writes": WRITES,
        "write_requests": int(after["ops.write"] - before["ops.write"]),
        "getxattr_requests": int(after.get("ops.getxattr", 0) - before.get("ops.getxattr", 0)),
        "killpriv_v2": int(after["fuse.killpriv_v2"]),
    }
