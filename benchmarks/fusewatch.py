"""Last-resort handling of hung FUSE mounts, for the benchmark harness.

Uses ``diofs.watchdog`` when it provides the same four functions; otherwise the minimal local
versions below. All of them are synchronous and bounded in time: none of them touches the
mountpoint itself (a stat of a hung mount blocks), which is why the connection id must be taken
with :func:`connection_id` right after the mount comes up, while it still answers.

Connection ids: the kernel names each FUSE connection in /sys/fs/fuse/connections by the minor
number of the mount's st_dev; writing anything to its ``abort`` file fails every outstanding and
future request of that connection with ENOTCONN, which unblocks processes stuck in D state.
"""

from __future__ import annotations

import os
import subprocess

FUSECTL = "/sys/fs/fuse/connections"


def _local_ensure_fusectl() -> bool:
    """Mount fusectl on /sys/fs/fuse/connections if it is not mounted. True if available."""
    with open("/proc/mounts") as f:
        if any(line.split()[2] == "fusectl" for line in f if len(line.split()) > 2):
            return True
    try:
        subprocess.run(
            ["mount", "-t", "fusectl", "none", FUSECTL],
            check=True, capture_output=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _local_connection_id(mountpoint: str) -> int:
    """The fusectl connection id of a live FUSE mount (minor of its st_dev)."""
    return os.minor(os.stat(mountpoint).st_dev)


def _local_abort_connection(conn_id: int) -> bool:
    """Abort FUSE connection ``conn_id``; True if the abort file was written."""
    try:
        with open(f"{FUSECTL}/{conn_id}/abort", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def _local_lazy_unmount(mountpoint: str) -> bool:
    """Detach ``mountpoint`` (fusermount3 -u -z, then umount -l). True if either succeeded."""
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            r = subprocess.run(argv, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return True
    return False


ensure_fusectl = _local_ensure_fusectl
connection_id = _local_connection_id
abort_connection = _local_abort_connection
lazy_unmount = _local_lazy_unmount

try:  # prefer the project's watchdog when it exists (written by another helper)
    from diofs import watchdog as _wd  # type: ignore[attr-defined]
except Exception:  # noqa: BLE001 - absent or broken: keep the local versions
    _wd = None
SOURCE = "benchmarks.fusewatch (local)"
