"""What the kernel says about mounts: /proc/self/mountinfo and the fusectl counters, read-only.

Used by the daemon (hang_detector, daemon_status, image_lock), by umount.diofs, and by the test
harness (harness/watchdog.py), which adds the actions (abort, lazy unmount, stacks) on top.

Invariant: nothing here stat()s or opens a mountpoint, so every call is safe on a hung FUSE
mount (a stat of one blocks): the mount, its type and source, and its fusectl connection id
all come from /proc/self/mountinfo.
"""

from __future__ import annotations

import dataclasses
import os

FUSECTL = "/sys/fs/fuse/connections"


@dataclasses.dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    super_options: str = ""  # e.g. "rw,user_id=0,group_id=0,default_permissions" for FUSE

    @property
    def conn_id(self) -> int:
        """The fusectl connection id: the superblock's dev_t, `(major << 20) | minor`."""
        return (self.major << 20) | self.minor


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    """All mounts visible to this process (reads /proc/self/mountinfo; never blocks on FUSE)."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            result.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    major=major,
                    minor=minor,
                    mountpoint=_unescape(fields[4]),
                    fstype=rfields[0] if rfields else "",
                    source=_unescape(rfields[1]) if len(rfields) > 1 else "",
                    super_options=rfields[2] if len(rfields) > 2 else "",
                )
            )
    return result


def find_mount(mnt: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount on `mnt` (absolute path, no symlink resolution), or None."""
    path = os.path.abspath(os.fspath(mnt))
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m  # later lines are mounted on top of earlier ones
    return found


def is_mounted(mnt: str | os.PathLike[str], fstype_prefix: str = "fuse") -> bool:
    """True if a filesystem whose type starts with `fstype_prefix` is mounted on `mnt`."""
    m = find_mount(mnt)
    return m is not None and m.fstype.startswith(fstype_prefix)


def connection_waiting(conn_id: int) -> int | None:
    """Requests of the connection waiting for an answer (fusectl `waiting`), or None."""
    try:
        with open(f"{FUSECTL}/{conn_id}/waiting") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
