"""A freshly made ext4 file system per repetition of the tree jobs, for the host-backed peers.

Why: ext4's inode allocator skips inodes freed in the last minutes and reads their inode-table
blocks to find out (``recently_deleted`` in ``__ext4_new_inode``). After a mass delete (the
tree jobs' own rm -rf, or an earlier run's) every file creation on that ext4 pays for the scan:
33% of a plain ``cp -a /usr/include`` onto the host's ext4. The C peer, the Python peer and the
local disk create their files on the host's ext4, diofs inside its preallocated image file, so
later repetitions slowed the host-backed peers only and the medians were unfair. With
``--tree-host-fs fresh`` (the default) each repetition of the tree jobs of such a peer runs on
an ext4 made just before it: an image file in the peer's directory of the work dir (the same
host disk as diofs's image), attached to a loop device with direct I/O (one page cache, like
ext4 on the disk itself), mounted on the peer's host directory (``Peer.host_dir``).

Lifecycle (one owner: :class:`FreshExt4`, driven by benchmarks/runner.py): ``make`` =
preallocate the image, mkfs.ext4, ``losetup --find --show --direct-io=on``, mount, then
``losetup -d`` at once (the kernel only marks a busy loop device for autoclear, so the device
goes away with the unmount, whatever happens to this process in between); ``remove`` =
unmount (lazily if busy), detach the loop device if still there, delete the image. ``remove``
is idempotent and never raises; every step of ``make`` that fails undoes the earlier ones.

mkfs: the system's mke2fs.conf ext4 features (what the host's ext4 was made with), but the
usage type of a large file system (``-T default``: 4 KiB blocks, 256-byte inodes, one inode per
16 KiB; below 512 MiB mke2fs would pick "small": 1 KiB blocks), inode tables and journal zeroed
by mkfs (``lazy_itable_init=0,lazy_journal_init=0``: no ext4lazyinit thread writing during the
runs), and a journal of a quarter of the file system (at most 1 GiB) instead of mke2fs's 16 MiB
for this size, so commits are not forced by a small journal. Mount options: those of the host's
ext4 that change the cost of the jobs (:func:`mount_options`, e.g. ``discard``, ``relatime``).

Pure parts (unit-tested): :func:`image_size`, :func:`journal_mib`, :func:`mkfs_argv`,
:func:`mount_options`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
CHOICES = ("fresh", "host")  # --tree-host-fs
IMAGE_NAME = "fresh-ext4.img"

# host ext4 mount options that matter for the cost of creating and deleting files
_KEEP_OPTS = {
    "discard",
    "nodiscard",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "barrier",
    "nobarrier",
    "delalloc",
    "nodelalloc",
    "auto_da_alloc",
    "noauto_da_alloc",
    "dioread_nolock",
    "dioread_lock",
    "journal_checksum",
    "nojournal_checksum",
    "journal_async_commit",
    "acl",
    "noacl",
    "user_xattr",
    "nouser_xattr",
}
_KEEP_KEYS = ("commit=", "data=", "inode_readahead_blks=", "max_batch_time=", "min_batch_time=")


class FreshFsError(Exception):
    """The fresh file system could not be made or mounted; the message says which step."""


def image_size(tree_info: dict[str, Any]) -> int:
    """Bytes of the image for a tree source survey (treecopy.survey): room for 4 copies.

    Each entry counted as at least one 4 KiB block (small files), plus 256 MiB; and at least
    4 inodes per entry at ext4's one inode per 16 KiB. Rounded up to MiB.
    """
    entries = tree_info["files"] + tree_info["dirs"] + tree_info["symlinks"] + tree_info["other"]
    by_bytes = 4 * (tree_info["bytes"] + 4096 * entries) + 256 * MIB
    by_inodes = 4 * entries * 16384
    size = max(by_bytes, by_inodes)
    return int(-(-size // MIB) * MIB)


def journal_mib(size_bytes: int) -> int:
    """Journal size: a quarter of the file system, at least 16 MiB, at most 1 GiB."""
    return max(16, min(1024, size_bytes // MIB // 4))


def mkfs_argv(image: Path, size_bytes: int) -> list[str]:
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-T",
        "default",
        "-J",
        f"size={journal_mib(size_bytes)}",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        str(image),
    ]


def mount_options(host_opts: str) -> str:
    """The options of the host's ext4 (``findmnt -no OPTIONS``) that the fresh ext4 copies."""
    keep = [
        o
        for o in host_opts.split(",")
        if o in _KEEP_OPTS or any(o.startswith(k) for k in _KEEP_KEYS)
    ]
    return ",".join(keep)


def _run(argv: list[str], timeout_s: float = 120.0) -> str:
    """Run a tool; return stdout. Raises FreshFsError with its stderr."""
    try:
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FreshFsError(f"{argv[0]}: {exc}") from None
    if r.returncode != 0:
        raise FreshFsError(
            f"{' '.join(argv)} exited with {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}"
        )
    return r.stdout


def host_options(path: Path) -> str:
    """Mount options of the file system holding ``path`` ("" if unknown)."""
    try:
        return _run(["findmnt", "-no", "OPTIONS", "-T", str(path)], 10).strip()
    except FreshFsError:
        return ""


def _mounted(target: Path) -> bool:
    # /proc/self/mountinfo, not os.path.ismount: never stat a mount point
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(target) for line in f)


def _loop_devices_of(image: Path) -> list[str]:
    """Loop devices attached to ``image`` (``losetup -j``)."""
    try:
        out = _run(["losetup", "-j", str(image)], 10)
    except FreshFsError:
        return []
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


class FreshExt4:
    """One fresh ext4: ``image`` (a file on the host disk) mounted on ``mountpoint``."""

    def __init__(self, image: Path, mountpoint: Path, size_bytes: int) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size_bytes = size_bytes
        self.device: str | None = None
        self.mounted = False  # we (may) have mounted it: only then does remove unmount

    def make(self) -> None:
        """Make and mount it (``mountpoint`` must exist, and is left empty: root's
        lost+found is removed). Raises FreshFsError, with everything made undone."""
        try:
            self._make()
        except BaseException:
            self.remove()
            raise

    def _make(self) -> None:
        if _mounted(self.mountpoint):
            raise FreshFsError(f"{self.mountpoint} is already a mount point")
        opts = mount_options(host_options(self.image.parent))
        try:
            fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            raise FreshFsError(f"image {self.image}: {exc}") from None
        _run(mkfs_argv(self.image, self.size_bytes), 300)
        self.device = _run(["losetup", "--find", "--show", "--direct-io=on", str(self.image)])
        self.device = self.device.strip()
        self.mounted = True
        _run(
            [
                "mount",
                "-t",
                "ext4",
                *(["-o", opts] if opts else []),
                self.device,
                str(self.mountpoint),
            ]
        )
        # busy (mounted): the kernel only sets autoclear, the device goes with the unmount
        _run(["losetup", "-d", self.device])
        with contextlib.suppress(OSError):
            (self.mountpoint / "lost+found").rmdir()

    def remove(self) -> list[str]:
        """Unmount, detach, delete the image; returns what went wrong (never raises)."""
        problems: list[str] = []
        if self.mounted and _mounted(self.mountpoint):
            try:
                _run(["umount", str(self.mountpoint)], 60)
            except FreshFsError as exc:
                problems.append(f"{exc}; detaching lazily")
                try:
                    _run(["umount", "-l", str(self.mountpoint)], 60)
                except FreshFsError as exc2:
                    problems.append(str(exc2))
        # normally none left: autoclear detached the device with the unmount (the kernel may
        # do that asynchronously, hence the retries)
        for _ in range(20):
            devices = _loop_devices_of(self.image)
            if not devices or not self.image.exists():
                break
            for dev in devices:
                with contextlib.suppress(FreshFsError):
                    _run(["losetup", "-d", dev], 30)
            time.sleep(0.1)
        else:
            problems.append(f"loop device(s) {', '.join(devices)} still attached to {self.image}")
        self.device = None
        self.mounted = False
        try:
            self.image.unlink(missing_ok=True)
        except OSError as exc:
            problems.append(f"image {self.image}: {exc}")
        return problems
