"""The image lock: one flock(2) on the image file says who may use it.

Holders:
  - the mount daemon: LOCK_EX from before it reads the image until after its final commit is
    durable and its status is published (diofs.daemon_status); the lock ends with the
    daemon's last file operation, so "the lock is free" means "the image is final";
  - fsck.diofs: LOCK_SH for a check (several checks may run side by side), LOCK_EX for
    --repair; `fsck.diofs --force` checks a locked image without the lock (read-only only);
  - mkfs.diofs: LOCK_EX while it writes.

A flock belongs to the open file description: forked children share it (mount.diofs takes it
before daemonizing, and the daemon keeps it), and it is released when the last descriptor
closes, at the latest when the process exits, even by SIGKILL. The descriptor is not inherited
by exec'd programs (Python's O_CLOEXEC default), so a helper the daemon ran cannot keep it.

An NBD image (a URI, diofs.backend.nbd) has no file here to lock: the lock is taken on a lock
file named after the URI, `LOCK_DIR/nbd-<sha256 of the URI>.lock`. It keeps two mounts (or a
mount and an fsck) of the same URI on this machine apart; it cannot see a client on another
machine, nor the same export reached through a different URI (host name vs address). The
server must enforce single-writer access itself if several machines can reach the export
(docs/nbd.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from diofs import mountinfo
from diofs.backend import image_name, is_uri
from diofs.errors import EXIT_IN_USE, DiofsError

LOCK_DIR = "/run/lock/diofs" if os.path.isdir("/run/lock") else "/tmp/diofs-locks"


def lock_path(image: str) -> str:
    """The file whose flock stands for `image`: the image itself, or for an NBD URI its lock
    file (created, with LOCK_DIR, if missing)."""
    if not is_uri(image):
        return image
    os.makedirs(LOCK_DIR, mode=0o755, exist_ok=True)
    path = os.path.join(LOCK_DIR, f"nbd-{hashlib.sha256(image.encode()).hexdigest()[:32]}.lock")
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))
    return path


class ImageInUse(DiofsError):
    """The image is locked by a running daemon, fsck or mkfs (exit code EXIT_IN_USE)."""

    def __init__(self, image: str) -> None:
        where = mounted_on(image)
        holder = f"mounted on {where}" if where else "locked by a diofs daemon, fsck or mkfs"
        super().__init__(f"image {image} is in use ({holder})", EXIT_IN_USE)


def mounted_on(image: str) -> str | None:
    """The mountpoint whose mount source (fsname) is `image`, from /proc/self/mountinfo, or
    None (not mounted here, or mounted with a path that could not be the fsname)."""
    path = image_name(image)
    for m in mountinfo.mounts():
        if m.fstype == "fuse.diofs" and m.source == path:
            return m.mountpoint
    return None


def lock_fd(fd: int, image: str, *, exclusive: bool) -> None:
    """Take the lock on an open descriptor of `image`, or raise ImageInUse at once."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImageInUse(image) from None


def lock_image(image: str, *, exclusive: bool = True) -> int:
    """Open `image` and lock it; returns the descriptor that holds the lock (close it to
    release). Raises ImageInUse if another process holds a conflicting lock."""
    fd = os.open(lock_path(image), os.O_RDONLY)
    try:
        lock_fd(fd, image, exclusive=exclusive)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_locked(image: str) -> bool:
    """True if some process holds the image's lock exclusively (a daemon, a repair, mkfs)."""
    fd = os.open(lock_path(image), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False
