"""Last-resort handling of hung FUSE mounts, for the benchmark harness.

Public API (all synchronous): ``ensure_fusectl() -> bool``, ``connection_id(mnt) -> int``,
``abort_connection(conn_id) -> bool``, ``lazy_unmount(mnt) -> bool`` and
``rescue(mnt, conn_id, daemon_pid, client_pids, reason) -> str`` (report text). They wrap
``diofs.watchdog`` when it is importable (its rescue adds kernel stacks of the daemon and the
clients and a SIGUSR1 to the daemon for its Python stacks); otherwise the minimal local
versions below are used. All of them are synchronous and bounded in time: none of them touches the
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
            check=True,
            capture_output=True,
            timeout=10,
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


def _local_rescue(
    mnt: str, conn_id: int | None, daemon_pid: int | None, client_pids: list[int], reason: str
) -> str:
    aborted = abort_connection(conn_id) if conn_id is not None else False
    lazy_unmount(mnt)
    return f"=== watchdog: {reason} ===\nmount {mnt}: conn {conn_id} aborted={aborted}"


ensure_fusectl = _local_ensure_fusectl
connection_id = _local_connection_id
abort_connection = _local_abort_connection
lazy_unmount = _local_lazy_unmount
rescue = _local_rescue
SOURCE = "benchmarks.fusewatch (local)"

try:  # prefer the project's watchdog (diofs/watchdog.py) when it is importable
    from diofs import watchdog as _wd
except Exception:  # absent or broken: keep the local versions
    _wd = None  # type: ignore[assignment]

if _wd is not None:

    def _wd_ensure_fusectl() -> bool:
        try:
            _wd.ensure_fusectl()
        except OSError:
            return False
        return True

    def _wd_lazy_unmount(mountpoint: str) -> bool:
        _wd.lazy_unmount(mountpoint)
        return not _wd.is_mounted(mountpoint, "")

    def _wd_rescue(
        mnt: str, conn_id: int | None, daemon_pid: int | None, client_pids: list[int], reason: str
    ) -> str:
        """Stack report, SIGUSR1 to the daemon, abort, lazy unmount (diofs.watchdog.rescue)."""
        ref = _wd.MountRef(mnt=mnt, conn_id=conn_id, daemon_pid=daemon_pid)
        return _wd.rescue([ref], client_pids, reason=reason)

    ensure_fusectl = _wd_ensure_fusectl
    connection_id = _wd.connection_id
    abort_connection = _wd.abort_connection
    lazy_unmount = _wd_lazy_unmount
    rescue = _wd_rescue
    SOURCE = "diofs.watchdog"
