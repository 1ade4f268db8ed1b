"""Everything survives unmount + fsck + remount (SPEC 1), and damaged metadata is detected by
fsck and refused by mount with one line (SPEC 1, 10)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from diofs import mountinfo
from harness import watchdog
from harness.io import pattern
from harness.mount import REPO, Mount, MountFactory, cli, run_argv, run_cli

MiB = 1 << 20


def build_tree(root: str) -> None:
    """A small tree with every kind of object and attribute the namespace has."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    os.makedirs(j("a", "b", "c"))
    os.mkdir(j("empty"))
    os.mkdir(j("modes"), 0o700)
    sizes = [0, 1, 511, 4095, 4096, 4097, 65536, MiB + 3, 3 * MiB]
    for i, size in enumerate(sizes):
        with open(j("a", f"f{size}"), "wb") as f:
            f.write(pattern(size, i))
    with open(j("a", "b", "c", "deep"), "wb") as f:
        f.write(b"deep file")
    # sparse file with data at both ends and a hole in the middle
    fd = os.open(j("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"start", 0)
    os.pwrite(fd, b"end", 20 * MiB)
    os.close(fd)
    # file truncated up (zeros after old EOF) and down
    with open(j("trunc_up"), "wb") as f:
        f.write(b"abc")
    os.truncate(j("trunc_up"), 100_000)
    with open(j("trunc_down"), "wb") as f:
        f.write(pattern(100_000, 7))
    os.truncate(j("trunc_down"), 1234)
    # links
    os.link(j("a", "f4096"), j("hard1"))
    os.link(j("a", "f4096"), j("a", "b", "hard2"))
    os.symlink("a/b/c/deep", j("sym"))
    os.symlink("/nonexistent/dangling", j("dangling"))
    os.symlink("x" * 900, j("longsym"))
    # modes, owners, times
    for name, mode in (("m600", 0o600), ("m755", 0o755), ("m4711", 0o4711)):
        with open(j("modes", name), "wb") as f:
            f.write(name.encode())
        os.chmod(j("modes", name), mode)
    if os.geteuid() == 0:
        os.chown(j("modes", "m600"), 4321, 8765)
    with open(j("times"), "wb") as f:
        f.write(b"times")
    os.utime(j("times"), ns=(1_234_567_890_123_456_789, 1_111_111_111_222_222_222))
    os.utime(j("a", "b"), ns=(1_300_000_000_000_000_001, 1_300_000_000_000_000_002))
    os.utime(
        j("sym"), ns=(1_400_000_000_000_000_003, 1_400_000_000_000_000_004), follow_symlinks=False
    )
    # a renamed and an unlinked file
    with open(j("before_rename"), "wb") as f:
        f.write(b"renamed")
    os.rename(j("before_rename"), j("a", "after_rename"))
    with open(j("deleted"), "wb") as f:
        f.write(b"gone")
    os.unlink(j("deleted"))
    # 300 entries in one directory
    os.mkdir(j("many"))
    for i in range(300):
        with open(j("many", f"e{i:03d}"), "wb") as f:
            f.write(str(i).encode())


def snapshot(root: str, read_atime_of: set[str] = frozenset({"times"})) -> dict[str, tuple]:
    """Path -> (kind, mode, uid, gid, size, mtime_ns, [atime_ns], link group, content/target).

    Contents are read first and stats taken afterwards, so that atime updates by the reads
    themselves do not differ between two snapshots. atime is compared only for the paths in
    `read_atime_of` (files never read), and hard links by group, not by inode number.
    """
    contents: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                contents[rel] = os.readlink(p)
            elif rel not in read_atime_of:
                with open(p, "rb") as f:
                    contents[rel] = f.read()
    result: dict[str, tuple] = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            group = groups.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            atime = st.st_atime_ns if rel in read_atime_of else None
            kind = stat.S_IFMT(st.st_mode)
            result[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                st.st_mtime_ns,
                atime,
                st.st_nlink,
                group,
                contents.get(rel),
            )
    return result


FIELDS = (
    "kind",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime_ns",
    "atime_ns",
    "nlink",
    "link_group",
    "content",
)


def describe_diff(path: str, before: tuple, after: tuple) -> str:
    parts = []
    for name, b, a in zip(FIELDS, before, after, strict=True):
        if a != b:
            if name == "content":
                b, a = f"<{len(b)} bytes>", f"<{len(a)} bytes>"
            parts.append(f"{name}: {b} -> {a}")
    return f"{path}: " + ", ".join(parts)


def test_tree_survives_unmount_fsck_remount(mounted: Mount) -> None:
    build_tree(mounted.path())
    before = snapshot(mounted.path())
    statfs_before = os.statvfs(mounted.mnt)
    mounted.unmount()
    mounted.fsck()
    mounted.start()
    after = snapshot(mounted.path())
    assert sorted(after) == sorted(before)
    diffs = [
        describe_diff(path, before[path], after[path])
        for path in sorted(before)
        if after[path] != before[path]
    ]
    assert not diffs, f"{len(diffs)} paths differ after remount:\n" + "\n".join(diffs[:20])
    statfs_after = os.statvfs(mounted.mnt)
    assert statfs_after.f_bfree == statfs_before.f_bfree


def test_sparse_file_stays_sparse_after_remount(mounted: Mount) -> None:
    fd = os.open(mounted.path("s"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x", 30 * MiB)
    os.close(fd)
    mounted.remount()
    st = os.stat(mounted.path("s"))
    assert st.st_size == 30 * MiB + 1
    assert st.st_blocks * 512 <= 256 * 1024
    with open(mounted.path("s"), "rb") as f:
        f.seek(29 * MiB)
        assert f.read() == bytes(MiB) + b"x"


def test_explicit_mtime_survives_unmount(mounted: Mount) -> None:
    """utime() after a buffered write: the later writeback must not overwrite the mtime."""
    with open(mounted.path("f"), "wb") as f:
        f.write(b"data" * 1000)
    os.utime(mounted.path("f"), ns=(1_000_000_000_000_000_001, 1_111_111_111_222_222_222))
    mounted.remount()
    st = os.stat(mounted.path("f"))
    assert st.st_mtime_ns == 1_111_111_111_222_222_222
    assert st.st_atime_ns == 1_000_000_000_000_000_001


def test_write_time_mtime_survives_unmount(mounted: Mount) -> None:
    """mtime is the time of the write(), not of the writeback at unmount."""
    with open(mounted.path("f"), "wb") as f:
        f.write(b"data" * 1000)
    mtime = os.stat(mounted.path("f")).st_mtime_ns
    time.sleep(0.05)  # so that a writeback-time mtime would differ measurably
    mounted.remount()
    assert os.stat(mounted.path("f")).st_mtime_ns == mtime


def test_remount_twice_and_modify_in_between(mounted: Mount) -> None:
    with open(mounted.path("f"), "wb") as f:
        f.write(b"1" * 10000)
    mounted.remount()
    with open(mounted.path("f"), "r+b") as f:
        f.seek(5000)
        f.write(b"2" * 10)
    os.mkdir(mounted.path("d"))
    mounted.remount()
    with open(mounted.path("f"), "rb") as f:
        assert f.read() == b"1" * 5000 + b"2" * 10 + b"1" * 4990
    assert os.path.isdir(mounted.path("d"))


def test_open_unlinked_file_is_gone_after_remount(mounted: Mount) -> None:
    with open(mounted.path("f"), "wb") as f:
        f.write(b"x" * MiB)
        f.flush()
        os.fsync(f.fileno())
    free = os.statvfs(mounted.mnt).f_bfree
    fd = os.open(mounted.path("f"), os.O_RDONLY)
    os.unlink(mounted.path("f"))
    os.close(fd)
    mounted.remount()
    assert os.listdir(mounted.mnt) == []
    assert os.statvfs(mounted.mnt).f_bfree >= free + (MiB // os.statvfs(mounted.mnt).f_frsize)


# --------------------------------------------------------------------------- corruption


def _populated_image(mount_factory: MountFactory) -> tuple[Mount, bytes]:
    """An unmounted image with a tree whose data blocks are all 0xDA (to tell them apart)."""
    m = mount_factory()
    data = b"\xda" * (256 * 1024)
    for i in range(8):
        os.makedirs(m.path(f"d{i}", "sub"))
        with open(m.path(f"d{i}", "sub", "f"), "wb") as f:
            f.write(data)
        os.symlink(f"d{i}", m.path(f"l{i}"))
    m.unmount()
    m.fsck()
    return m, data


def _assert_refused(m: Mount) -> None:
    """fsck exits non-zero with a message; mount.diofs fails with one line, no traceback."""
    m.expect_dirty()
    fsck = run_cli("fsck.diofs", m.image, timeout=60)
    assert fsck.returncode != 0, f"fsck found the corrupted image clean:\n{fsck.stdout}"
    out = fsck.stdout + fsck.stderr
    assert out.strip(), "fsck exited non-zero without saying why"
    assert "Traceback" not in out, out
    for argv in (
        [*cli("mount.diofs"), str(m.image), str(m.mnt)],
        [sys.executable, str(REPO / "mount.py"), str(m.image), str(m.mnt), "--foreground"],
    ):
        try:
            proc = run_argv(argv, 30)
        finally:
            if mountinfo.is_mounted(m.mnt):
                watchdog.lazy_unmount(m.mnt)
                pytest.fail(f"{argv} mounted a corrupted image")
        assert proc.returncode != 0, f"{argv} accepted a corrupted image"
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
        assert lines[0].startswith(("mount.diofs: ", "mount.py: ")), lines[0]


def _xor_bytes(path: Path, offsets: list[int]) -> None:
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def test_zeroed_first_mib_is_refused(mount_factory: MountFactory) -> None:
    m, _ = _populated_image(mount_factory)
    with open(m.image, "r+b") as f:
        f.write(bytes(MiB))
    _assert_refused(m)


def test_bytes_flipped_across_first_mib_are_refused(mount_factory: MountFactory) -> None:
    m, _ = _populated_image(mount_factory)
    _xor_bytes(m.image, list(range(9, MiB, 509)))
    _assert_refused(m)


def test_flipped_byte_in_every_metadata_block_is_refused(mount_factory: MountFactory) -> None:
    """Without knowing the layout: flip one byte in every non-zero block that is not file data
    (both shadow copies of the metadata, the superblock and the commit slots)."""
    m, data = _populated_image(mount_factory)
    bs = 4096
    offsets = []
    with open(m.image, "rb") as f:
        block_no = 0
        while block := f.read(bs):
            if block.count(0) != len(block) and block != data[: len(block)]:
                nonzero = next(i for i, b in enumerate(block) if b)
                offsets.append(block_no * bs + nonzero)
            block_no += 1
    assert offsets, "no metadata blocks found"
    _xor_bytes(m.image, offsets)
    _assert_refused(m)


def test_flipped_byte_in_file_data_is_not_metadata_damage(mount_factory: MountFactory) -> None:
    """Control for the test above: damage to file data only leaves fsck clean."""
    m, data = _populated_image(mount_factory)
    with open(m.image, "rb") as f:
        raw = f.read()
    off = raw.find(data[:4096])
    assert off >= 0
    _xor_bytes(m.image, [off + 100])
    m.fsck()
